"""Stage evidence (stub: being written)."""

from __future__ import annotations

from tasks.records import FAIL, Outcome

DESCRIPTION = "stage evidence"


def add_arguments(parser) -> None:
    pass


def run(run_dir, args) -> Outcome:
    return Outcome(FAIL, "stage evidence is not implemented yet")
