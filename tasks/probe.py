"""Stage probe (stub: being written)."""

from __future__ import annotations

from tasks.records import FAIL, Outcome

DESCRIPTION = "stage probe"


def add_arguments(parser) -> None:
    pass


def run(run_dir, args) -> Outcome:
    return Outcome(FAIL, "stage probe is not implemented yet")
