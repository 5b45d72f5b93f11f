"""The fabric facts of cuda_check: PCIe link and host<->device bandwidth, NVLink states and error
counters, the peer-to-peer bandwidth matrix, and NCCL collectives over a size sweep.

GPU side (imports torch; runs in .venv-gpu). It measures and returns numbers; the verdicts come from
tasks/burn_rules.py. The collective sweep does not care about the backend: the checker runs it with
NCCL, one process per GPU, and the tests run the same code with gloo on CPU processes.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch

from tasks import burn_rules
from training_pt import quick_exit

try:
    import pynvml
except ImportError:
    pynvml = None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def nvml_call(fn, *args):
    """fn(*args), or None when NVML answers an error (Not Supported, no permission, a lost GPU)."""
    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


# --------------------------------------------------------------------------- PCIe


def pcie_now(handle) -> tuple[int | None, int | None]:
    """The PCIe link generation and width right now (read it under load: links downtrain at idle)."""
    if pynvml is None or handle is None:
        return None, None
    return (
        nvml_call(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        nvml_call(pynvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
    )


def pcie_max(handle) -> dict:
    """What GPU and slot allow together (max_gen, max_width), and what the GPU alone allows (gpu_max_gen)."""
    if pynvml is None or handle is None:
        return {"max_gen": None, "max_width": None, "gpu_max_gen": None}
    gpu_max = getattr(pynvml, "nvmlDeviceGetGpuMaxPcieLinkGeneration", None)
    return {
        "max_gen": nvml_call(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
        "max_width": nvml_call(pynvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
        "gpu_max_gen": nvml_call(gpu_max, handle) if gpu_max else None,
    }


def link_under_load(dev, handle, n: int = 8192, products: int = 30) -> list[tuple[int | None, int | None]]:
    """The quick level's link reading: queue a few bf16 matmuls (tens of ms) and read the link while
    they run, then once more after."""
    gen = torch.Generator(dev).manual_seed(1)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=gen)
    out = torch.empty_like(a)
    for _ in range(products):
        torch.matmul(a, a, out=out)
    seen = [pcie_now(handle)]
    time.sleep(0.01)
    seen.append(pcie_now(handle))
    torch.cuda.synchronize(dev)
    return seen


def pinned_bandwidth(dev, mib: int, repeats: int, handle=None) -> tuple[float, float, list]:
    """(host->device GB/s, device->host GB/s, link readings during the copies): median of `repeats`
    copies of `mib` MiB between pinned host memory and the GPU, timed with CUDA events."""
    nbytes = mib << 20
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(0xA5)
    device = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    seen = []

    def timed(dst, src) -> float:
        times = []
        for k in range(repeats + 1):  # the first copy warms up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            seen.append(pcie_now(handle))
            end.synchronize()
            if k:
                times.append(start.elapsed_time(end) / 1e3)
        return nbytes / statistics.median(times) / 1e9

    with torch.cuda.device(dev):  # the events and the copies on this GPU's current stream
        h2d = timed(device, host)
        d2h = timed(host, device)
    if not bool((host == 0xA5).all()):
        raise RuntimeError("the pinned buffer came back from the GPU changed")
    return h2d, d2h, seen


# --------------------------------------------------------------------------- NVLink

NVLINK_COUNTERS = {
    "replay": "NVML_NVLINK_ERROR_DL_REPLAY",
    "recovery": "NVML_NVLINK_ERROR_DL_RECOVERY",
    "crc_flit": "NVML_NVLINK_ERROR_DL_CRC_FLIT",
    "crc_data": "NVML_NVLINK_ERROR_DL_CRC_DATA",
}


def nvlink_links(handle) -> tuple[list[dict] | None, str]:
    """Every NVLink link of a GPU: {link, active, errors}; ([], why) where NVML answers Not Supported (a GPU
    without NVLink), (None, why) where NVML cannot answer (a board with NVLink may be failing)."""
    if pynvml is None or handle is None:
        return None, "NVML unavailable for this GPU"
    links = []
    for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            state = pynvml.nvmlDeviceGetNvLinkState(handle, link)
        except pynvml.NVMLError as e:
            past_last = isinstance(e, (pynvml.NVMLError_NotSupported, pynvml.NVMLError_InvalidArgument))
            if past_last and links:  # past the GPU's last link
                break
            if past_last:
                return [], f"NVML answers {e} (no NVLink on this GPU)"
            return None, f"NVML answers {e} at link {link}"
        errors = {
            name: nvml_call(pynvml.nvmlDeviceGetNvLinkErrorCounter, handle, link, getattr(pynvml, const))
            for name, const in NVLINK_COUNTERS.items()
            if hasattr(pynvml, const)
        }
        links.append({"link": link, "active": state == pynvml.NVML_FEATURE_ENABLED, "errors": errors})
    return links, "" if links else "no NVLink links"


def nvlink_compare(before: list[dict] | None, after: list[dict] | None) -> list[dict] | None:
    """The links as judge_nvlink wants them: each link seen before or after the checks, with its state and
    error counters then and now (a link gone since is inactive now; active_before None: NVML could not
    read the links before the checks)."""
    if after is None:
        return None
    old, now = {x["link"]: x for x in before or []}, {x["link"]: x for x in after}
    return [
        {
            "link": link,
            "active": bool(now.get(link, {}).get("active")),
            "active_before": None if before is None else bool(old.get(link, {}).get("active")),
            "errors_before": old.get(link, {}).get("errors", {}),
            "errors_after": now.get(link, {}).get("errors", {}),
        }
        for link in sorted(old.keys() | now.keys())
    ]


# --------------------------------------------------------------------------- peer to peer


def p2p_matrix(n: int, mib: int, repeats: int) -> list[list[float | None]]:
    """GB/s of a `mib` MiB copy from GPU i to GPU j (median of `repeats`, CUDA events on the source)."""
    nbytes = mib << 20
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{i}") for i in range(n)]
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{j}")
            times = []
            with torch.cuda.device(i):
                for k in range(repeats + 1):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    dst.copy_(bufs[i], non_blocking=True)
                    end.record()
                    end.synchronize()
                    torch.cuda.synchronize(j)
                    if k:
                        times.append(start.elapsed_time(end) / 1e3)
            matrix[i][j] = nbytes / statistics.median(times) / 1e9
            del dst
    return matrix


# --------------------------------------------------------------------------- collectives


def _collective(dist, op: str, count: int, world: int, rank: int, device):
    """(buffers, run(), wrong()) for one op: inputs hold rank+1, so every result is known exactly."""
    total = world * (world + 1) / 2
    if op == "all_reduce":
        x = torch.full((count,), float(rank + 1), device=device)
        return lambda: dist.all_reduce(x), lambda: int((x != total).sum())
    if op == "all_gather":
        x = torch.full((count // world,), float(rank + 1), device=device)
        out = torch.empty(count, device=device)
        want = torch.arange(1, world + 1, device=device, dtype=torch.float32).repeat_interleave(count // world)
        return lambda: dist.all_gather_into_tensor(out, x), lambda: int((out != want).sum())
    x = torch.full((count,), float(rank + 1), device=device)
    out = torch.empty(count // world, device=device)
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return lambda: reduce_scatter(out, x), lambda: int((out != total).sum())


def sweep(dist, rank: int, world: int, device, sizes: list[int], warmup: int, iters: int) -> list[dict]:
    """Every collective at every size: one checked run, `warmup` runs, then `iters` timed; the time is
    the slowest rank's mean (nccl-tests' figure). Returns rows {op, bytes, seconds, wrong} (same on all ranks)."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for op in burn_rules.COLLECTIVES:
        for size in sizes:
            count = burn_rules.elements_for(op, size, world)
            run, wrong = _collective(dist, op, count, world, rank, device)
            run()
            sync()
            bad = wrong()
            for _ in range(warmup):
                run()
            sync()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                run()
            sync()
            seconds = torch.tensor([(time.perf_counter() - t0) / iters], device=device)
            wrong_all = torch.tensor([float(bad)], device=device)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            dist.all_reduce(wrong_all, op=dist.ReduceOp.SUM)
            rows.append({"op": op, "bytes": count * 4, "seconds": float(seconds), "wrong": int(wrong_all)})
    return rows


def sweep_worker(
    rank: int, world: int, tmp: str, backend: str, sizes: list[int], warmup: int, iters: int, timeout: float
) -> None:
    """One rank of the sweep (a spawned process): writes rank<N>.json with its rows or its error."""
    import torch.distributed as dist

    result: dict = {"rank": rank}
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group(
            backend, init_method=f"file://{tmp}/store", rank=rank, world_size=world, timeout=timedelta(seconds=timeout)
        )
        result["rows"] = sweep(dist, rank, world, device, sizes, warmup, iters)
    except Exception as e:
        result["error"] = first_line(e)
    end_worker(tmp, rank, result)


def end_worker(tmp: str, rank: int, result: dict) -> NoReturn:
    """The end of a spawned rank: its result written whole to tmp/rank<N>.json, then quick_exit.end_rank (the
    peers awaited, no process-group teardown: one that died after the result is written would have turned
    a measured rank into a failed one). The result, not the exit code, says how the rank did."""
    part = Path(tmp, f"rank{rank}.json.part")  # written, then renamed: as records.write does
    part.write_text(json.dumps(result))
    part.replace(Path(tmp, f"rank{rank}.json"))
    quick_exit.end_rank(1 if result.get("error") else 0)  # a failed rank does not wait for its peers


def run_ranks(target, world: int, args: tuple, timeout: float, prefix: str) -> tuple[list[dict], list[int]]:
    """`world` spawned processes `target(rank, world, tmp, *args)`, each writing tmp/rank<N>.json, waited for
    until one deadline `timeout` s away; one still running then is stopped (terminate, then kill). Returns
    (each rank's result, or {"rank", "error"} where it wrote none; the ranks that hung)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        procs = [ctx.Process(target=target, daemon=True, args=(r, world, tmp, *args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        # hung: still running and no result (a rank with its result written may still be waiting for its peers)
        hung = [r for r, p in enumerate(procs) if p.is_alive() and not Path(tmp, f"rank{r}.json").exists()]
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results = []
        for r, p in enumerate(procs):
            f = Path(tmp, f"rank{r}.json")
            no_result = {"rank": r, "error": f"process ended with code {p.exitcode} and no result"}
            results.append(json.loads(f.read_text()) if f.exists() else no_result)
    return results, hung


def run_sweep(
    world: int, backend: str, sizes: list[int], warmup: int, iters: int, timeout: float
) -> tuple[list[dict], list[str]]:
    """The sweep over `world` spawned processes: (rank 0's rows, errors of ranks that failed or hung)."""
    results, hung = run_ranks(sweep_worker, world, (backend, sizes, warmup, iters, timeout), timeout, "m40-sweep-")
    errors = [f"rank {r} did not finish within {timeout:g} s" for r in hung]
    errors += [f"rank {x['rank']}: {x['error']}" for x in results if x.get("error") and x["rank"] not in hung]
    return (results[0].get("rows") or []), errors
