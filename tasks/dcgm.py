"""DCGM's own diagnostics where DCGM is installed: `dcgmi diag -r LEVEL --json`, its JSON kept in the
run folder. Torch-free; called by the long level of cuda_check. Nothing else depends on it: without
`dcgmi` on PATH the check SKIPs with one line (tasks/burn_rules.py:judge_dcgm)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tasks import jsonfile


def run_diag(level: int, timeout_s: float, out_file: Path) -> tuple[bool, int | None, dict | None, str]:
    """(dcgmi found, its exit code, its JSON, an error): runs `dcgmi diag -r LEVEL --json` and writes its
    output to out_file byte for byte, as DCGM wrote it. dcgmi exits non-zero when a test
    fails: the JSON says which. Its JSON is what jsonfile.parse reads (an object, not nested too deep); else
    None, and the error says why."""
    exe = shutil.which("dcgmi")
    if exe is None:
        return False, None, None, ""
    try:
        proc = subprocess.run(
            [exe, "diag", "-r", str(level), "--json"],
            capture_output=True,  # bytes: the file keeps them as dcgmi wrote them
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return True, None, None, f"dcgmi diag did not finish within {timeout_s:g} s"
    except OSError as e:
        return True, None, None, f"dcgmi cannot be run: {e}"
    out_file.write_bytes(proc.stdout)
    stdout = proc.stdout.decode("utf-8", "replace")  # a byte that is not UTF-8 as U+FFFD, never a crash
    try:
        return True, proc.returncode, jsonfile.parse(stdout), ""
    except jsonfile.Unreadable as e:
        tail = (proc.stderr.decode("utf-8", "replace") or stdout).strip().splitlines()
        return True, proc.returncode, None, f"its output cannot be read ({e}): {tail[-1][:200] if tail else 'empty'}"
