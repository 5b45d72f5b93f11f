"""Running a child process (usually `.venv-gpu`'s Python) with its output shown and kept.

Every child that runs in `.venv-gpu` (cuda_check's checker, install's verifier, train, under torchrun
or not, and bench) is started one way, by `gpu_command` + `gpu_env` (or `run_gpu`, which tees it):
`python -m training_pt.<module>` in an isolated environment, so the torch it imports is the one
installed in that venv and nothing the caller's shell put on PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from tasks import layout

PR_SET_PDEATHSIG = 1  # linux/prctl.h
INTERRUPT_GRACE_S = 10  # after Ctrl-C or SIGTERM, a child's time to stop on its own before SIGKILL


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the process that started it dies (Linux; elsewhere
    nothing). Run in every child tee starts (before exec) and by every torchrun rank and worker of
    training_pt for itself: killing nox (or its stage) must not leave a GPU child running, or one that
    writes a result after its stage is gone."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def gpu_env(extra: dict | None = None, python: Path | None = None) -> dict:
    """The whole environment of a child in .venv-gpu: ours with every PYTHON* variable removed
    (PYTHONHOME, PYTHONSTARTUP, ...), PYTHONPATH = the repository root only (so `training_pt` and the
    torch-free helpers of `tasks` import), no user site-packages, the current folder not on sys.path
    (PYTHONSAFEPATH, Python >= 3.11), NVLink multicast off, the compile cache beside the venv of `python`
    (compile_cache_env; a variable the user set wins), then `extra` (which may not undo the isolation)."""
    # never inherited: only tasks/train.py's start_waiting sets it (else train.py would wait on its stdin)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != layout.TRAIN_WAIT_ENV}
    env.update(layout.NO_MULTICAST_ENV)
    for key, value in compile_cache_env(python).items():
        env.setdefault(key, value)
    env.update({k: v for k, v in (extra or {}).items() if not k.startswith("PYTHON")})
    env.update(PYTHONPATH=str(layout.ROOT), PYTHONNOUSERSITE="1", PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1")
    return env


def compile_cache_env(python: Path | None = None) -> dict[str, str]:
    """Inductor's, Triton's and AOTAutograd's persistent caches in the folder beside the venv of `python`
    (.venv-gpu when it is None or not in a venv: layout.compile_cache). The FX graph and AOTAutograd caches are
    on by torch's own default (2.13: both; the compile check's line says hit or miss); they are not forced, which
    would turn on the experimental caches of an older torch, where a cache bug would FAIL the compile check.
    A hit skips code generation only: the cached kernel still runs and its results are still compared.
    Nothing ({}: torch's own defaults) where that folder cannot be made (a venv in a read-only place)."""
    cache = layout.compile_cache(layout.venv_of(python) if python is not None else None)
    if not os.access(cache if cache.exists() else cache.parent, os.W_OK):
        return {}
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
    }


def gpu_command(python: Path, module: str, args: list, nproc: int = 1, torchrun: list | None = None) -> list[str]:
    """`python -m <module> args`; with nproc > 1 the same under torchrun on this machine (one process per
    GPU), or under torchrun with the given options (`torchrun`: a job across nodes)."""
    if torchrun is None and nproc > 1:
        torchrun = ["--standalone", "--nproc-per-node", nproc]
    launch = ["-m", "torch.distributed.run", *torchrun] if torchrun is not None else []
    return [str(c) for c in (python, *launch, "-m", module, *args)]


def run_gpu(
    python: Path,
    module: str,
    args: list,
    log_file: Path | None = None,
    *,
    nproc: int = 1,
    extra_env: dict | None = None,
    timeout: float | None = None,
    append: bool = False,
) -> int:
    """Run a `training_pt` module in .venv-gpu's `python`, isolated, from the repository root, teed."""
    return tee(
        gpu_command(python, module, args, nproc),
        log_file,
        env=gpu_env(extra_env, python),
        inherit_env=False,
        cwd=layout.ROOT,
        timeout=timeout,
        append=append,
    )


def start(cmd: list, log_file: Path, *, env: dict, cwd: Path) -> subprocess.Popen:
    """Start `cmd` in the background with exactly `env`, its stdout and stderr appended to `log_file`, in a
    process group of its own (so `finish` can kill its children too), dying with us (die_with_parent).
    Start it from the main thread: the kernel's parent-death signal follows the thread that started it."""
    with open(log_file, "a", encoding="utf-8") as log:
        return subprocess.Popen(
            [str(c) for c in cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def finish(child: subprocess.Popen, timeout: float) -> int:
    """Wait for a child `start` started: its exit code, or 124 (like tee) once `timeout` seconds passed,
    its whole process group killed."""
    try:
        return child.wait(max(0.0, timeout))
    except subprocess.TimeoutExpired:
        signal_group(child, signal.SIGKILL)
        child.wait()
        return 124


def tee(
    cmd: list[str],
    log_file: Path | None = None,
    *,
    env: dict | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    append: bool = False,
    echo: bool = True,
    on_line: Callable[[str], None] | None = None,
    inherit_env: bool = True,
    started: subprocess.Popen | None = None,
) -> int:
    """Run `cmd` (or take `started`, a child start_in_group already started), echoing stdout+stderr line by
    line to our stdout (unless `echo` is False), to `log_file` and to `on_line`. `env` adds to our
    environment, or is the whole of it with `inherit_env=False` (install's pip/uv run with the machine's
    PIP_*/UV_* variables removed).

    Returns the exit code (124 on timeout, like coreutils' timeout). The child runs in a process
    group of its own, so a timeout kills its children too (torchrun's ranks, spawned NCCL workers),
    which would otherwise hold the GPU and the output pipe. Ctrl-C is passed on to that group and
    re-raised here after the child ends. The child dies with us (die_with_parent), also when we are
    killed with SIGKILL and cannot pass anything on.
    """
    full_env = {**(os.environ if inherit_env else {}), **(env or {}), "PYTHONUNBUFFERED": "1"}
    log = open(log_file, "a" if append else "w", encoding="utf-8") if log_file else None
    try:
        child = started if started is not None else start_in_group(cmd, full_env, cwd)
        timed_out = threading.Event()

        def kill_at_timeout() -> None:
            timed_out.set()
            signal_group(child, signal.SIGKILL)

        timer = threading.Timer(timeout, kill_at_timeout) if timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            copy_lines(child, echo, on_line, log)
            code = child.wait()
            return 124 if timed_out.is_set() else code
        except KeyboardInterrupt:
            signal_group(child, signal.SIGINT)
            try:  # a child stuck in a CUDA or NCCL call never runs its SIGINT handler: a time limit's seal waits not
                child.wait(timeout=INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                signal_group(child, signal.SIGKILL)
                child.wait()
            raise
        finally:
            if timer:
                timer.cancel()
    finally:
        if log:
            log.close()


def start_in_group(cmd: list, env: dict, cwd: Path | None, stdin: bool = False) -> subprocess.Popen:
    """`cmd` in a process group of its own, dying with us, its stdout+stderr one text pipe read line by line;
    with `stdin`, a pipe to its stdin too (see `release`)."""
    return subprocess.Popen(
        [str(c) for c in cmd],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


def release(child: subprocess.Popen, go: bool = True) -> None:
    """Tell a child started with a stdin pipe and waiting on it (a train.py started ahead) to go on, or
    with go=False to end; nothing if it has ended already (its output and exit code then say why)."""
    if child.stdin is None:
        return
    try:
        if go:
            child.stdin.write("go\n")
            child.stdin.flush()
    except (OSError, ValueError):  # BrokenPipeError: it is gone; ValueError: the pipe was closed already
        pass
    finally:
        with contextlib.suppress(OSError):
            child.stdin.close()


def signal_group(child: subprocess.Popen, sig: int) -> None:
    """`sig` to the child's whole process group (its own children too); nothing if it is gone."""
    try:
        os.killpg(child.pid, sig)
    except ProcessLookupError:
        pass


def copy_lines(child: subprocess.Popen, echo: bool, on_line: Callable[[str], None] | None, log: TextIO | None) -> None:
    """Each line of the child's output to our stdout (when `echo`), to `on_line` and to `log`, as it comes."""
    assert child.stdout is not None
    for line in child.stdout:
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        if on_line is not None:
            on_line(line)
        if log:
            log.write(line)
            log.flush()


# --------------------------------------------------------------------------- signals


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt (terminate_as_interrupt): Ctrl-C's path, with its own words."""


def interrupt_words(e: KeyboardInterrupt) -> str:
    """What stopped the run, in the words every record and message uses: SIGTERM or Ctrl-C."""
    if isinstance(e, Terminated):
        return "stopped by SIGTERM (a job's time limit, a stop request)"
    return "interrupted by the user (Ctrl-C)"


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (a job's time limit under Slurm, a pod's stop, `timeout`) raises KeyboardInterrupt while inside,
    so it takes Ctrl-C's path: the stage is recorded INTERRUPTED and m40 seals the run. The handler before is
    put back after; off the main thread (where Python allows no handler) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Terminated

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def interrupts_deferred(on_signal: Callable[[], None]):
    """SIGINT and SIGTERM call on_signal() instead of interrupting what runs inside (a run's seal, which must
    finish once begun); yields the list of the signals that came. Handlers put back after; main thread only."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return

    def note(signum, frame):
        came.append(signum)
        on_signal()

    before = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield came
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
