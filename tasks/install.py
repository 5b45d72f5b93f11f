"""Stage install (stub: being written)."""

from __future__ import annotations

from tasks.records import FAIL, Outcome

DESCRIPTION = "stage install"


def add_arguments(parser) -> None:
    pass


def run(run_dir, args) -> Outcome:
    return Outcome(FAIL, "stage install is not implemented yet")
