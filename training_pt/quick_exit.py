"""Ending a GPU-side process quickly: without the interpreter's last garbage collection over torch's
objects (exit_quickly), or, for a rank of a process group, without any teardown at all (end_rank).

With torch imported (and Dynamo/Inductor after a compile), CPython's shutdown walks millions of objects
that the OS frees anyway: measured on the CPU test machine 1-3 s per process (`python -c "import torch"`
3.3 s wall, 0.3-0.6 s of it with gc.freeze() last). `gc.freeze()` moves every live object out of the
collector's reach; atexit handlers still run (under exit_quickly) and every object still dies with the
process. The caller writes and closes its own files first (nothing it needs may depend on a finalizer).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import time
from typing import NoReturn


def exit_quickly(code: int | None) -> NoReturn:
    """sys.exit(code), its output flushed and the shutdown's garbage collection skipped."""
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    sys.exit(code)


def end_rank(code: int, wait_s: float = 30.0) -> NoReturn:
    """End a rank of a process group at once: its output flushed, os._exit(code); a rank that succeeded
    first waits until every rank has come this far (wait_for_every_rank). A failed one leaves at once, as
    before: its peers may be stuck in a collective it will never join, and torchrun stops them.

    Once its files are written a rank has nothing left to do, and the teardown is where it could still die:
    a gloo rank aborted there after writing its PASS ("terminate called without an active exception", exit
    -6; once in about four CI runs, never in 20 runs alone), and torchrun then reports the run as failed.
    Skipped with the teardown: destroy_process_group, atexit handlers (Inductor's compile workers leave
    when their parent does) and C++ destructors; the OS frees what they would.
    """
    if code == 0:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C or SIGTERM (torchrun stopping the job): go now
            wait_for_every_rank(wait_s)
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(Exception):  # what native code printed through C's stdio, not yet flushed
        ctypes.CDLL(None).fflush(None)
    os._exit(code)


def wait_for_every_rank(wait_s: float) -> None:
    """Where a process group is up, wait (wait_s at most) until every rank has arrived here: a counter in
    the group's store, not a collective. So no rank leaves while a peer may still be receiving the data of
    its last collective (over a network a sender's kernel can finish before its proxy has sent it all).
    A peer that died or hangs costs wait_s; a store that is gone (its host rank left) ends the wait."""
    dist = sys.modules.get("torch.distributed")  # never imported here: only a rank that has one waits
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    with contextlib.suppress(Exception):
        store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
        arrived, deadline = store.add(ARRIVED_KEY, 1), time.monotonic() + wait_s
        while arrived < world and time.monotonic() < deadline:
            time.sleep(0.02)
            arrived = int(store.get(ARRIVED_KEY))  # a read: add(key, 0) would append to a FileStore's log


ARRIVED_KEY = "m40/ranks_at_their_end"
