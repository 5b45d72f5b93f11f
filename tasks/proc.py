"""Running a child process (usually `.venv-gpu`'s Python) with its output shown and kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path


def tee(cmd: list[str], log_file: Path | None = None, *, env: dict | None = None,
        cwd: Path | None = None, timeout: float | None = None, append: bool = False,
        echo: bool = True, on_line: Callable[[str], None] | None = None, inherit_env: bool = True) -> int:
    """Run `cmd`, echoing stdout+stderr line by line to our stdout (unless `echo` is False), to
    `log_file` and to `on_line`. `env` adds to our environment, or is the whole of it with
    `inherit_env=False` (install's pip/uv run with the machine's PIP_*/UV_* variables removed).

    Returns the exit code (124 on timeout, like coreutils' timeout). The child runs in a process
    group of its own, so a timeout kills its children too (torchrun's ranks, spawned NCCL workers),
    which would otherwise hold the GPU and the output pipe. Ctrl-C is passed on to that group and
    re-raised here after the child ends.
    """
    full_env = {**(os.environ if inherit_env else {}), **(env or {}), "PYTHONUNBUFFERED": "1"}
    mode = "a" if append else "w"
    log = open(log_file, mode, encoding="utf-8") if log_file else None
    try:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=full_env, cwd=cwd, text=True, errors="replace", bufsize=1,
                                start_new_session=True)
        timed_out = threading.Event()

        def _signal_group(sig: int) -> None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

        def _kill() -> None:
            timed_out.set()
            _signal_group(signal.SIGKILL)

        timer = threading.Timer(timeout, _kill) if timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if on_line is not None:
                    on_line(line)
                if log:
                    log.write(line)
                    log.flush()
            code = proc.wait()
            return 124 if timed_out.is_set() else code
        except KeyboardInterrupt:
            _signal_group(signal.SIGINT)
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
    finally:
        if log:
            log.close()
