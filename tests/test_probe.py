"""The probe stage: NVML facts (fake pynvml values), the nvidia-smi fallback (fake scripts on PATH), the gate."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import fake_gpu
import pynvml
import pytest

from tasks import config, cuda_rules, layout, probe, records, verdict


def args(**kw):
    base = {"min_driver_cuda": None, "settings": None, "probe_source": "auto", "probe_timeout": None}
    return argparse.Namespace(**{**base, **kw})


def read(run_dir, name):
    return (run_dir / name).read_text()


# --------------------------------------------------------------------------- pure parsing


def test_cuda_version_from_nvml_int():
    assert probe.cuda_version_from_int(13000) == "13.0"
    assert probe.cuda_version_from_int(12080) == "12.8"
    assert probe.cuda_version_from_int(12040) == "12.4"


def test_smi_csv_parses_values_and_not_available_fields():
    row = fake_gpu.query_row(0, ecc="[N/A]", reasons="0x0000000000000004").replace(
        ", 0, 0, Enabled", ", [N/A], [N/A], Disabled"
    )
    driver, gpus = probe.parse_smi_csv(row + "\n")
    assert driver == "580.95.05"
    (g,) = gpus
    assert (g.index, g.name, g.compute_capability, g.memory_total_mib) == (0, fake_gpu.H100, "9.0", 81559)
    assert (g.ecc_current, g.ecc_pending, g.ecc_uncorrected_volatile) == ("N/A", "N/A", None)
    assert g.persistence_mode == "disabled"
    assert g.clock_event_reasons == ["sw_power_cap"]


def test_smi_csv_rejects_garbage():
    with pytest.raises(probe.SmiParseError):
        probe.parse_smi_csv("Segmentation fault? lorem ipsum, dolor\n")


def test_smi_header_gives_driver_and_cuda():
    text = fake_gpu.header("580.95.05", "13.0")
    assert probe.parse_smi_cuda(text) == "13.0"
    assert probe.parse_smi_driver(text) == "580.95.05"
    assert probe.parse_smi_cuda("CUDA Version                              : 12.4\n") == "12.4"
    assert probe.parse_smi_cuda("nothing here") is None


# --------------------------------------------------------------------------- nvidia-smi fallback (NVML unavailable)


def test_cuda_13_driver_passes_through_nvidia_smi(monkeypatch, run_dir, smi_machine):
    fake_gpu.working_smi(smi_machine, cuda="13.0")
    out = probe.run(run_dir, args())
    assert out.status == records.StageStatus.PASS, out.reason
    assert out.figures["source"] == "nvidia-smi"
    assert out.figures["driver"] == "580.95.05"
    assert out.figures["driver_cuda"] == "13.0"
    assert out.figures["gpu_count"] == 1
    assert out.figures["gpus"] == f"1x {fake_gpu.H100}"
    raw = read(run_dir, "nvidia_smi.txt")
    assert "CUDA Version: 13.0" in raw and "NVSMI LOG" in raw
    env_info = read(run_dir, "env_info.txt")
    assert "source: nvidia-smi" in env_info
    assert "NVML not used" in env_info
    assert "PASS: driver 580.95.05 supports CUDA 13.0 >= 12.8" in env_info
    doc = json.loads(read(run_dir, layout.GPUS_JSON))
    assert doc["gpus"][0]["model"] == "H100 SXM"  # the datasheet entry from configs/gpus.yaml
    assert doc["gate"]["passed"] is True


def test_cuda_12_4_driver_fails_the_gate_with_one_line(monkeypatch, run_dir, smi_machine):
    fake_gpu.working_smi(smi_machine, cuda="12.4", driver="550.54.15")
    out = probe.run(run_dir, args())
    assert out.status == records.StageStatus.FAIL
    assert "\n" not in out.reason
    assert "found driver 550.54.15 supporting CUDA 12.4" in out.reason  # what was found
    assert "need CUDA >= 12.8" in out.reason  # what is needed
    assert "upgrade the NVIDIA driver" in out.reason  # what to do
    assert f"FAIL: {out.reason}" in read(run_dir, "env_info.txt")


def test_min_driver_cuda_option_overrides_the_config(monkeypatch, run_dir, smi_machine):
    fake_gpu.working_smi(smi_machine, cuda="12.4", driver="550.54.15")
    out = probe.run(run_dir, args(min_driver_cuda="12.4"))
    assert out.status == records.StageStatus.PASS
    assert out.figures["min_driver_cuda"] == "12.4"


def test_a_lowered_min_driver_cuda_is_an_override_and_the_default_is_not(run_dir, smi_machine):
    fake_gpu.working_smi(smi_machine, cuda="13.0")
    default = str(config.load_settings(layout.SETTINGS_FILE)["min_driver_cuda"])
    assert probe.run(run_dir, args(min_driver_cuda="11.0")).figures["overrides"] == ["min_driver_cuda=11.0"]
    assert probe.run(run_dir, args(min_driver_cuda=default)).figures["overrides"] == []
    assert probe.run(run_dir, args()).figures["overrides"] == []
    got = verdict.judge(
        {
            "probe": records.StageRecord(
                "probe", records.StageStatus.PASS, figures={"overrides": ["min_driver_cuda=11.0"]}
            )
        },
        verdict.load_rules(),
        {},
    )
    assert any(d.startswith("probe ran with min_driver_cuda=11.0: a changed check") for d in got.deviations)


def test_settings_file_gives_the_minimum(monkeypatch, tmp_path, run_dir, smi_machine):
    fake_gpu.working_smi(smi_machine, cuda="13.0")
    settings = tmp_path / "m40.yaml"
    settings.write_text('min_driver_cuda: "13.1"\nchannel_order: [cu128]\ngpu_packages: []\n')
    out = probe.run(run_dir, args(settings=settings))
    assert out.status == records.StageStatus.FAIL
    assert "need CUDA >= 13.1" in out.reason


def test_bad_settings_file_fails_but_env_info_is_written(monkeypatch, tmp_path, run_dir, smi_machine):
    settings = tmp_path / "m40.yaml"
    settings.write_text("min_driver_cuda: [oops\n")
    out = probe.run(run_dir, args(settings=settings))
    assert out.status == records.StageStatus.FAIL
    assert "not valid YAML" in out.reason
    assert "cannot decide" in read(run_dir, "env_info.txt")


def test_garbage_output_fails_with_one_line(monkeypatch, run_dir, smi_machine):
    fake_gpu.garbage_smi(smi_machine)
    out = probe.run(run_dir, args())
    assert out.status == records.StageStatus.FAIL
    assert "\n" not in out.reason
    assert "nvidia-smi output this probe cannot read" in out.reason
    assert "reinstall the NVIDIA driver" in out.reason
    assert "lorem ipsum" in read(run_dir, "nvidia_smi.txt")  # the raw text is kept
    assert (run_dir / "env_info.txt").exists()


def test_missing_binary_and_no_nvml_means_no_driver(monkeypatch, run_dir, smi_machine):
    out = probe.run(run_dir, args())
    assert out.status == records.StageStatus.FAIL
    assert out.reason.startswith("found no NVIDIA driver")
    assert "nvidia-smi not found on PATH" in out.reason
    assert "need a driver supporting CUDA >= 12.8" in out.reason
    assert "install the NVIDIA driver" in out.reason
    assert out.figures["source"] == "none" and out.figures["gpu_count"] == 0
    assert "could not be run: nvidia-smi not found on PATH" in read(run_dir, "nvidia_smi.txt")
    env_info = read(run_dir, "env_info.txt")
    for section in ("## System", "kernel", "glibc", "python", "cpu", "ram", "disk", "## Environment", "## Gate"):
        assert section in env_info


def test_driver_not_loaded_names_nvidia_smi_message(monkeypatch, run_dir, smi_machine):
    fake_gpu.failing_smi(smi_machine)
    out = probe.run(run_dir, args())
    assert out.status == records.StageStatus.FAIL
    assert "couldn't communicate with the NVIDIA driver" in out.reason
    assert "lsmod | grep nvidia" in out.reason


def test_no_devices_found(monkeypatch, run_dir, smi_machine):
    fake_gpu.write_script(smi_machine, 'echo "No devices were found"\nexit 6\n')
    out = probe.run(run_dir, args())
    assert out.status == records.StageStatus.FAIL
    assert "no GPU" in out.reason and "NVIDIA_VISIBLE_DEVICES" in out.reason


def test_older_driver_without_new_fields_is_asked_again_with_core_fields(monkeypatch, run_dir, smi_machine):
    core = "0, NVIDIA A100-SXM4-80GB, GPU-1, 00000000:07:00.0, 535.104.05, 81920, 81000"
    fake_gpu.write_script(
        smi_machine,
        f"""case "$1" in
*compute_cap*) echo 'Field "compute_cap" is not a valid field to query.'; exit 2;;
--query-gpu=*) echo '{core}';;
*) echo '| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2 |';;
esac
""",
    )
    out = probe.run(run_dir, args(min_driver_cuda="12.0"))
    assert out.status == records.StageStatus.PASS, out.reason
    assert out.figures["gpus"] == "1x NVIDIA A100-SXM4-80GB"
    doc = json.loads(read(run_dir, layout.GPUS_JSON))
    assert doc["gpus"][0]["ecc_current"] == "N/A"


def test_probe_source_nvml_does_not_fall_back(monkeypatch, run_dir, smi_machine):
    fake_gpu.working_smi(smi_machine)
    out = probe.run(run_dir, args(probe_source="nvml"))
    assert out.status == records.StageStatus.FAIL
    assert "NVML unavailable" in out.reason


# --------------------------------------------------------------------------- NVML (fake pynvml values)


def test_nvml_is_the_first_source(monkeypatch, run_dir, nvml_machine):
    out = probe.run(run_dir, args())
    assert out.status == records.StageStatus.PASS, out.reason
    assert out.figures == {
        "host": socket.gethostname(),
        "source": "nvml",
        "driver": "580.95.05",
        "driver_cuda": "13.0",
        "min_driver_cuda": "12.8",
        "gpu_count": 2,
        "gpus": f"2x {fake_gpu.H100}",
        "overrides": [],
    }
    assert nvml_machine.calls == ["shutdown"]
    doc = json.loads(read(run_dir, layout.GPUS_JSON))
    g0, g1 = doc["gpus"]
    assert g0["pci_bus_id"] == "00000000:18:00.0" and g0["uuid"] == "GPU-aaaa-0"
    assert g0["compute_capability"] == "9.0" and g0["memory_total_mib"] == 81559
    assert (g0["ecc_current"], g0["ecc_pending"]) == ("enabled", "enabled")
    assert (g0["ecc_uncorrected_volatile"], g0["ecc_uncorrected_aggregate"]) == (0, 3)
    assert g0["persistence_mode"] == "enabled" and g0["clock_event_reasons"] == ["gpu_idle"]
    assert (g1["ecc_current"], g1["ecc_uncorrected_volatile"]) == ("N/A", None)
    assert g1["clock_event_reasons"] == ["gpu_idle", "hw_thermal_slowdown"]
    env_info = read(run_dir, "env_info.txt")
    assert "source: nvml" in env_info
    assert "warning     : clocks held down by hw_thermal_slowdown" in env_info
    assert "could not be run: nvidia-smi not found on PATH" in read(run_dir, "nvidia_smi.txt")


def test_a_power_capped_gpu_is_information_not_a_warning_as_cuda_check_judges_it(monkeypatch, run_dir, nvml_machine):
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", lambda h: 0x4)  # SW power cap only
    probe.run(run_dir, args())
    doc = json.loads(read(run_dir, layout.GPUS_JSON))
    assert doc["gpus"][0]["clock_event_reasons"] == ["sw_power_cap"]
    assert "warning" not in read(run_dir, "env_info.txt")
    assert cuda_rules.judge_throttle({"under load": 0x4}).status == cuda_rules.PASS  # the same split


def test_nvml_cuda_below_minimum_fails(monkeypatch, run_dir, nvml_machine):
    monkeypatch.setattr(pynvml, "nvmlSystemGetCudaDriverVersion_v2", lambda: 12040)
    out = probe.run(run_dir, args())
    assert out.status == records.StageStatus.FAIL
    assert out.figures["source"] == "nvml"
    assert "supporting CUDA 12.4; need CUDA >= 12.8" in out.reason


def test_nvml_failing_midway_falls_back_to_nvidia_smi(monkeypatch, tmp_path, run_dir, nvml_machine):

    def broken():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", broken)
    fake_gpu.working_smi(tmp_path / "bin")
    fake_gpu.only_on_path(monkeypatch, tmp_path / "bin")
    out = probe.run(run_dir, args())
    assert out.status == records.StageStatus.PASS, out.reason
    assert out.figures["source"] == "nvidia-smi"
    assert "NVML failed while reading the GPUs" in read(run_dir, "env_info.txt")


def test_env_info_shows_cuda_visible_devices_unset_or_empty(monkeypatch, run_dir, nvml_machine):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    probe.run(run_dir, args())
    env_info = read(run_dir, "env_info.txt")
    assert "CUDA_VISIBLE_DEVICES=<unset>" in env_info
    assert "NCCL_DEBUG=INFO" in env_info
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    probe.run(run_dir, args())
    assert 'CUDA_VISIBLE_DEVICES=""   (set but empty' in read(run_dir, "env_info.txt")


def test_a_broken_gpu_datasheet_still_leaves_the_facts_written(monkeypatch, tmp_path, run_dir, smi_machine):
    fake_gpu.working_smi(smi_machine, cuda="13.0")
    broken = tmp_path / "gpus.yaml"
    broken.write_text("gpus: [{model: x}]\n")
    monkeypatch.setattr(layout, "GPUS_FILE", broken)
    out = probe.run(run_dir, args())
    assert out.status == records.StageStatus.PASS, out.reason  # the gate is about the driver, not the datasheet
    assert json.loads(read(run_dir, layout.GPUS_JSON))["gpus"][0]["model"] is None
    assert "datasheet models not named:" in read(run_dir, "env_info.txt")
    assert "CUDA Version: 13.0" in read(run_dir, "nvidia_smi.txt")


# --------------------------------------------------------------------------- hung drivers: one deadline

HANGING_SMI = """#!{python}
import os, sys, time
if os.fork() == 0:  # a child that keeps stdout, the probe's end of the output, open
    with open({pidfile!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    time.sleep(600)
    os._exit(0)
print("NVIDIA-SMI starting", flush=True)
{tail}
"""


def hanging_smi(bin_dir, pidfile, hang: bool):
    body = HANGING_SMI.format(python=sys.executable, pidfile=str(pidfile), tail="time.sleep(600)" if hang else "")
    path = bin_dir / "nvidia-smi"
    bin_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(0o755)


def run_with_a_watchdog(run_dir, probe_args, limit_s=30.0):
    """probe.run in a thread: a probe that hangs fails the test instead of hanging the suite."""
    box = {}
    worker = threading.Thread(target=lambda: box.update(out=probe.run(run_dir, probe_args)), daemon=True)
    t0 = time.monotonic()
    worker.start()
    worker.join(limit_s)
    assert not worker.is_alive(), f"the probe still runs after {limit_s:g} s"
    return box["out"], time.monotonic() - t0


def gone(pid: int, wait_s: float = 5.0) -> bool:
    """Whether a process has ended (a zombie waiting for its reaper counts as ended)."""
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("hang", [True, False], ids=["hangs", "exits-leaving-a-child"])
def test_a_hung_nvidia_smi_whose_child_holds_the_output_open_ends_within_the_one_deadline(
    tmp_path, run_dir, smi_machine, hang
):
    pidfile = tmp_path / "children.txt"
    hanging_smi(smi_machine, pidfile, hang)
    out, seconds = run_with_a_watchdog(run_dir, args(probe_timeout=2.0))
    assert out.status == records.StageStatus.FAIL and "\n" not in out.reason
    assert seconds < 2.0 + 4.0  # one deadline for every command, not 20 s each
    pids = [int(p) for p in pidfile.read_text().split()]
    assert pids and all(gone(p) for p in pids)  # the whole process group was killed
    env_info = read(run_dir, "env_info.txt")
    assert "## Gate\nFAIL: " in env_info
    if hang:
        assert "nvidia-smi did not answer within 2 s" in out.reason
        assert "did not answer within 2 s" in read(run_dir, "nvidia_smi.txt")


def test_a_hung_nvml_fails_within_the_deadline_and_says_so_in_env_info(monkeypatch, run_dir, nvml_machine):
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: time.sleep(600))  # the driver stops answering
    out, seconds = run_with_a_watchdog(run_dir, args(probe_timeout=2.0))
    assert seconds < 2.0 + 4.0
    assert out.status == records.StageStatus.FAIL
    assert "NVML did not answer within 2 s" in out.reason and "reset the GPU or reboot" in out.reason
    env_info = read(run_dir, "env_info.txt")
    assert "NVML did not answer within 2 s" in env_info and "## Gate\nFAIL: " in env_info
    assert (run_dir / "nvidia_smi.txt").exists() and (run_dir / layout.GPUS_JSON).exists()


def test_the_probe_deadline_comes_from_configs_and_is_validated(tmp_path):
    assert config.load_probe()["timeout_s"] > 0
    bad = tmp_path / "probe.yaml"
    bad.write_text("timeout_s: -1\n")
    with pytest.raises(config.ConfigError, match=r"probe.yaml: timeout_s: -1 must be a positive number of seconds"):
        config.load_probe(bad)


# --------------------------------------------------------------------------- values from the machine stay on one line

FORGED = "x\n\n## Gate\nPASS: driver 999.99 supports CUDA 99.9"


def test_a_value_holding_newlines_cannot_forge_a_section_of_env_info(monkeypatch, run_dir, nvml_machine):
    monkeypatch.setenv("NCCL_DEBUG", FORGED)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: "NVIDIA H100\r\n## Gate\nPASS: forged\x1b[2J")
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "580.95.05\n## System")
    out = probe.run(run_dir, args())
    env_info = read(run_dir, "env_info.txt")
    lines = env_info.splitlines()
    assert [line for line in lines if line.startswith("## ")] == [
        "## System",
        "## Environment (names containing TOKEN, KEY, SECRET, PASSWORD, CREDENTIAL are redacted)",
        "## Driver and GPUs (source: nvml)",
        "## Gate",
    ]
    assert not any(line.startswith("PASS: driver 999.99") or line.startswith("PASS: forged") for line in lines)
    assert "NCCL_DEBUG=x\\n\\n## Gate\\nPASS: driver 999.99 supports CUDA 99.9" in lines
    assert "\x1b" not in env_info and "\r" not in env_info
    assert "\n" not in out.reason and "\n" not in out.figures["gpus"] and "\n" not in out.figures["driver"]


def test_the_nvml_child_holds_no_file_of_the_probe_so_a_stuck_child_cannot_keep_a_run_locked(
    monkeypatch, tmp_path, run_dir, nvml_machine
):
    lock = tmp_path / "run.lock"
    held = open(lock, "w")  # stands for the run folder's lock, which the probe's process holds
    seen = tmp_path / "child-files.txt"

    def init():
        fds = Path("/proc/self/fd")
        targets = []
        for fd in list(fds.iterdir()):
            try:
                targets.append(os.readlink(fd))
            except OSError:
                pass
        seen.write_text("\n".join(targets))

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    try:
        probe.run(run_dir, args())
    finally:
        held.close()
    assert seen.exists() and str(lock) not in seen.read_text().splitlines()


def test_mig_mode_from_nvml_is_recorded_and_named_in_env_info(monkeypatch, run_dir, nvml_machine):
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMigMode", lambda h: [1, 1] if h == 0 else [0, 0])
    probe.run(run_dir, args())
    g0, g1 = json.loads(read(run_dir, layout.GPUS_JSON))["gpus"]
    assert (g0["mig_mode"], g1["mig_mode"]) == ("enabled", "disabled")
    assert "note        : MIG is enabled on GPU 0: cuda_check judges each slice against its share" in read(
        run_dir, "env_info.txt"
    )


def test_ctrl_c_while_probe_waits_leaves_no_command_running(tmp_path):
    """Each nvidia-smi runs in a session of its own, so the terminal's Ctrl-C never reaches it: the probe kills
    every command it started whenever it stops waiting, an interrupt included."""
    from tasks import probe as P

    class Interrupted(P.Deadline):
        def left(self) -> float:
            raise KeyboardInterrupt

    started = P.Commands({"a": ["sleep", "60"], "b": ["sleep", "60"]})
    procs = [proc for _, proc, _ in started.started.values()]
    with pytest.raises(KeyboardInterrupt):
        started.finish(Interrupted(30))
    for proc in procs:
        assert proc.wait(timeout=5) is not None  # reaped: killed, not left sleeping
