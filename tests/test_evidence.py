"""The evidence stage: README.md, summary.json, placeholders and SHA256SUMS from a fixture run."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fake_gpu
import pytest

from tasks import evidence, layout, records, runs, stage, text
from tasks.records import StageRecord, StageStatus

GPU = fake_gpu.probe_gpu(clock_event_reasons=["gpu_idle"])
STAGE_TEXT = {
    "env_info.txt": "env of the machine\n",
    "nvidia_smi.txt": "raw smi\n",
    "torch_version.txt": "torch 2.11.0+cu130\n",
    "cuda_check.txt": "all checks pass\n",
    "training_log.txt": "step 1 loss 10.9\n",
}
TORCH_ID = {
    "version": "2.11.0+cu130",
    "file": "/m/.venv-gpu/lib/python3.12/site-packages/torch/__init__.py",
    "record_sha256": "0" * 64,
}
FIGURES = {
    "probe": {"source": "nvml", "driver": "580.95.05", "driver_cuda": "13.0", "gpu_count": 1},
    "install": {"channel": "cu130", "torch": "2.11.0+cu130", "cuda": "13.0", "torch_identity": TORCH_ID},
    "cuda_check": {
        "checks_pass": 21,
        "checks_fail": 0,
        "checks_skip": 2,
        "gpus_checked": 1,
        "gpu0_bf16_tflops": 793.3,
        "gpu0_bf16_pct_datasheet": 80.2,
        "gpu0_copy_tbs": 2.584,
        "gpu0_copy_pct_datasheet": 77.1,
        "cuda_build": "13.0",
        "torch_identity": TORCH_ID,
    },
    "train": {
        "model": "gpt2",
        "first_loss": 10.912,
        "final_loss": 5.2628,
        "steps": 30,
        "tok_s": 420319,
        "tok_s_per_gpu": 420319,
        "mfu_pct": 36.4,
        "peak_tflops": 989.0,
        "transformers": "5.0.0",
        "device": "cuda",
        "nproc": 1,
        "torch_identity": TORCH_ID,
        "thresholds": {"checks.first_loss_tol": 0.5, "checks.final_window": 5, "checks.min_loss_drop": 2.0},
    },
}
# cuda_check.json's versions, as the checker reads them inside .venv-gpu
CHECKER_VERSIONS = {
    "torch": "2.11.0+cu130",
    "cuda": "13.0",
    "cudnn": "9.19.0",
    "nccl": "2.28.9",
    "triton": "3.6.0",
    "python": "3.12.3",
    "driver": "580.95.05",
}
SHA256SUM = shutil.which("sha256sum")


@pytest.fixture(autouse=True)
def no_step_summary(monkeypatch):
    monkeypatch.delenv(evidence.STEP_SUMMARY_ENV, raising=False)


# install failed: the stages after it were skipped
INSTALL_FAILED = {
    "probe": StageStatus.PASS,
    "install": StageStatus.FAIL,
    "cuda_check": StageStatus.SKIP,
    "train": StageStatus.SKIP,
}


def make_run(tmp_path, statuses: dict[str, str], reasons: dict[str, str] | None = None):
    """A run folder as the stages would leave it: a record per stage in `statuses`, and the files
    of each stage that ran (pass or fail)."""
    run_dir = tmp_path / "m40_v1"
    run_dir.mkdir()
    reasons = reasons or {}
    for name, status in statuses.items():
        reason = reasons.get(name, "" if status == StageStatus.PASS else f"{name} went wrong")
        records.write(run_dir, StageRecord(name, status, reason, duration_s=1.5, figures=FIGURES.get(name, {})))
        if status in (StageStatus.PASS, StageStatus.FAIL):
            for f in layout.STAGE_FILES[name]:
                (run_dir / f).write_text(STAGE_TEXT[f])
        if name in layout.STAGE_EVIDENCE and status in (StageStatus.PASS, StageStatus.FAIL):
            (run_dir / layout.STAGE_EVIDENCE[name]).write_text(json.dumps(own_file(name, status == StageStatus.PASS)))
    return run_dir


def own_file(name: str, passed: bool = True) -> dict:
    """The stage's own file (layout.STAGE_EVIDENCE), agreeing with its record's FIGURES."""
    if name == "probe":
        gate = {"passed": passed, "line": "driver 580.95.05 supports CUDA 13.0 >= 12.8"}
        return {
            "schema": 1,
            "source": "nvml",
            "driver": "580.95.05",
            "driver_cuda": "13.0",
            "gate": gate,
            "gpus": [GPU],
        }
    if name == "cuda_check":
        counts = {"PASS": 21, "FAIL": 0, "SKIP": 2}
        ident = {"torch_identity": TORCH_ID, "gpus_checked": 1, "counts": counts}
        return {"exit_code": 0 if passed else 1, "versions": CHECKER_VERSIONS, **ident}
    return {"status": "pass" if passed else "fail", "exit_code": 0 if passed else 3, "figures": FIGURES["train"]}


def render(run_dir):
    """Run evidence through the harness, as nox does (the harness calls the sealing hook)."""
    with runs.locked(run_dir):
        return stage.execute("evidence", run_dir, argparse.Namespace())


def sha256sum_check(run_dir):
    return subprocess.run(
        [SHA256SUM, "--strict", "-c", layout.SUMS_FILE],
        cwd=run_dir,  # noqa: S603
        capture_output=True,
        text=True,
    )


ALL_PASS = {
    "probe": StageStatus.PASS,
    "install": StageStatus.PASS,
    "cuda_check": StageStatus.PASS,
    "train": StageStatus.PASS,
}


# --------------------------------------------------------------------------- rendering a fixture run


@pytest.mark.skipif(SHA256SUM is None, reason="needs coreutils sha256sum")
def test_passing_run_renders_readme_summary_and_verifiable_sums(tmp_path):
    run_dir = make_run(tmp_path, ALL_PASS)
    (run_dir / "loss.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"></svg>\n')
    (run_dir / "odd name\\with backslash.txt").write_text("still checksummed\n")
    before = {f: (run_dir / f).read_text() for f in STAGE_TEXT}

    rec = render(run_dir)
    assert rec.status == StageStatus.PASS, rec.reason
    assert rec.figures["verdict"] == "PASS"

    for f in layout.REQUIRED_FILES:
        assert (run_dir / f).is_file(), f
    assert {f: (run_dir / f).read_text() for f in STAGE_TEXT} == before  # never overwrites a stage's file

    readme = (run_dir / layout.README_FILE).read_text()
    assert readme.splitlines()[0] == "# M40 run `m40_v1`: PASS"
    assert "**PASS**" in readme.split("## Stages")[0]
    assert "| probe | PASS | 1.5 s |" in readme
    assert "| 0 | NVIDIA H100 80GB HBM3 | H100 SXM | 81559 (81004) | 9.0 | enabled/enabled | 0/0 |" in readme
    for name, value in (
        ("NVIDIA driver", "580.95.05 (supports CUDA 13.0)"),
        ("Python (.venv-gpu)", "3.12.3"),
        ("torch", "2.11.0+cu130"),
        ("CUDA (torch build)", "13.0"),
        ("cuDNN", "9.19.0"),
        ("NCCL", "2.28.9"),
        ("triton", "3.6.0"),
        ("transformers", "5.0.0"),
        ("install channel", "cu130"),
    ):
        assert f"| {name} | {value} |" in readme
    assert "| this tool (git commit) | " in readme
    assert "![loss.svg](loss.svg)" in readme
    for f in evidence.run_files(run_dir):
        assert f"]({evidence.link(f)})" in readme, f  # a link to every file
    assert "[SHA256SUMS](SHA256SUMS)" in readme

    summary = json.loads((run_dir / layout.SUMMARY_FILE).read_text())
    assert summary["schema"] == evidence.SCHEMA
    assert (summary["verdict"], summary["failed_stage"], summary["reason"]) == ("PASS", None, "")
    assert list(summary["stages"]) == ["probe", "install", "cuda_check", "train"]
    assert summary["stages"]["install"]["figures"]["torch"] == "2.11.0+cu130"
    assert summary["gpus"] == [GPU]
    assert summary["versions"]["CUDA (torch build)"] == "13.0"
    assert sorted(summary["files"]) == sorted([*evidence.run_files(run_dir), layout.SUMS_FILE])

    assert runs.is_sealed(run_dir)
    listed = [line.split("  ", 1)[1] for line in (run_dir / layout.SUMS_FILE).read_text().splitlines()]
    assert "stages/evidence.json" in listed and layout.LOCK_FILE not in listed and layout.SUMS_FILE not in listed
    check = sha256sum_check(run_dir)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "README.md: OK" in check.stdout

    (run_dir / "cuda_check.txt").write_text("tampered\n")
    assert sha256sum_check(run_dir).returncode != 0


def test_failed_run_names_the_stage_and_writes_why_files_are_missing(tmp_path):
    reason = "found driver 550.54.15 supporting CUDA 12.4; need CUDA >= 12.8; upgrade the driver"
    run_dir = make_run(
        tmp_path,
        INSTALL_FAILED,
        {"install": reason, "cuda_check": "not run: install failed", "train": "not run: install failed"},
    )
    (run_dir / "torch_version.txt").unlink()  # install failed before writing its file
    render(run_dir)

    readme = (run_dir / layout.README_FILE).read_text()
    assert readme.splitlines()[0] == "# M40 run `m40_v1`: FAIL"
    assert f"**FAIL at install** (exit code 20).\n\n**What happened:** {text.md_inert(reason)}" in readme
    assert readme.count(text.md_inert(reason)) == 1  # said once
    assert "| cuda_check | SKIP |" in readme
    assert (
        (run_dir / "torch_version.txt").read_text().startswith(f"install failed before it wrote this file — {reason}")
    )
    assert (run_dir / "cuda_check.txt").read_text().startswith(f"cuda_check did not run: install failed — {reason}")
    assert (run_dir / "training_log.txt").read_text().startswith("train did not run: install failed")
    summary = json.loads((run_dir / layout.SUMMARY_FILE).read_text())
    assert (summary["verdict"], summary["failed_stage"], summary["reason"]) == ("FAIL", "install", reason)


def test_a_stage_record_that_says_pass_over_its_own_file_that_says_fail_is_a_fail(tmp_path):
    """stages/train.json edited to pass beside the train_result.json train.py wrote: evidence renders FAIL at
    train, naming both files, and exits as a failed train does."""
    run_dir = make_run(tmp_path, ALL_PASS)
    (run_dir / layout.TRAIN_RESULT).write_text(json.dumps({**own_file("train", passed=False), "reason": "no drop"}))
    rec = render(run_dir)
    why = "stages/train.json says pass but train_result.json says fail (exit 3): no drop"
    assert (rec.figures["verdict"], evidence.exit_code_of(rec, run_dir)) == ("FAIL", layout.EXIT_STAGE["train"])
    summary = json.loads((run_dir / layout.SUMMARY_FILE).read_text())
    assert (summary["verdict"], summary["failed_stage"], summary["reason"]) == ("FAIL", "train", why)
    assert (
        f"**FAIL at train** (exit code 40).\n\n**What happened:** {text.md_inert(why)}"
        in (run_dir / layout.README_FILE).read_text()
    )


def test_a_figure_edited_in_a_stage_record_is_named_beside_its_own_files_figure(tmp_path):
    run_dir = make_run(tmp_path, ALL_PASS)
    rec = records.read(run_dir, "cuda_check")
    rec.figures["checks_fail"] = 0
    rec.figures["checks_pass"] = 23  # the two skipped checks, said to have passed
    records.write(run_dir, rec)
    render(run_dir)
    summary = json.loads((run_dir / layout.SUMMARY_FILE).read_text())
    assert (summary["verdict"], summary["failed_stage"]) == ("FAIL", "cuda_check")
    assert summary["reason"] == "stages/cuda_check.json says checks_pass=23 but cuda_check.json says checks_pass=21"


def test_interrupted_run_says_where(tmp_path):
    run_dir = make_run(
        tmp_path,
        {"probe": StageStatus.PASS, "install": StageStatus.PASS, "cuda_check": StageStatus.INTERRUPTED},
        {"cuda_check": "interrupted by the user (Ctrl-C) during cuda_check"},
    )
    render(run_dir)
    readme = (run_dir / layout.README_FILE).read_text()
    assert "**INTERRUPTED at cuda_check** (exit code 130)." in readme
    assert "| train | MISSING | — |" in readme
    assert (run_dir / "training_log.txt").read_text().startswith("train did not run: cuda_check was interrupted")
    assert json.loads((run_dir / layout.SUMMARY_FILE).read_text())["stages"]["train"]["status"] == "missing"


def test_evidence_alone_on_an_empty_run_still_leaves_all_six_files(tmp_path):
    run_dir = tmp_path / "m40_v1"
    run_dir.mkdir()
    rec = render(run_dir)
    assert rec.status == StageStatus.PASS
    for f in layout.REQUIRED_FILES:
        assert (run_dir / f).is_file(), f
    assert (run_dir / "env_info.txt").read_text().startswith("probe did not run: it left no record in stages/")
    readme = (run_dir / layout.README_FILE).read_text()
    assert "**What happened:** probe did not run" in readme
    assert "probe left no gpus.json" in readme


def test_markdown_special_characters_in_reasons_cannot_break_the_tables(tmp_path):
    run_dir = make_run(tmp_path, {"probe": StageStatus.FAIL}, {"probe": "a | b <script> c"})
    render(run_dir)
    readme = (run_dir / layout.README_FILE).read_text()
    assert "a \\| b &lt;script> c" in readme and "<script>" not in readme


def test_step_summary_is_appended_when_github_asks(tmp_path, monkeypatch):
    target = tmp_path / "step_summary.md"
    target.write_text("earlier step\n")
    monkeypatch.setenv(evidence.STEP_SUMMARY_ENV, str(target))
    run_dir = make_run(tmp_path, {"probe": StageStatus.FAIL}, {"probe": "no driver"})
    render(run_dir)
    text = target.read_text()
    assert text.startswith("earlier step\n")
    assert "## M40 run `m40_v1`: FAIL" in text
    assert "**FAIL at probe** (exit code 10).\n\n**What happened:** no driver" in text
    assert "| stage | status | duration | key figures | reason |" in text
    assert "| probe | FAIL |" in text


def test_unwritable_step_summary_does_not_fail_evidence(tmp_path, monkeypatch):
    monkeypatch.setenv(evidence.STEP_SUMMARY_ENV, str(tmp_path / "missing-dir" / "summary.md"))
    run_dir = make_run(tmp_path, ALL_PASS)
    assert render(run_dir).status == StageStatus.PASS


def test_broken_template_fails_evidence_and_leaves_the_run_unsealed(tmp_path, monkeypatch):
    templates = tmp_path / "templates"
    shutil.copytree(layout.TEMPLATES, templates)
    (templates / "README.md.j2").write_text("{{ no_such_value }}\n")
    monkeypatch.setattr(layout, "TEMPLATES", templates)
    run_dir = make_run(tmp_path, ALL_PASS)
    rec = render(run_dir)
    assert rec.status == StageStatus.FAIL and "no_such_value" in rec.reason
    assert stage.exit_code(rec) == layout.EXIT_STAGE["evidence"]
    assert not runs.is_sealed(run_dir)


# --------------------------------------------------------------------------- a stage that never finished


def test_a_stage_killed_mid_way_reads_as_did_not_finish_not_its_earlier_pass(tmp_path):
    """Re-running probe in a folder whose records all say pass, killed with SIGKILL (as the OOM killer or
    a Slurm/Kubernetes stop would): the old pass record must not survive."""
    run_dir = make_run(tmp_path, ALL_PASS)
    bin_dir, started = tmp_path / "bin", tmp_path / "smi-started"
    pids = tmp_path / "smi-pids"
    # a driver tool that hangs (each call notes its pid: probe starts several, each in its own session)
    fake_gpu.write_script(bin_dir, f"echo $$ >> '{pids}'\n: > '{started}'\nexec sleep 60\n")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(layout.ROOT)}
    code = "import sys; from tasks import stage; sys.exit(stage.main('probe', sys.argv[1:]))"
    child = subprocess.Popen(
        [sys.executable, "-c", code, "--run-dir", str(run_dir), "--probe-source", "nvidia-smi"],  # noqa: S603
        cwd=layout.ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "probe never reached nvidia-smi"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        kill_noted(pids)

    assert records.read(run_dir, "probe").status == StageStatus.RUNNING
    wait_until_unlocked(run_dir)  # a child that probe was forking as it died holds the lock until its exec
    render(run_dir)
    summary = json.loads((run_dir / layout.SUMMARY_FILE).read_text())
    assert (summary["verdict"], summary["failed_stage"]) == ("FAIL", "probe")
    assert summary["reason"].startswith("probe did not finish")
    assert "**What happened:** probe did not finish" in (run_dir / layout.README_FILE).read_text()


def kill_noted(pids: Path) -> None:
    """SIGKILL each process whose pid the fake tool noted (its sleeps live in sessions of their own)."""
    for pid in (int(p) for p in (pids.read_text().split() if pids.exists() else [])):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_until_unlocked(run_dir: Path, seconds: float = 30) -> None:
    """Return once the run's lock can be taken (bounded): a dead stage's forked children let go of it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with runs.locked(run_dir):
                return
        except runs.RunLocked:
            assert time.monotonic() < deadline, f"the run's lock was still held {seconds:g} s after the kill"
            time.sleep(0.05)


# --------------------------------------------------------------------------- the README as its receiver reads it


def test_the_first_lines_of_a_pass_are_the_verdict_and_the_figures_that_prove_it(tmp_path):
    run_dir = make_run(tmp_path, ALL_PASS)
    render(run_dir)
    head = (run_dir / layout.README_FILE).read_text().split("\nRendered ")[0]
    assert head.splitlines()[2].startswith("**PASS** (exit code 0): this machine trains with PyTorch on its 1 GPU(s).")
    for row in (
        "| CUDA checks | 21 passed, 0 failed, 2 skipped on 1 GPU(s) (cuda_check.txt) |",
        "| bf16 matmul | 793.3 TFLOP/s (80.2% of datasheet); dense bf16 matmul |",
        "| memory copy | 2.584 TB/s (77.1% of datasheet); device memory copy |",
        "| training loss | gpt2: 10.91 → 5.26 in 30 steps |",
        "| training speed | 420,319 tok/s on cuda |",
        "| MFU | 36.4% of 989 TFLOP/s bf16 dense per GPU |",
    ):
        assert row in head, row


def test_a_fail_says_what_happened_and_what_to_do_once(tmp_path):
    reason = "no channel gave a verified CUDA torch: cu128 unreachable; use cu130"
    run_dir = make_run(
        tmp_path,
        INSTALL_FAILED,
        {"install": reason},
    )
    render(run_dir)
    readme = (run_dir / layout.README_FILE).read_text()
    assert readme.count("**What happened:**") == 1 and readme.count("**What to do:**") == 1
    assert readme.count(reason.split(":")[0]) == 1  # the reason is said once: not again in the stage table
    assert "| install | FAIL | 1.5 s | channel=cu130" in readme and "| the verdict above |" in readme


def test_the_files_table_has_no_empty_cell_and_leaves_out_the_checkers_console(tmp_path):
    run_dir = make_run(tmp_path, ALL_PASS)
    (run_dir / layout.CUDA_CHECK_LOG).write_text("the checker's console\n")
    (run_dir / "extra_notes.txt").write_text("something a stage added\n")
    render(run_dir)
    readme = (run_dir / layout.README_FILE).read_text()
    table = readme.split("## Files")[1].strip().splitlines()[2:]
    assert table and all("||" not in line.replace(" ", "") for line in table)
    assert all(cell.strip() for line in table for cell in line.strip("|").split("|")), table
    assert f"[{layout.CUDA_CHECK_LOG}]" not in readme
    assert layout.CUDA_CHECK_LOG in (run_dir / layout.SUMS_FILE).read_text()  # still sealed with the rest


def test_a_value_from_the_machine_cannot_add_markup_to_the_readme(tmp_path):
    run_dir = make_run(tmp_path, ALL_PASS)
    gpus = json.loads((run_dir / layout.GPUS_JSON).read_text())
    gpus["gpus"][0]["name"] = "H100 [click](https://evil.example) ![x](https://evil.example/x.png)\n## Verdict: PASS"
    (run_dir / layout.GPUS_JSON).write_text(json.dumps(gpus))
    render(run_dir)
    readme = (run_dir / layout.README_FILE).read_text()
    # every bracket escaped, and the bare URLs left for GitHub to autolink have their ":" escaped too
    assert readme.count("](https") == readme.count("\\](https\\://evil") == 2
    assert "\n## Verdict" not in readme
    assert (
        "H100 \\[click\\](https\\://evil.example) !\\[x\\](https\\://evil.example/x.png)\\\\n## Verdict: PASS" in readme
    )


def test_a_cpu_training_run_has_no_mfu_row_and_still_renders(tmp_path):
    """train.py records mfu_pct and peak_tflops as "n/a" when it has no datasheet peak (a CPU run)."""
    run_dir = make_run(tmp_path, ALL_PASS)
    rec = records.read(run_dir, "train")
    rec.figures.update(mfu_pct="n/a", peak_tflops="n/a", first_loss=10.8, final_loss=9.6)
    records.write(run_dir, rec)
    result = own_file("train")
    result["figures"] = {**result["figures"], **rec.figures}
    (run_dir / layout.TRAIN_RESULT).write_text(json.dumps(result))  # the figures the record took from it
    assert render(run_dir).ok
    readme = (run_dir / layout.README_FILE).read_text()
    assert "10.80 → 9.60" in readme and "| MFU |" not in readme


# --------------------------------------------------------------------------- collect_env.txt


def test_collect_env_runs_in_the_gpu_environment_without_our_pythonpath(tmp_path, monkeypatch):
    """A real torch.utils.collect_env from the GPU environment's interpreter (here: the test env's CPU torch);
    a stand-in `torch` on our PYTHONPATH is not the one it reports."""
    stand_in = tmp_path / "stand-in" / "torch"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("raise SystemExit('the stand-in torch was imported')\n")
    monkeypatch.setenv("PYTHONPATH", str(stand_in.parent))
    monkeypatch.setattr(layout, "gpu_python", lambda venv=None: Path(sys.executable))
    run_dir = make_run(tmp_path, ALL_PASS)
    render(run_dir)
    collected = (run_dir / layout.COLLECT_ENV).read_text()
    assert collected.startswith(f"$ {sys.executable} -m torch.utils.collect_env")
    assert "PyTorch version:" in collected and "stand-in" not in collected
    assert f"[{layout.COLLECT_ENV}]({layout.COLLECT_ENV})" in (run_dir / layout.README_FILE).read_text()
    assert layout.COLLECT_ENV in (run_dir / layout.SUMS_FILE).read_text()


def test_a_hung_collect_env_is_killed_with_its_children_at_the_timeout(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    pid_file = tmp_path / "grandchild.pid"
    fake.write_text(f"#!/bin/sh\necho started\nsleep 30 &\necho $! > {pid_file}\nsleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setattr(layout, "gpu_python", lambda venv=None: fake)
    monkeypatch.setattr(evidence, "COLLECT_ENV_TIMEOUT_S", 1)
    run_dir = make_run(tmp_path, ALL_PASS)
    started = time.monotonic()
    evidence.write_collect_env(run_dir, records.read_all(run_dir))
    assert time.monotonic() - started < 15  # not held by the grandchild's copy of the output pipe
    collected = (run_dir / layout.COLLECT_ENV).read_text()
    assert "started" in collected and "timed out after 1 s; its process group was killed" in collected
    status = Path(f"/proc/{pid_file.read_text().strip()}/status")
    for _ in range(50):  # SIGKILL is delivered asynchronously: allow a loaded machine a moment to act on it
        if not status.exists() or "zombie" in status.read_text():
            break
        time.sleep(0.1)
    assert not status.exists() or "zombie" in status.read_text()


def test_a_collect_env_started_ahead_is_awaited_not_run_twice(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho run >> {tmp_path / 'runs.txt'}\nsleep 2\necho done\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(layout, "gpu_python", lambda venv=None: fake)
    run_dir = make_run(tmp_path, ALL_PASS)
    assert evidence.start_collect_env(run_dir) is True
    assert evidence.start_collect_env(run_dir) is False  # once per run
    assert "done" not in (run_dir / layout.COLLECT_ENV).read_text()  # started, not awaited: still running
    evidence.write_collect_env(run_dir, records.read_all(run_dir))
    collected = (run_dir / layout.COLLECT_ENV).read_text()
    assert collected.endswith("done\n\n--- exit code 3 ---\n")
    assert (tmp_path / "runs.txt").read_text() == "run\n" and evidence.STARTED == {}


def test_no_collect_env_without_a_passing_install(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "gpu_python", lambda venv=None: Path(sys.executable))
    run_dir = make_run(tmp_path, {"probe": StageStatus.PASS, "install": StageStatus.FAIL})
    render(run_dir)
    assert not (run_dir / layout.COLLECT_ENV).exists()


def test_an_interrupted_run_starts_no_collect_env_and_is_sealed_at_once(tmp_path, monkeypatch):
    """After an interrupt during cuda_check, evidence started collect_env and waited up to its 180 s; a time
    limit's SIGKILL (Slurm's KillWait: 30 s) came before the seal."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setattr(layout, "gpu_python", lambda venv=None: fake)
    run_dir = make_run(tmp_path, ALL_PASS)
    evidence.stop_collect_env(run_dir)
    started = time.monotonic()
    evidence.write_collect_env(run_dir, records.read_all(run_dir))
    assert time.monotonic() - started < 5
    assert (run_dir / layout.COLLECT_ENV).read_text().startswith("not run: the run was interrupted")


# --------------------------------------------------------------------------- a hostile or corrupted own file


def nested(document: dict, depth: int) -> str:
    """`document` as JSON with the string "DEEP" in it replaced by lists nested `depth` deep."""
    return json.dumps(document).replace('"DEEP"', "[" * depth + "]" * depth)


def deep_own_file(stage: str, depth: int) -> str:
    """The stage's own file as it passed, with a value the stage and the README read nested `depth` deep."""
    doc = own_file(stage)
    if stage == "train":
        doc["figures"] = {**doc["figures"], "thresholds": "DEEP"}
    elif stage == "cuda_check":
        doc["versions"] = {**doc["versions"], "torch": "DEEP"}
    else:
        doc["gpus"] = [{**GPU, "name": "DEEP"}]
    return nested(doc, depth)


def assert_rendered_fail(run_dir, rec, stage: str, says: str) -> None:
    """evidence wrote the README, summary.json and the seal; the verdict is FAIL at `stage` in one line."""
    assert rec.status == StageStatus.PASS, rec.reason
    assert evidence.exit_code_of(rec, run_dir) == layout.EXIT_STAGE[stage]
    summary = json.loads((run_dir / layout.SUMMARY_FILE).read_text())
    assert (summary["verdict"], summary["failed_stage"]) == ("FAIL", stage)
    assert summary["reason"].startswith(says) and "\n" not in summary["reason"], summary["reason"]
    assert (run_dir / layout.README_FILE).read_text().splitlines()[0] == "# M40 run `m40_v1`: FAIL"
    assert runs.is_sealed(run_dir)


@pytest.mark.parametrize("depth", [450, 900, 990])
@pytest.mark.parametrize("stage", ["probe", "cuda_check", "train"])
def test_an_own_file_nested_too_deep_is_a_fail_at_its_stage_and_the_run_is_still_rendered(tmp_path, stage, depth):
    run_dir = make_run(tmp_path, ALL_PASS)
    file = layout.STAGE_EVIDENCE[stage]
    (run_dir / file).write_text(deep_own_file(stage, depth))
    rec = render(run_dir)
    assert_rendered_fail(run_dir, rec, stage, f"stages/{stage}.json says pass but {file} is nested too deep to read")


def test_an_own_file_too_large_to_be_the_tools_is_a_fail_naming_its_size(tmp_path):
    """train_result.json padded past the cap every reader of a run's JSON keeps (16 MiB: a real one is kilobytes)."""
    run_dir = make_run(tmp_path, ALL_PASS)
    body = json.dumps(own_file("train"))
    (run_dir / layout.TRAIN_RESULT).write_text(body[:-1] + " " * (16 << 20) + "}")
    size = (run_dir / layout.TRAIN_RESULT).stat().st_size
    rec = render(run_dir)
    says = f"stages/train.json says pass but train_result.json is too large to be this tool's: {size} bytes"
    assert_rendered_fail(run_dir, rec, "train", says)


def test_a_check_on_a_gpu_index_no_machine_has_is_a_fail_not_a_memory_error(tmp_path):
    """A per-GPU SKIP on GPUs 0, 1 and 10**12 (gpu_span once built the list of every index between)."""
    run_dir = make_run(tmp_path, ALL_PASS)
    doc = own_file("cuda_check")
    doc["checks"] = [{"name": "health", "gpu": g, "status": "SKIP", "data": {}} for g in (0, 1, 10**12)]
    (run_dir / layout.CUDA_CHECK_JSON).write_text(json.dumps(doc))
    rec = render(run_dir)
    says = "stages/cuda_check.json says pass but cuda_check.json is not what cuda_check writes (ValueError: check "
    assert_rendered_fail(run_dir, rec, "cuda_check", says + "health names gpu 1000000000000, not a GPU index")


@pytest.mark.parametrize(
    "gpus",
    [[{}], [5], 5, "H100", [{**GPU, "clock_event_reasons": 5}], [{**GPU, "index": {"a": [1]}}]],
    ids=["an empty entry", "a number", "no list", "a string", "reasons not a list", "an index that is an object"],
)
def test_a_gpu_list_not_as_probe_writes_it_still_renders_the_run(tmp_path, gpus):
    """The README's GPU table is gpus.json's: an entry with fields missing or of another type is shown as it
    is (N/A where missing), never a template error that leaves the run without a verdict."""
    run_dir = make_run(tmp_path, ALL_PASS)
    (run_dir / layout.GPUS_JSON).write_text(json.dumps({**own_file("probe"), "gpus": gpus}))
    rec = render(run_dir)
    assert rec.status == StageStatus.PASS, rec.reason
    summary = json.loads((run_dir / layout.SUMMARY_FILE).read_text())
    assert summary["verdict"] in ("PASS", "FAIL", "PARTIAL") and runs.is_sealed(run_dir)
    assert (run_dir / layout.README_FILE).read_text().startswith("# M40 run `m40_v1`: ")
