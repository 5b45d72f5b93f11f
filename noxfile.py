# /// script
# requires-python = ">=3.10"
# dependencies = ["nox>=2025.2.9", "pyyaml>=6", "jinja2>=3", "nvidia-ml-py>=12"]
# ///
"""M40 GPU bring-up: does this machine train with PyTorch on its GPUs? `nox -l` lists the sessions.

Every GPU session shares `.venv-gpu` (managed by tasks/install.py, never by nox: venv_backend
"none"); each writes into a run folder under submission_runs/. Options follow `--`:
`nox -s m40 -- --help`. The logic lives in tasks/; this file only names the sessions.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).resolve().parent))  # nox does not put the noxfile's folder on sys.path
from tasks import config, validate  # noqa: E402

nox.options.sessions = ["m40"]
nox.options.default_venv_backend = "none"

CHANNELS = config.channel_names()
if (_refused := validate.unknown_channels(sys.argv[1:], CHANNELS)) is not None:
    print(_refused, file=sys.stderr)  # else nox says "no sessions selected" and exits 3
    raise SystemExit(2)


if (_refused := validate.forced_python_refusal(sys.argv[1:])) is not None:
    print(_refused, file=sys.stderr)  # else every install(<channel>) session fails with a TypeError
    raise SystemExit(2)

if validate.bare_install(sys.argv[1:], CHANNELS):
    print(validate.bare_install_refusal(CHANNELS), file=sys.stderr)
    raise SystemExit(2)

TEST_TORCH = "torch==2.13.0+cpu"  # the tests session's torch: a CPU build, pinned
# triton for tests/test_ce_kernel.py, which runs the loss kernel in triton's interpreter; kept in a folder of
# its own, since torch._dynamo imports any triton it can see (and 3.9's prints leak warnings at exit)
TEST_TRITON = "triton==3.9.0"


def _stage(name: str, *argv: str) -> None:
    """Run one stage (tasks/stage.py) with these options."""
    from tasks import stage  # imported here: listing the sessions (`nox -l`) needs none of it

    _exit_with(stage.main(name, list(argv)))


def _exit_with(code: int) -> None:
    """A task's non-zero exit code becomes nox's (README: exit codes)."""
    if code:
        raise SystemExit(code)


@nox.session
def probe(session: nox.Session) -> None:
    """Probe the NVIDIA driver and GPUs (NVML, else nvidia-smi) and gate on the driver's CUDA."""
    _stage("probe", *session.posargs)


@nox.session
@nox.parametrize("python", CHANNELS, ids=CHANNELS)
def install(session: nox.Session) -> None:
    """Install a CUDA build of PyTorch from one channel (or auto) into .venv-gpu and verify it."""
    _stage("install", "--session-channel", session.python, *session.posargs)


@nox.session
def cuda_check(session: nox.Session) -> None:
    """Check that PyTorch computes correctly and at speed on every GPU (runs in .venv-gpu)."""
    _stage("cuda_check", *session.posargs)


@nox.session
def train(session: nox.Session) -> None:
    """Train GPT-2 for a few steps on every GPU (training_pt/train.py in .venv-gpu)."""
    _stage("train", *session.posargs)


@nox.session
def evidence(session: nox.Session) -> None:
    """Render the run's README.md, summary.json and SHA256SUMS from its stage records; seal it."""
    _stage("evidence", *session.posargs)


@nox.session
def m40(session: nox.Session) -> None:
    """Run probe, install, cuda_check, train and evidence into a new submission_runs/m40_vN."""
    from tasks import m40 as chain

    # Always exit here, 0 included: the verdict line stays the last line (nox would add "Session ... successful").
    raise SystemExit(chain.main(session.posargs))


@nox.session
def fleet(session: nox.Session) -> None:
    """One report (fleet.md/.json/.csv) over many nodes' sealed run folders: `nox -s fleet -- PATH...`."""
    from tasks import fleet as fleet_task

    _exit_with(fleet_task.main(session.posargs))


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmark GPT-2 training speed on one GPU: HF baseline, smoke config, compiled (in .venv-gpu)."""
    from tasks import bench as bench_task

    _exit_with(bench_task.main(session.posargs))


@nox.session(venv_backend="virtualenv")
def tests(session: nox.Session) -> None:
    """Run the test suite on the CPU (CPU torch pinned: never a CUDA download)."""
    # torch alone first, from PyTorch's CPU index (PyPI's Linux torch is a CUDA build of several GB);
    # where that index is unreachable, a local copy that pip's find-links provide does as well.
    session.install("--retries", "1", "--index-url", "https://download.pytorch.org/whl/cpu", TEST_TORCH)
    session.install("-r", "requirements-test.txt", TEST_TORCH)
    if sys.platform == "linux" and platform.machine() == "x86_64":  # where triton has wheels
        triton_dir = Path(session.virtualenv.location) / "triton-interpreter"
        session.install("--no-deps", "--target", str(triton_dir), TEST_TRITON)
        session.env["M40_TEST_TRITON_PATH"] = str(triton_dir)
    session.run("pytest", *session.posargs)


@nox.session(venv_backend="virtualenv")
def lint(session: nox.Session) -> None:
    """Lint (ruff check, line length 120), check the formatting (ruff format --check), type-check tasks/ (mypy)."""
    session.install("ruff", "mypy", "types-PyYAML", "jinja2", "packaging")  # mypy resolves tasks/ imports
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")
