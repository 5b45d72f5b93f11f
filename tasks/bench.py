"""`nox -s bench`: GPT-2 training speed on one GPU, in one process (`python -m training_pt.bench` in .venv-gpu).

    nox -s bench -- [--compile] [--levers] [--steps N] [--warmup N] [--batch-size N] [--compile-mode MODE]
                    [--only ROWS] [--set key=value ...] [--out DIR] [--python PATH]

Rows: hf-default (HF GPT-2 defaults, the baseline), smoke (configs/submission_local_gpu_gpt2.yaml),
smoke-eager (the same uncompiled), with --compile the compiled benchmark rows, with --levers one row per
lever of configs/bench.yaml; tok/s over >= 2 s of timed steps (CUDA events), MFU, the step-time spread,
warm-up time, peak memory and the ratio to the baseline, checked against configs/bench.yaml's targets.
bench.md (the table), bench.json and bench_console.txt go to --out (default: a new
submission_runs/bench_<time>/; never a run folder's evidence). This module never imports torch.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

from tasks import layout, proc, runs, validate
from training_pt import bench_options

DESCRIPTION = "Benchmark GPT-2 training speed on one GPU: HF defaults vs the smoke config vs compiled."


def main(argv: list[str]) -> int:
    parser = validate.Parser(prog="nox -s bench --", description=DESCRIPTION, add_help=False)
    parser.add_argument(
        "--python", type=Path, default=None, help="the interpreter to benchmark with (default: .venv-gpu's)"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for bench.md, bench.json, bench_console.txt")
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.help:  # every option, with or without .venv-gpu: the checker's parser imports no torch
        parser.print_help()
        print("\nOptions of training_pt/bench.py (passed through):\n", flush=True)
        bench_options.parser().print_help()
        return layout.EXIT_OK
    # the options passed through, checked here first: a typo is named before a missing .venv-gpu is
    bench_options.parser(cls=validate.Parser, prog="nox -s bench --").parse_args([str(a) for a in rest])
    python = args.python or layout.gpu_python()
    if not Path(python).exists():
        print(
            f"bench: error: {python} is missing; run `nox -s install -p CHANNEL` first, or pass --python PATH",
            file=sys.stderr,
        )
        return layout.EXIT_USAGE
    try:
        out = runs.make_output_dir(
            args.out or layout.RUNS_DIR / f"bench_{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}", "--out"
        )
    except runs.RunError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return e.exit_code
    bench_args = ["--out", out, *rest]
    print(f"bench: {' '.join(proc.gpu_command(python, layout.BENCH_MODULE, bench_args))}", flush=True)
    return proc.run_gpu(python, layout.BENCH_MODULE, bench_args, out / "bench_console.txt")
