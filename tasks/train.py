"""Stage train (stub: being written)."""

from __future__ import annotations

from tasks.records import FAIL, Outcome

DESCRIPTION = "stage train"


def add_arguments(parser) -> None:
    pass


def run(run_dir, args) -> Outcome:
    return Outcome(FAIL, "stage train is not implemented yet")
