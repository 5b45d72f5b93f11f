"""Hostile input and faults, built for real, through nox in a copy of the project (issue 11.1-11.3).

Each test makes the fault (a broken or non-UTF-8 config file, a file in the way, an immutable folder, a
real symlink, a held lock, a bad option) and checks: the exit code the README gives, exactly one line
on stderr besides nox's own, naming the problem and the fix, no traceback, and nothing lost (the earlier
sealed run, the project's README and any linked folder are byte-identical afterwards).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import fake_gpu
import holders
import pytest
from trees import tree_hashes

from tasks import config, evidence, layout, m40, records, runs, stage, validate

pytestmark = pytest.mark.slow
CHATTR = shutil.which("chattr")
USAGE, LOCKED = layout.EXIT_USAGE, layout.EXIT_LOCKED


class Project:
    """A copy of the project on a machine without a GPU (a failing nvidia-smi first on PATH)."""

    def __init__(self, root: Path, bin_dir: Path):
        self.root, self.runs = root, root / "submission_runs"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in (evidence.STEP_SUMMARY_ENV, "VIRTUAL_ENV", layout.CHANNELS_ENV)
        }
        self.env.update(PATH=f"{bin_dir}{os.pathsep}{self.env.get('PATH', '')}", NOX_SCRIPT_MODE="none")

    def nox(self, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "nox", *argv],
            cwd=self.root,
            env={**self.env, **(env or {})},  # noqa: S603
            capture_output=True,
            text=True,
            timeout=300,
        )

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.root.parent / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def run_names(self) -> list[str]:
        return sorted(p.name for p in self.runs.iterdir() if p.name != ".gitkeep")


NO_GPU = ["--probe-source", "nvidia-smi"] if fake_gpu.nvml_works_here() else []  # the fake answers, not NVML


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A project copy holding one sealed FAIL run, m40_v1, made by a real `nox -s m40` without a GPU."""
    base = tmp_path_factory.mktemp("template")
    root = base / "project"
    root.mkdir()
    for name in ("noxfile.py", "README.md"):
        shutil.copy2(layout.ROOT / name, root)
    for folder in ("tasks", "configs", "training_pt"):
        shutil.copytree(layout.ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    fake_gpu.failing_smi(base / "bin")
    first = Project(root, base / "bin").nox("-s", "m40", "--", *NO_GPU)
    assert first.returncode == layout.EXIT_STAGE["probe"], first.stdout + first.stderr
    assert runs.is_sealed(root / "submission_runs" / "m40_v1")
    return base


@pytest.fixture
def project(template, tmp_path):
    shutil.copytree(template, tmp_path / "t", symlinks=True)
    p = Project(tmp_path / "t" / "project", tmp_path / "t" / "bin")
    before = {"v1": tree_hashes(p.runs / "m40_v1"), "readme": (p.root / "README.md").read_bytes()}
    yield p
    for path in p.runs.iterdir() if p.runs.is_dir() else ():  # the fault may have left an immutable folder
        if CHATTR:
            subprocess.run([CHATTR, "-i", str(path)], capture_output=True)  # noqa: S603
    if p.runs.is_dir() and CHATTR:
        subprocess.run([CHATTR, "-i", str(p.runs)], capture_output=True)  # noqa: S603
    if (p.runs / "m40_v1").is_dir():
        assert tree_hashes(p.runs / "m40_v1") == before["v1"], "the earlier sealed run changed"
    assert (p.root / "README.md").read_bytes() == before["readme"], "the project's README changed"


def refused(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The one line the user got; checks the exit code, that it is the only one, and no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("nox > ")]
    assert len(lines) == 1, output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- 11.1 exit codes, checked up front


def test_m40_refuses_an_unknown_channel_before_any_stage_and_names_the_valid_ones(project):
    line = refused(project.nox("-s", "m40", "--", "--channels", "bogus"), USAGE, "bogus", "cu128", "cu124")
    assert "unknown channel" in line
    assert project.run_names() == ["m40_v1"]  # no run started


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_broken_channels_file_is_reported_on_a_machine_whose_probe_would_fail_first(project, how):
    bad = project.write("channels.yaml", "channels:\n  cu128: [\n")
    if how == "option":
        result = project.nox("-s", "m40", "--", "--channels-file", str(bad), *NO_GPU)
    else:
        result = project.nox("-s", "m40", "--", *NO_GPU, env={layout.CHANNELS_ENV: str(bad)})
    refused(result, USAGE, str(bad), "not valid YAML", "fix the syntax")
    assert project.run_names() == ["m40_v1"]


def test_install_with_an_unknown_channel_names_the_valid_ones_not_nox_s_no_sessions(project):
    line = refused(project.nox("-s", "install", "-p", "cu999"), USAGE, "cu999", "cu128", "wheelhouse")
    assert "no sessions" not in line


@pytest.mark.parametrize(
    "session,config_name,argv",
    [
        ("probe", "m40.yaml", ["--settings", "{bad}"]),
        ("install", "channels.yaml", ["--channels-file", "{bad}"]),
        ("cuda_check", "cuda_check.yaml", []),
        ("train", "submission_local_gpu_gpt2.yaml", ["--train-config", "{bad}"]),
        ("m40", "gpus.yaml", []),
    ],
)
def test_every_session_refuses_a_broken_config_file_with_exit_2(project, session, config_name, argv):
    bad = project.root / "configs" / config_name
    bad.write_text("key: [unclosed\n")
    nox_args = ["-s", session] + (["-p", "cu128"] if session == "install" else [])
    result = project.nox(*nox_args, "--", *[a.format(bad=bad) for a in argv], *(NO_GPU if session == "m40" else []))
    refused(result, USAGE, str(bad), "fix the syntax")
    assert project.run_names() == ["m40_v1"]


def test_a_bad_option_value_is_one_line_not_the_usage_block(project):
    refused(
        project.nox("-s", "m40", "--", "--check-speed-share", "2"), USAGE, "--check-speed-share", "(0, 1]", "--help"
    )


def test_a_locked_run_exits_with_a_code_nox_does_not_use_and_names_the_holder(project):
    run_dir = project.runs / "m40_v2"
    (run_dir / layout.STAGES_DIR).mkdir(parents=True)
    env = {**project.env, "PYTHONPATH": str(project.root)}
    holder = holders.hold("tasks.runs", "locked", run_dir, cwd=project.root, env=env)
    try:
        assert LOCKED not in (1, 2, 3)  # nox's own exit codes
        refused(project.nox("-s", "probe", "--", *NO_GPU), LOCKED, f"locked by pid {holder.pid}", "wait for it")
    finally:
        holders.release(holder)
    assert not any((run_dir / layout.STAGES_DIR).iterdir())


# --------------------------------------------------------------------------- 11.2 no traceback


def test_a_config_file_with_bytes_that_are_not_utf8_is_one_line(project):
    bad = project.write("m40.yaml", b'min_driver_cuda: "12.8"\xff\n')
    refused(project.nox("-s", "probe", "--", "--settings", str(bad)), USAGE, str(bad), "not UTF-8", "save it as UTF-8")
    refused(project.nox("-s", "m40", "--", "--train-config", str(bad)), USAGE, str(bad), "not UTF-8")


def test_submission_runs_that_is_a_file_is_one_line(project):
    shutil.rmtree(project.runs)
    project.runs.write_text("in the way\n")
    refused(project.nox("-s", "probe", "--", *NO_GPU), USAGE, str(project.runs), "not a folder", "move it away")
    assert project.runs.read_text() == "in the way\n"


@pytest.mark.skipif(CHATTR is None or os.geteuid() != 0, reason="needs chattr and root (chmod does not stop root)")
def test_submission_runs_that_cannot_be_written_is_one_line(project):
    subprocess.run([CHATTR, "+i", str(project.runs)], check=True)  # noqa: S603
    refused(
        project.nox("-s", "m40", "--", *NO_GPU),
        USAGE,
        "cannot create",
        str(project.runs / "m40_v2"),
        "Operation not permitted",
        "chattr -i",
    )


def test_a_run_dir_that_is_a_file_or_lies_under_one_is_one_line(project):
    afile = project.write("notes.txt", "mine\n")
    refused(project.nox("-s", "probe", "--", "--run-dir", str(afile)), USAGE, str(afile), "is a file")
    refused(project.nox("-s", "probe", "--", "--run-dir", str(afile / "sub")), USAGE, "lies under", str(afile))
    assert afile.read_text() == "mine\n"


@pytest.mark.parametrize("where", ["config file", "override"])
def test_a_learning_rate_that_is_nan_is_refused_before_training(project, where):
    if where == "config file":
        cfg = project.write("nan.yaml", "train:\n  lr: .nan\n")
        line = refused(project.nox("-s", "train", "--", "--train-config", str(cfg)), USAGE, str(cfg), "train.lr")
    else:
        line = refused(project.nox("-s", "m40", "--", "--train-override", "train.lr=nan"), USAGE, "train.lr=nan")
    assert "not a finite number" in line


@pytest.mark.parametrize("where", ["config file", "override"])
def test_an_unknown_training_config_key_or_a_wrong_override_type_is_exit_2_before_the_first_stage(project, where):
    """training_pt/configurator.py's loader (torch-free) runs in train's check_inputs: not exit 40 at train."""
    if where == "config file":
        cfg = project.write("typo.yaml", "train:\n  stpes: 3\n")
        result = project.nox("-s", "m40", "--", "--train-config", str(cfg), *NO_GPU)
        refused(result, USAGE, str(cfg), "unknown key 'train.stpes'", "--train-config")
    else:
        result = project.nox("-s", "m40", "--", "--train-override", "train.steps=ten", *NO_GPU)
        refused(result, USAGE, "train.steps=ten", "train.steps must be an integer", "--train-override")
    assert project.run_names() == ["m40_v1"]


def test_a_stage_that_finds_a_bad_input_itself_leaves_a_sealed_fail_run_and_exits_2(monkeypatch, tmp_path, capsys):
    """The checks up front catch what they can; a stage that still meets a bad input (here a stand-in
    install raising ConfigError) fails its record, evidence seals the run, and m40 exits 2."""
    monkeypatch.setattr(layout, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.delenv(evidence.STEP_SUMMARY_ENV, raising=False)
    fake_gpu.no_nvml(monkeypatch)
    fake_gpu.working_smi(tmp_path / "bin", cuda="13.0")
    fake_gpu.put_first_on_path(monkeypatch, tmp_path / "bin")

    def broken_install(run_dir, args):
        raise config.ConfigError("channels.yaml: channels.x: broken; fix it")

    fake = SimpleNamespace(DESCRIPTION="install", add_arguments=lambda parser: None, run=broken_install)
    monkeypatch.setitem(stage.MODULES, "install", fake)
    assert m40.main(["--train-device", "cpu"]) == USAGE
    (run_dir,) = runs.list_runs(layout.RUNS_DIR)
    assert runs.is_sealed(run_dir)
    assert records.read(run_dir, "install").status == records.StageStatus.FAIL
    assert "broken; fix it" in records.read(run_dir, "install").reason
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["m40: error: channels.yaml: channels.x: broken; fix it"]


# --------------------------------------------------------------------------- 11.3 paths


def test_a_symlinked_run_folder_is_never_written_through(project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / layout.STAGES_DIR).mkdir(parents=True)
    (elsewhere / "env_info.txt").write_text("someone else's file\n")
    before = tree_hashes(elsewhere)
    (project.runs / "m40_v2").symlink_to(elsewhere)
    # Picked implicitly: the link is not a run, so a new run is made beside it.
    result = project.nox("-s", "probe", "--", *NO_GPU)
    assert result.returncode == layout.EXIT_STAGE["probe"], result.stdout + result.stderr
    assert (project.runs / "m40_v3" / "env_info.txt").is_file()
    # Picked explicitly: refused.
    refused(
        project.nox("-s", "probe", "--", "--run-dir", str(project.runs / "m40_v2")),
        USAGE,
        "symbolic link",
        str(elsewhere),
    )
    refused(project.nox("-s", "evidence", "--", "--run-dir", str(project.runs / "m40_v2")), USAGE, "symbolic link")
    assert tree_hashes(elsewhere) == before


def test_a_symlinked_file_inside_a_run_folder_is_never_written_through(project, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    run_dir = project.runs / "m40_v2"
    (run_dir / layout.STAGES_DIR).mkdir(parents=True)
    (run_dir / "env_info.txt").symlink_to(precious)
    refused(project.nox("-s", "probe", "--", *NO_GPU), USAGE, "holds a symbolic link", "env_info.txt", "remove it")
    refused(project.nox("-s", "evidence"), USAGE, "holds a symbolic link")
    assert precious.read_text() == "keep me\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["env_info.txt", layout.STAGES_DIR]


def test_a_run_dir_inside_a_sealed_run_is_refused_and_the_run_still_checks(project):
    inside = project.runs / "m40_v1" / layout.STAGES_DIR
    refused(
        project.nox("-s", "probe", "--", "--run-dir", str(inside)),
        USAGE,
        "inside the run folder",
        str(project.runs / "m40_v1"),
    )
    refused(project.nox("-s", "m40", "--", "--run-dir", str(inside / "deeper")), USAGE, "inside the run folder")
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "--quiet", layout.SUMS_FILE], cwd=project.runs / "m40_v1")  # noqa: S603,S607
        assert check.returncode == 0


def test_run_dir_dot_never_overwrites_the_project(project):
    refused(
        project.nox("-s", "probe", "--", "--run-dir", ".", *NO_GPU),
        USAGE,
        "--run-dir .",
        "no stages/",
        "new or empty folder",
    )
    assert not (project.root / "env_info.txt").exists()


def test_run_dir_accepts_a_new_folder_an_empty_one_and_a_run_folder(project, tmp_path):
    for run_dir in (tmp_path / "new" / "run", tmp_path / "empty", project.runs / "m40_v1x"):
        if run_dir.name == "empty":
            run_dir.mkdir()
        result = project.nox("-s", "probe", "--", "--run-dir", str(run_dir), *NO_GPU)
        assert result.returncode == layout.EXIT_STAGE["probe"], result.stdout + result.stderr
        assert (run_dir / "env_info.txt").is_file() and (run_dir / layout.STAGES_DIR / "probe.json").is_file()
        again = project.nox("-s", "probe", "--", "--run-dir", str(run_dir), *NO_GPU)  # now a run folder
        assert again.returncode == layout.EXIT_STAGE["probe"], again.stdout + again.stderr


def test_a_folder_the_user_made_under_submission_runs_is_never_written_into(project):
    mine = project.runs / "m40_v2"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    before = tree_hashes(mine)
    result = project.nox("-s", "probe", "--", *NO_GPU)
    assert result.returncode == layout.EXIT_STAGE["probe"], result.stdout + result.stderr
    assert (project.runs / "m40_v3" / "env_info.txt").is_file()
    refused(project.nox("-s", "probe", "--", "--run-dir", str(mine)), USAGE, "no stages/")
    assert tree_hashes(mine) == before


def test_nox_python_values_are_read_as_nox_reads_them():
    argv = ["-s", "install", "-p", "a", "b", "--python=c", "-pd", "--extra-python", "e,f", "-r", "--", "-p", "x"]
    assert validate.python_args(argv) == ["a", "b", "c", "d", "e", "f"]
    assert validate.unknown_channels(["-s", "install", "-p", "cu128"], ["cu128"]) is None


@pytest.mark.parametrize(
    "argv, bare",
    [
        (["-s", "install"], True),
        (["-s", "install", "--", "-p", "cu128"], True),  # after `--`: install's own option, not nox's
        (["-s", "install", "--python=system", "--", "--help"], False),
        (["-s", "install", "-P", "cu128"], False),
        (["-s", "install", "--pythons", "cu128"], False),
        (["-s", "install", "-pcu128"], False),
        (["-s", "probe"], False),
        (["-k", "install"], True),  # nox's keyword selection: every install(<channel>) session too
        (["--keywords=install and not cu124"], True),
        (["-k", "install", "-p", "cu128"], False),
        (["-k", "probe or train"], False),
        (["-k", "not install"], False),  # every session but the installs
        (["-k", "lint"], False),
        (["-k", "inst"], True),  # nox matches a part of a keyword
        (["-k", "install and cu128"], False),  # one session: install(cu128)
    ],
)
def test_a_bare_install_is_told_apart_by_nox_own_reading_of_p(argv, bare):
    assert validate.bare_install(argv, ["cu128", "cu124", "auto"]) is bare


@pytest.mark.parametrize(
    "argv", [["--force-python", "cu128", "-s", "install"], ["-P", "cu128"], ["--extra-python=cu124", "-s", "m40"]]
)
def test_nox_forced_or_extra_pythons_are_one_line_and_exit_2(project, argv):
    """nox's -P/--force-python and --extra-python add the value to every session's pythons: each install(<channel>)
    session then failed with a TypeError traceback, twelve in a row."""
    result = project.nox(*argv)
    out = result.stdout + result.stderr
    assert result.returncode == USAGE and "Traceback" not in out, out
    flag = argv[0].split("=")[0]
    assert result.stderr.strip().splitlines() == [
        f"nox: {flag} is not for this project: its sessions run in no interpreter of nox's; "
        "name a channel with nox -s install -p CHANNEL"
    ]


def test_nox_install_help_with_python_equals_a_channel_is_the_help_not_a_refusal():
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(  # noqa: S603
        [
            sys.executable,
            "-m",
            "nox",
            "-f",
            str(root / "noxfile.py"),
            "-s",
            "install",
            "--python=system",
            "--",
            "--help",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "NOX_SCRIPT_MODE": "none"},
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "name one channel" not in done.stderr and done.stdout.startswith("usage: nox -s install --")


@pytest.mark.parametrize(
    "content",
    ["garbage", '{"stage": "probe", "status": "weird"}', "[1]", '{"stage": "train", "status": "pass"}', b"\xff\xfe"],
)
def test_a_damaged_stage_record_is_a_fail_not_a_traceback(project, content):
    run_dir = project.runs / "m40_v2"
    (run_dir / layout.STAGES_DIR).mkdir(parents=True)
    path = run_dir / layout.STAGES_DIR / "probe.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    result = project.nox("-s", "evidence")
    out = result.stdout + result.stderr
    assert result.returncode == layout.EXIT_STAGE["probe"] and "Traceback" not in out, out  # the verdict's code
    assert "verdict FAIL at probe: stages/probe.json is not a valid stage record" in result.stdout
    assert runs.is_sealed(run_dir)


@pytest.mark.parametrize("where", ["inside a sealed run", "a run folder", "a symbolic link", "under a file"])
def test_bench_output_never_goes_into_a_run_or_through_a_link(project, tmp_path, where):
    target = tmp_path / "elsewhere"
    target.mkdir()
    out = {
        "inside a sealed run": project.runs / "m40_v1" / "bench",
        "a run folder": project.runs / "m40_v1",
        "a symbolic link": project.runs / "bench_link",
        "under a file": project.root / "README.md" / "b",
    }[where]
    if where == "a symbolic link":
        out.symlink_to(target)
    refused(project.nox("-s", "bench", "--", "--python", sys.executable, "--out", str(out)), USAGE, "--out", str(out))
    assert not any(target.iterdir())


NOT_READ_BY_M40 = {"bench.yaml", "fleet.yaml", "submission_local_gpu_gemma2b.yaml"}  # other sessions' files


@pytest.mark.parametrize("name", sorted(p.name for p in (layout.ROOT / "configs").glob("*.yaml")))
def test_every_config_file_m40_reads_is_checked_before_the_first_stage(project, name):
    """A new config file read by a stage that does not run on this GPU-less machine must still be checked
    up front (its stage's check_inputs), else this test fails: exit 10 (probe) instead of 2."""
    bad = project.root / "configs" / name
    bad.write_text("key: [unclosed\n")
    result = project.nox("-s", "m40", "--", *NO_GPU)
    if name in NOT_READ_BY_M40:
        assert result.returncode == layout.EXIT_STAGE["probe"], result.stdout + result.stderr
    else:
        refused(result, USAGE, str(bad), "fix the syntax")
        assert project.run_names() == ["m40_v1"]


def test_a_bare_install_with_an_unreadable_catalog_names_the_catalog_not_an_empty_list(tmp_path, monkeypatch):
    broken = tmp_path / "channels.yaml"
    broken.write_text("channels: [\n")
    monkeypatch.setenv(layout.CHANNELS_ENV, str(broken))
    names = config.channel_names()
    assert names == []
    line = validate.bare_install_refusal(names)
    assert line.startswith("nox: name one channel with -p, but the channel catalog cannot be read: ")
    assert str(broken) in line and "(one of )" not in line
    assert validate.bare_install_refusal(["cu128", "auto"]) == (
        "nox: name one channel: nox -s install -p CHANNEL (one of cu128, auto)"
    )


@pytest.mark.parametrize("name", ["NOXFORCEPYTHON", "NOXEXTRAPYTHON"])
def test_nox_forced_python_from_the_environment_is_refused_too(monkeypatch, name):
    monkeypatch.setenv(name, "3.12")
    assert validate.forced_python_refusal(["-s", "install(cu128)", "--", "--help"]).startswith(f"nox: {name} is not")
    monkeypatch.delenv(name)
    assert validate.forced_python_refusal(["-s", "install", "-p", "cu128"]) is None
