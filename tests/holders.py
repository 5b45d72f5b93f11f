"""Another process holding one of the project's locks until the test lets it go: for what a second process
is told (a lock naming its holder, a locked run, an install holding .venv-gpu). Only for tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HOLD = """
import importlib, sys, time
from pathlib import Path
module, how, path = sys.argv[1:4]
with getattr(importlib.import_module(module), how)(Path(path)):
    print("held", flush=True)
    time.sleep(60)
"""


def hold(module: str, how: str, path: Path, *, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """A child process inside `with module.how(path):` (e.g. "tasks.locks", "exclusive"), returned once it holds
    it; it lets go when killed (release), or after 60 s."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, module, how, str(path)],  # noqa: S603
        cwd=cwd,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    said = child.stdout.readline() if child.stdout is not None else ""
    if said.strip() != "held":
        release(child)
        raise AssertionError(f"the holder did not take {module}.{how}({path}): it said {said!r}")
    return child


def release(child: subprocess.Popen) -> None:
    """Kill the holder hard (as a crash would) and reap it."""
    child.kill()
    child.wait()
