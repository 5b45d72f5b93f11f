"""training_pt/quick_exit.py: the exit code, the output and the atexit handlers survive the quick exit."""

from __future__ import annotations

import subprocess
import sys

from tasks import layout

CHILD = """
import atexit
from training_pt import quick_exit
atexit.register(lambda: print("atexit ran", flush=True))
print("unflushed", end="")
quick_exit.exit_quickly(5)
"""


def test_a_quick_exit_keeps_its_code_its_output_and_its_atexit_handlers():
    res = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env={"PYTHONPATH": str(layout.ROOT)}
    )
    assert res.returncode == 5, res.stderr
    assert res.stdout == "unflushedatexit ran\n"
