"""Run folders: next m40_vN, never writing into a sealed run, the lock, reuse of an unfinished run."""

from __future__ import annotations

import argparse
import json
import socket

import holders
import pytest

from tasks import layout, runs, stage, venvs
from tasks.records import StageStatus

PROJECT = layout.ROOT


def seal(run_dir):
    (run_dir / layout.SUMS_FILE).write_text("")


def test_runs_are_numbered_from_v1_and_never_reuse_a_number(tmp_path):
    assert runs.create_next(tmp_path).name == "m40_v1"
    assert runs.create_next(tmp_path).name == "m40_v2"
    (tmp_path / "m40_v7").mkdir()
    (tmp_path / "m40_vx").mkdir()  # not a run
    (tmp_path / "notes.txt").write_text("")
    assert runs.create_next(tmp_path).name == "m40_v8"
    assert [p.name for p in runs.list_runs(tmp_path)] == ["m40_v1", "m40_v2", "m40_v7", "m40_v8"]


def test_numbers_sort_as_numbers(tmp_path):
    for n in (9, 10, 2):
        (tmp_path / f"m40_v{n}" / layout.STAGES_DIR).mkdir(parents=True)  # a run folder holds stages/
    assert [p.name for p in runs.list_runs(tmp_path)] == ["m40_v2", "m40_v9", "m40_v10"]
    assert runs.newest_unfinished(tmp_path).name == "m40_v10"


def test_m40_always_starts_a_new_run(tmp_path):
    first = runs.resolve(tmp_path, None, new=True)
    assert runs.resolve(tmp_path, None, new=True) != first


def test_a_stage_alone_reuses_the_newest_unfinished_run(tmp_path):
    first = runs.resolve(tmp_path, None, new=False)
    assert first.name == "m40_v1"
    assert runs.resolve(tmp_path, None, new=False) == first


def test_a_sealed_run_is_never_written_again(tmp_path):
    first = runs.resolve(tmp_path, None, new=False)
    seal(first)
    second = runs.resolve(tmp_path, None, new=False)
    assert second.name == "m40_v2"
    with pytest.raises(runs.RunError, match="sealed") as e:
        runs.resolve(tmp_path, first, new=False)
    assert e.value.exit_code == layout.EXIT_USAGE


def test_run_dir_option_picks_a_folder(tmp_path):
    chosen = tmp_path / "elsewhere" / "my_run"
    assert runs.resolve(tmp_path / "runs", chosen, new=True) == chosen
    assert chosen.is_dir()


def test_sealed_run_dir_is_refused_by_a_stage_with_exit_2(tmp_path, capsys):
    run_dir = tmp_path / "m40_v1"
    run_dir.mkdir()
    seal(run_dir)
    assert stage.main("evidence", ["--run-dir", str(run_dir)]) == layout.EXIT_USAGE
    assert "is sealed" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == [layout.SUMS_FILE]


def test_lock_is_released_after_use_and_after_an_error(tmp_path):
    with runs.locked(tmp_path):
        assert (tmp_path / layout.LOCK_FILE).exists()
    assert not (tmp_path / layout.LOCK_FILE).exists()
    with pytest.raises(RuntimeError), runs.locked(tmp_path):
        raise RuntimeError("boom")
    assert not (tmp_path / layout.LOCK_FILE).exists()


@pytest.fixture
def holder(tmp_path):
    """Another process holding the run's lock (killed hard at the end, as a crash would)."""
    (tmp_path / layout.STAGES_DIR).mkdir()  # a run folder
    proc = holders.hold("tasks.runs", "locked", tmp_path, cwd=PROJECT)
    yield proc
    if proc.poll() is None:
        holders.release(proc)


def test_second_process_is_told_who_holds_the_lock(tmp_path, holder, capsys):
    with pytest.raises(runs.RunLocked) as e, runs.locked(tmp_path):
        pass
    msg = str(e.value)
    assert f"pid {holder.pid} on {socket.gethostname()}" in msg
    assert "wait for it to finish" in msg
    assert e.value.exit_code == layout.EXIT_LOCKED
    # The same through a stage run alone: the locked exit code, nothing written.
    assert stage.main("probe", ["--run-dir", str(tmp_path)]) == layout.EXIT_LOCKED
    assert f"locked by pid {holder.pid}" in capsys.readouterr().err
    assert not any((tmp_path / layout.STAGES_DIR).iterdir())


def test_lock_of_a_dead_process_is_taken_over(tmp_path, holder):
    holder.kill()  # dies without releasing: the lock file stays
    holder.wait()
    info = json.loads((tmp_path / layout.LOCK_FILE).read_text())
    assert info["pid"] == holder.pid
    with runs.locked(tmp_path):
        assert json.loads((tmp_path / layout.LOCK_FILE).read_text())["pid"] != holder.pid


def test_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / layout.LOCK_FILE).write_text(
        json.dumps({"pid": 1, "host": "other-host", "since": "x", "command": "nox"})
    )
    with pytest.raises(runs.RunLocked, match="other-host"), runs.locked(tmp_path):
        pass


@pytest.fixture
def venv_holder(tmp_path, monkeypatch):
    """venv_holder(how): another process holding tmp_path/.venv-gpu (`locked`: an install, `in_use`: a stage)."""
    monkeypatch.setattr(layout, "VENV_GPU", tmp_path / ".venv-gpu")
    procs = []

    def start(how):
        procs.append(holders.hold("tasks.venvs", how, layout.VENV_GPU, cwd=PROJECT))
        return procs[-1]

    yield start
    for proc in procs:
        holders.release(proc)


@pytest.mark.parametrize("name", ["cuda_check", "train"])
def test_a_stage_that_uses_gpu_venv_is_a_one_line_fail_while_an_install_holds_it(tmp_path, venv_holder, name):
    install = venv_holder("locked")
    run_dir = runs.resolve(tmp_path / "runs", None, new=True)
    rec = stage.execute(name, run_dir, argparse.Namespace())
    assert rec.status == StageStatus.FAIL
    assert f"is being installed by pid {install.pid} on {socket.gethostname()}" in rec.reason


def test_an_install_waits_for_stages_that_use_gpu_venv(venv_holder):
    venv_holder("in_use")
    venv_holder("in_use")  # two stages at once share it
    with pytest.raises(venvs.VenvError, match="being used by processes that share it"):
        with venvs.locked(layout.VENV_GPU):
            pass


def test_changed_files_names_what_differs_from_the_commit_and_nothing_outside_git(tmp_path):
    """tasks/proof.changed_files: the listed files a checkout has changed (edited, deleted, new), for the stage
    records' `changed_configs`; None where git cannot tell (not a checkout)."""
    import subprocess

    from tasks import proof

    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    for name in ("a.yaml", "b.yaml", "c.yaml"):
        (repo / "configs" / name).write_text("x: 1\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    paths = ["configs/a.yaml", "configs/b.yaml", "configs/c.yaml", "configs/new.yaml"]
    assert proof.changed_files(paths, repo) == []
    (repo / "configs" / "b.yaml").chmod(0o755)  # a copy or a mount that changes modes changes no number
    assert proof.changed_files(paths, repo) == []
    (repo / "configs" / "a.yaml").write_text("x: 0.01\n")
    (repo / "configs" / "c.yaml").unlink()
    (repo / "configs" / "new.yaml").write_text("y: 2\n")
    assert proof.changed_files(paths, repo) == ["configs/a.yaml", "configs/c.yaml", "configs/new.yaml"]
    assert proof.changed_files(paths, tmp_path / "not-a-checkout") is None
    copy = repo / "vendored"  # the tool unpacked (git archive, a tarball) inside another project's repository
    (copy / "configs").mkdir(parents=True)
    (copy / "configs" / "a.yaml").write_text("x: 1\n")
    assert proof.changed_files(paths, copy) is None
