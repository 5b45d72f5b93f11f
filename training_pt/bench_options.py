"""The options of `python -m training_pt.bench`, kept free of torch so that nox's side can print them
(`nox -s bench -- --help` before .venv-gpu exists). Imports only the standard library and tasks.layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks import layout


def parser(
    description: str = "GPT-2 training speed on one GPU.",
    cls: type[argparse.ArgumentParser] = argparse.ArgumentParser,
    prog: str = "python -m training_pt.bench",
) -> argparse.ArgumentParser:
    """training_pt/bench.py's command line (`cls`, `prog`: nox's side checks it first, with its one-line errors)."""
    p = cls(prog=prog, description=description)
    p.add_argument("--config", type=Path, default=layout.TRAIN_CONFIG, help="the smoke config (YAML)")
    p.add_argument("--bench-config", type=Path, default=layout.BENCH_FILE, help="steps, batch and targets (YAML)")
    p.add_argument("--compile", action="store_true", help="add the compiled benchmark row")
    p.add_argument("--levers", action="store_true", help="add one row per lever of bench.yaml (what each one buys)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: bench.yaml)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default: bench.yaml)")
    p.add_argument("--batch-size", type=int, default=None, help="batch of the compiled row (default: bench.yaml)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled row (default: the YAML's)")
    p.add_argument("--only", default="", help="comma-separated rows to run (hf-default,smoke,smoke-eager,compiled)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="key=value",
        help="override a setting of the smoke config (all our rows; the baseline takes its sizes)",
    )
    p.add_argument("--out", type=Path, default=None, help="folder for bench.json and bench.md")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    return p
