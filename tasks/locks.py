"""One lock mechanism for the run folder and for `.venv-gpu`: a file created exclusively.

The lock file holds its owner (pid, host, start time, command) as JSON, so a second process can say
who holds it. A lock left by a process that is gone (same host, pid no longer alive) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path

from tasks.records import now_iso


class Busy(Exception):
    """The lock is held by a live process, described by `holder`."""

    def __init__(self, holder: dict):
        super().__init__(describe(holder))
        self.holder = holder


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
            f" ({holder.get('command') or 'unknown command'})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(lock: Path) -> dict:
    try:
        info = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


@contextlib.contextmanager
def exclusive(lock: Path):
    """Hold `lock` for the duration of the block; raises Busy when a live process holds it."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(), "command": " ".join(sys.argv[:4])}
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(lock)
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                    and not _pid_alive(holder["pid"]):
                lock.unlink(missing_ok=True)  # stale: its holder is gone
                continue
            raise Busy(holder) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # the stale lock came back between unlink and open twice: someone else is taking it
        raise Busy(_read_holder(lock))
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)
