"""One lock mechanism for the run folder and for `.venv-gpu`: a kernel lock (flock) on a lock file.

The kernel holds the lock and drops it when its holder dies (exit, crash, SIGKILL), so there is no
stale lock to take over and no race between two processes that both think a lock is stale. The lock
file also holds its owner (pid, host, start time, command) as JSON, so a second process can say who
holds it. A lock file naming another host is left alone (a network filesystem may not carry flock
between hosts): its message says to remove the file once that process is gone.

`exclusive` is one holder (an install, a run); `shared` is any number of holders at once (stages that
use `.venv-gpu`), none while an exclusive holder has it. Shared holders do not write the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from tasks import jsonfile
from tasks.records import now_iso
from tasks.redact import redact_url


class Busy(Exception):
    """The lock is held by another process, described by `holder`."""

    def __init__(self, holder: dict, hint: str = ""):
        super().__init__(describe(holder) + hint)
        self.holder = holder


def describe(holder: dict) -> str:
    if not holder:
        return "processes that share it (they record no holder; a stage using it right now)"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
        f" ({holder.get('command') or 'unknown command'})"
    )


def _read_holder(lock: Path) -> dict:
    """The holder the lock file names; {} for an empty, missing or damaged one (what jsonfile cannot read)."""
    try:
        return jsonfile.read(lock)
    except jsonfile.Unreadable:
        return {}


def _holder_of_busy(lock: Path) -> dict:
    """The holder of a lock we could not take. It may be writing its JSON right now, and until it has, the
    file still names the holder before it (a dead one): read again, for up to a second, until the file
    names a live process (one on another host cannot be asked, so it is taken as it reads)."""
    holder: dict = {}
    for _ in range(20):
        holder = _read_holder(lock)
        if holder and _alive_or_elsewhere(holder):
            return holder
        time.sleep(0.05)
    return holder


def _alive_or_elsewhere(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open(lock: Path) -> int:
    """The lock file's descriptor, never through a symbolic link, and only of a regular file (a FIFO would
    hold up every read of its holder)."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, f"{lock} is a symbolic link; remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{lock} is not a regular file; remove it")
    return fd


def _acquire(lock: Path, mode: int) -> int:
    """A descriptor holding the kernel lock (mode: LOCK_EX or LOCK_SH) on the file now at `lock`; raises
    Busy when another process holds it in a mode that excludes ours."""
    while True:
        fd = _open(lock)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(_holder_of_busy(lock)) from None
        # The holder before us may have removed the file between our open and our flock: then we
        # hold a lock on a file nobody else can see. Only the file that is at the path counts.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def exclusive(lock: Path):
    """Hold `lock` for the duration of the block; raises Busy when another process holds it."""
    command = redact_url(" ".join(sys.argv[:4]))  # an index URL on the command line may carry a token
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(), "command": command}
    fd = _take(lock, fcntl.LOCK_EX)
    try:
        record = json.dumps(me).encode()
        os.pwrite(fd, record, 0)
        os.ftruncate(fd, len(record))  # nothing of an older, longer or damaged record is left after ours
        yield lock
    finally:
        if _read_holder(lock).get("pid") == me["pid"]:  # never remove a lock file that is not ours
            lock.unlink(missing_ok=True)  # while we still hold it, so no one locks the removed file
        os.close(fd)


@contextlib.contextmanager
def shared(lock: Path):
    """Hold `lock` together with other shared holders; raises Busy while an exclusive holder has it."""
    fd = _take(lock, fcntl.LOCK_SH)
    try:
        yield lock
    finally:
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds only when no one else holds it
            lock.unlink(missing_ok=True)  # the last holder removes the file, as an exclusive holder does
        os.close(fd)


def _take(lock: Path, mode: int) -> int:
    """The locked descriptor, the file emptied of a dead holder's record; Busy for another host's record."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, mode)
    try:
        left = _read_holder(lock)
        if left.get("host") not in (None, socket.gethostname()):  # its holder may live there: not ours to take
            raise Busy(left, f"; if that process is gone, remove {lock}")
        if left:
            os.ftruncate(fd, 0)  # no live process holds it in a mode that excludes ours: the record is stale
    except BaseException:
        os.close(fd)
        raise
    return fd
