"""Run folders: `submission_runs/m40_vN/`, picked, created and locked here only.

Rules: `nox -s m40` always starts the next free `m40_vN`. A stage run alone writes into the newest
unfinished (unsealed) run, or starts a new one. `--run-dir` picks one explicitly. A sealed run
(evidence wrote SHA256SUMS) is never written again. One process at a time holds a run's lock.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from tasks import layout, locks


class RunError(Exception):
    """A run folder cannot be used; the message is one line naming the fix."""

    exit_code = layout.EXIT_USAGE


class RunLocked(RunError):
    exit_code = layout.EXIT_LOCKED


_RUN_RE = re.compile(rf"^{re.escape(layout.RUN_PREFIX)}(\d+)$")


def run_number(path: Path) -> int | None:
    m = _RUN_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_runs(runs_dir: Path) -> list[Path]:
    """Run folders, oldest (lowest N) first."""
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and run_number(p) is not None]
    return sorted(runs, key=run_number)


def is_sealed(run_dir: Path) -> bool:
    return (run_dir / layout.SUMS_FILE).exists()


def create_next(runs_dir: Path) -> Path:
    """Create and return the next free m40_vN (never reuses a number, even of a deleted gap)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    n = max((run_number(p) for p in list_runs(runs_dir)), default=0) + 1
    while True:
        path = runs_dir / f"{layout.RUN_PREFIX}{n}"
        try:
            path.mkdir()  # atomic: two processes cannot both create the same run
            return path
        except FileExistsError:
            n += 1


def newest_unfinished(runs_dir: Path) -> Path | None:
    runs = list_runs(runs_dir)
    if runs and not is_sealed(runs[-1]):
        return runs[-1]
    return None


def resolve(runs_dir: Path, run_dir: Path | None, *, new: bool) -> Path:
    """The run folder a command writes into (created when needed)."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        if is_sealed(run_dir):
            raise RunError(
                f"run folder {run_dir} is sealed (it has {layout.SUMS_FILE}); "
                "drop --run-dir to start a new run"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    if not new and (found := newest_unfinished(runs_dir)) is not None:
        return found
    return create_next(runs_dir)


@contextlib.contextmanager
def locked(run_dir: Path):
    """Hold the run's lock file; a second process gets RunLocked naming the holder."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locks.exclusive(run_dir / layout.LOCK_FILE))
        except locks.Busy as busy:
            raise RunLocked(
                f"run folder {run_dir} is locked by {busy}; "
                f"wait for it to finish, or pass --run-dir to use another run"
            ) from None
        if is_sealed(run_dir):  # sealed between our choice of this run and our lock
            raise RunError(f"run folder {run_dir} was sealed by another process just now; run the command again")
        yield run_dir
