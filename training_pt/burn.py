"""cuda_check's long level (`--level long --duration S`): burn-in and fabric checks on every GPU at once.

GPU side (imports torch; runs in .venv-gpu inside the checker, training_pt/gpu_checks.py). Per GPU, in
one thread each with its own CUDA stream and all at the same time:
  - a sustained bf16 matmul burn on inputs made from the seed on the CPU (so identical on every GPU);
    every product is compared bit for bit with the first (gpu-burn's method), and the first product's
    checksum is compared across GPUs of one model;
  - then a memory test over most of the free memory: walking ones, seeded random, address-in-address,
    each followed by its bitwise inverse, written and read back in chunks.
An NVML sampler thread records clocks, power, temperature, clock-event reasons and the PCIe link
throughout (burn_samples.csv, burn.svg). Then per GPU: pinned host<->device bandwidth and the link
read under that load, NVLink states and counters; across GPUs: the peer-to-peer matrix and the NCCL
collective sweep. The verdicts come from tasks/burn_rules.py; the quick level only gains the cheap
`pcie.link` and `peers.*` checks (see quick_pcie_link and peer_checks).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from tasks import burn_plot, burn_rules, dcgm, layout, probe
from tasks.cuda_rules import FAIL, SKIP, Verdict
from training_pt import fabric, memtest

pynvml = fabric.pynvml

# int64 multipliers of the seeded random pattern (splitmix64's, as signed int64): every word is a
# function of its index and the seed, so a chunk's expected values are recomputed, never stored.
MIX1, MIX2, MIX3 = -7046029254386353131, -4658895280553007687, -7723592293110705685
PATTERNS = ("walking_ones", "random", "address")
# The checks this module adds, by level: SKIPped by name when there is no GPU to run them on.
QUICK_CHECKS = ("pcie.link", "peers.matmul_bf16", "peers.copy")
LONG_CHECKS = (
    "dcgm",
    "burn.compare",
    "burn.clocks",
    "memory.patterns",
    "pcie.bandwidth",
    "pcie.link_burn",
    "nvlink",
    "burn.peers",
    "peers.burn_tflops",
    "p2p.bandwidth",
    "collectives",
)


# --------------------------------------------------------------------------- the checker's options


def add_options(parser) -> None:
    parser.add_argument(
        "--level",
        choices=burn_rules.LEVELS,
        default="quick",
        help="quick: the correctness and speed checks; long: also the burn-in and fabric checks",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of the long level's burn (default: duration_s in configs/burnin.yaml)",
    )
    parser.add_argument(
        "--dcgm-level",
        type=int,
        choices=(1, 2, 3, 4),
        default=None,
        help="dcgmi diag -r N in the long level (default: dcgm.level in configs/burnin.yaml)",
    )
    parser.add_argument(
        "--burnin-config", type=Path, default=None, help="long-level settings (default configs/burnin.yaml)"
    )


def time_limit(args, burnin: dict, settings: dict) -> float:
    """Seconds the checker may run in all: the quick level's limit, plus the burn and its extras if long."""
    duration = args.duration if args.duration is not None else burnin["duration_s"]
    return burn_rules.time_budget_s(args.level, duration, settings["timeout_s"], burnin["extra_timeout_s"])


def configure(checker, args, burnin: dict) -> None:
    """Give the checker its level and the burn-in settings (checker.burnin, level, duration, dcgm_level)."""
    checker.burnin, checker.level = burnin, args.level
    checker.duration = args.duration if args.duration is not None else burnin["duration_s"]
    checker.dcgm_level = args.dcgm_level if args.dcgm_level is not None else burnin["dcgm"]["level"]


def skipped_names(level: str) -> tuple[str, ...]:
    return QUICK_CHECKS + (LONG_CHECKS if level == "long" else ())


# --------------------------------------------------------------------------- the quick level's hooks


def quick_pcie_link(checker, g: dict) -> Verdict:
    """pcie.link in the quick level: the link read while a few matmuls run (~0.1 s per GPU)."""
    handle = gpu_handle(checker, g)
    if handle is None:
        return Verdict(SKIP, "", "NVML cannot read this GPU's PCIe link (no NVML match)")
    seen = fabric.link_under_load(torch.device("cuda", g["index"]), handle)
    return judge_link(checker.burnin, handle, seen)


def judge_link(burnin: dict, handle, seen: list) -> Verdict:
    top = fabric.pcie_max(handle)
    return burn_rules.judge_pcie_link(
        seen,
        top["max_gen"],
        top["max_width"],
        top["gpu_max_gen"],
        burnin["pcie"]["link_severity"],
        burnin["pcie"]["slot_severity"],
    )


def peer_checks(checker) -> None:
    """peers.matmul_bf16 and peers.copy: one GPU slower than the others of its model (both levels)."""
    peers = checker.burnin["peers"]
    models = {g["index"]: g["name"] for g in checker.gpus}
    for check, key, metric, unit in (
        ("speed.matmul_bf16", "tflops", "matmul_bf16", "TFLOP/s"),
        ("speed.copy", "tbs", "copy", "TB/s"),
    ):
        values = {c.gpu: c.data[key] for c in checker.checks if c.name == check and c.data.get(key)}
        checker.add(
            f"peers.{metric}",
            None,
            burn_rules.judge_peers(metric, unit, values, models, peers["below_median_share"], peers["severity"]),
        )


def gpu_handle(checker, g: dict):
    nvml = checker.nvml
    return nvml.handles[g["nvml"]] if nvml.ok and g.get("nvml") is not None else None


# --------------------------------------------------------------------------- NVML sampler


class Sampler(threading.Thread):
    """Samples every GPU's clocks, power, temperature, clock-event reasons and PCIe link every
    `interval` seconds until stopped; `live` and `phase` are written by the GPU threads."""

    def __init__(self, handles: dict[int, object], interval: float) -> None:
        super().__init__(daemon=True, name="nvml-sampler")
        self.handles, self.interval = handles, interval
        self.live: dict[int, float] = {}
        self.phase: dict[int, str] = dict.fromkeys(handles, "start")
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def read(self, gpu: int, h) -> dict:
        call = fabric.nvml_call
        power = call(pynvml.nvmlDeviceGetPowerUsage, h)
        gen, width = fabric.pcie_now(h)
        return {
            "t_s": round(time.perf_counter() - self.t0, 3),
            "gpu": gpu,
            "phase": self.phase.get(gpu),
            "tflops": self.live.get(gpu) if self.phase.get(gpu) == "burn" else None,
            "sm_mhz": call(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM),
            "sm_max_mhz": call(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_SM),
            "mem_mhz": call(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM),
            "power_w": None if power is None else power / 1000,
            "temp_c": call(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
            "reasons": probe.clock_events(pynvml, h),
            "pcie_gen": gen,
            "pcie_width": width,
        }

    def run(self) -> None:
        while not self.stop.is_set():
            for gpu, h in self.handles.items():
                self.samples.append(self.read(gpu, h))
            self.stop.wait(self.interval)

    def of(self, gpu: int, phase: str) -> list[dict]:
        return [s for s in self.samples if s["gpu"] == gpu and s["phase"] == phase]


# --------------------------------------------------------------------------- the burn


def burn_inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two n x n bf16 matrices from the seed, made on the CPU: the same bits for every GPU."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, n, generator=gen).to(torch.bfloat16), torch.randn(n, n, generator=gen).to(torch.bfloat16))


def checksum(t: torch.Tensor) -> str:
    """An exact, position-dependent checksum of a tensor's bits (int64 arithmetic, wrapping)."""
    words = t.contiguous().view(torch.int16).flatten().to(torch.int64)
    weights = torch.arange(1, words.numel() + 1, device=t.device, dtype=torch.int64).mul_(MIX1)
    return f"{int((words * weights).sum()) & 0xFFFFFFFFFFFFFFFF:016x}"


def burn(
    dev: torch.device,
    a: torch.Tensor,
    b: torch.Tensor,
    duration_s: float,
    window_s: float,
    live: dict | None = None,
    key=None,
    matmul=torch.matmul,
) -> dict:
    """Multiply a @ b again and again for `duration_s`, comparing every product with the first bit for
    bit; TFLOP/s per window of about `window_s`. `matmul` is the seam the tests use to flip a bit."""
    cuda = dev.type == "cuda"
    a, b = a.to(dev), b.to(dev)
    ref = matmul(a, b)
    out = torch.empty_like(ref)
    bad_iters = torch.zeros((), dtype=torch.int64, device=dev)
    bad_elems = torch.zeros((), dtype=torch.int64, device=dev)
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    iterations, per_window, windows = 1, 4, []
    t_end = time.perf_counter() + duration_s
    while time.perf_counter() < t_end:
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        end = torch.cuda.Event(enable_timing=True) if cuda else None
        t0 = time.perf_counter()
        if cuda:
            start.record()
        for _ in range(per_window):
            matmul(a, b, out=out)
            diff = (out != ref).sum()
            bad_elems += diff
            bad_iters += (diff > 0).to(torch.int64)
        if cuda:
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            seconds = time.perf_counter() - t0
        iterations += per_window
        tflops = per_window * flops / seconds / 1e12
        windows.append((time.perf_counter() - t_end + duration_s, tflops))
        if live is not None:
            live[key] = tflops
        per_window = max(1, min(4 * per_window, round(per_window * window_s / max(seconds, 1e-6))))
    return {
        "iterations": iterations,
        "bad_iterations": int(bad_iters),
        "bad_elements": int(bad_elems),
        "elements": ref.numel(),
        "nonfinite": int((~torch.isfinite(ref.float())).sum()),
        "checksum": checksum(ref),
        "windows": windows,
        "tflops": sorted(w for _, w in windows)[len(windows) // 2] if windows else None,
    }


# --------------------------------------------------------------------------- memory patterns


def expected(pattern: str, lo: int, hi: int, dev, seed: int, base: int) -> torch.Tensor:
    """The int64 words lo..hi of a pattern: a function of the word's index only."""
    idx = torch.arange(lo, hi, dtype=torch.int64, device=dev)
    if pattern == "walking_ones":
        return torch.bitwise_left_shift(torch.ones_like(idx), idx.remainder_(64))
    if pattern == "address":  # the byte address of the word itself
        return idx.mul_(8).add_(base)
    x = idx.add_(seed).mul_(MIX1)  # "random": splitmix64's finaliser over index + seed
    x = x.bitwise_xor_(torch.bitwise_right_shift(x, 30)).mul_(MIX2)
    x = x.bitwise_xor_(torch.bitwise_right_shift(x, 27)).mul_(MIX3)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 31))


def memory_patterns(dev, words: int, seed: int, chunk: int, patterns=PATTERNS, after_write=None) -> dict[str, int]:
    """Each pattern written over `words` int64 words, read back, inverted in place and read back again,
    chunk by chunk (training_pt/memtest.py). Returns the words read back wrong per pattern. `after_write(buf)`:
    the tests' seam to flip a bit, as faulty memory would."""
    buf = torch.empty(words, dtype=torch.int64, device=dev)
    base = buf.data_ptr()
    out = {}
    for pattern in patterns:
        out[pattern] = memtest.read_back_wrong(
            buf, chunk, lambda lo, hi, p=pattern: expected(p, lo, hi, dev, seed, base), after_write
        )
    del buf
    return out


# --------------------------------------------------------------------------- one GPU's thread


def gpu_work(g: dict, a, b, s: dict, duration_s: float, seed: int, sampler: Sampler | None, results: dict) -> None:
    """The burn, then the memory patterns, on one GPU (run in its own thread, on its own stream)."""
    i, r = g["index"], {"burn_error": "", "memory_error": ""}
    results[i] = r
    dev = torch.device("cuda", i)
    torch.cuda.set_device(dev)
    phase = sampler.phase if sampler else {}
    with torch.cuda.stream(torch.cuda.Stream(dev)):
        phase[i] = "burn"
        try:
            r["burn"] = burn(dev, a, b, duration_s, s["burn"]["window_s"], sampler.live if sampler else None, i)
        except Exception as e:  # an OOM, a CUDA error: what the check is for
            r["burn_error"] = fabric.first_line(e)
        phase[i] = "memory"
        torch.cuda.synchronize(dev)
        r["words"], free, _ = memtest.free_words(dev, s["memory"]["share"])
        r["free_gib"] = free / 2**30
        t0 = time.perf_counter()
        try:
            r["memory"] = memory_patterns(dev, r["words"], seed, s["memory"]["chunk_words"])
        except Exception as e:
            r["memory_error"] = fabric.first_line(e)
        torch.cuda.synchronize(dev)
        r["memory_s"] = time.perf_counter() - t0
        phase[i] = "done"
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the long level


def run_long(checker, duration_s: float, dcgm_level: int) -> None:
    """Every long check, in cuda_check.txt's order: DCGM (on idle GPUs), the burn and memory test on
    every GPU at once, then per GPU the samples, PCIe and NVLink, then the checks across GPUs."""
    s, gpus = checker.burnin, checker.gpus
    checker.emit("")
    checker.emit(
        f"long level: {duration_s:g} s bf16 {s['burn']['matmul_n']}^3 burn then memory patterns "
        f"({', '.join(PATTERNS)}, each and its inverse) over {s['memory']['share']:.0%} of free memory, "
        f"on {len(gpus)} GPU(s) at once; NVML sampled every {s['sample_interval_s']:g} s"
    )
    t0 = time.perf_counter()
    found, code, doc, error = dcgm.run_diag(dcgm_level, s["dcgm"]["timeout_s"], checker.out_dir / layout.DCGM_JSON)
    checker.add(
        "dcgm",
        None,
        burn_rules.judge_dcgm(found, code, doc, dcgm_level, s["dcgm"]["severity"], error),
        time.perf_counter() - t0,
    )
    handles = {g["index"]: gpu_handle(checker, g) for g in gpus}
    nvlink_before = {i: fabric.nvlink_links(h)[0] for i, h in handles.items()}
    results, seconds = burn_all(checker, duration_s, {i: h for i, h in handles.items() if h is not None})
    for g in gpus:
        per_gpu_long(checker, g, handles[g["index"]], results.get(g["index"], {}), nvlink_before[g["index"]], seconds)
    across_gpus(checker, results)


def burn_all(checker, duration_s: float, handles: dict) -> tuple[dict, float]:
    """The burn and memory test on every GPU at once, sampled by NVML; writes the samples and the plot."""
    s = checker.burnin
    seed = checker.next_seed()
    a, b = burn_inputs(s["burn"]["matmul_n"], seed)
    sampler = Sampler(handles, s["sample_interval_s"]) if pynvml is not None and handles else None
    results: dict = {}
    threads = [
        threading.Thread(
            target=gpu_work, name=f"burn-gpu{g['index']}", args=(g, a, b, s, duration_s, seed, sampler, results)
        )
        for g in checker.gpus
    ]
    t0 = time.perf_counter()
    if sampler:
        sampler.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    samples = []
    if sampler:
        sampler.stop.set()
        sampler.join(5)
        samples = sampler.samples
    checker.long_samples = samples
    (checker.out_dir / layout.BURN_SAMPLES).write_text(burn_plot.samples_csv(samples))
    title = f"cuda_check --level long: {duration_s:g} s burn then memory patterns on {len(checker.gpus)} GPU(s)"
    (checker.out_dir / layout.BURN_PLOT).write_text(burn_plot.burn_svg(samples, title))
    checker.emit(
        f"long level: burn and memory test took {seconds:.1f} s; {len(samples)} NVML samples in "
        f"{layout.BURN_SAMPLES}, drawn in {layout.BURN_PLOT}"
    )
    return results, seconds


def per_gpu_long(checker, g: dict, handle, r: dict, nvlink_before, seconds: float) -> None:
    s, i = checker.burnin, g["index"]
    samples = [x for x in getattr(checker, "long_samples", []) if x["gpu"] == i]
    under_load = [x for x in samples if x["phase"] == "burn"]
    for line in burn_rules.timeline_lines(i, burn_rules.timeline(under_load)):
        checker.emit(line)
    info = r.get("burn")
    if not info:
        why = r.get("burn_error") or "no result (its thread ended early; see cuda_check.log)"
        checker.add("burn.compare", i, Verdict(FAIL, "", f"the burn stopped: {why}"), seconds)
    else:
        v = burn_rules.judge_burn_compare(
            info["iterations"], info["bad_iterations"], info["bad_elements"], info["elements"], info["nonfinite"]
        )
        v.value += f", median {info['tflops'] or 0:.1f} TFLOP/s"
        v.data.update(tflops=info["tflops"], checksum=info["checksum"], windows=info["windows"])
        checker.add("burn.compare", i, v, seconds)
    checker.add(
        "burn.clocks", i, burn_rules.judge_clocks(under_load, s["burn"]["clock_share"], s["burn"]["low_clock_share"])
    )
    gib = r.get("words", 0) * 8 / 2**30
    memory_error = r.get("memory_error") or ("" if r.get("memory") else "the memory test did not run")
    checker.add(
        "memory.patterns",
        i,
        burn_rules.judge_memory_patterns(
            r.get("memory") or {}, r.get("words", 0), gib, r.get("memory_s", 0.0), r.get("free_gib", 0.0), memory_error
        ),
        r.get("memory_s", 0.0),
    )
    checker.run("pcie.link_burn", i, long_pcie, checker, g, handle, under_load)
    checker.run("nvlink", i, nvlink_check, s["nvlink"], handle, nvlink_before)


def nvlink_check(nv: dict, handle, before) -> Verdict:
    after, error = fabric.nvlink_links(handle)
    return burn_rules.judge_nvlink(
        fabric.nvlink_compare(before, after), error, nv["down_severity"], nv["errors_severity"]
    )


def long_pcie(checker, g: dict, handle, under_load: list) -> Verdict:
    """pcie.link_burn: the link read during the burn and the pinned copies; pcie.bandwidth added before it."""
    p = checker.burnin["pcie"]
    error, h2d, d2h, seen = "", None, None, []
    t0 = time.perf_counter()
    try:
        h2d, d2h, seen = fabric.pinned_bandwidth(torch.device("cuda", g["index"]), p["copy_mib"], p["repeats"], handle)
    except Exception as e:
        error = fabric.first_line(e)
    readings = [(x.get("pcie_gen"), x.get("pcie_width")) for x in under_load] + seen
    link = (
        judge_link(checker.burnin, handle, readings)
        if handle is not None
        else Verdict(SKIP, "", "NVML cannot read this GPU's PCIe link (no NVML match)")
    )
    bw = burn_rules.judge_pcie_bandwidth(
        h2d, d2h, link.data.get("gen"), link.data.get("width"), p["warn_share"], p["fail_share"], error
    )
    checker.add("pcie.bandwidth", g["index"], bw, time.perf_counter() - t0)
    return link


def across_gpus(checker, results: dict) -> None:
    s, gpus = checker.burnin, checker.gpus
    models = {g["index"]: g["name"] for g in gpus}
    burns = {i: r["burn"] for i, r in results.items() if r.get("burn")}
    checker.add("burn.peers", None, burn_rules.judge_burn_peers({i: b["checksum"] for i, b in burns.items()}, models))
    checker.add(
        "peers.burn_tflops",
        None,
        burn_rules.judge_peers(
            "burn",
            "TFLOP/s",
            {i: b["tflops"] for i, b in burns.items() if b["tflops"]},
            models,
            s["peers"]["below_median_share"],
            s["peers"]["severity"],
        ),
    )
    n = len(gpus)
    if n < 2:
        for name in ("p2p.bandwidth", "collectives"):
            checker.add(name, None, Verdict(SKIP, "", "one GPU visible: nothing to connect"))
        return
    checker.run("p2p.bandwidth", None, p2p_check, checker, n)
    checker.run("collectives", None, collectives_check, checker, n)


def p2p_check(checker, n: int) -> Verdict:
    p = checker.burnin["p2p"]
    matrix = fabric.p2p_matrix(n, p["copy_mib"], p["repeats"])
    for line in burn_rules.p2p_lines(matrix):
        checker.emit(line)
    return burn_rules.judge_p2p(matrix, p["below_median_share"], p["severity"])


def collectives_check(checker, n: int) -> Verdict:
    c = checker.burnin["collectives"]
    sizes = burn_rules.sweep_sizes(c["min_bytes"], c["max_bytes"])
    rows, errors = fabric.run_sweep(n, "nccl", sizes, c["warmup"], c["iters"], c["timeout_s"])
    for line in burn_rules.collective_lines(rows, n):
        checker.emit(line)
    links = [fabric.nvlink_links(gpu_handle(checker, g))[0] for g in checker.gpus]
    interconnect = "nvlink" if any(x and any(k["active"] for k in x) for x in links) else "pcie"
    return burn_rules.judge_collectives(rows, n, errors, interconnect, c["expect_busbw_gbs"], c["severity"])
