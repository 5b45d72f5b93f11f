"""The harness every stage runs in, alone (`nox -s probe`) or chained (`nox -s m40`).

A stage module provides:
    DESCRIPTION               one line, for --help
    add_arguments(parser)     its options (each option name used by one stage only)
    run(run_dir, args)        does the work, returns records.Outcome; never calls sys.exit
    after_record(run_dir, rec)  optional: runs after stages/<stage>.json is written, if the stage passed
    USES_GPU_VENV = True      optional: run() uses .venv-gpu, held shared meanwhile (an install waits)
    check_inputs(args)        optional: raises ConfigError on a bad option or config file; called before
                              any stage runs (m40 calls every stage's), so a bad input is exit 2 up front
    nothing_to_do(args)       optional: (a one-line reason to do nothing, the exit code) (then no run folder is
                              touched), None to go on, or RunError
    exit_code_of(rec, run_dir)  optional: the exit code of the stage run alone once it passed (evidence: the
                              verdict's, so that stages run one by one end as `nox -s m40` does)

The harness times it, writes `stages/<stage>.json`, turns errors into a one-line failed record,
and maps the result to the stage's exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
import traceback
from pathlib import Path

from tasks import (
    cuda_check,
    evidence,
    install,
    layout,
    probe,
    proc,
    proof,
    records,
    runs,
    train,
    validate,
    venvs,
    verdict,
)
from tasks.config import ConfigError
from tasks.records import StageStatus, Timer

# The stages, in layout.STAGES order: the one table from a stage's name to its module.
MODULES = {"probe": probe, "install": install, "cuda_check": cuda_check, "train": train, "evidence": evidence}


def execute(stage: str, run_dir: Path, args: argparse.Namespace) -> records.StageRecord:
    """Run one stage into run_dir (already locked) and write its record. Re-raises Ctrl-C."""
    mod = MODULES[stage]
    timer = Timer.start()
    # Replaces any earlier record first: a stage killed from here on (SIGKILL, the OOM killer, a
    # Slurm/Kubernetes stop) leaves "running", which evidence reads as "did not finish", never a stale pass.
    running = records.StageRecord(stage, StageStatus.RUNNING, started=timer.started, host=records.this_host())
    records.write(run_dir, running)
    try:
        # A stage that runs .venv-gpu's Python holds it shared: no install swaps it under the stage.
        with venvs.in_use(layout.VENV_GPU) if getattr(mod, "USES_GPU_VENV", False) else contextlib.nullcontext():
            out = mod.run(run_dir, args)
        rec = timer.record(stage, out.status, out.reason, {**out.figures, **config_changes()}, out.files)
    except venvs.VenvError as e:  # an install holds .venv-gpu right now
        rec = timer.record(stage, StageStatus.FAIL, str(e))
    except KeyboardInterrupt as e:
        rec = timer.record(stage, StageStatus.INTERRUPTED, f"{proc.interrupt_words(e)} during {stage}")
        records.write(run_dir, rec)
        raise
    except ConfigError as e:  # a bad input found by the stage itself: a FAIL record, and exit 2 from the caller
        records.write(run_dir, timer.record(stage, StageStatus.FAIL, str(e)))
        raise
    except OSError as e:  # a file the stage could not read or write: one line, no traceback
        rec = timer.record(stage, StageStatus.FAIL, f"{stage}: {e.filename or ''}: {e.strerror or e}")
    except Exception as e:  # a bug or an unforeseen failure: one line in the record, trace in the log
        traceback.print_exc()
        rec = timer.record(stage, StageStatus.FAIL, f"unexpected {type(e).__name__}: {e}")
    records.write(run_dir, rec)
    # Optional hook, run once the record exists: evidence seals the run here, so SHA256SUMS covers its record.
    after = getattr(mod, "after_record", None)
    if after is not None and rec.ok:
        try:
            after(run_dir, rec)
        except OSError as e:
            rec = timer.record(stage, StageStatus.FAIL, f"{stage} could not finish: {e}")
            records.write(run_dir, rec)
    print(verdict_line(rec), flush=True)
    return rec


def config_changes() -> dict:
    """{"changed_configs": [...]} when config files a verdict rests on differ from this tool's git commit
    now (tasks/verdict.py: PARTIAL); {} when none do, or git cannot tell."""
    changed = proof.changed_files(list(verdict.load_rules().judged_configs))
    return {"changed_configs": changed} if changed else {}


def file_error(e: OSError) -> str:
    """One line for a file the run folder could not take: which, why, and the fix that fits."""
    name = e.filename or "into the run folder"
    if e.errno == errno.ENOSPC:
        full = f"the disk is full ({e.strerror})"
        return f"cannot write {name}: {full}; free space on it, or pass --run-dir DIR on another disk"
    return f"cannot write {name} ({e.strerror or e}); make the run folder writable, or pass --run-dir DIR"


def verdict_line(rec: records.StageRecord) -> str:
    text = f"{rec.stage}: {rec.status.upper()} ({rec.duration_s:.1f} s)"
    return f"{text} — {rec.reason}" if rec.reason else text


def exit_code(rec: records.StageRecord) -> int:
    if rec.status == StageStatus.INTERRUPTED:
        return layout.EXIT_INTERRUPTED
    return layout.EXIT_OK if rec.status in (StageStatus.PASS, StageStatus.SKIP) else layout.EXIT_STAGE[rec.stage]


def parser_for(prog: str, description: str) -> argparse.ArgumentParser:
    p = validate.Parser(prog=prog, description=description)
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="write into this run folder instead of the newest unfinished submission_runs/m40_vN",
    )
    return p


def main(stage: str, argv: list[str]) -> int:
    """`nox -s <stage> -- [options]`: run one stage into the newest unfinished run (or a new one)."""
    mod = MODULES[stage]
    parser = parser_for(f"nox -s {stage} --", mod.DESCRIPTION)
    mod.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        validate.inputs(args, (stage,), MODULES)
        # Optional hook: a stage with nothing to do says why (evidence on a sealed newest run), changes nothing.
        idle = getattr(mod, "nothing_to_do", None)
        if idle is not None and (said := idle(args)):
            why, code = said
            print(f"{stage}: {why}", flush=True)
            return code
        run_dir = runs.resolve(layout.RUNS_DIR, args.run_dir, new=False)
        with runs.locked(run_dir), proc.terminate_as_interrupt():  # SIGTERM: recorded as Ctrl-C is
            print(f"{stage}: run folder {run_dir}", flush=True)
            rec = execute(stage, run_dir, args)
    except (runs.RunError, ConfigError) as e:
        print(f"{stage}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the run folder could not be written (full disk, made read-only meanwhile)
        print(f"{stage}: error: {file_error(e)}", file=sys.stderr)
        return layout.EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{stage}: interrupted", file=sys.stderr)
        return layout.EXIT_INTERRUPTED
    final = getattr(mod, "exit_code_of", None)
    return final(rec, run_dir) if final is not None and rec.ok else exit_code(rec)
