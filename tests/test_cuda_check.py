"""The cuda_check stage on a machine without a GPU: the real checker runs in this test venv's Python
(CPU torch), so the build check FAILs and every GPU check SKIPs with its reason; the stage turns that
into a one-line failure. The GPU paths run on the lead's GPU machine (see docs/readme/cuda_check.md)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import cuda_check, layout, proc, records, stage, verdict
from tasks.config import ConfigError
from tasks.cuda_rules import ARCH_LIST_SEAM_ENV

GPU_CHECKS = (
    "arch",
    "matmul.fp32",
    "matmul.tf32",
    "matmul.bf16",
    "matmul.fp16",
    "conv2d.fp32",
    "conv2d.bf16",
    "sdpa.causal",
    "reduction",
    "memory",
    "speed.copy",
    "speed.matmul_bf16",
    "compile",
    "peer_access",
    "allreduce",
    "health.ecc",
    "health.pages",
    "health.throttle",
    "health.xid",
    "pcie.link",
    "peers.matmul_bf16",
    "peers.copy",
)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One standalone checker run with CPU torch (and the arch seam set, to see it announced)."""
    out = tmp_path_factory.mktemp("cc")
    env = {**os.environ, ARCH_LIST_SEAM_ENV: "sm_80,sm_86"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["PYTHONPATH"] = str(layout.ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", layout.GPU_CHECKS_MODULE, "--out", str(out), "--seed", "7"],
        capture_output=True,
        text=True,
        env=env,
        cwd=out,
        timeout=300,
    )
    return proc, out


def test_checker_on_cpu_torch_fails_the_build_and_skips_gpu_checks(cpu_run):
    proc, out = cpu_run
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads((out / layout.CUDA_CHECK_JSON).read_text())
    by_name = {c["name"]: c for c in result["checks"]}
    assert by_name["build"]["status"] == "FAIL" and "CPU build" in by_name["build"]["reason"]
    assert by_name["driver"]["status"] == "SKIP"
    assert by_name["device_count"]["status"] == "SKIP" and by_name["device_count"]["reason"]
    for name in GPU_CHECKS:
        assert by_name[name]["status"] == "SKIP", name
        assert "CPU build" in by_name[name]["reason"], name
    assert result["gpus_checked"] == 0 and result["seed"] == 7
    assert result["reason"].startswith("1 check(s) FAIL: build: torch ")


def test_checker_report_has_a_line_per_check_and_the_seam(cpu_run):
    proc, out = cpu_run
    text = (out / layout.STAGE_FILES["cuda_check"][0]).read_text()
    assert text == proc.stdout  # the file and the console carry the same report
    assert "seed 7" in text and "torch 2." in text
    assert f"TEST SEAM ACTIVE: {ARCH_LIST_SEAM_ENV}='sm_80,sm_86'" in text
    lines = [line for line in text.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert len(lines) == 3 + len(GPU_CHECKS)
    assert lines[0].startswith("FAIL  -     build ")
    assert text.rstrip().splitlines()[-1].startswith("verdict: FAIL: 1 check(s) FAIL: build")


def test_checker_reports_where_its_seconds_went(cpu_run):
    proc, out = cpu_run
    result = json.loads((out / layout.CUDA_CHECK_JSON).read_text())
    phases = result["phases"]
    assert {"startup", "import", "nvml", "checks", "other", "total"} <= set(phases)
    assert phases["import"] > 0.1 and phases["import"] == round(result["import_s"], 3)
    within = sum(v for k, v in phases.items() if k not in ("startup", "total"))
    assert abs(within - result["total_s"]) < 0.01  # the phases add up to the checker's total
    assert abs(phases["total"] - result["total_s"] - phases["startup"]) < 0.01
    text = (out / layout.STAGE_FILES["cuda_check"][0]).read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("phases: ")]
    assert "interpreter start " in line and "imports (torch) " in line and "NVML " in line
    figures = cuda_check.figures_from(result)  # the stage's figures carry them (stages/cuda_check.json)
    assert figures["phase_import_s"] == round(phases["import"], 2) and "phase_total_s" in figures


def stand_in_torch(folder: Path) -> Path:
    """A folder holding a fake `torch` that leaves a mark when imported (put on PYTHONPATH by a test)."""
    (folder / "torch").mkdir(parents=True)
    (folder / "torch" / "__init__.py").write_text(
        f"open({str(folder / 'imported')!r}, 'w').close()\n__version__ = '0.0.0-standin'\n"
    )
    return folder


def _venv_gpu(tmp_path, monkeypatch):
    """A stand-in .venv-gpu whose python is this test venv's (CPU torch)."""
    venv = tmp_path / ".venv-gpu"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    monkeypatch.setattr(layout, "VENV_GPU", venv)
    return venv


def test_stage_fails_on_cpu_torch_with_one_line_and_keeps_the_files(tmp_path, monkeypatch, capsys):
    _venv_gpu(tmp_path, monkeypatch)
    standin = stand_in_torch(tmp_path / "standin")
    monkeypatch.setenv("PYTHONPATH", str(standin))  # the checker runs isolated: never this torch
    run_dir = tmp_path / "m40_v1"
    run_dir.mkdir()
    (run_dir / layout.CUDA_CHECK_JSON).write_text('{"exit_code": 0, "reason": "stale"}')  # never read as this run's
    args = argparse.Namespace(check_mem_share=None, check_speed_share=None, check_seed=11)
    rec = stage.execute("cuda_check", run_dir, args)
    assert rec.status == records.StageStatus.FAIL
    assert rec.reason.startswith("1 check(s) FAIL: build: torch ") and "CPU build" in rec.reason
    assert stage.exit_code(rec) == layout.EXIT_STAGE["cuda_check"]
    assert set(rec.files) == {"cuda_check.txt", layout.CUDA_CHECK_JSON, layout.CUDA_CHECK_LOG}
    assert rec.figures["checks_fail"] == 1 and rec.figures["gpus_checked"] == 0 and rec.figures["seed"] == 11
    assert rec.figures["failed_checks"] == "build"
    assert records.read(run_dir, "cuda_check").reason == rec.reason
    said = cuda_check.file_says(json.loads((run_dir / layout.CUDA_CHECK_JSON).read_text()))
    assert said.failure.startswith("exit code 1: 1 check(s) FAIL: build")  # the verdict reads the file so too
    assert verdict.differing_figures(records.read(run_dir, "cuda_check").figures, said.figures) == []
    import torch

    ident = rec.figures["torch_identity"]
    assert ident["file"] == str(Path(torch.__file__).resolve()) and ident["version"] == torch.__version__
    assert not (standin / "imported").exists()
    assert rec.figures["device"] == "cpu" and rec.figures["nproc"] == 0
    assert rec.figures["thresholds"]["speed_share"] == 0.5 and "tolerances.matmul_bf16" in rec.figures["thresholds"]
    assert "SKIP  -     memory" in (run_dir / layout.CUDA_CHECK_LOG).read_text()
    assert "cuda_check: FAIL" in capsys.readouterr().out


def test_stage_without_venv_gpu_says_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "VENV_GPU", tmp_path / "missing")
    out = cuda_check.run(tmp_path, argparse.Namespace())
    assert out.status == records.StageStatus.FAIL
    assert out.reason.startswith("no .venv-gpu (") and "run `nox -s install -p <channel>` first" in out.reason


def test_options_reach_the_checker_and_bad_shares_are_refused():
    parser = argparse.ArgumentParser()
    cuda_check.add_arguments(parser)
    args = parser.parse_args(["--check-mem-share", "0.25", "--check-speed-share", "0.6", "--check-seed", "3"])
    cmd = proc.gpu_command(
        layout.gpu_python(), layout.GPU_CHECKS_MODULE, cuda_check.checker_args(layout.ROOT / "run", args)
    )
    assert cmd[1:3] == ["-m", "training_pt.gpu_checks"]
    assert cmd[-6:] == ["--mem-share", "0.25", "--speed-share", "0.6", "--seed", "3"]
    for bad in (
        ["--check-mem-share", "0.95"],
        ["--check-speed-share", "0"],
        ["--check-mem-share", "half"],
        ["--check-seed", str(2**64 - 10)],  # the seeded checks then fail with an overflow: the GPU blamed
        ["--check-seed", "-1"],
        ["--level", "long", "--duration", "1e12"],  # past any clock's reach: an OverflowError mid-stage
        ["--level", "long", "--duration", "1e-6"],  # one product: the burn's compare fails
    ):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(bad)
        assert e.value.code == 2


GOOD_RESULT = {
    "exit_code": 0,
    "reason": "",
    "seed": 5,
    "total_s": 11.9,
    "gpus_checked": 1,
    "counts": {"PASS": 21, "FAIL": 0, "SKIP": 2},
    "versions": {"torch": "2.11.0+cu130", "cuda": "13.0"},
    "checks": [
        {"name": "driver", "gpu": None, "status": "PASS", "data": {"driver_cuda": "13.0"}},
        {"name": "sdpa.causal", "gpu": 0, "status": "PASS", "data": {"backend": "flash"}},
        {"name": "speed.copy", "gpu": 0, "status": "PASS", "data": {"tbs": 2.9512, "share": 0.881}},
        {"name": "speed.matmul_bf16", "gpu": 0, "status": "PASS", "data": {"tflops": 702.33, "share": 0.7101}},
        {"name": "allreduce", "gpu": None, "status": "SKIP", "data": {}},
    ],
}


def test_outcome_from_a_passing_result_carries_the_key_figures():
    out = cuda_check.outcome_from(GOOD_RESULT, 0, "", 300, ["cuda_check.txt"])
    assert out.status == records.StageStatus.PASS and out.reason == ""
    assert out.figures == {
        "checks_pass": 21,
        "checks_fail": 0,
        "checks_skip": 2,
        "checks_warn": 0,
        "gpus_checked": 1,
        "check_s": 11.9,
        "seed": 5,
        "torch": "2.11.0+cu130",
        "cuda_build": "13.0",
        "driver_cuda": "13.0",
        "gpu0_sdpa_backend": "flash",
        "gpu0_copy_tbs": 2.951,
        "gpu0_copy_pct_datasheet": 88.1,
        "gpu0_bf16_tflops": 702.3,
        "gpu0_bf16_pct_datasheet": 71.0,
        "device": "cuda",
        "nproc": 1,
    }
    with_settings = dict(
        GOOD_RESULT, settings={"speed_share": 0.5, "memory_share": 0.5, "tolerances": {"matmul_bf16": 0.01}}
    )
    assert cuda_check.outcome_from(with_settings, 0, "", 300, []).figures["thresholds"] == {
        "speed_share": 0.5,
        "memory_share": 0.5,
        "tolerances.matmul_bf16": 0.01,
    }


def test_a_passing_result_with_a_warning_passes_and_keeps_the_warning_as_its_reason():
    why = "1 check(s) WARN: driver: the driver supports CUDA 12.8 and this torch is built for CUDA 12.9: ..."
    result = dict(GOOD_RESULT, counts={"PASS": 20, "WARN": 1, "FAIL": 0, "SKIP": 2}, reason=why)
    out = cuda_check.outcome_from(result, 0, "", 300, [])
    assert out.status == records.StageStatus.PASS and out.reason == why and out.figures["checks_warn"] == 1


def test_outcome_names_the_per_gpu_checks_that_were_not_judged_and_not_the_ones_with_nothing_to_judge():
    """A per-GPU SKIP (no datasheet figure, no NVML counter) is a check that did not judge its GPU: named for
    the verdict (PARTIAL). A SKIP with nothing to judge (one GPU: no all-reduce; no NVLink link) is not."""
    checks = GOOD_RESULT["checks"] + [
        {"name": "speed.copy", "gpu": 1, "status": "SKIP", "data": {}},
        {"name": "health.ecc", "gpu": 0, "status": "SKIP", "data": {}},
        {"name": "health.ecc", "gpu": 1, "status": "SKIP", "data": {}},
        {"name": "nvlink", "gpu": 0, "status": "SKIP", "data": {"links": [], "nothing_to_judge": True}},  # PCIe only
        {"name": "nvlink", "gpu": 1, "status": "SKIP", "data": {"error": "NVML answers Unknown Error"}},  # not read
    ]
    out = cuda_check.outcome_from(dict(GOOD_RESULT, checks=checks), 0, "", 300, [])
    assert out.status == records.StageStatus.PASS
    assert out.figures["unjudged_checks"] == "gpu1 speed.copy, gpu0,1 health.ecc, gpu1 nvlink"
    assert "unjudged_checks" not in cuda_check.outcome_from(GOOD_RESULT, 0, "", 300, []).figures


def test_outcome_when_no_gpu_was_checked_is_a_failure():
    result = dict(
        GOOD_RESULT,
        exit_code=3,
        gpus_checked=0,
        reason="no CUDA device visible to torch: torch sees 0 of 1 GPU(s): CUDA_VISIBLE_DEVICES is set but empty",
    )
    out = cuda_check.outcome_from(result, 3, "", 300, [])
    assert out.status == records.StageStatus.FAIL and out.reason.startswith("no CUDA device visible to torch: ")


def test_outcome_without_a_result_names_the_exit_and_the_log():
    crashed = cuda_check.outcome_from(None, 1, "ModuleNotFoundError: No module named 'torch'", 300, [])
    assert crashed.status == records.StageStatus.FAIL
    assert crashed.reason == (
        "the checker exited with code 1 and wrote no cuda_check.json (last output: "
        "ModuleNotFoundError: No module named 'torch'); see cuda_check.log"
    )
    hung = cuda_check.outcome_from(None, 1, 'File "x", line 3 in bench', 300, [], hung=True)
    assert "hung and stopped itself after 300 s" in hung.reason
    assert "did not finish within 300 s" in cuda_check.outcome_from(None, 124, "", 300, []).reason
    disagree = cuda_check.outcome_from(GOOD_RESULT, 1, "", 300, [])
    assert disagree.status == records.StageStatus.FAIL and "exited with code 1" in disagree.reason


def test_memory_pattern_is_written_and_checked_in_chunks_without_false_errors():
    """The pattern test fills and compares chunk by chunk (one arange over >2**32 words computed wrong
    values on an H100); on the CPU, with a chunk size that leaves a ragged last chunk, it must find
    every word right in both passes."""
    torch = pytest.importorskip("torch")
    from training_pt import gpu_checks as checks

    assert checks.Checker._pattern_test(torch.device("cpu"), 100_003, 17, chunk=4096) == 0


def test_burn_options_without_the_long_level_are_refused_not_ignored():
    parser = argparse.ArgumentParser()
    cuda_check.add_arguments(parser)
    for argv in (["--duration", "60"], ["--dcgm-level", "2"]):
        with pytest.raises(ConfigError, match=r"applies to --level long only; add --level long, or drop it"):
            cuda_check.check_inputs(parser.parse_args(argv))
    cuda_check.check_inputs(parser.parse_args(["--level", "long", "--duration", "60"]))
