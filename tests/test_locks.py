import json
import os
import signal
import socket
import subprocess
import sys
import time

import holders
import pytest

from tasks import layout, locks

CHILD_ENV = {**os.environ, "PYTHONPATH": str(layout.ROOT)}


def test_a_held_lock_names_its_holder_and_is_released_after(tmp_path):
    lock = tmp_path / "x.lock"
    with locks.exclusive(lock):
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(locks.Busy, match=rf"pid {os.getpid()} on {socket.gethostname()} since "):
            with locks.exclusive(lock):
                pass
    assert not lock.exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "since": "then"}))
    with locks.exclusive(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_lock_held_on_another_host_is_never_taken_over(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then", "command": "nox -s m40"}))
    with pytest.raises(locks.Busy, match="pid 1 on elsewhere since then \\(nox -s m40\\)"):
        with locks.exclusive(lock):
            pass
    assert lock.exists()


def test_the_lock_file_never_holds_a_token_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["nox", "-s", "install", "--deps-index-url=https://me:s3cr3t@idx/simple"])
    lock = tmp_path / "x.lock"
    with locks.exclusive(lock):
        text = lock.read_text()
    assert "s3cr3t" not in text and "<redacted>@idx" in text


def test_a_lock_that_is_no_longer_ours_is_left_alone_on_exit(tmp_path):
    lock = tmp_path / "x.lock"
    with locks.exclusive(lock):
        lock.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))  # someone else's now
    assert json.loads(lock.read_text())["host"] == "elsewhere"


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"pid": "\xff"}' + b"x" * 4096, b"[1, 2]" + b"]" * 4096],
    ids=["deep", "not-utf8", "list"],
)
def test_a_damaged_lock_file_that_no_process_locks_is_taken_over_and_rewritten_whole(tmp_path, body):
    """What a damaged lock file says names no holder: it is taken over, emptied first, so the file then names
    this process alone (a second process can say who holds it)."""
    lock = tmp_path / "x.lock"
    lock.write_bytes(body)
    with locks.exclusive(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_lock_file_that_is_not_a_regular_file_is_refused_in_one_line_not_waited_on(tmp_path):
    lock = tmp_path / "x.lock"
    os.mkfifo(lock)  # reading it would wait for a writer forever
    signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)  # a hang fails the test instead of stalling the suite
    try:
        with pytest.raises(OSError, match=r"x.lock is not a regular file; remove it$"):
            with locks.exclusive(lock):
                pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def hang(signum, frame):
    pytest.fail("still waiting after 5 s")  # not an OSError: the code under test must not take it for one


RACER = """
import sys, time
from pathlib import Path
from tasks import locks
lock, start = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    pass
try:
    with locks.exclusive(lock):
        print("got", flush=True)
        time.sleep(1.5)
except locks.Busy as busy:
    print(f"busy {busy}", flush=True)
"""


def race(lock, n=6):
    """n real processes that try to take `lock` at the same instant; their outputs."""
    start = time.time() + 1.5  # after every interpreter has started
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(lock), str(start)],
            cwd=layout.ROOT,  # noqa: S603
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=CHILD_ENV,
        )
        for _ in range(n)
    ]
    return [(p.pid, p.communicate(timeout=60)[0].strip()) for p in procs]


@pytest.mark.parametrize("left_behind", [False, True], ids=["no lock file", "a dead holder's lock file"])
def test_processes_racing_for_a_lock_have_exactly_one_winner_named_by_the_others(tmp_path, left_behind):
    lock = tmp_path / "x.lock"
    if left_behind:  # a holder killed with SIGKILL: its file stays, its kernel lock died with it
        lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "since": "then"}))
    for _ in range(2):
        outputs = race(lock)
        winners = [pid for pid, out in outputs if out == "got"]
        assert len(winners) == 1, outputs
        losers = [out for pid, out in outputs if pid != winners[0]]
        assert all(out.startswith(f"busy pid {winners[0]} on {socket.gethostname()} since ") for out in losers), outputs
        assert not lock.exists()


def test_a_lock_file_that_no_live_process_locks_is_free_whatever_pid_it_names(tmp_path):
    """A pid that was reused by an unrelated process (here: our parent) does not keep a dead holder's lock."""
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "then"}))
    with locks.exclusive(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_lock_dies_with_a_holder_killed_by_sigkill(tmp_path):
    lock = tmp_path / "x.lock"
    holder = holders.hold("tasks.locks", "exclusive", lock, cwd=layout.ROOT, env=CHILD_ENV)
    with pytest.raises(locks.Busy, match=f"pid {holder.pid} on "):
        with locks.exclusive(lock):
            pass
    holders.release(holder)
    assert lock.exists()  # the file stays behind; its kernel lock does not
    with locks.exclusive(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_symlinked_lock_file_is_never_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "x.lock").symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        with locks.exclusive(tmp_path / "x.lock"):
            pass
    assert target.read_text() == "keep me"


@pytest.fixture
def hold(tmp_path):
    """hold(lock, "shared"|"exclusive"): another process holding the lock until the test ends."""
    procs = []

    def start(lock, mode):
        procs.append(holders.hold("tasks.locks", mode, lock, cwd=layout.ROOT, env=CHILD_ENV))
        return procs[-1]

    yield start
    for proc in procs:
        holders.release(proc)


def test_shared_holders_share_and_keep_an_exclusive_holder_out(tmp_path, hold):
    lock = tmp_path / "venv.lock"
    hold(lock, "shared")
    with locks.shared(lock):  # a second stage at the same time
        pass
    with pytest.raises(locks.Busy, match="share it"):
        with locks.exclusive(lock):
            pass


def test_an_exclusive_holder_keeps_shared_holders_out_and_is_named(tmp_path, hold):
    lock = tmp_path / "venv.lock"
    holder = hold(lock, "exclusive")
    with pytest.raises(locks.Busy, match=f"pid {holder.pid} on {socket.gethostname()}"):
        with locks.shared(lock):
            pass


def test_the_last_shared_holder_removes_the_lock_file(tmp_path):
    lock = tmp_path / "venv.lock"
    with locks.shared(lock), locks.shared(lock):
        assert lock.exists()
    assert not lock.exists()
    with locks.exclusive(lock):  # and an exclusive holder can take it after
        assert json.loads(lock.read_text())["pid"] == os.getpid()
