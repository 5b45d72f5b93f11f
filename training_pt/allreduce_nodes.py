"""cuda_check across nodes: one all-reduce over every GPU of every node, as one torchrun job.

    python -m torch.distributed.run --nnodes N ... -m training_pt.allreduce_nodes --out RUN_DIR

Launched by the cuda_check stage (tasks/cuda_check.py) on each node with the multi-node options
(tasks/multinode.py). Every rank all-reduces random integers (exact in float32) and checks the sum
that every rank can compute from the seeds, then times an all-reduce of --mib MiB; bus bandwidth is
nccl-tests' 2(n-1)/n x bytes / time. NCCL on GPUs, gloo on the CPU. Each node's first process writes
allreduce_nodes.json into --out: {status, reason, world_size, nnodes, node_rank, rdzv_id, backend,
wrong, checked, seconds, bytes, busbw_gbs}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tasks import proc
from training_pt import quick_exit

RESULT = "allreduce_nodes.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the node's run folder")
    p.add_argument("--mib", type=int, default=256, help="float32 payload of the timed all-reduce")
    p.add_argument("--timed", type=int, default=10, help="timed repeats")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu: gloo on the CPU (tests)")
    return p.parse_args(argv)


def check(args, device: torch.device, rank: int, world: int) -> dict:
    n = 1 << 16
    parts = [
        torch.randint(-1000, 1000, (n,), generator=torch.Generator().manual_seed(args.seed + r)).float()
        for r in range(world)
    ]
    expected = torch.stack(parts).sum(0)
    x = parts[rank].to(device, copy=True)  # a copy: on the CPU .to() would return the part itself
    dist.all_reduce(x)
    wrong = torch.tensor([int((x.cpu() != expected).sum())], device=device)
    dist.all_reduce(wrong, op=dist.ReduceOp.MAX)  # every node learns if any rank saw a wrong sum
    y = torch.randn(args.mib << 18, device=device)
    for _ in range(3):
        dist.all_reduce(y)
    sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.timed):
        dist.all_reduce(y)
    sync(device)
    seconds = (time.perf_counter() - t0) / args.timed
    nbytes = y.numel() * y.element_size()
    busbw = 2 * (world - 1) / world * nbytes / seconds / 1e9 if world > 1 else 0.0
    return {"wrong": int(wrong.item()), "checked": n, "seconds": seconds, "bytes": nbytes, "busbw_gbs": round(busbw, 2)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc.die_with_parent()  # a torchrun rank dies with its torchrun (which dies with the stage)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    result = {
        "status": "fail",
        "reason": "",
        "world_size": world,
        "nnodes": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
        "node_rank": int(os.environ.get("GROUP_RANK", "0")),
        "rdzv_id": os.environ.get("TORCHELASTIC_RUN_ID", ""),
    }
    code = 1
    try:
        cuda = args.device == "auto" and torch.cuda.is_available()
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        result["backend"] = "nccl" if cuda else "gloo"
        dist.init_process_group(
            result["backend"], timeout=timedelta(seconds=args.timeout), device_id=device if cuda else None
        )
        result.update(check(args, device, rank, world))
        if result["wrong"]:
            result["reason"] = (
                f"all-reduce across {result['nnodes']} node(s), {world} processes: {result['wrong']} of "
                f"{result['checked']} sums wrong"
            )
        else:
            result["status"], code = "pass", 0
    except Exception as e:  # one line for the stage; the traceback stays in the console
        first = (str(e).strip().splitlines() or [""])[0][:300]
        result["reason"] = f"all-reduce across nodes failed on rank {rank}: {type(e).__name__}: {first}"
        print(result["reason"], file=sys.stderr, flush=True)
    if local_rank == 0:
        (args.out / RESULT).write_text(json.dumps(result, indent=2) + "\n")
    print(f"allreduce_nodes rank {rank}: {result['status']} {result.get('busbw_gbs', '')} GB/s", flush=True)
    return code


if __name__ == "__main__":
    quick_exit.end_rank(main())  # no process-group teardown: see end_rank
