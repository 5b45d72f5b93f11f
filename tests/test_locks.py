import json
import os
import socket

import pytest

from tasks import locks


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
