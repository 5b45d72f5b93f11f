"""`nox -s m40`: probe → install → cuda_check → train, then evidence, always, into a new run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tasks import evidence, layout, multinode, proc, records, runs, stage, validate
from tasks.config import ConfigError

DESCRIPTION = (
    "Run every stage into a new submission_runs/m40_vN: probe, install, cuda_check, train; "
    "stop at the first failure; evidence always runs last and seals the run."
)
WORK_STAGES = layout.WORK_STAGES


def build_parser():
    parser = stage.parser_for("nox -s m40 --", DESCRIPTION)
    for name in layout.STAGES:
        group = parser.add_argument_group(f"{name} options")
        stage.MODULES[name].add_arguments(group)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        chain_inputs(args)
        validate.inputs(args, layout.STAGES, stage.MODULES)  # every option and config file, before the first stage
        run_dir = runs.resolve(layout.RUNS_DIR, args.run_dir, new=True)
        with runs.locked(run_dir):
            refuse_earlier_attempt(run_dir)
            print(f"m40: run folder {run_dir}", flush=True)
            with proc.terminate_as_interrupt():  # a job's time limit seals the run as Ctrl-C does
                return _chain(run_dir, args)
    except (runs.RunError, ConfigError) as e:
        print(f"m40: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"m40: error: {stage.file_error(e)}", file=sys.stderr)
        return layout.EXIT_USAGE


def chain_inputs(args) -> None:
    """What only the chain refuses (ConfigError, exit 2): a --venv other than .venv-gpu (cuda_check and train
    always use .venv-gpu) and a multinode combination train or cuda_check would refuse only mid-run."""
    venv = getattr(args, "venv", None)
    if venv is not None and Path(venv).absolute() != layout.VENV_GPU.absolute():
        raise ConfigError("--venv is for `nox -s install` alone; m40 always uses .venv-gpu")
    try:
        multinode.resolve(args, os.environ)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def refuse_earlier_attempt(run_dir: Path) -> None:
    """RunError (exit 2) when --run-dir already holds anything of a run (stage records, a stage's files): a stage
    this chain skips (after an earlier failure) would leave an earlier attempt's files, a log ending in PASS
    say, to be sealed as this run's."""
    earlier = list(records.read_all(run_dir))
    stages_dir = run_dir / layout.STAGES_DIR
    others = [p.name for p in sorted(run_dir.iterdir()) if p.name not in (layout.STAGES_DIR, layout.LOCK_FILE)]
    if not earlier and stages_dir.is_dir() and any(stages_dir.iterdir()):
        earlier = [layout.STAGES_DIR]
    if earlier or others:
        held = ", ".join(earlier) if earlier else ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        what = "stage results" if earlier else "files"
        raise runs.RunError(
            f"run folder {run_dir} already holds {what} ({held}); m40 runs every stage into "
            "a run of its own: pass a new or empty folder, or drop --run-dir for the next m40_vN"
        )


def prestart(train_module, run_dir, args):
    """The train stage's process started ahead, if that stage offers it (tasks/train.py prestart), else None.
    Only a speed-up: if it cannot start, the chain goes on as without it and the train stage launches."""
    start = getattr(train_module, "prestart", None)
    try:
        return start(run_dir, args) if start is not None else None
    except Exception as e:
        print(f"m40: train.py not started ahead ({type(e).__name__}: {e}); it starts in its stage", flush=True)
        return None


def _chain(run_dir, args) -> int:
    code = layout.EXIT_OK
    blocker = None
    try:
        for name in WORK_STAGES:
            if blocker is not None:
                skipped = records.Timer.start().record(name, records.StageStatus.SKIP, f"not run: {blocker}")
                records.write(run_dir, skipped)
                continue
            if name == "cuda_check":  # train.py's imports meanwhile; the train stage releases it (tasks/train.py)
                args.train_prestarted = prestart(stage.MODULES["train"], run_dir, args)
            if name == "train":  # torch's collect_env in the background meanwhile; evidence awaits it
                evidence.start_collect_env(run_dir)
            rec = stage.execute(name, run_dir, args)
            if not rec.ok:
                code = stage.exit_code(rec)
                blocker = f"{name} failed"
    except KeyboardInterrupt:
        code = layout.EXIT_INTERRUPTED
        print("m40: interrupted; sealing the run with what it has", file=sys.stderr, flush=True)
    finally:
        if getattr(args, "train_prestarted", None) is not None:  # cuda_check failed, or Ctrl-C: train never ran
            stage.MODULES["train"].cancel(args.train_prestarted)
            args.train_prestarted = None
        # Evidence runs on success, failure and Ctrl-C alike, and a second Ctrl-C or SIGTERM cannot stop the
        # seal (it only stops collect_env's wait); after an interrupt it does not wait for collect_env at all:
        # a time limit's SIGKILL follows its SIGTERM in seconds.
        if code == layout.EXIT_INTERRUPTED:
            evidence.stop_collect_env(run_dir)
        with proc.interrupts_deferred(lambda: evidence.stop_collect_env(run_dir)) as came:
            ev = stage.execute("evidence", run_dir, args)
        if came:
            code = layout.EXIT_INTERRUPTED
    if not ev.ok:
        code = code or stage.exit_code(ev)
        print(f"m40: no verdict (exit {code}): evidence failed — {ev.reason}", flush=True)
        return code
    # The verdict (tasks/verdict.py) decides: a torch that changed between stages FAILs, a weakened run is PARTIAL.
    code = ev.figures["exit_code"] if code != layout.EXIT_INTERRUPTED else code
    print(f"m40: {ev.figures['verdict_line']} (exit {code}); read {run_dir / layout.README_FILE}", flush=True)
    return code
