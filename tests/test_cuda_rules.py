"""The cuda_check decisions, fed injected values (no GPU, no torch needed)."""

from __future__ import annotations

import json
import math

import pytest

from tasks import config, cuda_rules
from tasks.cuda_rules import FAIL, PASS, SKIP, WARN, Check, judge_arch, judge_count, judge_error

CU124_ARCHES = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CU128_ARCHES = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
MIN_CUDA = config.load_cuda_check()["min_cuda_for_arch"]


# --------------------------------------------------------------------------- arch (check d)


def test_sm120_fails_against_cu124_with_the_fix_named():
    v = judge_arch((12, 0), CU124_ARCHES, "NVIDIA GeForce RTX 5090", MIN_CUDA)
    assert v.status == FAIL
    assert v.reason.startswith(
        "this PyTorch build has no kernels for sm_120 (NVIDIA GeForce RTX 5090); "
        "use a channel built for it (cu128 or later for sm_120)"
    )


def test_sm120_passes_against_cu128():
    v = judge_arch((12, 0), CU128_ARCHES, "NVIDIA GeForce RTX 5090", MIN_CUDA)
    assert v.status == PASS and v.data["runs_with"] == "sm_120"


def test_same_major_lower_minor_binary_runs():
    v = judge_arch((8, 9), ["sm_80", "sm_86"], "NVIDIA L4", MIN_CUDA)
    assert v.status == PASS and v.data["runs_with"] == "sm_86"


def test_higher_minor_binary_does_not_run_on_lower_device():
    v = judge_arch((8, 6), ["sm_89", "sm_90"], "NVIDIA RTX A6000", MIN_CUDA)
    assert v.status == FAIL and "no kernels for sm_86" in v.reason and "cu111 or later" in v.reason


def test_ptx_is_jit_compiled_for_newer_devices():
    v = judge_arch((10, 0), ["sm_80", "sm_90", "compute_90"], "NVIDIA B200", MIN_CUDA)
    assert v.status == PASS and v.data["runs_with"] == "compute_90" and "JIT" in v.reason
    assert judge_arch((8, 0), ["compute_90"], "NVIDIA A100", MIN_CUDA).status == FAIL  # PTX never runs backwards


def test_arch_specific_code_runs_only_on_that_capability():
    assert judge_arch((9, 0), ["sm_90a"], "NVIDIA H100 80GB HBM3", MIN_CUDA).status == PASS
    assert judge_arch((10, 0), ["sm_90a", "compute_90a"], "NVIDIA B200", MIN_CUDA).status == FAIL
    assert judge_arch((10, 3), ["sm_100f"], "NVIDIA B300", MIN_CUDA).status == PASS  # family: same major


def test_binary_of_another_major_does_not_run():
    v = judge_arch((10, 0), CU124_ARCHES, "NVIDIA B200", MIN_CUDA)
    assert v.status == FAIL and "cu128 or later for sm_100" in v.reason


def test_empty_arch_list_and_seam_source_are_named():
    assert judge_arch((9, 0), [], "NVIDIA H100 80GB HBM3").status == FAIL
    v = judge_arch(
        (9, 0),
        ["sm_80", "sm_86"],
        "NVIDIA H100 80GB HBM3",
        MIN_CUDA,
        source="M40_TEST_ARCH_LIST (test seam)",
        torch_warnings=["H100 is not compatible"],
    )
    assert v.status == FAIL and "M40_TEST_ARCH_LIST" in v.reason and "torch warned: H100" in v.reason


def test_family_specific_code_runs_only_within_its_family_and_arch_specific_only_on_its_capability():
    covers = cuda_rules.arch_list_covers
    assert covers(["compute_100f"], (10, 3)) and not covers(["compute_100f"], (12, 0))  # PTX 'f': the 10.x family
    assert covers(["sm_100f"], (10, 3)) and not covers(["sm_100f"], (11, 0))
    assert covers(["sm_90a"], (9, 0)) and not covers(["compute_90a"], (10, 0))  # 'a': that capability only
    assert covers(["compute_90"], (12, 0)) and not covers(["compute_90"], (8, 9))  # plain PTX: any newer device
    assert covers(["sm_80"], [8, 6]) and not covers(["sm_86"], (8, 0)) and not covers(["gfx90a", ""], (9, 0))


def test_parse_arch():
    assert cuda_rules.parse_arch("sm_120") == cuda_rules.Arch("sm", 12, 0)
    assert cuda_rules.parse_arch("compute_90a") == cuda_rules.Arch("compute", 9, 0, "a")
    assert cuda_rules.parse_arch("gfx90a") is None


# --------------------------------------------------------------------------- tolerances (check e)


def test_error_within_tolerance_passes():
    assert judge_error(3e-4, 1e-3).status == PASS


def test_error_over_tolerance_fails():
    v = judge_error(2e-3, 1e-3)
    assert v.status == FAIL and "exceeds the tolerance" in v.reason


@pytest.mark.parametrize("err", [math.nan, math.inf])
def test_nonfinite_error_never_passes(err):
    assert judge_error(err, 1.0 - 1e-9).status == FAIL


def test_nan_outputs_never_pass_even_with_small_error():
    v = judge_error(1e-9, 1e-2, nonfinite=3)
    assert v.status == FAIL and "3 NaN/inf" in v.reason


def test_sdpa_names_the_backend_and_fails_on_any_wrong_backend():
    ok = cuda_rules.judge_sdpa(
        "flash",
        (2e-3, 0),
        {"flash": (2e-3, 0), "efficient": (2e-3, 0), "cudnn": "n/a: not supported", "math": (1e-3, 0)},
        1e-2,
    )
    assert ok.status == PASS and ok.value.startswith("default flash:") and "cudnn n/a" in ok.value
    wrong = cuda_rules.judge_sdpa("flash", (2e-3, 0), {"efficient": (5e-2, 0)}, 1e-2)
    assert wrong.status == FAIL and "backend efficient" in wrong.reason
    nan = cuda_rules.judge_sdpa("flash", (math.nan, 10), {}, 1e-2)
    assert nan.status == FAIL and "default backend (flash)" in nan.reason
    raised = cuda_rules.judge_sdpa("flash", (2e-3, 0), {"cudnn": "error: RuntimeError: cuDNN Frontend error"}, 1e-2)
    assert raised.status == PASS and "cudnn raised" in raised.reason
    assert cuda_rules.sdpa_backend_label("EFFICIENT_ATTENTION") == "efficient"


def test_memory_mismatch_fails():
    assert cuda_rules.judge_memory(0, 100, 40.0, 79.0, 80.0).status == PASS
    assert cuda_rules.judge_memory(2, 100, 40.0, 79.0, 80.0).status == FAIL
    assert cuda_rules.judge_memory(0, 100, 40.0, 79.0, 80.0, error="OutOfMemoryError: x").status == FAIL


# --------------------------------------------------------------------------- device count (check c)


def test_count_equal_passes():
    assert judge_count(2, 2, None).status == PASS


def test_empty_visible_devices_fails_with_the_explanation():
    v = judge_count(1, 0, "")
    assert v.status == FAIL
    assert "CUDA_VISIBLE_DEVICES is set but empty, which hides every GPU; unset it" in v.reason


def test_visible_devices_naming_missing_gpu():
    v = judge_count(1, 0, "1")
    assert v.status == FAIL and "names '1'" in v.reason and "indexes 0..0" in v.reason
    partial = judge_count(2, 1, "0,3")
    assert partial.status == PASS and "names '3'" in partial.reason and "ignores it" in partial.reason


def test_visible_devices_selecting_a_subset_passes_with_a_note():
    v = judge_count(4, 2, "2,3")
    assert v.status == PASS and "as CUDA_VISIBLE_DEVICES selects" in v.reason


def test_visible_devices_parsing_like_cuda():
    uuids = ("GPU-aaaa1111", "GPU-bbbb2222")
    assert cuda_rules.visible_devices(None, 2, uuids) is None
    assert cuda_rules.visible_devices("1,0", 2, uuids) == ["GPU-bbbb2222", "GPU-aaaa1111"]
    assert cuda_rules.visible_devices("0,0,1", 2, uuids) == ["GPU-aaaa1111"]  # a repeat stops the list
    assert cuda_rules.visible_devices("GPU-bbbb", 2, uuids) == ["GPU-bbbb2222"]  # a UUID prefix
    assert cuda_rules.visible_devices("0,x,1", 2, uuids) == ["GPU-aaaa1111"]
    assert cuda_rules.visible_devices("MIG-1234", 2, uuids, mig_enabled=True) == ["MIG-1234"]


def test_mig_explains_the_mismatch():
    v = judge_count(2, 1, None, mig_gpus=(1,))
    assert v.status == PASS and "MIG is enabled on GPU 1" in v.reason
    assert judge_count(1, 0, None, mig_gpus=(0,)).status == FAIL


def test_missing_gpus_without_a_reason_fail():
    v = judge_count(8, 7, None)
    assert v.status == FAIL and "torch sees 7 of the 8" in v.reason and "Xid" in v.reason
    assert judge_count(2, 0, None).status == FAIL


def test_no_gpu_at_all_is_a_skip():
    assert judge_count(None, 0, None, nvml_error="NVML Shared Library Not Found").status == SKIP
    assert judge_count(0, 0, None).status == SKIP
    assert judge_count(None, 0, "").status == FAIL  # no NVML, but the empty variable explains it
    assert judge_count(None, 2, None, nvml_error="x").status == PASS


# --------------------------------------------------------------------------- build and driver (a, b)


def test_build_cpu_and_rocm_fail_cuda_passes():
    assert judge_build_status("2.13.0+cpu", None) == FAIL
    assert cuda_rules.judge_build("2.6.0+rocm6.2", None, hip="6.2").status == FAIL
    assert judge_build_status("2.11.0+cu130", "13.0") == PASS


def judge_build_status(torch_version, cuda):
    return cuda_rules.judge_build(torch_version, cuda, None, "9.13.0", "2.27.7").status


def test_driver_older_than_build_fails_naming_both():
    v = cuda_rules.judge_driver("11.8", "12.8", "cudaDriverGetVersion")
    assert v.status == FAIL and "CUDA 11.8" in v.reason and "CUDA 12.8" in v.reason
    assert cuda_rules.judge_driver("13.0", "12.8", "cudaDriverGetVersion").status == PASS
    assert cuda_rules.judge_driver("12.8", "12.8", "cudaDriverGetVersion").status == PASS
    assert cuda_rules.judge_driver(None, "12.8", "cudaDriverGetVersion").status == SKIP
    assert cuda_rules.judge_driver("13.0", None, "x").status == SKIP


def test_a_newer_minor_build_on_the_same_major_driver_warns_and_a_newer_major_fails():
    minor = cuda_rules.judge_driver("12.8", "12.9", "cudaDriverGetVersion")
    assert minor.status == WARN
    assert "minor-version compatibility" in minor.reason and "kernel checks decide" in minor.reason
    major = cuda_rules.judge_driver("12.8", "13.0", "cudaDriverGetVersion")
    assert major.status == FAIL and "CUDA 12.8" in major.reason and "CUDA 13.0" in major.reason
    assert cuda_rules.exit_code([Check.of("driver", None, minor), _check(PASS)]) == cuda_rules.EXIT_OK


def test_version_helpers():
    assert cuda_rules.cuda_version_from_int(13000) == "13.0"
    assert cuda_rules.cuda_version_from_int(12080) == "12.8"
    assert cuda_rules.cuda_version_from_int(0) is None
    assert cuda_rules.cudnn_version_text(91002) == "9.10.2"
    assert cuda_rules.cudnn_version_text(8902) == "8.9.2"
    assert config.major_minor("12.8.61") == (12, 8) and config.major_minor("13") == (13, 0)
    assert config.major_minor("12.x") is None and config.major_minor(None) is None
    assert config.parse_version("12.8.61") == (12, 8, 61)
    with pytest.raises(ValueError):
        config.parse_version("12.8 beta")


# --------------------------------------------------------------------------- datasheet and speed (g)


@pytest.mark.parametrize(
    "name, model",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA GH200 144G HBM3e", "GH200 144GB"),
        ("NVIDIA H20", "H20"),
        ("NVIDIA H800", "H800 SXM"),
        ("NVIDIA H800 PCIe", "H800 PCIe"),
        ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100 PCIe 40GB"),
        ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A40", "A40"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-32GB", "V100"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA B300 SXM6 AC", "B300"),
        ("NVIDIA GB200", "GB200"),
        ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada"),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "RTX PRO 6000 Blackwell"),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "RTX PRO 6000 Blackwell"),
        ("NVIDIA GeForce RTX 3090", "RTX 3090"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA GeForce RTX 5090", "RTX 5090"),
    ],
)
def test_datasheet_lookup_picks_the_most_specific_entry_for_the_device_name(name, model):
    assert config.gpu_spec_for(name).model == model


@pytest.mark.parametrize(
    "name",
    [
        "Tesla M40 24GB",
        "NVIDIA GeForce RTX 4090 Laptop GPU",
        "NVIDIA GeForce RTX 5090 Laptop GPU",
        "NVIDIA GeForce RTX 3090 Ti",
        "NVIDIA GeForce RTX 4090 D",
        "Quadro RTX 6000",
        "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition",
    ],
)
def test_a_gpu_whose_figures_differ_from_a_listed_name_has_no_datasheet(name):
    assert config.gpu_spec_for(name) is None


def test_every_datasheet_entry_holds_the_figures_and_no_two_entries_the_same_words(tmp_path):
    specs = config.load_gpus()
    assert len(specs) >= 30 and all(s.memory_gb > 0 and s.mem_bw_tbs for s in specs)
    assert {s.model for s in specs if s.bf16_tflops is None} == {"T4", "V100", "A10G"}
    bad = tmp_path / "gpus.yaml"
    bad.write_text(
        "gpus:\n  - {model: a, match: [h100], bf16_tflops: 1, mem_bw_tbs: 1, memory_gb: 1}\n"
        "  - {model: b, match: [H100], bf16_tflops: 2, mem_bw_tbs: 1, memory_gb: 1}\n"
    )
    with pytest.raises(config.ConfigError, match=r"gpus\[1\]\.match: same words as 'a'"):
        config.load_gpus(bad)


def test_speed_below_share_fails_naming_causes():
    v = cuda_rules.judge_speed(
        "bf16 matmul",
        300.0,
        "TFLOP/s",
        989.0,
        0.5,
        "H100 SXM",
        "NVIDIA H100 80GB HBM3",
        ["clocks under load limited by hw_power_brake_slowdown"],
    )
    assert v.status == FAIL and "30% of H100 SXM" in v.value and "hw_power_brake_slowdown" in v.reason
    assert "throttling" in v.reason and "power" in v.reason


def test_speed_above_share_passes():
    assert cuda_rules.judge_speed("copy", 3.0, "TB/s", 3.35, 0.5, "H100 SXM", "x").status == PASS
    assert cuda_rules.judge_speed("copy", math.nan, "TB/s", 3.35, 0.5, "H100 SXM", "x").status == FAIL


def test_a_gpu_missing_from_the_datasheet_skips_speed_naming_the_figure_and_where_to_add_it():
    v = cuda_rules.judge_speed("copy", 1.0, "TB/s", None, 0.5, None, "Mystery GPU")
    assert v.status == SKIP and v.data["share"] is None and v.value == "1.00 TB/s"
    assert "'Mystery GPU' is not in configs/gpus.yaml" in v.reason and "mem_bw_tbs" in v.reason
    t4 = cuda_rules.judge_speed("bf16 matmul", 20.0, "TFLOP/s", None, 0.5, "T4", "Tesla T4")
    assert t4.status == SKIP and "configs/gpus.yaml gives no bf16_tflops for T4" in t4.reason
    checks = [Check("speed.copy", 0, PASS, "3 TB/s"), Check.of("speed.matmul_bf16", 0, t4), _check(PASS)]
    assert cuda_rules.exit_code(checks) == cuda_rules.EXIT_OK
    assert cuda_rules.stage_reason(checks) == f"gpu0 speed.matmul_bf16 SKIP: {t4.reason}"


# --------------------------------------------------------------------------- health (j) and multi-GPU (i)


def test_clock_event_reasons_decode_to_names_and_keep_unknown_bits():
    assert cuda_rules.clock_event_names(0) == []
    assert cuda_rules.clock_event_names(0x1 | 0x40) == ["gpu_idle", "hw_thermal_slowdown"]
    assert cuda_rules.clock_event_names(0x1000) == ["unknown_0x1000"]


def test_clock_event_faults_are_hardware_slowdown_thermal_and_power_brake_and_nothing_else():
    faults = [n for bit in range(9) for n in cuda_rules.decode_throttle(1 << bit)[0]]
    assert faults == ["hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"]


def test_throttle_reasons():
    assert cuda_rules.decode_throttle(0x1 | 0x4) == ([], ["gpu_idle", "sw_power_cap"])
    assert cuda_rules.judge_throttle({"before": 0x1, "under load": 0x4, "after": 0x1}).status == PASS
    v = cuda_rules.judge_throttle({"before": 0x1, "under load": 0x40 | 0x4, "after": 0x0})
    assert v.status == FAIL and "hw_thermal_slowdown (under load)" in v.reason
    assert cuda_rules.judge_throttle({"before": 0x80}).status == FAIL
    assert cuda_rules.judge_throttle({"before": None, "after": None}).status == SKIP


def test_ecc_growth_pages_and_xid():
    assert cuda_rules.judge_ecc(0, 0).status == PASS
    assert cuda_rules.judge_ecc(1, 3).status == FAIL
    assert cuda_rules.judge_ecc(None, None).status == SKIP
    assert cuda_rules.judge_pages(False, (0, 0, False, False)).status == PASS
    assert cuda_rules.judge_pages(None, (0, 1, True, False)).status == FAIL
    assert cuda_rules.judge_pages(True, None).status == FAIL
    assert cuda_rules.judge_pages(None, None).status == SKIP
    v = cuda_rules.judge_xid([79])
    assert v.status == FAIL and "fallen off the bus" in v.reason
    assert cuda_rules.judge_xid([]).status == PASS
    assert cuda_rules.judge_xid(None, "Not Supported").status == SKIP


@pytest.mark.parametrize("xid", [13, 31, 43, 45])
def test_an_application_xid_warns_and_does_not_fail(xid):
    v = cuda_rules.judge_xid([xid])
    assert v.status == WARN and f"Xid {xid} (" in v.reason and "application" in v.reason


@pytest.mark.parametrize("xid", [48, 63, 64, 74, 79, 92, 94, 95, 119, 120])
def test_a_hardware_or_driver_xid_fails(xid):
    v = cuda_rules.judge_xid([13, xid])
    assert v.status == FAIL and f"Xid {xid} (" in v.reason and "Xid 13" in v.reason


def test_an_unclassified_xid_warns_naming_it_as_unclassified():
    v = cuda_rules.judge_xid([999])
    assert v.status == WARN and "Xid 999 (not in configs/nvml.yaml" in v.reason


def test_warnings_are_named_in_the_reason_of_a_passing_stage():
    checks = [Check.of("driver", None, cuda_rules.judge_driver("12.8", "12.9", "x")), _check(PASS)]
    assert cuda_rules.counts(checks)[WARN] == 1
    assert cuda_rules.stage_reason(checks).startswith("1 check(s) WARN: driver: the driver supports CUDA 12.8")
    assert cuda_rules.format_line(checks[0]).startswith("WARN  -     driver")


def test_allreduce_verdicts():
    ok = [{"rank": r, "wrong": 0, "checked": 4, "seconds": 0.002, "bytes": 256 << 20} for r in range(2)]
    v = cuda_rules.judge_allreduce(2, ok, [], 120)
    assert v.status == PASS and "bus bandwidth" in v.value and v.data["busbw_gbs"] > 0
    bad = [dict(ok[0]), dict(ok[1], wrong=5)]
    assert cuda_rules.judge_allreduce(2, bad, [], 120).status == FAIL
    assert cuda_rules.judge_allreduce(2, [ok[0], {"rank": 1}], [1], 120).status == FAIL
    err = cuda_rules.judge_allreduce(2, [ok[0], {"rank": 1, "error": "NCCL error"}], [], 120)
    assert err.status == FAIL and "rank 1: NCCL error" in err.reason


# --------------------------------------------------------------------------- summary


def _check(status, gpu=0, name="x", reason="r"):
    return Check(name, gpu, status, "", reason)


def test_exit_code_and_stage_reason():
    assert cuda_rules.exit_code([_check(PASS), _check(SKIP, None)]) == cuda_rules.EXIT_OK
    checks = [_check(PASS), _check(FAIL, 0, "arch", "no kernels"), _check(FAIL, 1, "memory")]
    assert cuda_rules.exit_code(checks) == cuda_rules.EXIT_FAIL
    assert (
        cuda_rules.stage_reason(checks) == "2 check(s) FAIL: gpu0 arch: no kernels (+1 more FAIL, see cuda_check.txt)"
    )
    no_gpu = [Check("device_count", None, SKIP, "", "no NVIDIA GPU here"), _check(SKIP, None, "arch")]
    assert cuda_rules.exit_code(no_gpu) == cuda_rules.EXIT_NO_GPU
    assert cuda_rules.stage_reason(no_gpu) == "no CUDA device visible to torch: no NVIDIA GPU here"


def test_report_line():
    line = cuda_rules.format_line(Check("matmul.bf16", 0, PASS, "rel err 3.1e-03 (tol 1e-02)", "", 0.123))
    assert line == "PASS  gpu0  matmul.bf16            0.12 s  rel err 3.1e-03 (tol 1e-02)"
    assert cuda_rules.format_line(Check("compile", 1, SKIP, "", "no Triton")).endswith("0.00 s  no Triton")


# --------------------------------------------------------------------------- the settings file


def test_a_config_file_that_is_not_utf8_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "cuda_check.yaml"
    bad.write_bytes(b"memory_share: 0.5 # caf\xe9\n")
    with pytest.raises(config.ConfigError, match=r"cuda_check.yaml is not UTF-8 text .*save it as UTF-8"):
        config.load_cuda_check(bad)


def test_an_empty_settings_file_is_an_empty_mapping_only_where_asked(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert config.load_yaml(empty, empty_ok=True) == {}
    with pytest.raises(config.ConfigError, match="must hold a mapping"):
        config.load_yaml(empty)


def test_nvml_tables_are_validated_on_load(tmp_path):
    tables = config.load_nvml()
    assert tables.clock_events[0x4] == ("sw_power_cap", False) and 79 in tables.xid_hardware
    text = config.layout.NVML_FILE.read_text()
    bad = tmp_path / "nvml.yaml"
    bad.write_text(text.replace("bit: 0x040", "bit: 0x041"))
    with pytest.raises(config.ConfigError, match=r"clock_events\[6\]\.bit: 65 must be a single bit"):
        config.load_nvml(bad)


def test_settings_load_and_bad_values_are_one_line_errors(tmp_path):
    s = config.load_cuda_check()
    assert s["memory_share"] == 0.5 and s["tolerances"]["matmul_tf32"] == 1e-3
    text = config.layout.CUDA_CHECK_FILE.read_text()
    bad = tmp_path / "cuda_check.yaml"
    bad.write_text(text.replace("memory_share: 0.5", "memory_share: 0.95"))
    with pytest.raises(config.ConfigError, match=r"memory_share must be a number in \(0, 0.9\]"):
        config.load_cuda_check(bad)
    bad.write_text(text.replace("matmul_tf32: 1.0e-3", "matmul_tf32: lots"))
    with pytest.raises(config.ConfigError, match="tolerances.matmul_tf32") as e:
        config.load_cuda_check(bad)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- MIG slices


def test_a_mig_slice_name_matches_its_parent_gpu_and_not_a_model_named_by_the_slice_memory():
    assert config.gpu_spec_for("NVIDIA A100-SXM4-80GB MIG 3g.40gb").model == "A100 SXM 80GB"
    assert config.gpu_spec_for("NVIDIA H100 80GB HBM3 MIG 1g.10gb").model == "H100 SXM"
    assert cuda_rules.parse_mig("NVIDIA H100 80GB HBM3 MIG 1g.10gb") == cuda_rules.MigSlice(1, 10.0)
    assert cuda_rules.parse_mig("NVIDIA H100 80GB HBM3") is None


def test_a_healthy_mig_slice_is_judged_against_its_share_of_the_gpu_not_the_whole_gpu():
    name = "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
    spec = config.gpu_spec_for(name)
    peak, model, why = cuda_rules.speed_expectation(spec, "TFLOP/s", name)
    assert why == "" and peak == pytest.approx(989 / 7) and "(1/7 of its compute)" in model
    v = cuda_rules.judge_speed("bf16 matmul", 110.0, "TFLOP/s", peak, 0.5, model, name)  # ~11% of a whole H100
    assert v.status == PASS and "78% of H100 SXM MIG 1g.10gb" in v.value
    bw, model, why = cuda_rules.speed_expectation(spec, "TB/s", name)
    assert bw == pytest.approx(3.35 * 10 / 80) and "(10/80 GB of its memory)" in model
    whole = cuda_rules.speed_expectation(spec, "TB/s", "NVIDIA H100 80GB HBM3")
    assert whole == (3.35, "H100 SXM", "")
    copy = cuda_rules.judge_speed_for("copy", 0.35, "TB/s", spec, 0.5, name)  # ~10% of a whole H100's bandwidth
    assert copy.status == PASS and "84% of H100 SXM MIG 1g.10gb (10/80 GB of its memory) datasheet" in copy.value
    assert cuda_rules.judge_speed_for("copy", 0.35, "TB/s", spec, 0.5, "NVIDIA H100 80GB HBM3").status == FAIL


def test_a_mig_slice_of_a_gpu_without_mig_data_skips_speed_saying_why():
    name = "NVIDIA RTX 6000 Ada Generation MIG 1g.12gb"  # no mig_slices for it in configs/gpus.yaml
    peak, model, why = cuda_rules.speed_expectation(config.gpu_spec_for(name), "TFLOP/s", name)
    assert peak is None and "MIG slice" in why and "mig_slices" in why
    v = cuda_rules.judge_speed("bf16 matmul", 30.0, "TFLOP/s", peak, 0.5, model, name, why_missing=why)
    assert v.status == SKIP and v.reason == why


def test_every_per_gpu_check_not_run_is_named_in_the_stage_reason_grouped_by_why():
    """A PASS whose compile or health checks did not run says so in its one line (and so in the verdict's), not
    only in a count: no triton in .venv-gpu, an NVML that cannot match the GPU."""
    nvml = "NVML cannot match this GPU (no UUID or PCI id in common)"
    checks = [
        _check(PASS),
        _check(SKIP, 0, "compile", "no triton in .venv-gpu"),
        _check(SKIP, 0, "health.ecc", nvml),
        _check(SKIP, 0, "health.xid", nvml),
        _check(SKIP, None, "allreduce", "one GPU visible: nothing to connect"),  # machine-wide: expected
    ]
    assert cuda_rules.exit_code(checks) == cuda_rules.EXIT_OK
    assert cuda_rules.stage_reason(checks) == (
        f"gpu0 compile SKIP: no triton in .venv-gpu; gpu0 health.ecc, gpu0 health.xid SKIP: {nvml}"
    )
    eight = [_check(PASS)] + [_check(SKIP, g, "health.ecc", "ECC is off") for g in range(8)]
    eight.append(_check(SKIP, 3, "compile", "no triton"))
    assert cuda_rules.stage_reason(eight) == "gpu0-7 health.ecc SKIP: ECC is off; gpu3 compile SKIP: no triton"
    assert cuda_rules.gpu_span([0, 2, 5]) == "gpu0,2,5" and cuda_rules.gpu_span([1, 2]) == "gpu1,2"


def test_a_span_of_gpus_is_found_by_arithmetic_not_by_listing_every_index_between():
    assert cuda_rules.gpu_span([3, 4, 5, 6]) == "gpu3-6" and cuda_rules.gpu_span([2, 0, 1, 1]) == "gpu0-2"
    assert cuda_rules.gpu_span([0, 1, 127]) == "gpu0,1,127"


@pytest.mark.parametrize("gpu", [10**12, 128, -1, True, "3", 1.5, None], ids=repr)
def test_a_span_of_what_is_no_gpu_index_is_a_value_error_naming_it(gpu):
    with pytest.raises(ValueError, match=r"^gpu .*, not a GPU index \(a whole number from 0 to 127\)$") as e:
        cuda_rules.gpu_span([0, 1, gpu])
    assert json.dumps(gpu) in str(e.value)
