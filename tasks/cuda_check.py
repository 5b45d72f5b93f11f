"""Stage cuda_check (stub: being written)."""

from __future__ import annotations

from tasks.records import FAIL, Outcome

DESCRIPTION = "stage cuda_check"


def add_arguments(parser) -> None:
    pass


def run(run_dir, args) -> Outcome:
    return Outcome(FAIL, "stage cuda_check is not implemented yet")
