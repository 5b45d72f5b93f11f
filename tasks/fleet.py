"""`nox -s fleet -- PATH...`: one report over many nodes' run folders. Never imports torch.

Each node runs `nox -s m40` and its sealed run folder (submission_runs/m40_vN) is copied back by the
user or the scheduler. This reads them all (globs, folders of folders: every folder holding
`stages/` or `SHA256SUMS` is a run), checks every run's SHA256SUMS, and writes fleet.md, fleet.json
and fleet.csv into a new folder (default: the next submission_runs/fleet_vN; never overwritten).

Trust: everything in a run folder is untrusted input. A run is read only when its SHA256SUMS lists
every file and every digest matches; a changed, missing or unlisted file makes the row TAMPERED, a
run without SHA256SUMS is UNSEALED, a sealed run without a readable summary.json is UNREADABLE; none
of their figures is shown or used. Text from runs is escaped for markdown and CSV.

Outliers: for each figure in configs/fleet.yaml, a node more than `outlier_share` below the median
of the nodes with the same GPU model (all-reduce: model and GPU count) is named.

Exit codes (README): 0 every node PASS and no outlier; 2 bad option, no run folder found, or --out
not new; 60 a node is not PASS (FAIL, INTERRUPTED, PARTIAL, TAMPERED, UNSEALED, UNREADABLE); 61 every node
PASS but some are outliers.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import statistics
import sys
from pathlib import Path

from tasks import burn_rules, config, evidence, jsonfile, layout, records, runs, text, validate, verdict
from tasks.config import ConfigError
from tasks.records import now_iso

DESCRIPTION = (
    "One report (fleet.md, fleet.json, fleet.csv) over many nodes' run folders: verdicts, seals checked, "
    "per-node figures, and outliers against the median of nodes with the same GPU model."
)
SCHEMA = 1
OUT_PREFIX = "fleet_v"
TAMPERED, UNSEALED, UNREADABLE = "TAMPERED", "UNSEALED", "UNREADABLE"
# Row order: the ones to look at first.
VERDICT_ORDER = (TAMPERED, UNSEALED, UNREADABLE, "FAIL", "INTERRUPTED", "PARTIAL", "PASS")
COLUMNS = (
    "host",
    "run",
    "gpu_model",
    "gpu_count",
    "driver",
    "torch",
    "verdict",
    "failed_stage",
    "reason",
    "bf16_tflops",
    "copy_tbs",
    "allreduce_busbw_gbs",
    "nodes_allreduce_busbw_gbs",
    "tok_s",
    "tok_s_per_gpu",
    "mfu_pct",
    "rdzv_id",
    "nnodes",
    "node_rank",
    "node_rank_given",
    "world_size",
    "outliers",
)
REPORT_FILES = ("fleet.md", "fleet.json", "fleet.csv")
FIGURE_NAMES = {
    "bf16_tflops": "bf16 TFLOP/s per GPU (min)",
    "copy_tbs": "copy TB/s per GPU (min)",
    "allreduce_busbw_gbs": "all-reduce bus GB/s",
    "tok_s_per_gpu": "train tok/s per GPU",
    "gpu_count": "GPUs on the node",
}


class FleetError(Exception):
    """Bad input; the message is one line naming the fix."""

    exit_code = layout.EXIT_USAGE


# --------------------------------------------------------------------------- settings


def load_settings(path: Path | None = None) -> dict:
    path = Path(path or layout.FLEET_FILE)
    data = config.load_yaml(path)
    try:
        share = config.check_share(data.get("outlier_share"), f"{path}: outlier_share", top=0.99)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    min_nodes = data.get("min_nodes")
    if isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or min_nodes < 2:
        raise ConfigError(f"{path}: min_nodes must be a whole number >= 2, got {min_nodes!r}")
    names = data.get("outlier_figures")
    if not isinstance(names, list) or not set(names) <= set(FIGURE_NAMES):
        raise ConfigError(f"{path}: outlier_figures must be a list of {', '.join(FIGURE_NAMES)}; got {names!r}")
    return {"outlier_share": share, "min_nodes": min_nodes, "outlier_figures": list(names)}


# --------------------------------------------------------------------------- finding runs


def is_run(folder: Path) -> bool:
    return (folder / layout.STAGES_DIR).is_dir() or (folder / layout.SUMS_FILE).is_file()


def find_runs(patterns: list[str]) -> list[Path]:
    """Every run folder under the paths (globs expanded; a folder that is not a run is searched)."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).exists() else [])
        if not matches:
            raise FleetError(f"{pattern}: no such file or folder; pass run folders or folders holding them")
        for match in map(Path, matches):
            for run in runs_under(match):  # a link found in the walk stays a link: read_node names it
                found.setdefault(run if run.is_symlink() else run.resolve(), None)
    return sorted(found)


def runs_under(top: Path) -> list[Path]:
    """The runs under `top`, and every link to a folder met on the way (never followed: no loop, no node
    read from outside the tree; each becomes a row that says so)."""
    if is_run(top):
        return [top]
    out = []
    for folder, subdirs, _files in os.walk(top):
        here = Path(folder)
        if is_run(here):
            out.append(here)
            subdirs[:] = []  # a run's own folders (stages/) hold no other run
        else:
            subdirs.sort()
            out += [here / d for d in subdirs if (here / d).is_symlink()]
    return out


# --------------------------------------------------------------------------- the seal


def parse_sums(text: str) -> dict[str, str]:
    """{path: digest} from `sha256sum` text (evidence.sums_line's format, escapes undone)."""
    listed = {}
    for line in text.splitlines():
        escaped = line.startswith("\\")
        digest, sep, name = line[1 if escaped else 0 :].partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(f"not a sha256sum line: {line[:80]!r}")
        if escaped:
            name = name.replace("\\\\", "\0").replace("\\n", "\n").replace("\\r", "\r").replace("\0", "\\")
        listed[name] = digest
    return listed


def check_seal(run_dir: Path) -> tuple[str | None, str]:
    """(None, "") when SHA256SUMS covers every file and every digest matches; else (verdict, one line)."""
    sums = run_dir / layout.SUMS_FILE
    if not sums.is_file():
        return UNSEALED, f"no {layout.SUMS_FILE}: the run was never sealed by evidence (unfinished or copied in part)"
    try:
        listed = parse_sums(sums.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return TAMPERED, f"{layout.SUMS_FILE} cannot be read ({e})"
    odd = [
        rel.relative_to(run_dir).as_posix()
        for rel in sorted(run_dir.rglob("*"))
        if rel.is_symlink() or not (rel.is_dir() or rel.is_file())
    ]
    if odd:  # a FIFO would hang the hash, a link to /dev/zero fill the memory: named, never read
        return TAMPERED, f"{odd[0]} is not a regular file: not read"
    present = set(evidence.run_files(run_dir))
    missing = sorted(set(listed) - present)
    unlisted = sorted(present - set(listed))
    changed = sorted(p for p in set(listed) & present if evidence.sha256_of(run_dir / p) != listed[p])
    problems = [
        f"{len(v)} {what} ({v[0]}{', …' if len(v) > 1 else ''})"
        for what, v in (("changed", changed), ("missing", missing), ("not in the seal", unlisted))
        if v
    ]
    if problems:
        return TAMPERED, f"{layout.SUMS_FILE} does not match: " + "; ".join(problems)
    return None, ""


# --------------------------------------------------------------------------- one node


def read_json(path: Path) -> dict | None:
    """A JSON object from a regular file that is no link, as jsonfile reads one; None for anything else (never a
    hang or a crash)."""
    if path.is_symlink():
        return None
    try:
        return jsonfile.read(path)
    except jsonfile.Unreadable:
        return None


def stage_figures(run_dir: Path, summary: dict, stage: str) -> dict:
    """A stage's figures from summary.json, else from stages/<stage>.json; {} when neither has them."""
    entry = (summary.get("stages") or {}).get(stage)
    figures = entry.get("figures") if isinstance(entry, dict) else None
    if not isinstance(figures, dict):
        figures = (read_json(layout.stage_record_path(run_dir, stage)) or {}).get("figures")
    return figures if isinstance(figures, dict) else {}


def number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN
        return None
    return float(value)


def per_gpu_min(figures: dict, suffix: str) -> float | None:
    """The lowest of gpu0_<suffix>, gpu1_<suffix>, ... (the slowest GPU sets the node's pace)."""
    values = [
        v
        for k, raw in figures.items()
        if k.startswith("gpu")
        and k.endswith(f"_{suffix}")
        and k[3 : -len(suffix) - 1].isdigit()
        and (v := number(raw)) is not None
    ]
    return min(values) if values else None


def gpu_model(summary: dict, probe: dict) -> tuple[str | None, int | None]:
    """(model, count) from probe's GPU list: the datasheet model when known, else the name."""
    gpus = [g for g in summary.get("gpus") or [] if isinstance(g, dict)]
    if gpus:
        names = sorted({str(g.get("model") or g.get("name") or "unknown") for g in gpus})
        return " + ".join(names), len(gpus)
    count = probe.get("gpu_count")
    return None, count if isinstance(count, int) and not isinstance(count, bool) else None


def blank_row(run_dir: Path, label: str) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(run=label, path=str(run_dir), outliers=[])
    return row


def read_node(run_dir: Path, label: str) -> dict:
    """One row: the node's identity, verdict and figures (None where the run does not say)."""
    row = blank_row(run_dir, label)
    if run_dir.is_symlink():
        row.update(
            verdict=UNREADABLE, reason=f"a symbolic link (to {os.readlink(run_dir)}): not followed; copy the run in"
        )
        return row
    bad, why = check_seal(run_dir)
    summary = read_json(run_dir / layout.SUMMARY_FILE)
    probe = stage_figures(run_dir, summary or {}, "probe")
    row["host"] = probe.get("host")  # shown even for an untrusted run: it says which node to look at
    if bad is None and (summary is None or summary.get("verdict") not in VERDICT_ORDER):
        bad, why = UNREADABLE, f"sealed, but {layout.SUMMARY_FILE} is missing or names no verdict"
    if bad is None:
        bad, why = disagreement(run_dir, summary)
    if bad is not None:
        row.update(verdict=bad, reason=why)
        return row
    assert summary is not None  # a missing summary returned above (UNREADABLE)
    check, train = stage_figures(run_dir, summary, "cuda_check"), stage_figures(run_dir, summary, "train")
    versions = summary.get("versions")
    if not isinstance(versions, dict):
        versions = {}
    model, count = gpu_model(summary, probe)
    row.update(
        gpu_model=model,
        gpu_count=count,
        driver=versions.get("driver") or probe.get("driver"),
        torch=versions.get("torch") or check.get("torch") or train.get("torch"),
        verdict=summary["verdict"],
        failed_stage=summary.get("failed_stage"),
        reason=summary.get("reason"),
        bf16_tflops=per_gpu_min(check, "bf16_tflops"),
        copy_tbs=per_gpu_min(check, "copy_tbs"),
        allreduce_busbw_gbs=number(check.get("allreduce_busbw_gbs")),
        nodes_allreduce_busbw_gbs=number(check.get("nodes_allreduce_busbw_gbs")),
        tok_s=number(train.get("tok_s")),
        tok_s_per_gpu=number(train.get("tok_s_per_gpu")),
        mfu_pct=number(train.get("mfu_pct")),
    )
    for key in ("rdzv_id", "nnodes", "node_rank", "node_rank_given", "world_size"):
        row[key] = train.get(key)
    return row


def disagreement(run_dir: Path, summary: dict | None) -> tuple[str | None, str]:
    """(TAMPERED, why) when the verdict the stage records give (tasks/verdict.py, as evidence judged them:
    held to each stage's own file) is not the one summary.json states: SHA256SUMS has no key, so a node's
    own word is never enough."""
    judged = verdict.judge(records.read_all(run_dir), verdict.load_rules(), evidence.own_files(run_dir))
    said = (summary or {}).get("verdict")
    if judged.word == said:
        return None, ""
    at = f" at {judged.stage}" if judged.stage else ""
    because = f": {judged.reason}" if judged.reason else ""
    return TAMPERED, f"{layout.SUMMARY_FILE} says {said}, but the stage records give {judged.word}{at}{because}"


def read_one(run_dir: Path, label: str) -> dict:
    """read_node, or an UNREADABLE row naming what broke: one hostile node never stops the report."""
    try:
        return read_node(run_dir, label)
    except Exception as e:  # a figure of the wrong type or size, say, in a re-sealed summary.json
        row = blank_row(run_dir, label)
        row.update(verdict=UNREADABLE, reason=f"cannot be read ({type(e).__name__}: {text.one_line(str(e))[:200]})")
        return row


def job_rows(rows: list[dict]) -> list[dict]:
    """A row for each multi-node job whose runs here are not its nodes one each: nodes missing, or runs of
    more than one job under one rendezvous id (more hosts than nodes, a node rank on two hosts, two world
    sizes). Either way the job is no PASS of the fleet."""
    jobs: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        n = r.get("nnodes")
        if isinstance(n, int) and not isinstance(n, bool) and n > 1 and r.get("rdzv_id"):
            jobs.setdefault((str(r["rdzv_id"]), n), []).append(r)
    out = []
    for (job, n), members in sorted(jobs.items()):
        hosts = sorted({host_of(r) for r in members})
        mixed = mixed_jobs(members, hosts, n)
        if mixed:
            label = f"{job}: runs of more than one job"
            why = f"job {job} names {n} nodes, but its runs here are not one node each: {'; '.join(mixed)}; "
            why += "give each job its own --rdzv-id, or copy in one job's runs"
        elif len(hosts) < n:
            label = f"{job}: {n - len(hosts)} node(s) missing"
            why = f"job {job} names {n} nodes, and {len(hosts)} of them have a run here ({', '.join(hosts)}); "
            why += "copy the missing nodes' run folders in"
        else:
            continue
        row = blank_row(Path(job), label)
        row.update(verdict=UNREADABLE, rdzv_id=job, nnodes=n, reason=why)
        out.append(row)
    return out


def host_of(row: dict) -> str:
    return str(row["host"] or row["run"])


def mixed_jobs(members: list[dict], hosts: list[str], nnodes: int) -> list[str]:
    """What shows that one job's rows are runs of several jobs ([] when nothing does)."""
    out = [f"{len(hosts)} hosts for {nnodes} nodes"] if len(hosts) > nnodes else []
    by_rank: dict[int, set[str]] = {}
    for r in members:
        rank = r.get("node_rank")
        if isinstance(rank, int) and not isinstance(rank, bool):
            by_rank.setdefault(rank, set()).add(host_of(r))
    out += [f"node rank {rank} on {' and '.join(sorted(on))}" for rank, on in sorted(by_rank.items()) if len(on) > 1]
    sizes = sorted({w for r in members if isinstance(w := r.get("world_size"), int) and not isinstance(w, bool)})
    if len(sizes) > 1:
        out.append(f"world sizes {' and '.join(map(str, sizes))}")
    return out


def read_fleet(run_dirs: list[Path]) -> list[dict]:
    rows = [read_one(d, label_of(d, run_dirs)) for d in run_dirs]
    rows += job_rows(rows)
    return sorted(rows, key=lambda r: (VERDICT_ORDER.index(r["verdict"]), str(r["host"] or ""), r["run"]))


def label_of(run_dir: Path, all_dirs: list[Path]) -> str:
    """The run's path relative to the folder all runs share (e.g. node017/m40_v1)."""
    if len(all_dirs) < 2:
        return run_dir.name
    common = Path(os.path.commonpath([str(d) for d in all_dirs]))
    return run_dir.relative_to(common).as_posix() if run_dir != common else run_dir.name


# --------------------------------------------------------------------------- outliers


def group_key(row: dict, figure: str) -> tuple:
    # An all-reduce's bus bandwidth depends on how many GPUs take part; the other figures are per GPU.
    return (row["gpu_model"], row["gpu_count"]) if figure == "allreduce_busbw_gbs" else (row["gpu_model"],)


def per_host(rows: list[dict], figure: str) -> list[float]:
    """One value per host (the median of its runs; a row that names no host counts alone): a node that ran
    m40 three times is one node in the median, never three that pull it towards itself."""
    by_host: dict[str, list[float]] = {}
    for i, row in enumerate(rows):
        by_host.setdefault(row["host"] or f"\0row{i}", []).append(row[figure])
    return [statistics.median(values) for values in by_host.values()]


def find_outliers(rows: list[dict], settings: dict) -> list[dict]:
    """Nodes more than outlier_share below their group's median, per figure; marks each row too."""
    found = short_of_gpus(rows, settings["min_nodes"]) if "gpu_count" in settings["outlier_figures"] else []
    for figure in (f for f in settings["outlier_figures"] if f != "gpu_count"):
        # The median is over PASS nodes; a sealed PARTIAL or FAIL node that measured the figure is compared too.
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            if comparable(row) and row[figure] is not None:
                groups.setdefault(group_key(row, figure), []).append(row)
        for members in groups.values():
            passed = per_host([r for r in members if r["verdict"] == "PASS"], figure)
            if len(passed) < settings["min_nodes"]:
                continue
            median = statistics.median(passed)
            for row in members:
                below = burn_rules.below_median(row[figure], median, settings["outlier_share"])
                if below is not None:
                    note = f"{figure} {100 * below:.0f}% below median"
                    found.append(outlier(row, figure, median, len(passed), below, note))
    return sorted(found, key=lambda o: (-o["below_pct"], o["run"]))


def comparable(row: dict) -> bool:
    """A row whose figures count in a comparison: a judged run (sealed and trusted) of a known GPU model."""
    return row["verdict"] in ("PASS", "PARTIAL", "FAIL") and bool(row["gpu_model"])


def outlier(row: dict, figure: str, median: float, nodes: int, below: float, note: str) -> dict:
    """The outlier entry of fleet.json for `row`'s `figure`; the row is marked with `note` too."""
    row["outliers"].append(note)
    return {
        "host": row["host"],
        "run": row["run"],
        "gpu_model": row["gpu_model"],
        "figure": figure,
        "value": row[figure],
        "median": median,
        "nodes": nodes,
        "below_pct": round(100 * below, 1),
    }


def short_of_gpus(rows: list[dict], min_nodes: int) -> list[dict]:
    """Nodes with fewer GPUs than most nodes of their model have: a GPU the driver never enumerated (a link
    down at boot, a container given 7 of 8) passes the node's own run, whose checks cover the GPUs it has.
    The expectation is the count most PASS hosts of the model have (ties: the larger), and only where at least
    min_nodes hosts have it (outlier "median": that count)."""
    judged = [r for r in rows if comparable(r) and isinstance(r["gpu_count"], int)]
    counts: dict[str, dict[str, int]] = {}  # model -> host -> its count (PASS rows)
    for r in judged:
        if r["verdict"] == "PASS":
            counts.setdefault(r["gpu_model"], {})[host_of(r)] = r["gpu_count"]
    found = []
    for r in judged:
        seen = list(counts.get(r["gpu_model"], {}).values())
        if not seen:
            continue
        expected = max(set(seen), key=lambda n: (seen.count(n), n))
        if r["gpu_count"] >= expected or seen.count(expected) < min_nodes:
            continue
        note = f"{r['gpu_count']} GPUs where its peers have {expected}"
        found.append(outlier(r, "gpu_count", expected, len(seen), 1 - r["gpu_count"] / expected, note))
    return found


# --------------------------------------------------------------------------- the report

DASH = "–"
REASON_CHARS = 200  # of a reason in fleet.md; fleet.json and fleet.csv keep it whole
DECIMALS = {
    "bf16_tflops": 1,
    "copy_tbs": 2,
    "allreduce_busbw_gbs": 1,
    "nodes_allreduce_busbw_gbs": 2,
    "tok_s": 0,
    "tok_s_per_gpu": 0,
    "mfu_pct": 1,
    "gpu_count": 0,
}


def plain(value) -> str:
    """Untrusted text as one line, control characters escaped (safe in a CSV cell and on a terminal)."""
    return text.one_line(value)


def cell(value) -> str:
    """A markdown table cell: "–" for nothing, else the text made inert (text.md_inert: pipes, links, HTML)."""
    return DASH if value in (None, "") else text.md_inert(value)


def reason_cell(value, limit: int = REASON_CHARS) -> str:
    """A reason cut to `limit` characters in the table (a PARTIAL's list of deviations can run long)."""
    value = plain(value) if value not in (None, "") else value
    if value and len(value) > limit:
        value = value[:limit].rstrip() + " … (whole in fleet.json)"
    return cell(value)


def num(value, figure: str) -> str:
    return DASH if value is None else f"{value:,.{DECIMALS.get(figure, 1)}f}"


def gpus_text(row: dict) -> str:
    if not row["gpu_model"]:
        return DASH
    return cell(f"{row['gpu_count']}× {row['gpu_model']}" if row["gpu_count"] else row["gpu_model"])


def job_text(row: dict) -> str:
    if not row["rdzv_id"] and not row["nnodes"]:
        return DASH
    given = row["node_rank_given"]  # the scheduler's number; c10d's rendezvous may assign another
    also = f" (scheduler's {given})" if given is not None and given != row["node_rank"] else ""
    return cell(f"{row['rdzv_id'] or '?'}, node {row['node_rank']}{also} / {row['nnodes']}, world {row['world_size']}")


def counts_of(rows: list[dict]) -> dict[str, int]:
    return {w: n for w in VERDICT_ORDER if (n := sum(r["verdict"] == w for r in rows))}


def exit_code_of(rows: list[dict], outliers: list[dict]) -> tuple[int, str]:
    if any(r["verdict"] != "PASS" for r in rows):
        return layout.EXIT_FLEET_NOT_PASS, "a node is not PASS"
    if outliers:
        return layout.EXIT_FLEET_OUTLIER, "every node PASS, some are outliers"
    return layout.EXIT_OK, "every node PASS, no outlier"


def markdown(ctx: dict) -> str:
    env = evidence.environment()
    env.filters.update(cell=cell, reason=reason_cell, num=num, gpus=gpus_text, job=job_text)
    return env.get_template("fleet.md.j2").render(**ctx)


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([csv_cell(row[c]) for c in COLUMNS])
    return buf.getvalue()


def csv_cell(value) -> str:
    """A CSV cell; text a spreadsheet would run as a formula (=, +, -, @ first) gets a leading quote."""
    if value is None:
        return ""
    if isinstance(value, list):
        value = "; ".join(map(str, value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    text = plain(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def context(rows: list[dict], outliers: list[dict], settings: dict, inputs: list[str]) -> dict:
    counts = counts_of(rows)
    code, meaning = exit_code_of(rows, outliers)
    return {
        "schema": SCHEMA,
        "generated": now_iso(),
        "inputs": inputs,
        "settings": settings,
        "headline": ", ".join(f"{n} {w}" for w, n in counts.items()),
        "counts": counts,
        "outliers": outliers,
        "rows": rows,
        "exit_code": code,
        "exit_meaning": meaning,
        "figure_names": FIGURE_NAMES,
    }


def json_document(ctx: dict) -> dict:
    keys = ("schema", "generated", "inputs", "settings", "counts", "exit_code", "exit_meaning", "outliers", "rows")
    return {k: ctx[k] for k in keys}


# --------------------------------------------------------------------------- writing


def new_out_dir(runs_dir: Path) -> Path:
    """The next free <runs_dir>/fleet_vN, created here (mkdir is atomic: two reports never share one)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    taken = [
        int(p.name[len(OUT_PREFIX) :]) for p in runs_dir.glob(OUT_PREFIX + "*") if p.name[len(OUT_PREFIX) :].isdigit()
    ]
    n = max(taken, default=0) + 1
    while True:
        try:
            (path := runs_dir / f"{OUT_PREFIX}{n}").mkdir()
            return path
        except FileExistsError:
            n += 1


def out_dir_from(option: Path | None) -> Path:
    if option is None:
        return new_out_dir(layout.RUNS_DIR)
    clash = [name for name in REPORT_FILES if (option / name).exists()]
    if clash:
        raise FleetError(
            f"--out {option} already holds {', '.join(clash)}; pass a new folder (reports are never overwritten)"
        )
    try:  # never a run folder, nor inside one: a run's seal covers only its stages' files
        return runs.make_output_dir(option, "--out")
    except runs.RunError as e:
        raise FleetError(str(e)) from None


def write_report(out: Path, ctx: dict) -> list[Path]:
    texts = {
        "fleet.md": markdown(ctx),
        "fleet.json": json.dumps(json_document(ctx), indent=2, default=str) + "\n",
        "fleet.csv": csv_text(ctx["rows"]),
    }
    written = []
    for name in REPORT_FILES:
        # "x": never overwrite, even in a race; a folder name that is not UTF-8 is written as its escape
        with open(out / name, "x", encoding="utf-8", errors="backslashreplace") as f:
            f.write(texts[name])
        written.append(out / name)
    return written


def build_parser() -> validate.Parser:
    p = validate.Parser(prog="nox -s fleet --", description=DESCRIPTION)  # a bad option: one line, exit 2
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="run folders, folders holding them (searched), or globs ('results/*/m40_v*')",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for fleet.md/.json/.csv (default: a new submission_runs/fleet_vN); never overwritten",
    )
    p.add_argument("--config", type=Path, default=None, help="the outlier settings (default: configs/fleet.yaml)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        run_dirs = find_runs(args.paths)
        if not run_dirs:
            raise FleetError(
                f"no run folder (one holding {layout.STAGES_DIR}/ or {layout.SUMS_FILE}) under "
                f"{' '.join(args.paths)}; pass the folders the nodes' submission_runs were copied to"
            )
        rows = read_fleet(run_dirs)
        outliers = find_outliers(rows, settings)
        ctx = context(rows, outliers, settings, [str(p) for p in args.paths])
        out = out_dir_from(args.out)
        write_report(out, ctx)
    except (FleetError, ConfigError) as e:
        print(f"fleet: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"fleet: error: cannot write the report: {e}; pass --out to a writable new folder", file=sys.stderr)
        return layout.EXIT_USAGE
    print(f"fleet: {len(rows)} node(s): {ctx['headline']}; {len(outliers)} outlier(s)", flush=True)
    for row in rows:
        if row["verdict"] != "PASS" or row["outliers"]:
            what = plain(row["reason"] or "") if row["verdict"] != "PASS" else "; ".join(row["outliers"])
            print(
                f"fleet:   {row['verdict']:<11} {plain(row['host'] or '?')} ({plain(row['run'])}): {what}", flush=True
            )
    print(
        f"fleet: wrote {out / 'fleet.md'}, fleet.json, fleet.csv (exit code {ctx['exit_code']}: {ctx['exit_meaning']})",
        flush=True,
    )
    return ctx["exit_code"]
