"""`.venv-gpu` as a transaction: build a staging venv next to it, verify it, then swap it in.

The previous `.venv-gpu` stays untouched until the swap, and comes back if anything fails (or Ctrl-C
arrives) during it:

    with venvs.locked(final):              # one installer at a time (.venv-gpu.lock)
        venvs.recover(final)               # leftovers of a killed run: restore or remove
        staging = venvs.staging_path(final)   # .venv-gpu.staging-<pid>
        try:
            venvs.create(staging, python); install; verify with staging's own python
            venvs.swap_in(staging, final, check)
        finally:
            venvs.remove(staging, final)

Venvs are not relocatable: scripts in bin/ carry the staging path in their shebang, pyvenv.cfg
names it. `swap_in` renames, then rewrites every file in bin/ and pyvenv.cfg that names the staging
path (byte-exact replacement), then runs `check` with the final venv's python; on failure the swap is
undone. Bytecode (.pyc) also records the staging path, but CPython rewrites co_filename to the real
source path when it loads a .pyc, so tracebacks and inspect see the final path.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path

from tasks import layout, locks


class VenvError(Exception):
    """One line: what went wrong with a venv and what to do."""


def staging_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.staging-{os.getpid()}")


def old_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.old-{os.getpid()}")


_trash_count = itertools.count()


def trash_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.trash-{os.getpid()}-{next(_trash_count)}")


def lock_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.lock")


def is_venv(path: Path) -> bool:
    return (path / "pyvenv.cfg").is_file()


@contextlib.contextmanager
def locked(final: Path):
    """Hold `<venv>.lock`; a second installer gets VenvError naming the holder."""
    lock = lock_path(final)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locks.exclusive(lock))
        except locks.Busy as busy:
            doing = "installed" if busy.holder else "used"  # a stage holding it shared records no holder
            raise VenvError(f"{final} is being {doing} by {busy}; wait for it to finish") from None
        yield final


@contextlib.contextmanager
def in_use(final: Path):
    """Hold `<venv>.lock` shared while a stage runs `final`'s Python, so no install swaps it meanwhile;
    any number of stages may hold it at once. VenvError while an install holds it."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locks.shared(lock_path(final)))
        except locks.Busy as busy:
            raise VenvError(
                f"{final} is being installed by {busy}; wait for it to finish, then run this stage again"
            ) from None
        yield final


def install_made(path: Path) -> bool:
    """A venv install made (it carries install's marker), not a link, a folder or somebody's own venv."""
    return not path.is_symlink() and is_venv(path) and (path / layout.VENV_MARKER).is_file()


def recover(final: Path) -> list[str]:
    """Clean up after an installer that was killed (call while holding the lock).

    A `.old-<pid>` venv install made is the last good venv of a swap that was interrupted (swap_in removes it
    only after the new venv checked out): it is put back, and a `final` beside it that install made, not known
    to have passed its check, is discarded. A `.staging-<pid>` venv (or empty folder) and a `.trash-<pid>-<n>`
    (a removal cut short) are leftovers and are removed. Anything else of those names is not install's
    (`.venv.old-2024`, an ordinary backup) and stays as it was. Returns what was done.
    """
    done: list[str] = []
    restored = False
    for p, kind in siblings(final):
        note, put_back = recover_one(final, p, kind, restored)
        done.append(note)
        restored = restored or put_back
    return done


def siblings(final: Path, kinds: tuple[str, ...] = ("staging", "old", "trash")) -> list[tuple[Path, str]]:
    """(path, kind) of each `<final>.<kind>-<pid>[-<n>]` beside `final` that another process left: the one rule
    for the names install gives its staging, old and trash folders (staging_path, old_path, remove)."""
    pattern = re.compile(rf"^{re.escape(final.name)}\.({'|'.join(kinds)})-(\d+)(-\d+)?$")
    if not final.parent.is_dir():
        return []
    found = ((p, pattern.match(p.name)) for p in sorted(final.parent.iterdir()))
    return [(p, m.group(1)) for p, m in found if m and int(m.group(2)) != os.getpid()]


def recover_one(final: Path, p: Path, kind: str, restored: bool) -> tuple[str, bool]:
    """What recover() does with one leftover `p` of `kind` (staging, old, trash): (what it did, whether it put
    `p` back as `final`)."""
    if p.is_symlink():  # never restored: a link is not a venv install made (its target is left alone)
        p.unlink()
        return f"removed leftover link {p.name}", False
    if kind == "staging" and not (is_venv(p) or (p.is_dir() and not any(p.iterdir()))):
        return f"left {p.name} alone: not a venv", False
    if kind == "old" and not install_made(p):
        return f"left {p.name} alone: install did not make it (no {layout.VENV_MARKER})", False
    if kind != "old" or restored:
        remove(p, final)
        return f"removed leftover {p.name}", False
    if final.exists() and not install_made(final):
        return f"left {p.name} alone: {final} beside it is not install's", False
    note = ""
    if final.exists():
        remove(final, final)
        note = f"discarded {final}: its swap was interrupted before the previous venv was removed; "
    p.rename(final)
    return f"{note}restored {final} from {p.name} (an earlier install was interrupted mid-swap)", True


def remove(path: Path, final: Path) -> None:
    """Delete a venv of install's (or a leftover): first renamed `<final>.trash-<pid>-<n>` in one atomic step,
    so a deletion cut short (Ctrl-C, a busy NFS file) leaves a name recover() removes, never a half venv
    under a name it could restore."""
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    trash = trash_path(final)
    try:
        path.rename(trash)
    except OSError:
        trash = path  # another file system, say: deleted where it stands
    shutil.rmtree(trash, ignore_errors=True)


def create(path: Path, python: str | Path, *, prompt: str, log=None, pip: bool = True) -> str:
    """`python -m venv --prompt PROMPT path`; falls back to --without-pip where ensurepip is missing.
    `pip=False`: --without-pip from the start (ensurepip costs seconds; the caller finds a pip itself).

    Returns a note ('' normally). Raises VenvError naming the interpreter and its error.
    """
    cmd = [str(python), "-m", "venv", "--prompt", prompt, *([] if pip else ["--without-pip"]), str(path)]
    res = _run(cmd, log)
    if res.returncode == 0:
        return ""
    shutil.rmtree(path, ignore_errors=True)
    if "ensurepip" in res.stdout:
        res = _run(cmd[:-1] + ["--without-pip", str(path)], log)
        if res.returncode == 0:
            return f"{python} has no ensurepip: venv made --without-pip"
        shutil.rmtree(path, ignore_errors=True)
    last = (res.stdout.strip().splitlines() or ["no output"])[-1]
    raise VenvError(f"cannot create a venv with {python} (exit {res.returncode}: {last})")


def _run(cmd: list[str], log) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, errors="replace")
    if log is not None:
        log(cmd, res.stdout, res.returncode)
    return res


def fix_paths(venv: Path, old: Path, new: Path) -> list[str]:
    """Rewrite `old` to `new` in pyvenv.cfg and the text files of bin/ (shebangs, activate scripts)."""
    old_b, new_b = str(old).encode(), str(new).encode()
    candidates = [venv / "pyvenv.cfg"]
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    if bindir.is_dir():
        candidates += [p for p in bindir.iterdir() if p.is_file() and not p.is_symlink()]
    fixed = []
    for p in candidates:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        if old_b in data and b"\0" not in data[:1024]:
            mode = p.stat().st_mode
            p.write_bytes(data.replace(old_b, new_b))
            os.chmod(p, mode)
            fixed.append(p.name)
    return fixed


def foreign(final: Path) -> str | None:
    """Why `final` is not a venv install may replace (None: absent, or made by install: it has the marker)."""
    if final.is_symlink():
        return (
            f"{final} is a symlink (to {os.readlink(final)}); install replaces only a venv it made itself: "
            "remove the link (its target is left alone) or pass --venv DIR"
        )
    if final.exists() and not is_venv(final):
        return (
            f"{final} exists but is not a virtual environment (no pyvenv.cfg); move it away, install never deletes it"
        )
    if final.exists() and not (final / layout.VENV_MARKER).is_file():
        return (
            f"{final} is a venv install did not make (no {layout.VENV_MARKER}); move it away or pass "
            "--venv DIR, install never deletes it"
        )
    return None


def swap_pending(final: Path) -> bool:
    """Whether a killed swap left a `.old-<pid>` venv beside `final` (recover() decides then, under the lock)."""
    return any(install_made(p) for p, _ in siblings(final, ("old",)))


def check_replaceable(final: Path) -> None:
    """Install replaces a venv it made, never anything else that happens to stand at its path."""
    if (why := foreign(final)) is not None:
        raise VenvError(why)


def swap_in(staging: Path, final: Path, check) -> None:
    """Make `staging` the new `final`; `check(final)` must pass or the old `final` comes back.

    The old venv is renamed aside (`.old-<pid>`) and deleted only after the new one checked out.
    On any failure or Ctrl-C the new venv goes back to `staging` (the caller discards it) and the
    old one is renamed back: `final` is exactly as it was.
    """
    check_replaceable(final)
    old = old_path(final) if final.exists() else None
    if old is not None:
        os.rename(final, old)
    try:
        os.rename(staging, final)
        try:
            fix_paths(final, staging, final)
            check(final)
        except BaseException:
            os.rename(final, staging)
            raise
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        remove(old, final)
