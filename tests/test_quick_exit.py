"""training_pt/quick_exit.py: the exit code, the output and the atexit handlers survive the quick exit."""

from __future__ import annotations

import subprocess
import sys
import time

from tasks import layout

CHILD = """
import atexit
from training_pt import quick_exit
atexit.register(lambda: print("atexit ran", flush=True))
print("unflushed", end="")
quick_exit.exit_quickly(5)
"""


def test_a_quick_exit_keeps_its_code_its_output_and_its_atexit_handlers():
    res = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env={"PYTHONPATH": str(layout.ROOT)}
    )
    assert res.returncode == 5, res.stderr
    assert res.stdout == "unflushedatexit ran\n"


RANK = """
import atexit, os
import torch.distributed as dist
from training_pt import quick_exit
dist.init_process_group("gloo", init_method="file://" + os.environ["STORE"], rank=0, world_size=1)
atexit.register(lambda: print("atexit ran", flush=True))
print("unflushed", end="")
quick_exit.end_rank(3)
"""


def test_a_rank_ends_with_its_code_and_output_and_without_any_teardown(tmp_path):
    # a gloo rank aborted in the teardown after its PASS was written ("terminate called without an active
    # exception", exit -6), and torchrun called the run failed: a rank's end skips the teardown
    env = {"PYTHONPATH": str(layout.ROOT), "STORE": str(tmp_path / "store")}
    res = subprocess.run([sys.executable, "-c", RANK], capture_output=True, text=True, env=env)
    assert res.returncode == 3, res.stderr
    assert res.stdout == "unflushed"  # flushed; no atexit handler, no destroy_process_group, no destructors


def ending_rank(rank: int, store: str, out: str) -> None:
    """A spawned gloo rank: rank 1 comes to its end 0.5 s after rank 0; each notes when it really exits."""
    import os
    import time

    import torch.distributed as dist

    from training_pt import quick_exit

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    if rank == 1:
        time.sleep(0.5)
    real_exit = os._exit

    def exit_noting(code):
        with open(f"{out}/rank{rank}", "w") as f:
            f.write(repr(time.time()))
        real_exit(code)

    quick_exit.os._exit = exit_noting
    with open(f"{out}/arrived{rank}", "w") as f:
        f.write(repr(time.time()))
    quick_exit.end_rank(0)


def test_a_rank_leaves_only_once_every_rank_has_come_to_its_end(tmp_path):
    # no rank may leave while a peer could still be receiving its last collective's data
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=ending_rank, args=(r, str(tmp_path / "store"), str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    left0 = float((tmp_path / "rank0").read_text())
    assert left0 >= float((tmp_path / "arrived1").read_text())  # rank 0 waited for rank 1


LONELY = """
import atexit, os, signal, sys
import torch.distributed as dist
from training_pt import quick_exit
dist.init_process_group("gloo", init_method="file://" + os.environ["STORE"], rank=0, world_size=1)
dist.get_world_size = lambda *a: 2  # a peer that never comes to its end
signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))  # as train.py's handler
if sys.argv[3:]:  # torchrun stopping the job while this rank waits
    signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGTERM))
    signal.setitimer(signal.ITIMER_REAL, 0.5)
atexit.register(lambda: print("teardown ran", flush=True))
quick_exit.end_rank(int(sys.argv[1]), wait_s=float(sys.argv[2]))
"""


def test_a_rank_waits_for_its_peers_wait_s_at_most_and_not_at_all_when_it_failed(tmp_path):
    def run(*args):
        env = {"PYTHONPATH": str(layout.ROOT), "STORE": str(tmp_path / f"store{len(args)}{args[0]}")}
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-c", LONELY, *args], capture_output=True, text=True, env=env)
        return res, time.monotonic() - t0

    waited, slow = run("0", "3")
    assert waited.returncode == 0 and slow >= 3, waited.stderr  # a peer that never comes: wait_s, then leave
    failed, fast = run("3", "60")
    assert failed.returncode == 3 and fast < 30, failed.stderr  # a failed rank leaves at once
    stopped, _ = run("0", "60", "sigterm")  # SIGTERM during the wait: it leaves, still with no teardown
    assert stopped.returncode == 0 and "teardown ran" not in stopped.stdout and "Traceback" not in stopped.stderr
