"""Stage evidence: render a run's README.md and summary.json from its stage records, then seal it.

Evidence reads only what the run folder holds: the stage records (`records.read_all`), each stage's
own file (`own_files`: gpus.json, cuda_check.json, train_result.json, to which the verdict holds the
records; the README's GPU table is gpus.json's) and the list of files. It never overwrites a file
another stage wrote. For every stage file (layout.STAGE_FILES) that is missing it writes one that says
why ("install did not run: probe failed — ..."), so every finished run holds the same six files.

Order of writing: the placeholder files, README.md, summary.json, the GitHub step summary (when
$GITHUB_STEP_SUMMARY is set); then the harness writes stages/evidence.json and calls
`after_record`, which writes SHA256SUMS over every file of the run (all but the lock file and
SHA256SUMS itself) in `sha256sum -c` format. SHA256SUMS is written last: its presence means the run
is sealed (runs.is_sealed) and no stage writes into it again.

The evidence stage passes when it rendered; the machine's verdict is in README.md and summary.json.

summary.json, schema 1:

    schema        1
    run           the run folder's name, "m40_v3"
    generated     ISO 8601 UTC time evidence rendered it
    verdict       "PASS" | "PARTIAL" | "FAIL" | "INTERRUPTED" (tasks/verdict.py says what each means)
    exit_code     the verdict's exit code, as `nox -s m40` exits (README: exit codes)
    failed_stage  the stage a FAIL or INTERRUPTED names (null otherwise)
    reason        that stage's one-line reason; PARTIAL: its deviations joined by "; "; PASS: ""
    deviations    PARTIAL: each way the run falls short of a full PASS, one line each (listed on FAIL too)
    harmless_overrides  overrides that keep PASS ("stage: key=value", configs/verdict.yaml)
    stages        {stage: {status, reason, duration_s, started, ended, figures}} for probe, install,
                  cuda_check and train, in order; status is a record status (pass, fail, skip,
                  interrupted) or "missing" when the stage left no record
    gpus          probe's GPU list (gpus.json "gpus"; [] when probe did not run)
    versions      {component: version}: the driver, Python, torch, CUDA, cuDNN, NCCL, triton,
                  transformers, the channel and this tool's git commit (tasks/proof.py); a component
                  nobody recorded is left out
    files         every file of the sealed run, relative paths, sorted (SHA256SUMS included)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import jinja2

from tasks import jsonfile, layout, probe, proc, proof, records, runs, text, verdict
from tasks.records import Outcome, StageRecord, StageStatus, now_iso

DESCRIPTION = (
    "Render the run's README.md, summary.json and SHA256SUMS from its stage records and seal it "
    "(no later stage writes into a sealed run)."
)

SCHEMA = 1
WORK_STAGES = layout.WORK_STAGES
MISSING = "missing"
STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"

IMAGE_SUFFIXES = (".svg", ".png", ".jpg", ".jpeg", ".gif")

_ENV_INFO, _NVIDIA_SMI = layout.STAGE_FILES["probe"]
FILE_NOTES = {
    _ENV_INFO: "OS, CPU, RAM, disk, environment, GPU table, driver gate (probe)",
    _NVIDIA_SMI: "raw `nvidia-smi` and `nvidia-smi -q` (probe)",
    layout.GPUS_JSON: "GPU list, machine-readable (probe)",
    layout.STAGE_FILES["install"][0]: "the installed PyTorch and its CUDA (install)",
    layout.REQUIREMENTS_GPU: "what .venv-gpu holds (install)",
    layout.INSTALL_LOG: "every install command and its output (install)",
    layout.STAGE_FILES["cuda_check"][0]: "CUDA correctness and speed checks (cuda_check)",
    layout.CUDA_CHECK_JSON: "the checks, machine-readable (cuda_check)",
    layout.COLLECT_ENV: "`python -m torch.utils.collect_env` in .venv-gpu: what PyTorch bug reports ask for (evidence)",
    layout.TRAIN_LOG: "the training run's log (train)",
    layout.TRAIN_METRICS: "training metrics per step (train)",
    layout.TRAIN_LOSS_PLOT: "training loss curve (train)",
    layout.TRAIN_RESULT: "the training result, machine-readable (train)",
    layout.TRAIN_CONSOLE: "the training processes' console (train)",
    layout.README_FILE: "this page (evidence)",
    layout.SUMMARY_FILE: "the verdict and figures, machine-readable (evidence)",
    layout.SUMS_FILE: "SHA-256 of every file: `sha256sum -c SHA256SUMS` (evidence, written last)",
}


# In SHA256SUMS and summary.json, but not in the README's files table: the checker's raw console
# repeats cuda_check.txt line for line.
TABLE_LEAVES_OUT = {layout.CUDA_CHECK_LOG}


def add_arguments(parser) -> None:
    pass  # evidence has no options: it renders what the run folder holds


def check_inputs(args) -> None:
    """A broken configs/verdict.yaml is a one-line ConfigError (exit 2) before any stage runs."""
    verdict.load_rules()


# --------------------------------------------------------------------------- the verdict

# An earlier stage in one of these states is why a later one did not run.
BLOCKED_BY = {
    StageStatus.FAIL: "failed",
    StageStatus.INTERRUPTED: "was interrupted",
    StageStatus.RUNNING: "did not finish",
}


def why_not_written(stage: str, recs: dict[str, StageRecord]) -> str:
    """One line: why `stage` left no file (used in the placeholder evidence writes instead)."""
    rec = recs.get(stage)
    earlier = WORK_STAGES[: WORK_STAGES.index(stage)] if stage in WORK_STAGES else WORK_STAGES
    blocker = next((recs[s] for s in earlier if s in recs and recs[s].status in BLOCKED_BY), None)
    if rec is None or rec.status == StageStatus.SKIP:
        if blocker is not None:
            why = verdict.did_not_finish(blocker) if blocker.status == StageStatus.RUNNING else blocker.reason
            return f"{stage} did not run: {blocker.stage} {BLOCKED_BY[blocker.status]} — {why}"
        if rec is None:
            return (
                f"{stage} did not run: it left no record in {layout.STAGES_DIR}/"
                " (it was never run into this run folder)"
            )
        return f"{stage} did not run: {rec.reason or 'skipped'}"
    if rec.status == StageStatus.INTERRUPTED:
        return f"{stage} was interrupted before it wrote this file — {rec.reason}"
    if rec.status == StageStatus.RUNNING:
        return f"{stage} did not finish before it wrote this file — {verdict.did_not_finish(rec)}"
    if rec.status == StageStatus.FAIL:
        return f"{stage} failed before it wrote this file — {rec.reason}"
    return f"{stage} passed but did not write this file (a bug in the stage); see {layout.STAGES_DIR}/{stage}.json"


# --------------------------------------------------------------------------- reading the run


def run_files(run_dir: Path) -> list[str]:
    """Every file of the run (relative posix paths, sorted) except the lock file and SHA256SUMS."""
    skip = {layout.LOCK_FILE, layout.SUMS_FILE}
    out = []
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir).as_posix()
        if rel in skip or not path.is_file():
            continue
        out.append(rel)
    return sorted(out)


def own_files(run_dir: Path) -> dict[str, verdict.OwnFile]:
    """The text of each stage's own file (layout.STAGE_EVIDENCE) the run holds, by name, for the verdict to
    hold the stage records to; for one that cannot be read (too large, not UTF-8), why (jsonfile.Unreadable)."""
    out: dict[str, verdict.OwnFile] = {}
    for name in layout.STAGE_EVIDENCE.values():
        path = run_dir / name
        if path.is_file():
            try:
                out[name] = jsonfile.read_text(path)
            except jsonfile.Unreadable as e:
                out[name] = e
    return out


def read_gpus(run_dir: Path) -> dict:
    """gpus.json, or {} where it is missing or unreadable (the verdict says why, at probe)."""
    try:
        return jsonfile.read(run_dir / layout.GPUS_JSON)
    except jsonfile.Unreadable:
        return {}


# The README's GPU table: its columns, the fields probe writes for each GPU in gpus.json (probe.Gpu).
GPU_COLUMNS = tuple(f.name for f in dataclasses.fields(probe.Gpu))


def gpu_rows(gpus: list) -> list[dict]:
    """gpus.json's GPUs for the README's table, each with every column (None where it has none): a file not as
    probe writes it is shown as it is, never a template error. An entry that is no object is its `name`."""
    rows = []
    for gpu in gpus:
        row = dict.fromkeys(GPU_COLUMNS) | (gpu if isinstance(gpu, dict) else {"name": gpu})
        reasons = row["clock_event_reasons"]
        row["clock_event_reasons"] = reasons if reasons is None or isinstance(reasons, list) else [reasons]
        rows.append(row)
    return rows


def stage_rows(recs: dict[str, StageRecord]) -> list[dict]:
    rows: list[dict] = []
    for name in WORK_STAGES:
        rec = recs.get(name)
        if rec is None:
            rows.append(
                {
                    "name": name,
                    "status": MISSING,
                    "reason": "no record",
                    "duration_s": None,
                    "started": "",
                    "ended": "",
                    "figures": {},
                }
            )
        else:
            rows.append(
                {
                    "name": name,
                    "status": rec.status,
                    "reason": rec.reason,
                    "duration_s": rec.duration_s,
                    "started": rec.started,
                    "ended": rec.ended,
                    "figures": dict(rec.figures),
                }
            )
    return rows


# --------------------------------------------------------------------------- rendering


def figures_text(figures: dict) -> str:
    """key=value, ...; a list as its items, a mapping (torch_identity: in the Versions table) left out."""
    return ", ".join(
        f"{k}={'; '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in figures.items()
        if not isinstance(v, dict) and v != []
    )


def link(path: str) -> str:
    return quote(path, safe="/._-")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(layout.TEMPLATES)),
        autoescape=False,  # markdown: text is escaped by the md filter
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(md=text.md_inert, figures=figures_text, link=link, na=lambda v: "N/A" if v is None else v)
    return env


def context(run_dir: Path, recs: dict[str, StageRecord], files: list[str], placeholders: dict[str, str]) -> dict:
    judged = verdict.judge(recs, verdict.load_rules(), own_files(run_dir))
    gpu_doc = read_gpus(run_dir)
    gpus: list = gpu_doc["gpus"] if isinstance(gpu_doc.get("gpus"), list) else []
    return {
        "run": run_dir.name,
        "generated": now_iso(),
        "verdict": judged.word,
        "failed_stage": judged.stage,
        "reason": judged.reason,
        "deviations": list(judged.deviations),
        "harmless": list(judged.harmless),
        "exit_code": judged.exit_code,
        "verdict_line": judged.line(),
        "stages": stage_rows(recs),
        "gpus": gpus,
        "gpu_rows": gpu_rows(gpus),
        "gpu_source": gpu_doc.get("source"),
        "gpu_note": (
            f"probe found none (source: {gpu_doc.get('source')}); see env_info.txt"
            if gpu_doc
            else f"probe left no {layout.GPUS_JSON} (it did not run)"
        ),
        "versions": dict(proof.versions(recs, run_dir, gpu_doc)),
        "proofs": proof.proof_rows(recs),
        "what_to_do": proof.PARTIAL_TO_DO
        if judged.word == verdict.PARTIAL
        else proof.WHAT_TO_DO.get(judged.stage or "", f"run `nox -s {judged.stage}` (or `nox -s m40`) again"),
        "gpu_count": len(gpus),
        "files": [
            {
                "path": f,
                "size": None if f in written_last(run_dir) else _size(run_dir / f),
                "note": file_note(f, placeholders),
            }
            for f in files
            if f not in TABLE_LEAVES_OUT
        ],
        "images": [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)],
        "sums_file": layout.SUMS_FILE,
    }


def written_last(run_dir: Path) -> set[str]:
    """The files evidence writes after it renders the README (so the README cannot give their size)."""
    return {
        layout.README_FILE,
        layout.SUMMARY_FILE,
        layout.SUMS_FILE,
        layout.stage_record_path(run_dir, "evidence").relative_to(run_dir).as_posix(),
    }


def file_note(rel: str, placeholders: dict[str, str]) -> str:
    if rel in placeholders:  # the note quotes a reason: machine text, made inert (the other notes are ours)
        return "placeholder: " + text.md_inert(placeholders[rel].split(" — ")[0]) + " (the file says why)"
    if rel.startswith(layout.STAGES_DIR + "/") and rel.endswith(".json"):
        return f"stage record of {Path(rel).stem}"
    return FILE_NOTES.get(rel, "written into this run (not described here)")


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None  # not written yet (README.md, summary.json, SHA256SUMS)


def summary_document(ctx: dict) -> dict:
    return {
        "schema": SCHEMA,
        "run": ctx["run"],
        "generated": ctx["generated"],
        "verdict": ctx["verdict"],
        "failed_stage": ctx["failed_stage"],
        "reason": ctx["reason"],
        "deviations": ctx["deviations"],
        "harmless_overrides": ctx["harmless"],
        "exit_code": ctx["exit_code"],
        "stages": {
            row["name"]: {k: row[k] for k in ("status", "reason", "duration_s", "started", "ended", "figures")}
            for row in ctx["stages"]
        },
        "gpus": ctx["gpus"],
        "versions": ctx["versions"],
        "files": [f["path"] for f in ctx["files"]],
    }


# --------------------------------------------------------------------------- writing


def write_placeholders(run_dir: Path, recs: dict[str, StageRecord]) -> dict[str, str]:
    """For each missing stage file, write one saying why; never touch a file that exists."""
    written = {}
    for stage, names in layout.STAGE_FILES.items():
        if stage == "evidence":
            continue
        for name in names:
            why = why_not_written(stage, recs)
            try:
                with open(run_dir / name, "x", encoding="utf-8") as f:
                    f.write(
                        f"{why}\n\n(written by the evidence stage at {now_iso()} in place of the {name} "
                        f"that {stage} writes, so that every finished run holds the same files)\n"
                    )
            except FileExistsError:
                continue
            written[name] = why
    return written


def append_step_summary(text: str, env=os.environ) -> str | None:
    """Append to $GITHUB_STEP_SUMMARY when set; returns the path written, or None."""
    target = env.get(STEP_SUMMARY_ENV)
    if not target:
        return None
    try:
        with open(target, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        print(f"evidence: warning: cannot append to ${STEP_SUMMARY_ENV} ({target}): {e.strerror}", file=sys.stderr)
        return None
    return target


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sums_line(digest: str, rel: str) -> str:
    """One line of `sha256sum` output (text mode), with its escaping of backslashes and newlines."""
    if "\\" in rel or "\n" in rel or "\r" in rel:
        rel = rel.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{digest}  {rel}\n"
    return f"{digest}  {rel}\n"


def seal(run_dir: Path) -> Path:
    """Write SHA256SUMS over every file of the run; written last, atomically (its presence = sealed)."""
    text = "".join(sums_line(sha256_of(run_dir / rel), rel) for rel in run_files(run_dir))
    target = run_dir / layout.SUMS_FILE
    tmp = run_dir / (layout.SUMS_FILE + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target


def nothing_to_do(args) -> tuple[str, int] | None:
    """`nox -s evidence` without --run-dir when the newest run is sealed: say so, with its verdict's exit code
    (never seal a new empty run). With no run at all, or a --run-dir that holds none (a typo never becomes a
    sealed empty run), there is nothing to render: RunError (one line, exit 2)."""
    found = runs.list_runs(layout.RUNS_DIR)
    if args.run_dir is None and not found:
        raise runs.RunError(f"no run folder in {layout.RUNS_DIR} to render; run `nox -s m40` first")
    if args.run_dir is not None:
        runs.check_run_dir(args.run_dir)  # a link, a sealed run, a folder inside a run: its own line first
        if not runs.is_run(args.run_dir):
            raise runs.RunError(
                f"--run-dir {args.run_dir} is not a run folder (no {layout.STAGES_DIR}/ in it): nothing to render; "
                "pass the folder a run's stages wrote into, or run nox -s m40"
            )
        return None
    if not runs.is_sealed(found[-1]):
        return None
    code = layout.EXIT_STAGE["evidence"]  # a sealed run whose summary cannot be read has no verdict to give
    try:
        summary = jsonfile.read(found[-1] / layout.SUMMARY_FILE)
        said = (
            f"{summary['verdict']} at {summary['failed_stage']}: {summary['reason']}"
            if summary.get("failed_stage")
            else f"{summary['verdict']}" + (f": {summary['reason']}" if summary.get("reason") else "")
        )
        if summary["verdict"] in verdict.WORDS:  # its exit code as the verdict gives it (tasks/verdict.py)
            code = verdict.Verdict(summary["verdict"], str(summary.get("failed_stage") or "") or None).exit_code
    except (jsonfile.Unreadable, KeyError, TypeError, AttributeError):
        said = f"its {layout.SUMMARY_FILE} is unreadable"
    why = (
        f"{found[-1]} is already sealed: {text.one_line(said)} (exit {code}); nothing changed. A new run: nox -s m40 "
        f"(or a stage); this one's files: cd {found[-1]} && sha256sum -c {layout.SUMS_FILE}"
    )
    return why, code


def exit_code_of(rec: StageRecord, run_dir: Path) -> int:
    """`nox -s evidence` alone ends as `nox -s m40` does: the verdict, its exit code and the README."""
    code = rec.figures["exit_code"]
    print(f"evidence: {rec.figures['verdict_line']} (exit {code}); read {run_dir / layout.README_FILE}", flush=True)
    return code


def after_record(run_dir: Path, rec: StageRecord) -> None:
    """Called by the harness once stages/evidence.json exists, so SHA256SUMS covers it too."""
    seal(run_dir)


COLLECT_ENV_TIMEOUT_S = 180  # collect_env imports torch and runs nvidia-smi and pip: seconds, not minutes
# collect_env started ahead (start_collect_env: m40 starts it as train begins), by run folder: (child, started at).
STARTED: dict[Path, tuple[subprocess.Popen, float]] = {}
STOPPED: set[Path] = set()  # runs interrupted: collect_env is not started for them (stop_collect_env)


def start_collect_env(run_dir: Path, recs: dict[str, StageRecord] | None = None) -> bool:
    """Start `python -m torch.utils.collect_env` in .venv-gpu in the background into collect_env.txt, once per
    run, after a passing install (what PyTorch's bug reports ask for); write_collect_env awaits it. m40 starts it
    as train begins, so its seconds (torch's import, nvidia-smi, pip) overlap train's start-up. False: not due."""
    target, python = run_dir / layout.COLLECT_ENV, layout.gpu_python()
    recs = records.read_all(run_dir) if recs is None else recs
    install = recs.get("install")
    if run_dir.resolve() in STARTED or target.exists() or not python.exists() or install is None or not install.ok:
        return False
    if run_dir.resolve() in STOPPED:  # an interrupted run is sealed now, not after collect_env's minutes
        target.write_text("not run: the run was interrupted, and it is sealed without waiting for it\n")
        return False
    cmd = proc.gpu_command(python, "torch.utils.collect_env", [])  # the one launcher: isolated from our PYTHON*
    target.write_text(f"$ {' '.join(cmd)}\n\n", encoding="utf-8")
    try:  # on timeout finish() kills its whole process group (collect_env runs nvidia-smi and pip)
        child = proc.start(cmd, target, env=proc.gpu_env(python=python), cwd=run_dir)
    except OSError as e:
        with target.open("a", encoding="utf-8") as f:
            f.write(f"could not run it: {text.one_line(e)}\n")
        return False
    STARTED[run_dir.resolve()] = (child, time.monotonic())
    return True


def stop_collect_env(run_dir: Path) -> None:
    """Kill the collect_env started for this run, if any (write_collect_env then notes its exit code): an
    interrupted run is sealed in seconds, never after collect_env's minutes."""
    STOPPED.add(run_dir.resolve())
    started = STARTED.get(run_dir.resolve())
    if started is not None:
        proc.signal_group(started[0], signal.SIGKILL)


def write_collect_env(run_dir: Path, recs: dict[str, StageRecord]) -> None:
    """collect_env.txt, complete: the run started ahead is awaited, else it is started now and awaited.
    Its failure is written into the file, never fails evidence."""
    if run_dir.resolve() not in STARTED and not start_collect_env(run_dir, recs):
        return
    child, started = STARTED.pop(run_dir.resolve())
    code = proc.finish(child, COLLECT_ENV_TIMEOUT_S - (time.monotonic() - started))
    tail = (
        f"\n--- timed out after {COLLECT_ENV_TIMEOUT_S} s; its process group was killed ---\n"
        if code == 124
        else f"\n--- exit code {code} ---\n"
        if code
        else ""
    )
    with (run_dir / layout.COLLECT_ENV).open("a", encoding="utf-8") as f:
        f.write(tail)


def run(run_dir: Path, args, *, env=None) -> Outcome:
    env = os.environ if env is None else env
    recs = {name: rec for name, rec in records.read_all(run_dir).items() if name != "evidence"}
    placeholders = write_placeholders(run_dir, recs)
    write_collect_env(run_dir, recs)

    # What the sealed run will hold: what is there now, plus what evidence is about to write.
    files = sorted(set(run_files(run_dir)) | written_last(run_dir))
    ctx = context(run_dir, recs, files, placeholders)

    templates = environment()
    (run_dir / layout.README_FILE).write_text(templates.get_template("README.md.j2").render(**ctx), encoding="utf-8")
    (run_dir / layout.SUMMARY_FILE).write_text(json.dumps(summary_document(ctx), indent=2) + "\n", encoding="utf-8")
    step_summary = append_step_summary(templates.get_template("step_summary.md.j2").render(**ctx), env)

    print(f"evidence: verdict {ctx['verdict_line']}", flush=True)
    print(f"evidence: {run_dir / layout.README_FILE}", flush=True)
    if step_summary:
        print(f"evidence: appended the verdict to ${STEP_SUMMARY_ENV}", flush=True)

    figures = {
        "verdict": ctx["verdict"],
        "exit_code": ctx["exit_code"],
        "verdict_line": ctx["verdict_line"],
        "failed_stage": ctx["failed_stage"] or "",
        "files": len(files),
    }
    written = [*placeholders, layout.README_FILE, layout.SUMMARY_FILE, layout.SUMS_FILE]
    return Outcome(StageStatus.PASS, "", figures, written)
