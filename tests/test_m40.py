"""`nox -s m40` and the stage harness: exit codes, skipped stages, Ctrl-C, no secrets, and end to end
through nox in a copy of the project (the user's .venv stays byte-identical)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import fake_gpu
import pytest
from trees import tree_hashes

from tasks import evidence, layout, m40, records, runs, stage, text
from tasks.records import Outcome, StageStatus

SHA256SUM = shutil.which("sha256sum")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Runs go to tmp_path/runs; NVML is unavailable; GitHub's step summary is not touched."""
    monkeypatch.setattr(layout, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.delenv(evidence.STEP_SUMMARY_ENV, raising=False)
    fake_gpu.no_nvml(monkeypatch)


@pytest.fixture
def good_driver(monkeypatch, tmp_path):
    fake_gpu.working_smi(tmp_path / "bin", cuda="13.0")
    fake_gpu.put_first_on_path(monkeypatch, tmp_path / "bin")


@pytest.fixture
def no_driver(monkeypatch, tmp_path):
    fake_gpu.failing_smi(tmp_path / "bin")
    fake_gpu.put_first_on_path(monkeypatch, tmp_path / "bin")


TORCH_ID = {"version": "2.11.0+cu130", "file": "/m/.venv-gpu/torch/__init__.py", "record_sha256": "0" * 64}
# What the real stages record on a healthy 1-GPU machine (the fake nvidia-smi shows one H100).
FAKE_FIGURES = {
    "install": {"torch": "2.11.0+cu130", "torch_identity": TORCH_ID},
    "cuda_check": {"gpus_checked": 1, "overrides": [], "torch_identity": TORCH_ID},
    "train": {
        "device": "cuda",
        "nproc": 1,
        "overrides": [],
        "torch_identity": TORCH_ID,
        "steps": 30,
        "thresholds": {"checks.first_loss_tol": 0.5, "checks.final_window": 5, "checks.min_loss_drop": 2.0},
    },
}


def fake_stage(name, status=StageStatus.PASS, raises=None, **figures):
    """A stand-in for install/cuda_check/train (their real versions need a GPU)."""

    def run(run_dir, args):
        if raises:
            raise raises
        for f in layout.STAGE_FILES[name]:
            (run_dir / f).write_text(f"{name} output\n")
        recorded = {**FAKE_FIGURES[name], **figures}
        if name in layout.STAGE_EVIDENCE:
            own = own_file(name, status == StageStatus.PASS, recorded)
            (run_dir / layout.STAGE_EVIDENCE[name]).write_text(json.dumps(own))
        return Outcome(status, "" if status == StageStatus.PASS else f"{name} broke", recorded)

    return SimpleNamespace(DESCRIPTION=f"fake {name}", add_arguments=lambda parser: None, run=run)


def own_file(name: str, passed: bool, figures: dict) -> dict:
    """The stage's own file (layout.STAGE_EVIDENCE) that its record's figures agree with."""
    if name == "cuda_check":
        ident = {k: figures.get(k) for k in ("gpus_checked", "torch_identity")}
        return {"exit_code": 0 if passed else 1, **ident}
    return {"status": "pass" if passed else "fail", "exit_code": 0 if passed else 3, "figures": figures}


def use_fakes(monkeypatch, **overrides):
    """Replace the GPU-only stages by fakes; probe and evidence stay real."""
    for name in ("install", "cuda_check", "train"):
        monkeypatch.setitem(stage.MODULES, name, overrides.get(name, fake_stage(name)))


def only_run():
    (run_dir,) = runs.list_runs(layout.RUNS_DIR)
    return run_dir


def statuses(run_dir):
    return {name: rec.status for name, rec in records.read_all(run_dir).items()}


# --------------------------------------------------------------------------- exit codes


def test_all_stages_pass_exit_0_and_the_run_is_sealed(monkeypatch, good_driver):
    use_fakes(monkeypatch)
    assert m40.main([]) == layout.EXIT_OK
    run_dir = only_run()
    assert set(statuses(run_dir).values()) == {StageStatus.PASS}
    assert runs.is_sealed(run_dir)
    assert (run_dir / layout.README_FILE).read_text().startswith("# M40 run `m40_v1`: PASS")


def test_collect_env_runs_in_the_background_during_train_and_evidence_seals_it_complete(
    monkeypatch, good_driver, tmp_path
):
    fake = tmp_path / "venv-python"
    fake.write_text("#!/bin/sh\necho collect_env begins\nsleep 1\necho 'PyTorch version: fake'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(layout, "gpu_python", lambda venv=None: fake)
    seen = {}
    train = fake_stage("train")

    def train_run(run_dir, args):
        seen["started"] = run_dir.resolve() in evidence.STARTED  # started before train began
        return train.run(run_dir, args)

    use_fakes(monkeypatch, train=SimpleNamespace(DESCRIPTION="fake train", add_arguments=lambda p: None, run=train_run))
    assert m40.main([]) == layout.EXIT_OK
    run_dir = only_run()
    assert seen["started"] and evidence.STARTED == {}
    collected = (run_dir / layout.COLLECT_ENV).read_text()
    assert collected.startswith(f"$ {fake} -m torch.utils.collect_env")
    assert collected.endswith("PyTorch version: fake\n")
    assert layout.COLLECT_ENV in (run_dir / layout.SUMS_FILE).read_text()


@pytest.mark.parametrize("failing", ["install", "cuda_check", "train"])
def test_first_failed_stage_gives_its_exit_code_and_later_stages_are_skipped(monkeypatch, good_driver, failing):
    use_fakes(monkeypatch, **{failing: fake_stage(failing, StageStatus.FAIL)})
    assert m40.main([]) == layout.EXIT_STAGE[failing]
    run_dir = only_run()
    got = statuses(run_dir)
    assert got[failing] == StageStatus.FAIL and got["evidence"] == StageStatus.PASS
    later = layout.STAGES[layout.STAGES.index(failing) + 1 : -1]
    assert all(got[s] == records.StageStatus.SKIP for s in later)
    readme = (run_dir / layout.README_FILE).read_text()
    assert (
        f"**FAIL at {failing}** (exit code {layout.EXIT_STAGE[failing]}).\n\n"
        f"**What happened:** {text.md_inert(failing)} broke" in readme
    )


def logged(calls, stage_module, name):
    """`stage_module` with its run logged in `calls`."""

    def run(run_dir, args):
        calls.append(name)
        return stage_module.run(run_dir, args)

    return SimpleNamespace(**{**vars(stage_module), "run": run})


def train_started_ahead(calls):
    """A train stage offering prestart/cancel, as tasks/train.py does; its run takes the prestarted process."""

    def run(run_dir, args):
        calls.append(("train runs with", args.train_prestarted))
        args.train_prestarted = None
        return fake_stage("train").run(run_dir, args)

    return SimpleNamespace(
        DESCRIPTION="fake train",
        add_arguments=lambda parser: None,
        run=run,
        prestart=lambda run_dir, args: calls.append("prestart") or "early",
        cancel=lambda early: calls.append(("cancel", early)),
    )


@pytest.mark.parametrize("cuda_check_status", [StageStatus.PASS, StageStatus.FAIL])
def test_train_is_started_ahead_of_cuda_check_and_released_or_cancelled(monkeypatch, good_driver, cuda_check_status):
    calls = []
    check = logged(calls, fake_stage("cuda_check", cuda_check_status), "cuda_check")
    use_fakes(monkeypatch, train=train_started_ahead(calls), cuda_check=check)
    code = m40.main([])
    if cuda_check_status == StageStatus.PASS:
        assert code == layout.EXIT_OK and calls == ["prestart", "cuda_check", ("train runs with", "early")]
    else:  # train is skipped: the process started ahead is ended before evidence seals the run
        assert code == layout.EXIT_STAGE["cuda_check"] and calls == ["prestart", "cuda_check", ("cancel", "early")]


def test_a_train_that_cannot_start_ahead_changes_nothing_but_a_line(monkeypatch, good_driver, capsys):
    calls = []
    train = train_started_ahead(calls)

    def cannot(run_dir, args):
        raise PermissionError(13, "Permission denied", "/x/.venv-gpu/bin/python")

    use_fakes(monkeypatch, train=SimpleNamespace(**{**vars(train), "prestart": cannot}))
    assert m40.main([]) == layout.EXIT_OK
    assert calls == [("train runs with", None)]  # the stage launched it itself
    assert "m40: train.py not started ahead (PermissionError: [Errno 13] Permission denied" in capsys.readouterr().out


def test_probe_failure_exits_10_from_m40_and_from_the_stage_alone(monkeypatch, no_driver, capsys):
    use_fakes(monkeypatch)
    assert m40.main([]) == layout.EXIT_STAGE["probe"] == 10
    out = capsys.readouterr().out
    assert "probe: FAIL" in out and "couldn't communicate with the NVIDIA driver" in out
    assert statuses(only_run())["install"] == records.StageStatus.SKIP
    # the same exit code from `nox -s probe`
    assert stage.main("probe", []) == 10


def test_min_driver_cuda_above_the_driver_exits_10(monkeypatch, good_driver):
    use_fakes(monkeypatch)
    assert m40.main(["--min-driver-cuda", "13.1"]) == 10
    assert stage.main("probe", ["--min-driver-cuda", "12.8"]) == 0


def test_evidence_failure_exits_50_when_the_stages_passed(monkeypatch, good_driver):
    use_fakes(monkeypatch)
    monkeypatch.setattr(evidence, "run", lambda run_dir, args: (_ for _ in ()).throw(RuntimeError("disk on fire")))
    assert m40.main([]) == layout.EXIT_STAGE["evidence"] == 50
    assert not runs.is_sealed(only_run())


def test_ctrl_c_exits_130_and_the_run_says_where(monkeypatch, good_driver):
    use_fakes(monkeypatch, cuda_check=fake_stage("cuda_check", raises=KeyboardInterrupt()))
    assert m40.main([]) == layout.EXIT_INTERRUPTED == 130
    run_dir = only_run()
    assert statuses(run_dir)["cuda_check"] == records.StageStatus.INTERRUPTED
    assert "train" not in statuses(run_dir)
    assert runs.is_sealed(run_dir)  # evidence ran after Ctrl-C
    assert "**INTERRUPTED at cuda_check** (exit code 130)." in (run_dir / layout.README_FILE).read_text()


def test_sigterm_is_an_interrupt_and_the_run_is_sealed(monkeypatch, good_driver):
    """Slurm's --time limit, Kubernetes and `timeout` send SIGTERM: the run was left unsealed with a stage
    "running". It is Ctrl-C's path now: the stage INTERRUPTED, the run sealed with what it has."""
    import signal

    def terminated(run_dir, args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt the stage")

    train = SimpleNamespace(DESCRIPTION="fake train", add_arguments=lambda parser: None, run=terminated)
    use_fakes(monkeypatch, train=train)
    assert m40.main([]) == layout.EXIT_INTERRUPTED
    run_dir = only_run()
    assert statuses(run_dir)["train"] == records.StageStatus.INTERRUPTED and runs.is_sealed(run_dir)
    assert (
        records.read(run_dir, "train").reason == "stopped by SIGTERM (a job's time limit, a stop request) during train"
    )
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back as it was


def test_a_second_interrupt_while_the_run_is_sealed_does_not_stop_the_seal(monkeypatch, good_driver, capsys):
    """Ctrl-C twice: the second one arrived while evidence sealed and left the run without SHA256SUMS."""
    import signal

    real = evidence.run

    def pressed_again(run_dir, args, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        return real(run_dir, args, **kw)

    use_fakes(monkeypatch, cuda_check=fake_stage("cuda_check", raises=KeyboardInterrupt()))
    monkeypatch.setattr(evidence, "run", pressed_again)
    assert m40.main([]) == layout.EXIT_INTERRUPTED
    assert runs.is_sealed(only_run())
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


def test_bad_option_is_a_usage_error(monkeypatch):
    use_fakes(monkeypatch)
    with pytest.raises(SystemExit) as e:
        m40.main(["--no-such-option"])
    assert e.value.code == layout.EXIT_USAGE
    with pytest.raises(SystemExit) as e:
        stage.main("probe", ["--min-driver-cuda", "twelve"])
    assert e.value.code == layout.EXIT_USAGE
    assert not layout.RUNS_DIR.exists()  # nothing started


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--venv", "/tmp/xv"], "m40: error: --venv is for `nox -s install` alone; m40 always uses .venv-gpu"),
        (["--nnodes", "2"], "m40: error: 2 nodes (--nnodes) but no rendezvous: pass --rdzv-endpoint HOST:PORT"),
        (["--node-rank", "5", "--nnodes", "2", "--rdzv-endpoint", "h:1"], "m40: error: --node-rank=5: a node rank"),
        (["--rdzv-timeout", "-1"], "m40: error: --rdzv-timeout -1: must be more than 0 seconds"),
    ],
)
def test_options_the_chain_cannot_honour_are_refused_before_the_first_stage(monkeypatch, capsys, argv, message):
    for name in ("SLURM_NNODES", "NNODES", "SLURM_NODEID", "NODE_RANK", "MASTER_ADDR", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert m40.main(argv) == layout.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not layout.RUNS_DIR.exists()  # nothing started


def test_the_default_venv_is_accepted_by_the_chain():
    args = m40.build_parser().parse_args(["--venv", str(layout.VENV_GPU)])
    m40.chain_inputs(args)  # raises ConfigError if refused


def test_the_stage_list_is_kept_once_in_layout():
    from tasks import verdict

    assert layout.STAGES[-1] == "evidence" and layout.WORK_STAGES == layout.STAGES[:-1]
    assert m40.WORK_STAGES is verdict.WORK_STAGES is evidence.WORK_STAGES is layout.WORK_STAGES


def test_each_m40_run_is_a_new_folder(monkeypatch, no_driver):
    use_fakes(monkeypatch)
    m40.main([])
    m40.main([])
    assert [p.name for p in runs.list_runs(layout.RUNS_DIR)] == ["m40_v1", "m40_v2"]


def test_m40_into_a_run_dir_holding_an_earlier_attempt_is_refused_and_it_stays_as_it_was(
    monkeypatch, no_driver, tmp_path, capsys
):
    """m40 runs every stage into a run of its own: an earlier `nox -s train --run-dir D`'s log, which ends in
    PASS, would otherwise be sealed into a run whose train stage never ran (a cuda_check failure skips it)."""
    use_fakes(monkeypatch)
    run_dir = tmp_path / "mine"
    assert stage.main("train", ["--run-dir", str(run_dir)]) == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert m40.main(["--run-dir", str(run_dir)]) == layout.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"m40: error: run folder {run_dir} already holds stage results (train); m40 runs every stage into a run "
        "of its own: pass a new or empty folder, or drop --run-dir for the next m40_vN"
    ]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    killed = tmp_path / "killed"  # a stage killed before its record: its log, and stages/ empty
    (killed / layout.STAGES_DIR).mkdir(parents=True)
    (killed / layout.TRAIN_LOG).write_text("... PASS: trained\n")
    assert m40.main(["--run-dir", str(killed)]) == layout.EXIT_USAGE
    assert f"already holds files ({layout.TRAIN_LOG})" in capsys.readouterr().err
    assert m40.main(["--run-dir", str(tmp_path / "empty")]) in (0, 10)  # a new folder is fine


# --------------------------------------------------------------------------- secrets


def test_a_secret_in_the_environment_reaches_no_file_of_the_run(monkeypatch, good_driver):
    secrets = {
        "HF_TOKEN": "hf_plantedsecret0001",
        "NVIDIA_API_KEY": "nvapi-plantedsecret0002",
        "CUDA_SECRET": "plantedsecret0003",
        "NCCL_PASSWORD": "plantedsecret0004",
        "PYTORCH_CREDENTIALS": "plantedsecret0005",
        "PIP_INDEX_URL": "https://alice:plantedsecret0006@pypi.example.com/simple",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    use_fakes(monkeypatch)
    assert m40.main([]) == 0
    run_dir = only_run()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in data, f"{path.name} holds the value of {name}"
        assert b"plantedsecret" not in data, f"{path.name} holds part of a planted secret"
    env_info = (run_dir / "env_info.txt").read_text()
    assert "NVIDIA_API_KEY=<redacted>" in env_info and "CUDA_SECRET=<redacted>" in env_info
    assert "PIP_INDEX_URL=https://pypi.example.com/\n" in env_info and "alice" not in env_info  # scheme://host/ only


# --------------------------------------------------------------------------- end to end through nox


@pytest.mark.slow
@pytest.mark.skipif(SHA256SUM is None, reason="needs coreutils sha256sum")
def test_nox_m40_without_a_gpu_end_to_end(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(layout.ROOT / "noxfile.py", project)
    for folder in ("tasks", "configs", "training_pt"):
        if (layout.ROOT / folder).is_dir():
            shutil.copytree(layout.ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    venv = project / ".venv"  # the user's own CPU environment
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # noqa: S603
    (venv / "marker.txt").write_text("user data\n")
    venv_before = tree_hashes(venv)

    bin_dir = tmp_path / "bin"
    fake_gpu.failing_smi(bin_dir)
    env = {k: v for k, v in os.environ.items() if k not in (evidence.STEP_SUMMARY_ENV, "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", NOX_SCRIPT_MODE="none")
    # NVML cannot load here (no driver); where it can, the fallback is forced so the fake answers.
    extra = ["--probe-source", "nvidia-smi"] if fake_gpu.nvml_works_here() else []

    def nox_m40():
        return subprocess.run(
            [sys.executable, "-m", "nox", "-s", "m40", "--", *extra],
            cwd=project,
            env=env,  # noqa: S603
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = nox_m40()
    output = first.stdout + first.stderr
    assert first.returncode == layout.EXIT_STAGE["probe"], output
    assert "probe: FAIL" in output and "couldn't communicate with the NVIDIA driver" in output
    assert first.stdout.strip().splitlines()[-1].startswith("m40: FAIL at probe: ")  # the verdict is the last line
    assert first.stdout.strip().endswith(f"(exit 10); read {project / 'submission_runs' / 'm40_v1' / 'README.md'}")
    assert "Session m40" not in first.stderr  # nox adds no line after it

    run_dir = project / "submission_runs" / "m40_v1"
    for f in layout.REQUIRED_FILES:
        assert (run_dir / f).is_file(), f
    readme = (run_dir / layout.README_FILE).read_text()
    assert readme.splitlines()[0] == "# M40 run `m40_v1`: FAIL"
    assert "**FAIL at probe** (exit code 10)." in readme
    check = subprocess.run([SHA256SUM, "-c", layout.SUMS_FILE], cwd=run_dir, capture_output=True, text=True)  # noqa: S603
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (run_dir / layout.LOCK_FILE).exists()
    v1_before = tree_hashes(run_dir)

    second = nox_m40()
    assert second.returncode == 10, second.stdout + second.stderr
    assert (project / "submission_runs" / "m40_v2" / layout.SUMS_FILE).is_file()
    assert tree_hashes(run_dir) == v1_before  # the finished run was not written again
    assert tree_hashes(venv) == venv_before  # the user's .venv is byte-identical
    assert not (project / ".venv-gpu").exists()  # nothing installed when the probe fails


# --------------------------------------------------------------------------- PARTIAL and the last line


@pytest.mark.parametrize(
    ("train_figures", "named"),
    [
        ({"device": "cpu"}, "train ran on cpu, not on CUDA"),
        ({"overrides": ["checks.min_loss_drop=0.3"]}, "train ran with checks.min_loss_drop=0.3"),
    ],
)
def test_a_weakened_run_is_partial_with_its_own_exit_code_named_first_in_the_readme(
    monkeypatch, good_driver, capsys, train_figures, named
):
    use_fakes(monkeypatch, train=fake_stage("train", **train_figures))
    assert m40.main([]) == layout.EXIT_PARTIAL == 70
    run_dir = only_run()
    head = (run_dir / layout.README_FILE).read_text().splitlines()[:6]
    assert head[0] == "# M40 run `m40_v1`: PARTIAL"
    assert any(named in line for line in head), head
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("m40: PARTIAL: ") and named in last
    assert last.endswith(f"(exit 70); read {run_dir / layout.README_FILE}")


def test_a_config_file_edited_in_the_checkout_makes_the_run_partial_and_names_it(monkeypatch, good_driver):
    """speed_share lowered in configs/cuda_check.yaml: the stages record the changed file (tasks/proof.py asks
    git), and the verdict is PARTIAL, as the option that lowers it would make it."""
    from tasks import proof

    seen = []

    def changed(paths, root=None):
        seen.append(list(paths))
        return ["configs/cuda_check.yaml"]

    monkeypatch.setattr(proof, "changed_files", changed)
    use_fakes(monkeypatch)
    assert m40.main([]) == layout.EXIT_PARTIAL
    assert "configs/cuda_check.yaml" in seen[0] and "configs/gpus.yaml" in seen[0]
    assert records.read(only_run(), "cuda_check").figures["changed_configs"] == ["configs/cuda_check.yaml"]
    reason = json.loads((only_run() / layout.SUMMARY_FILE).read_text())["reason"]
    assert reason.startswith("configs/cuda_check.yaml differed from this tool's git commit when the stages ran")


def test_a_torch_that_changed_between_stages_fails_at_that_stage(monkeypatch, good_driver):
    other = {"version": "2.5.0", "file": "/stand-in/torch/__init__.py", "record_sha256": "f" * 64}
    use_fakes(monkeypatch, train=fake_stage("train", torch_identity=other))
    assert m40.main([]) == layout.EXIT_STAGE["train"]
    reason = json.loads((only_run() / layout.SUMMARY_FILE).read_text())["reason"]
    assert "train ran torch 2.5.0 from /stand-in/torch/__init__.py" in reason
    assert "install recorded torch 2.11.0+cu130" in reason


def test_the_last_line_of_m40_is_the_verdict_its_exit_code_and_the_readme(monkeypatch, good_driver, capsys):
    use_fakes(monkeypatch)
    assert m40.main([]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"m40: PASS (exit 0); read {only_run() / layout.README_FILE}"


# --------------------------------------------------------------------------- one voice (issue 16.4)


def test_evidence_alone_with_no_run_at_all_is_one_line_and_exit_2(capsys):
    """Nothing to render: never a new, empty run sealed with exit 0."""
    assert stage.main("evidence", []) == layout.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"evidence: error: no run folder in {layout.RUNS_DIR} to render; run `nox -s m40` first"]
    assert runs.list_runs(layout.RUNS_DIR) == []


@pytest.mark.parametrize("made", [False, True])
def test_evidence_with_a_run_dir_that_is_no_run_is_one_line_and_exit_2(tmp_path, capsys, made):
    """A typo in --run-dir made the folder and sealed an empty run there."""
    target = tmp_path / "doesnotexist"
    if made:
        target.mkdir()
    assert stage.main("evidence", ["--run-dir", str(target)]) == layout.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"evidence: error: --run-dir {target} is not a run folder (no stages/ in it): nothing to render; "
        "pass the folder a run's stages wrote into, or run nox -s m40"
    ]
    assert list(target.iterdir()) == [] if made else not target.exists()


def test_evidence_alone_on_a_sealed_newest_run_says_so_and_changes_nothing(monkeypatch, no_driver, capsys):
    use_fakes(monkeypatch)
    assert m40.main([]) == 10
    run_dir = only_run()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert stage.main("evidence", []) == 10  # the sealed verdict's exit code, as m40 gave it
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"evidence: {run_dir} is already sealed: FAIL at probe")
    assert "nothing changed" in out[0]
    assert runs.list_runs(layout.RUNS_DIR) == [run_dir]  # no new, empty run sealed
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_stages_run_one_by_one_end_with_the_verdicts_exit_code_as_m40_does(monkeypatch, no_driver, capsys):
    """README: exit codes are the same from stages run alone as from m40; the last command, evidence, is the
    one that judges the run, so its exit code is the verdict's (probe's FAIL: 10), not 0 for "rendered"."""
    use_fakes(monkeypatch)
    assert stage.main("probe", []) == 10
    assert stage.main("evidence", []) == 10
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("evidence: FAIL at probe: ")


def test_train_without_the_gpu_environment_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(layout, "VENV_GPU", tmp_path / "no-venv")
    assert stage.main("train", []) == layout.EXIT_STAGE["train"]
    out = capsys.readouterr().out
    assert "nox -s install -p CHANNEL" in out
    assert "`nox -s install`" not in out  # the bare command refuses to run


def test_the_readme_exit_code_table_is_every_code_in_layout():
    readme = (layout.ROOT / "README.md").read_text()
    table = readme.split("## Exit codes")[1].split("\n## ")[0]
    documented = sorted(
        int(line.split("|")[1])
        for line in table.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    )
    codes = sorted(
        {v for k, v in vars(layout).items() if k.startswith("EXIT_") and isinstance(v, int)}
        | set(layout.EXIT_STAGE.values())
    )
    assert documented == codes


def test_the_workflows_hold_a_read_only_token_and_one_run_at_a_time():
    import yaml

    workflows = sorted((layout.ROOT / ".github" / "workflows").glob("*.yml"))
    assert [w.name for w in workflows] == ["ci.yml", "m40.yml"]
    for path in workflows:
        doc = yaml.safe_load(path.read_text())
        assert doc["permissions"] == {"contents": "read"}, path.name
        assert "group" in doc["concurrency"], path.name
    gpu = (layout.ROOT / ".github" / "workflows" / "m40.yml").read_text()
    assert "::error title=m40 verdict" in gpu and "PIPESTATUS[0]" in gpu
    labels = yaml.safe_load((layout.ROOT / ".github" / "actionlint.yaml").read_text())["self-hosted-runner"]["labels"]
    assert "gpu" in labels


@pytest.mark.parametrize("said", ["m40: run folder /runner/work/submission_runs/m40_v3\n", ""])
def test_the_gpu_workflow_uploads_this_jobs_run_never_an_earlier_one(tmp_path, said):
    """With `clean: false`, an earlier job's m40_v1 stays; a job that stopped before making its own folder
    (a bad --channels: exit 2) must not upload it as its evidence."""
    import yaml

    doc = yaml.safe_load((layout.ROOT / ".github" / "workflows" / "m40.yml").read_text())
    (step,) = [s for s in doc["jobs"]["m40"]["steps"] if s.get("id") == "run"]
    (tmp_path / "submission_runs" / "m40_v1").mkdir(parents=True)  # the earlier job's
    (tmp_path / "m40.log").write_text("probe: PASS (0.2 s)\n" + said + "m40: FAIL\n")
    out = tmp_path / "github_output"
    env = {**os.environ, "RUNNER_TEMP": str(tmp_path), "GITHUB_OUTPUT": str(out)}
    subprocess.run(["bash", "-e", "-c", step["run"]], cwd=tmp_path, env=env, check=True)
    want = "/runner/work/submission_runs/m40_v3" if said else ""
    assert f"dir={want}\n" in out.read_text()
