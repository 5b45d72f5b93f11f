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
from tasks.redact import redact_url


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


def _take_over_stale(lock: Path) -> None:
    """Move a dead holder's lock aside. A rename succeeds for one process only, so two processes
    that both found the lock stale cannot both remove it (one of them would remove the other's)."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # another process moved it first; the next O_EXCL open decides who gets the lock
    aside.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(lock: Path):
    """Hold `lock` for the duration of the block; raises Busy when a live process holds it."""
    command = redact_url(" ".join(sys.argv[:4]))  # an index URL on the command line may carry a token
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(), "command": command}
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(lock)
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                    and not _pid_alive(holder["pid"]):
                _take_over_stale(lock)
                continue
            raise Busy(holder) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # the lock kept coming back: another process is taking it over right now
        raise Busy(_read_holder(lock))
    try:
        yield lock
    finally:
        if _read_holder(lock).get("pid") == me["pid"]:  # never remove a lock that is not ours
            lock.unlink(missing_ok=True)
