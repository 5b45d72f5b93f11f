import sys

from tasks import proc


def test_tee_shows_and_logs_output_and_returns_the_exit_code(tmp_path, capsys):
    log = tmp_path / "out.log"
    code = proc.tee([sys.executable, "-c", "print('hello'); import sys; sys.exit(7)"], log)
    assert code == 7
    assert log.read_text() == "hello\n"
    assert "hello" in capsys.readouterr().out


def test_tee_kills_a_hung_child_at_the_timeout(tmp_path):
    log = tmp_path / "out.log"
    code = proc.tee([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"],
                    log, timeout=1)
    assert code == 124
    assert log.read_text() == "started\n"


def test_tee_timeout_kills_the_childs_own_children_too(tmp_path):
    """A grandchild (a torchrun rank, an NCCL worker) holding the pipe must not outlive the timeout."""
    import time

    start = time.monotonic()
    code = proc.tee(["sh", "-c", "sleep 30 & sleep 30"], tmp_path / "out.log", timeout=1)
    assert code == 124
    assert time.monotonic() - start < 10
