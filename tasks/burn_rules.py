"""The verdicts of cuda_check's long level and fabric checks, as pure functions of measured values.

No torch, no NVML: training_pt/burn.py and training_pt/fabric.py measure and call these; the tests
inject faults here on a CPU (a throttle under load, one slow GPU of eight, an x8 link, a burn output
that differs). Thresholds come from configs/burnin.yaml (tasks/config.py:load_burnin).

A finding configured as WARN (configs/burnin.yaml `*_severity`) is cuda_rules' WARN status: reported,
never failing the stage.
"""

from __future__ import annotations

import statistics

from tasks.cuda_rules import FAIL, PASS, SKIP, WARN, Verdict, decode_throttle

LEVELS = ("quick", "long")


def flagged(severity: str, value: str, reason: str, data: dict | None = None) -> Verdict:
    """A finding at its configured severity: FAIL or WARN."""
    return Verdict(FAIL if severity == FAIL else WARN, value, reason, dict(data or {}))


def figures(name: str, gpu: int | None, data: dict) -> dict:
    """The long level's key numbers of one check for the stage record (cuda_check.figures_from)."""
    where = f"gpu{gpu}_"
    if name == "burn.compare" and data.get("tflops"):
        return {f"{where}burn_tflops": round(data["tflops"], 1)}
    if name == "memory.patterns" and data.get("gibs"):
        return {f"{where}memtest_gib": round(data["gib"], 1), f"{where}memtest_gibs": round(data["gibs"], 1)}
    if name in ("pcie.link", "pcie.link_burn") and data.get("gen"):
        return {f"{where}pcie_link": f"Gen{data['gen']} x{data['width']}"}
    if name == "pcie.bandwidth" and data.get("h2d_gbs"):
        return {f"{where}h2d_gbs": round(data["h2d_gbs"], 1), f"{where}d2h_gbs": round(data["d2h_gbs"], 1)}
    if name == "collectives" and data.get("busbw_gbs"):
        return {f"{op}_sweep_busbw_gbs": round(bw, 1) for op, bw in data["busbw_gbs"].items()}
    return {}


def time_budget_s(level: str, duration_s: float, base_timeout_s: float, extra_timeout_s: float) -> float:
    """Seconds the checker may run: the quick level's limit, plus the burn and its extras when long."""
    return base_timeout_s + (duration_s + extra_timeout_s if level == "long" else 0.0)


# --------------------------------------------------------------------------- the burn


def judge_burn_compare(
    iterations: int, bad_iterations: int, bad_elements: int, elements: int, nonfinite: int = 0
) -> Verdict:
    """gpu-burn's method: every product after iteration 0 must equal iteration 0's bit for bit."""
    data = {
        "iterations": iterations,
        "bad_iterations": bad_iterations,
        "bad_elements": bad_elements,
        "elements": elements,
        "nonfinite": nonfinite,
    }
    value = f"{iterations} products compared bit for bit with the first"
    if iterations < 2:
        return Verdict(FAIL, value, "the burn ran fewer than 2 products: nothing was compared", data)
    if nonfinite:
        return Verdict(FAIL, value, f"the reference product holds {nonfinite} NaN/inf from finite inputs", data)
    if bad_iterations:
        return Verdict(
            FAIL,
            value,
            f"{bad_iterations} of {iterations - 1} products differ from the first "
            f"({bad_elements} wrong elements in all, of {elements} per product): the same "
            "inputs gave different bits, a faulty GPU (or its memory) under load",
            data,
        )
    return Verdict(PASS, value, "", data)


def judge_burn_peers(checksums: dict[int, str], models: dict[int, str]) -> Verdict:
    """Identical inputs on GPUs of one model must give identical products (compared by checksum)."""
    data = {"checksums": {str(k): v for k, v in checksums.items()}}
    groups: dict[str, list[int]] = {}
    for gpu in sorted(checksums):
        groups.setdefault(models.get(gpu, "?"), []).append(gpu)
    peers = {m: g for m, g in groups.items() if len(g) > 1}
    if not peers:
        return Verdict(SKIP, "", "no two GPUs of one model: nothing to compare across GPUs", data)
    odd = []
    for gpus in peers.values():
        counts: dict[str, int] = {}
        for g in gpus:
            counts[checksums[g]] = counts.get(checksums[g], 0) + 1
        if len(counts) > 1:
            top = max(counts.values())
            majority = [c for c, n in counts.items() if n == top]
            odd += [g for g in gpus if len(majority) > 1 or checksums[g] != majority[0]]
    value = f"{sum(len(g) for g in peers.values())} GPUs in {len(peers)} model group(s)"
    if odd:
        return Verdict(
            FAIL,
            value,
            f"gpu {', '.join(map(str, odd))} computed a different product from identical "
            "inputs than its peers of the same model: a faulty GPU",
            data | {"odd": odd},
        )
    return Verdict(PASS, value + ", identical products", "", data)


# --------------------------------------------------------------------------- NVML samples under load


def judge_clocks(samples: list[dict], clock_share: float, low_clock_share: float) -> Verdict:
    """Samples taken under load (keys sm_mhz, sm_max_mhz, power_w, temp_c, reasons).

    A hardware slowdown, thermal slowdown or power brake in any sample FAILs (cuda_rules' clock-event
    table); an SM clock below clock_share of its maximum in more than low_clock_share of the samples WARNs.
    """
    data: dict = {"samples": len(samples)}
    if not samples:
        return Verdict(SKIP, "", "no NVML samples under load (NVML unavailable or the burn did not run)", data)
    faults: dict[str, int] = {}
    for s in samples:
        for name in decode_throttle(s.get("reasons"))[0]:
            faults[name] = faults.get(name, 0) + 1
    value = describe_samples(samples)
    clocks = [(s["sm_mhz"], s["sm_max_mhz"]) for s in samples if s.get("sm_mhz") and s.get("sm_max_mhz")]
    low = sum(1 for c, m in clocks if c < clock_share * m)
    data.update(faults=faults, low_clock_samples=low, clock_samples=len(clocks))
    if faults:
        seen = ", ".join(f"{n} in {k} of {len(samples)} samples" for n, k in faults.items())
        return Verdict(
            FAIL,
            value,
            f"clocks held back under load by {seen}: check cooling, power delivery and "
            "the GPU's slot (nvidia-smi -q -d PERFORMANCE,TEMPERATURE,POWER)",
            data,
        )
    if clocks and low > low_clock_share * len(clocks):
        return flagged(
            WARN,
            value,
            f"SM clock below {clock_share:.0%} of its maximum in {low} of {len(clocks)} "
            "samples under load: the GPU runs slow without a hardware event (power cap, application "
            "clocks?)",
            data,
        )
    return Verdict(PASS, value, "", data)


def _span(values: list[float], unit: str, fmt: str = ".0f") -> str:
    if not values:
        return f"- {unit}"
    return f"{min(values):{fmt}}-{max(values):{fmt}} {unit} (median {statistics.median(values):{fmt}})"


def describe_samples(samples: list[dict]) -> str:
    def col(key):
        return [s[key] for s in samples if s.get(key) is not None]

    return (
        f"SM {_span(col('sm_mhz'), 'MHz')}, power {_span(col('power_w'), 'W')}, "
        f"temperature {_span(col('temp_c'), '°C')}, {len(samples)} samples"
    )


def timeline(samples: list[dict], slices: int = 6) -> list[dict]:
    """The burn cut into `slices` equal spans of time: per span the median TFLOP/s, SM clock, power,
    temperature, and the clock-event reasons seen (samples: t_s plus the keys of judge_clocks)."""
    if not samples:
        return []
    t0, t1 = samples[0]["t_s"], samples[-1]["t_s"]
    width = max((t1 - t0) / slices, 1e-9)
    rows = []
    for k in range(slices):
        lo, hi = t0 + k * width, t0 + (k + 1) * width
        part = [s for s in samples if lo <= s["t_s"] < hi or (k == slices - 1 and s["t_s"] == hi)]
        if not part:
            continue
        row = {"from_s": lo, "to_s": hi}
        for key in ("tflops", "sm_mhz", "power_w", "temp_c"):
            vals = [s[key] for s in part if s.get(key) is not None]
            row[key] = statistics.median(vals) if vals else None
        mask = 0
        for s in part:
            mask |= s.get("reasons") or 0
        bad, info = decode_throttle(mask)
        row["events"] = ", ".join(bad + info) or "none"
        rows.append(row)
    return rows


def timeline_lines(gpu: int, rows: list[dict]) -> list[str]:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    out = [f"gpu{gpu} burn over time:  {'seconds':>11}  {'TFLOP/s':>8}  {'SM MHz':>6}  {'W':>5}  {'°C':>4}  events"]
    for r in rows:
        out.append(
            f"{'':<22}{r['from_s']:5.0f}-{r['to_s']:<5.0f}  {f(r['tflops'], '8.1f')}  "
            f"{f(r['sm_mhz'], '6.0f')}  {f(r['power_w'], '5.0f')}  {f(r['temp_c'], '4.0f')}  {r['events']}"
        )
    return out


# --------------------------------------------------------------------------- one GPU among its peers


def below_median(value: float, median: float, share: float) -> float | None:
    """The outlier rule, one for every comparison with peers: how far `value` falls below `median` (a
    fraction) when it is more than `share` below it, else None. Used for a GPU among the GPUs of its model
    (peer_outliers) and for a node among the nodes of a fleet (tasks/fleet.py)."""
    if median > 0 and value < (1 - share) * median:
        return 1 - value / median
    return None


def peer_outliers(values: dict[int, float], models: dict[int, str], share: float) -> list[tuple[int, float, float]]:
    """GPUs whose value is more than `share` below the median of the other GPUs of the same model:
    [(gpu, value, peers' median)]. A GPU without a peer of its model is never flagged."""
    out = []
    for gpu, value in sorted(values.items()):
        peers = [v for g, v in values.items() if g != gpu and models.get(g) == models.get(gpu)]
        median = statistics.median(peers) if peers else 0.0  # no peer of its model: never flagged
        if below_median(value, median, share) is not None:
            out.append((gpu, value, median))
    return out


def judge_peers(
    metric: str, unit: str, values: dict[int, float], models: dict[int, str], share: float, severity: str
) -> Verdict:
    """Check peers.<metric>: one GPU slower than its peers of the same model."""
    data = {"values": {str(k): v for k, v in values.items()}, "share": share}
    groups = {m for g, m in models.items() if g in values and sum(1 for h in values if models.get(h) == m) > 1}
    if not groups:
        return Verdict(SKIP, "", "no two GPUs of one model: no peers to compare", data)
    value = ", ".join(f"gpu{g} {v:.3g}" for g, v in sorted(values.items())) + f" {unit}"
    slow = peer_outliers(values, models, share)
    data["outliers"] = [g for g, _, _ in slow]
    if slow:
        named = "; ".join(
            f"gpu{g} {v:.3g} {unit} is {1 - v / m:.0%} below its peers' median {m:.3g}" for g, v, m in slow
        )
        return flagged(
            severity,
            value,
            f"{named} (more than {share:.0%}): a slow GPU among its peers (cooling, power, clocks, its PCIe or memory)",
            data,
        )
    return Verdict(PASS, value, f"every GPU within {share:.0%} of its peers' median", data)


# --------------------------------------------------------------------------- PCIe

# PCIe data rate per lane and direction after line encoding, GB/s (PCI-SIG: 8b/10b for Gen1-2,
# 128b/130b for Gen3-5, FLIT for Gen6). Gen5 x16 = 63.0 GB/s.
PCIE_LANE_GBS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


def pcie_theoretical_gbs(gen: int | None, width: int | None) -> float | None:
    if not gen or not width or gen not in PCIE_LANE_GBS:
        return None
    return PCIE_LANE_GBS[gen] * width


def judge_pcie_link(
    under_load: list[tuple[int | None, int | None]],
    max_gen: int | None,
    max_width: int | None,
    gpu_max_gen: int | None,
    link_severity: str,
    slot_severity: str,
) -> Verdict:
    """Check pcie.link: the link generation and width read under load (the best seen: links downtrain
    at idle) against what the GPU and its slot allow together, and the slot against the GPU."""
    seen = [(g, w) for g, w in under_load if g and w]
    data = {"under_load": seen, "max_gen": max_gen, "max_width": max_width, "gpu_max_gen": gpu_max_gen}
    if not seen or not max_gen or not max_width:
        return Verdict(SKIP, "", "NVML cannot read the PCIe link here (no NVML, or a GPU without PCIe link info)", data)
    gen, width = max(g for g, _ in seen), max(w for _, w in seen)
    data.update(gen=gen, width=width)
    value = f"Gen{gen} x{width} under load (max Gen{max_gen} x{max_width})"
    short = []
    if gen < max_gen:
        short.append(f"Gen{gen} instead of Gen{max_gen}")
    if width < max_width:
        short.append(f"x{width} instead of x{max_width}")
    if short:
        return flagged(
            link_severity,
            value,
            f"the PCIe link runs at {' and '.join(short)} under load: reseat the "
            "card, check the riser/slot and the BIOS link settings (host<->device copies slow down)",
            data,
        )
    if gpu_max_gen and gpu_max_gen > max_gen:
        return flagged(
            slot_severity,
            value,
            f"the GPU supports Gen{gpu_max_gen} but its slot allows Gen{max_gen}: "
            "a slot or riser of an older generation",
            data,
        )
    return Verdict(PASS, value, "", data)


def judge_pcie_bandwidth(
    h2d_gbs: float | None,
    d2h_gbs: float | None,
    gen: int | None,
    width: int | None,
    warn_share: float,
    fail_share: float,
    error: str = "",
) -> Verdict:
    """Check pcie.bandwidth: pinned host<->device copies both ways against the link's theoretical rate."""
    data = {"h2d_gbs": h2d_gbs, "d2h_gbs": d2h_gbs, "gen": gen, "width": width}
    if error:
        return Verdict(FAIL, "", f"pinned host<->device copies failed: {error}", data)
    if not h2d_gbs or not d2h_gbs:
        return Verdict(SKIP, "", "no host<->device measurement", data)
    value = f"host->device {h2d_gbs:.1f} GB/s, device->host {d2h_gbs:.1f} GB/s"
    peak = pcie_theoretical_gbs(gen, width)
    if peak is None:
        return Verdict(PASS, value, "not judged: the PCIe link generation/width is unknown (NVML)", data)
    worst = min(h2d_gbs, d2h_gbs)
    data.update(peak_gbs=peak, share=worst / peak)
    value += f" = {h2d_gbs / peak:.0%} / {d2h_gbs / peak:.0%} of Gen{gen} x{width} ({peak:.1f} GB/s)"
    why = (
        "(the link's width or generation, the CPU socket the GPU hangs off (NUMA), the IOMMU, or host memory bandwidth)"
    )
    if worst < fail_share * peak:
        return Verdict(FAIL, value, f"below {fail_share:.0%} of the link's rate {why}", data)
    if worst < warn_share * peak:
        return flagged(WARN, value, f"below {warn_share:.0%} of the link's rate {why}", data)
    return Verdict(PASS, value, "", data)


# --------------------------------------------------------------------------- memory patterns


def judge_memory_patterns(
    results: dict[str, int], words: int, gib: float, seconds: float, free_gib: float, error: str = ""
) -> Verdict:
    """Check memory.patterns: words read back wrong per pattern (each written, read, inverted, read)."""
    data = {"mismatches": results, "words": words, "gib": gib, "seconds": seconds, "free_gib": free_gib}
    traffic = 5 * gib * len(results)  # per pattern: write, read, invert (read + write), read
    speed = traffic / seconds if seconds > 0 else 0.0
    value = (
        f"{gib:.1f} GiB of {free_gib:.1f} GiB free x {len(results)} patterns "
        f"({', '.join(results) or '-'}), {seconds:.1f} s, {speed:.0f} GiB/s"
    )
    data["gibs"] = speed
    if error:
        return Verdict(FAIL, value, f"the pattern test stopped: {error}", data)
    bad = {name: n for name, n in results.items() if n}
    if bad:
        named = ", ".join(f"{name} {n} wrong word(s)" for name, n in bad.items())
        return Verdict(
            FAIL,
            value,
            f"{named} of {words} (each pattern and its inverse): faulty GPU memory (check "
            "nvidia-smi -q -d ECC,ROW_REMAPPER)",
            data,
        )
    return Verdict(PASS, value, "every pattern and its inverse read back", data)


# --------------------------------------------------------------------------- NVLink


def judge_nvlink(links: list[dict] | None, error: str, down_severity: str, errors_severity: str) -> Verdict:
    """Check nvlink: links as {link, active, errors_before, errors_after} (errors: counter -> count); [] on a
    GPU without NVLink, None where NVML could not answer, each with the reason. A SKIP with nothing to judge
    (no link, or none active: a PCIe card or board) says so in its data (`nothing_to_judge`): any other SKIP
    is a check that could not judge its GPU (tasks/cuda_check.py: the run is PARTIAL)."""
    if links is None:
        return Verdict(SKIP, "", f"NVLink not checked: {error or 'no answer from NVML'}", {"error": error})
    if not links:
        return Verdict(SKIP, "no NVLink", error or "no NVLink on this GPU", {"links": [], "nothing_to_judge": True})
    data = {"links": links}
    active = [x["link"] for x in links if x.get("active")]
    down = [x["link"] for x in links if not x.get("active")]
    value = f"{len(active)} of {len(links)} link(s) active"
    lost = [x["link"] for x in links if x.get("active_before") and not x.get("active")]
    if lost and not active:  # every link that was up went down: not a PCIe board
        return flagged(
            down_severity,
            value,
            f"link(s) {', '.join(map(str, lost))} went down during the checks: a failed NVLink or NVSwitch "
            "(nvidia-smi nvlink -s)",
            data,
        )
    if not active and any("active_before" in x and x["active_before"] is None for x in links):
        return Verdict(SKIP, value, "no NVLink link is active, and NVML could not read them before the checks", data)
    if not active:
        return Verdict(
            SKIP,
            value,
            "no NVLink link is active on this GPU (a PCIe-only card or board)",
            {**data, "nothing_to_judge": True},
        )
    grown = []
    for x in links:
        before, after = x.get("errors_before") or {}, x.get("errors_after") or {}
        for name, n in after.items():
            if n is not None and before.get(name) is not None and n > before[name]:
                grown.append(f"link {x['link']} {name} +{n - before[name]}")
    if down:
        return flagged(
            down_severity,
            value,
            f"link(s) {', '.join(map(str, down))} inactive while others are "
            "active: a failed or untrained NVLink (nvidia-smi nvlink -s)",
            data,
        )
    if grown:
        return flagged(
            errors_severity, value, f"NVLink error counters grew during the checks: {', '.join(grown)}", data
        )
    return Verdict(PASS, value, "no error counter grew", data)


# --------------------------------------------------------------------------- peer-to-peer and collectives


def judge_p2p(matrix: list[list[float | None]], share: float, severity: str) -> Verdict:
    """Check p2p.bandwidth: GB/s from GPU i (row) to GPU j (column); a pair below `share` of the median pair."""
    pairs = {(i, j): v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j and v}
    data = {"matrix": matrix}
    if not pairs:
        return Verdict(SKIP, "", "fewer than two GPUs: no pair to measure", data)
    median = statistics.median(pairs.values())
    slow = sorted(p for p, v in pairs.items() if v < share * median)
    value = f"{len(pairs)} pairs, {min(pairs.values()):.0f}-{max(pairs.values()):.0f} GB/s (median {median:.0f})"
    if slow:
        named = ", ".join(f"{i}->{j} {pairs[(i, j)]:.0f}" for i, j in slow)
        return flagged(
            severity,
            value,
            f"pair(s) below {share:.0%} of the median: {named} GB/s (no peer access, a PCIe hop, or a degraded link)",
            data,
        )
    return Verdict(PASS, value, "", data)


def p2p_lines(matrix: list[list[float | None]]) -> list[str]:
    n = len(matrix)
    out = ["peer-to-peer GB/s (row: from, column: to):  " + "".join(f"{'gpu' + str(j):>8}" for j in range(n))]
    for i, row in enumerate(matrix):
        out.append(
            f"{'':<44}gpu{i:<3}"
            + "".join(f"{'-' if i == j or v is None else format(v, '.0f'):>8}" for j, v in enumerate(row))[2:]
        )
    return out


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


def sweep_sizes(min_bytes: int, max_bytes: int) -> list[int]:
    """nccl-tests' -b MIN -e MAX -f 2: every power-of-two multiple of min_bytes up to max_bytes."""
    out, size = [], min_bytes
    while size <= max_bytes:
        out.append(size)
        size *= 2
    return out


def elements_for(op: str, nbytes: int, world: int, elem: int = 4) -> int:
    """Elements of each rank's buffer for a size as nccl-tests counts it (all_reduce: the buffer;
    all_gather: the gathered output; reduce_scatter: the scattered input): a multiple of `world`."""
    count = max(nbytes // elem, 1)
    if op == "all_reduce":
        return count
    return max(count // world, 1) * world


def bus_bandwidth(op: str, nbytes: int, seconds: float, world: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s with nccl-tests' formulas (PERFORMANCE.md): algbw = size / time;
    all_reduce busbw = algbw * 2(n-1)/n; all_gather and reduce_scatter busbw = algbw * (n-1)/n."""
    algbw = nbytes / seconds / 1e9
    factor = 2 * (world - 1) / world if op == "all_reduce" else (world - 1) / world
    return algbw, algbw * factor


def collective_lines(rows: list[dict], world: int) -> list[str]:
    """The sweep's table for cuda_check.txt: rows as {op, bytes, seconds, wrong}."""
    out = [
        f"NCCL collectives on {world} GPUs (nccl-tests bus bandwidth: all_reduce algbw*2(n-1)/n, "
        "all_gather/reduce_scatter algbw*(n-1)/n)",
        f"  {'op':<15}{'bytes':>12}{'time us':>12}{'algbw GB/s':>12}{'busbw GB/s':>12}{'wrong':>7}",
    ]
    for r in rows:
        algbw, busbw = bus_bandwidth(r["op"], r["bytes"], r["seconds"], world)
        out.append(
            f"  {r['op']:<15}{r['bytes']:>12}{r['seconds'] * 1e6:>12.1f}{algbw:>12.2f}{busbw:>12.2f}"
            f"{r.get('wrong', 0):>7}"
        )
    return out


def judge_collectives(
    rows: list[dict], world: int, errors: list[str], interconnect: str, expect: dict, severity: str
) -> Verdict:
    """Check collectives: every op exact at every size, no rank failed; the largest all_reduce's bus
    bandwidth against the expectation for the interconnect (configs/burnin.yaml)."""
    data: dict = {"world": world, "rows": rows, "interconnect": interconnect}
    if errors:
        return Verdict(FAIL, f"{world} ranks", "; ".join(errors), data)
    if not rows:
        return Verdict(FAIL, f"{world} ranks", "the sweep returned no result", data)
    wrong = [f"{r['op']} {r['bytes']} B" for r in rows if r.get("wrong")]
    peak = {}
    for op in COLLECTIVES:
        mine = [r for r in rows if r["op"] == op]
        if mine:
            top = max(mine, key=lambda r: r["bytes"])
            peak[op] = bus_bandwidth(op, top["bytes"], top["seconds"], world)[1]
    data["busbw_gbs"] = peak
    value = (
        ", ".join(f"{op} {bw:.0f}" for op, bw in peak.items()) + f" GB/s bus bandwidth at the largest size "
        f"({interconnect})"
    )
    if wrong:
        return Verdict(
            FAIL, value, f"wrong results for {', '.join(wrong[:6])}: GPU-to-GPU transfers corrupt data", data
        )
    floor = expect.get(interconnect)
    if floor and peak.get("all_reduce", 0) < floor:
        return flagged(
            severity,
            value,
            f"all_reduce bus bandwidth {peak.get('all_reduce', 0):.0f} GB/s is below "
            f"the {floor:g} GB/s expected over {interconnect} (configs/burnin.yaml)",
            data,
        )
    return Verdict(PASS, value, "", data)


# --------------------------------------------------------------------------- DCGM

DCGM_ROOTS = ("DCGM Diagnostic", "DCGM GPU Diagnostic")  # DCGM 4.x, 3.x


def dcgm_tests(doc: dict) -> list[dict]:
    """`dcgmi diag --json` -> [{category, test, status, gpus_failed, warnings}]. A test's status is
    its test_summary's, else Fail if any entity failed, Pass if any passed, else Skip."""
    root: dict = next((doc[k] for k in DCGM_ROOTS if isinstance(doc, dict) and isinstance(doc.get(k), dict)), {})
    out = []
    for cat in root.get("test_categories") or []:
        for test in (cat.get("tests") or []) if isinstance(cat, dict) else []:
            results = [r for r in test.get("results") or [] if isinstance(r, dict)]
            statuses = [str(r.get("status", "")).lower() for r in results]
            summary = str((test.get("test_summary") or {}).get("status", "")).lower()
            status = summary or ("fail" if "fail" in statuses else "pass" if "pass" in statuses else "skip")
            failed = [
                str(r.get("entity_id", r.get("gpu_ids", "?")))
                for r in results
                if str(r.get("status", "")).lower() == "fail"
            ]
            warnings = [
                str(w.get("warning", "")).strip()
                for r in results
                for w in r.get("warnings") or []
                if isinstance(w, dict) and w.get("warning")
            ]
            out.append(
                {
                    "category": str(cat.get("category", "")),
                    "test": str(test.get("name", "?")),
                    "status": status.capitalize(),
                    "gpus_failed": failed,
                    "warnings": warnings,
                }
            )
    return out


def judge_dcgm(found: bool, code: int | None, doc: dict | None, level: int, severity: str, error: str = "") -> Verdict:
    """Check dcgm: DCGM's own verdict per plugin, when dcgmi exists; nothing else depends on it."""
    if not found:
        return Verdict(SKIP, "", "dcgmi is not on PATH: DCGM diagnostics not run (install DCGM to add them)")
    if error or doc is None:
        return flagged(
            severity,
            f"dcgmi diag -r {level}",
            f"no JSON from dcgmi diag (exit code {code}): {error}",
            {"exit_code": code},
        )
    tests = dcgm_tests(doc)
    data = {"exit_code": code, "tests": tests}
    value = f"dcgmi diag -r {level}: " + (", ".join(f"{t['test']} {t['status']}" for t in tests) or "no tests")
    failed = [t for t in tests if t["status"] == "Fail"]
    if failed:
        named = "; ".join(
            f"{t['category']}/{t['test']} on GPU {', '.join(t['gpus_failed']) or '?'}"
            + (f" ({t['warnings'][0][:120]})" if t["warnings"] else "")
            for t in failed
        )
        return flagged(severity, value, f"DCGM failed {named}", data)
    if not tests:
        return flagged(severity, value, f"dcgmi diag gave no test results (exit code {code})", data)
    return Verdict(PASS, value, "", data)
