import sys

import pytest

from tasks import proc


def test_tee_shows_and_logs_output_and_returns_the_exit_code(tmp_path, capsys):
    log = tmp_path / "out.log"
    code = proc.tee([sys.executable, "-c", "print('hello'); import sys; sys.exit(7)"], log)
    assert code == 7
    assert log.read_text() == "hello\n"
    assert "hello" in capsys.readouterr().out


def test_tee_kills_a_hung_child_at_the_timeout(tmp_path):
    log = tmp_path / "out.log"
    code = proc.tee([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"], log, timeout=1)
    assert code == 124
    assert log.read_text() == "started\n"


def test_tee_timeout_kills_the_childs_own_children_too(tmp_path):
    """A grandchild (a torchrun rank, an NCCL worker) holding the pipe must not outlive the timeout."""
    import time

    start = time.monotonic()
    code = proc.tee(["sh", "-c", "sleep 30 & sleep 30"], tmp_path / "out.log", timeout=1)
    assert code == 124
    assert time.monotonic() - start < 10


PARENT = """
import sys

import pytest
from tasks import proc
child = ("import os, subprocess, sys, time\\n"
         "from tasks import proc\\n"
         "grandchild = subprocess.Popen([sys.executable, '-c', 'from tasks import proc; proc.die_with_parent(); "
         "print(\\"ready\\", flush=True); import time; time.sleep(120)'])\\n"
         "print(os.getpid(), grandchild.pid, flush=True)\\n"
         "time.sleep(120)\\n")
proc.tee([sys.executable, "-c", child], env={"PYTHONPATH": sys.argv[1]})
"""


def alive(pid: int) -> bool:
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False
    except OSError:
        return os.path.exists(f"/proc/{pid}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_a_parent_killed_by_sigkill():
    """nox killed with SIGKILL passes nothing on: the child tee started, and a rank that asked for it
    (train.py, the checker's workers), die with their parent anyway."""
    import os
    import signal
    import subprocess
    import time

    from tasks import layout

    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(layout.ROOT)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=layout.ROOT,
        env={**os.environ, "PYTHONPATH": str(layout.ROOT)},
    )
    child, grandchild = map(int, parent.stdout.readline().split())
    assert parent.stdout.readline().strip() == "ready"  # the grandchild has asked to die with its parent
    assert alive(child) and alive(grandchild)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while (alive(child) or alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child) and not alive(grandchild)
