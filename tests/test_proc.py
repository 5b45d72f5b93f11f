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


CACHE_VARS = (
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_FX_GRAPH_CACHE",
    "TORCHINDUCTOR_AUTOGRAD_CACHE",
)


def fake_venv(root):
    (root / "bin").mkdir(parents=True)
    (root / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / "bin" / "python").write_text("")
    return root / "bin" / "python"


def test_every_gpu_child_shares_the_compile_cache_beside_gpu_venv(monkeypatch):
    from tasks import layout

    for name in CACHE_VARS:
        monkeypatch.delenv(name, raising=False)
    cache = layout.ROOT / ".venv-gpu.compile-cache"
    for env in (proc.gpu_env(), proc.gpu_env(python=layout.gpu_python()), proc.gpu_env({"OMP_NUM_THREADS": "2"})):
        assert env["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "inductor")
        assert env["TRITON_CACHE_DIR"] == str(cache / "triton")
        # on by torch's default; never forced (that would turn on an older torch's experimental caches)
        assert "TORCHINDUCTOR_FX_GRAPH_CACHE" not in env and "TORCHINDUCTOR_AUTOGRAD_CACHE" not in env
    assert layout.compile_cache() == cache
    # never part of a run's evidence: outside submission_runs/
    assert not cache.is_relative_to(layout.RUNS_DIR)


def test_a_venv_elsewhere_gets_its_own_compile_cache_and_a_bare_python_gets_gpu_venvs(tmp_path, monkeypatch):
    from tasks import layout

    for name in CACHE_VARS:
        monkeypatch.delenv(name, raising=False)
    python = fake_venv(tmp_path / "elsewhere" / "myvenv")
    env = proc.gpu_env(python=python)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "elsewhere" / "myvenv.compile-cache" / "inductor")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "elsewhere" / "myvenv.compile-cache" / "triton")
    bare = tmp_path / "usr" / "bin" / "python3"  # not inside a venv (no pyvenv.cfg above it)
    assert proc.gpu_env(python=bare)["TORCHINDUCTOR_CACHE_DIR"] == str(layout.compile_cache() / "inductor")
    # run_gpu passes its python on: bench --python uses the cache beside that venv
    seen = {}
    monkeypatch.setattr(proc, "tee", lambda cmd, log, **kw: seen.update(kw["env"]) or 0)
    proc.run_gpu(python, "training_pt.bench", [])
    assert seen["TORCHINDUCTOR_CACHE_DIR"] == env["TORCHINDUCTOR_CACHE_DIR"]


def test_the_users_own_compile_cache_settings_win(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/scratch/inductor")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/scratch/triton")
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    monkeypatch.delenv("TORCHINDUCTOR_AUTOGRAD_CACHE", raising=False)
    env = proc.gpu_env()
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/scratch/inductor" and env["TRITON_CACHE_DIR"] == "/scratch/triton"
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0" and "TORCHINDUCTOR_AUTOGRAD_CACHE" not in env


def test_git_ignores_the_compile_cache():
    import subprocess

    from tasks import layout

    cache = layout.compile_cache()
    for path in (cache / "inductor" / "fxgraph" / "entry", cache / "triton" / "kernel.cubin"):
        rel = str(path.relative_to(layout.ROOT))
        res = subprocess.run(["git", "check-ignore", "--no-index", "-q", rel], cwd=layout.ROOT)
        assert res.returncode == 0, f"{rel} is not ignored by .gitignore"


def test_a_venv_in_a_read_only_place_leaves_torchs_default_caches(tmp_path, monkeypatch):
    for name in CACHE_VARS:
        monkeypatch.delenv(name, raising=False)
    python = fake_venv(tmp_path / "opt" / "venv")
    read_only = {str(tmp_path / "opt")}
    monkeypatch.setattr(proc.os, "access", lambda path, mode: str(path) not in read_only)
    env = proc.gpu_env(python=python)
    assert not any(name in env for name in CACHE_VARS)
    assert env["PYTHONNOUSERSITE"] == "1"  # the rest of the isolation stays


COMPILE_TWICE = """
import torch
from training_pt import gpu_checks as g
before = g.compile_cache_counts()
torch.compile(g._compiled_probe, fullgraph=True)(torch.randn(8, 8), torch.randn(8, 8))
print(g.compile_cache_state(before, g.compile_cache_counts()))
"""


def test_a_second_child_reuses_the_first_ones_compiled_graph_from_the_cache_beside_its_venv(tmp_path, monkeypatch):
    """Real Inductor on the CPU: two processes with the launcher's environment; the second hits the cache."""
    import subprocess

    for name in (*CACHE_VARS, "TORCHINDUCTOR_FORCE_DISABLE_CACHES"):
        monkeypatch.delenv(name, raising=False)
    env = proc.gpu_env(python=fake_venv(tmp_path / "v"))
    said = [
        subprocess.run([sys.executable, "-c", COMPILE_TWICE], env=env, capture_output=True, text=True, timeout=600)
        for _ in range(2)
    ]
    assert [s.returncode for s in said] == [0, 0], said[0].stderr[-2000:] + said[1].stderr[-2000:]
    assert "FX graph cache miss" in said[0].stdout
    assert said[1].stdout.strip() == "FX graph cache hit, AOTAutograd cache hit"
    assert (tmp_path / "v.compile-cache" / "inductor").is_dir()


def test_the_wait_for_go_variable_is_never_inherited_by_a_gpu_child(monkeypatch):
    # Set in the user's shell it would make every train.py wait on its stdin; only start_waiting sets it.
    from tasks import layout

    monkeypatch.setenv(layout.TRAIN_WAIT_ENV, "1")
    assert layout.TRAIN_WAIT_ENV not in proc.gpu_env()
    assert proc.gpu_env({layout.TRAIN_WAIT_ENV: "1"})[layout.TRAIN_WAIT_ENV] == "1"


def test_release_says_go_once_and_closes_the_pipe_even_to_a_child_that_has_gone():
    child = proc.start_in_group([sys.executable, "-c", "print(input())"], {}, None, stdin=True)
    proc.release(child)
    assert child.stdout.read() == "go\n" and child.wait() == 0 and child.stdin.closed
    gone = proc.start_in_group([sys.executable, "-c", "pass"], {}, None, stdin=True)
    gone.wait()
    proc.release(gone)  # a broken pipe is not an error here
    assert gone.stdin.closed
    gone.stdout.close()
    child.stdout.close()


def test_a_child_that_ignores_the_interrupt_is_killed_after_the_grace(tmp_path, monkeypatch):
    """SIGTERM (a time limit) is turned into an interrupt, and tee sends the child SIGINT: a child stuck in a
    CUDA call never acts on it, and tee waited for it without end."""
    import os
    import signal
    import threading
    import time

    monkeypatch.setattr(proc, "INTERRUPT_GRACE_S", 1)
    child = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"]
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), proc.terminate_as_interrupt():
        proc.tee(child, tmp_path / "log.txt", echo=False)
    assert time.monotonic() - started < 15
