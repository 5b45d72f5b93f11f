"""Run folders: `submission_runs/m40_vN/`, picked, created, checked and locked here only.

Rules: `nox -s m40` always starts the next free `m40_vN`. A stage run alone writes into the newest
unfinished (unsealed) run, or starts a new one. `--run-dir` picks one explicitly: a new or empty
folder, or a run folder (one that holds `stages/`). A sealed run (evidence wrote SHA256SUMS) is never
written again, nor is anything inside it. A run folder is a real folder: never a symbolic link, and it
holds none (so no stage writes outside it through a link). A folder under submission_runs/ that holds
no `stages/` was not made here and is never picked. One process at a time holds a run's lock.
"""

from __future__ import annotations

import contextlib
import os
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


def _number(path: Path) -> int:
    """run_number of a name that _entries kept (so it matched)."""
    n = run_number(path)
    assert n is not None
    return n


def _entries(runs_dir: Path) -> list[Path]:
    """Every m40_vN name under runs_dir, whatever it is (a folder, a file, a link)."""
    try:
        return [p for p in runs_dir.iterdir() if run_number(p) is not None]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise RunError(f"cannot list {runs_dir} ({e.strerror}); make it readable") from None


def list_runs(runs_dir: Path) -> list[Path]:
    """Real folders named m40_vN (never links), oldest (lowest N) first."""
    runs = [p for p in _entries(runs_dir) if p.is_dir() and not p.is_symlink()]
    return sorted(runs, key=_number)


def is_run(path: Path) -> bool:
    """A folder this tool made (or was pointed at with --run-dir): it holds stages/."""
    return (path / layout.STAGES_DIR).is_dir() and not path.is_symlink()


def is_sealed(run_dir: Path) -> bool:
    return (run_dir / layout.SUMS_FILE).exists()


def _oserror(what: Path, e: OSError, fix: str) -> RunError:
    return RunError(f"cannot create {what} ({e.strerror or e}); {fix}")


def check_runs_dir(runs_dir: Path) -> None:
    """runs_dir is a folder we can create runs in (created when missing)."""
    if runs_dir.exists() and not runs_dir.is_dir() or runs_dir.is_symlink() and not runs_dir.exists():
        raise RunError(
            f"{runs_dir} is not a folder; move it away so that runs can be written there, or pass --run-dir DIR"
        )
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _oserror(runs_dir, e, "make its parent writable, or pass --run-dir DIR") from None


def create_next(runs_dir: Path) -> Path:
    """Create and return the next free m40_vN (never reuses a number, even of a deleted gap)."""
    check_runs_dir(runs_dir)
    n = max((_number(p) for p in _entries(runs_dir)), default=0) + 1
    while True:
        path = runs_dir / f"{layout.RUN_PREFIX}{n}"
        try:
            path.mkdir()  # atomic: two processes cannot both create the same run
        except FileExistsError:
            n += 1
            continue
        except OSError as e:
            raise _oserror(path, e, f"make {runs_dir} writable (chmod u+w, chattr -i), or pass --run-dir DIR") from None
        (path / layout.STAGES_DIR).mkdir()
        return path


def newest_unfinished(runs_dir: Path) -> Path | None:
    runs = [p for p in list_runs(runs_dir) if is_run(p)]
    if runs and not is_sealed(runs[-1]):
        return runs[-1]
    return None


def check_outside_runs(folder: Path, option: str) -> None:
    """`folder` (given as `option`) is not a link, not a file, not under a file and not inside a run."""
    path = Path(os.path.abspath(folder))
    if path.is_symlink():
        raise RunError(
            f"{option} {folder} is a symbolic link (to {os.readlink(path)}); "
            "pass a real folder: nothing is written through a link"
        )
    for above in path.parents:
        if above.exists() and not above.is_dir():
            raise RunError(f"{option} {folder} lies under {above}, which is a file; pass a folder path")
        if is_sealed(above) or is_run(above):
            raise RunError(f"{option} {folder} lies inside the run folder {above}; pass a folder outside every run")
    if path.exists() and not path.is_dir():
        raise RunError(f"{option} {folder} is a file; pass a folder path")


def make_output_dir(folder: Path, option: str) -> Path:
    """A folder for a tool's own files (bench): never a run folder, nor inside one, nor through a link."""
    check_outside_runs(folder, option)
    if is_sealed(folder) or is_run(folder):
        raise RunError(
            f"{option} {folder} is a run folder (it has {layout.STAGES_DIR}/ or {layout.SUMS_FILE}); "
            "pass another folder: a run's evidence holds only its stages' files"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _oserror(folder, e, f"pass another {option}") from None
    return folder


def check_run_dir(run_dir: Path) -> None:
    """A --run-dir is a new or empty folder, or a run folder; not a link, not in a run, not sealed."""
    check_outside_runs(run_dir, "--run-dir")
    path = Path(os.path.abspath(run_dir))
    if not path.exists():
        return
    if is_sealed(path):
        raise RunError(f"run folder {run_dir} is sealed (it has {layout.SUMS_FILE}); drop --run-dir to start a new run")
    if not is_run(path) and any(path.iterdir()):
        raise RunError(
            f"--run-dir {run_dir} holds files but no {layout.STAGES_DIR}/, so it is not a run folder; "
            "pass a new or empty folder, or a run folder (drop --run-dir for a new run)"
        )


def resolve(runs_dir: Path, run_dir: Path | None, *, new: bool) -> Path:
    """The run folder a command writes into (created when needed)."""
    if run_dir is None:
        if not new and (found := newest_unfinished(runs_dir)) is not None:
            return found
        return create_next(runs_dir)
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    try:
        (run_dir / layout.STAGES_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _oserror(run_dir, e, "pass a folder you can write to") from None
    return run_dir


def check_no_links(run_dir: Path) -> None:
    """No symbolic link in the run folder or under it: a stage would write through it, outside the run."""
    if run_dir.is_symlink():
        raise RunError(
            f"run folder {run_dir} is a symbolic link; use a real folder, or pass --run-dir DIR for another run"
        )
    for top, dirs, files in os.walk(run_dir):
        for name in dirs + files:
            if os.path.islink(link := os.path.join(top, name)):
                raise RunError(
                    f"run folder {run_dir} holds a symbolic link {link} (to {os.readlink(link)}); "
                    "remove it, or pass --run-dir DIR for another run"
                )


@contextlib.contextmanager
def locked(run_dir: Path):
    """Hold the run's lock file; a second process gets RunLocked naming the holder."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locks.exclusive(run_dir / layout.LOCK_FILE))
        except locks.Busy as busy:
            raise RunLocked(
                f"run folder {run_dir} is locked by {busy}; wait for it to finish, or pass --run-dir to use another run"
            ) from None
        except OSError as e:
            raise RunError(
                f"cannot lock run folder {run_dir} ({e.strerror or e}: {run_dir / layout.LOCK_FILE}); "
                "make it writable, or pass --run-dir DIR for another run"
            ) from None
        if is_sealed(run_dir):  # sealed between our choice of this run and our lock
            raise RunError(f"run folder {run_dir} was sealed by another process just now; run the command again")
        check_no_links(run_dir)
        yield run_dir
