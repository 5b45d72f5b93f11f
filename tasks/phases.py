"""Where a process's seconds go: named phases, timed, shown on one line and recorded (torch-free).

GPU-side modules (cuda_check's checker, train.py) time their phases with `Phases` and write `record()` into their
JSON result; the stage copies it into its figures with `figures()` (`phase_<name>_s`), so stages/<stage>.json
and the evidence show them. The phases add up to the total: what no phase claimed is `other`.
"""

from __future__ import annotations

import contextlib
import os
import time

# How each phase is named on the log line; a phase not listed here shows its key.
LABELS = {
    "startup": "interpreter start",
    "import": "imports (torch)",
    "nvml": "NVML",
    "cuda_init": "CUDA init",
    "describe": "GPU properties",
    "checks": "checks",
    "compile": "compile check",
    "multi_gpu": "multi-GPU",
    "long": "long level",
    "start": "start (interpreter, imports)",  # train.py's phases from here
    "ahead": "model code imported ahead (during cuda_check)",
    "wait": "waiting to start (cuda_check, then the stage's own checks)",
    "setup": "setup",
    "data": "data",
    "model": "model (transformers, build)",
    "first_step": "first step (compile)",
    "warmup_steps": "warm-up steps",
    "timed_steps": "timed steps",
    "other": "other",
}


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), i.e. the interpreter's own start-up when called
    first thing; None where that cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """Seconds per named phase, in the order first seen."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float | None) -> None:
        if seconds is not None:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def record(self, total_s: float, before: tuple[str, ...] = ("startup",)) -> dict[str, float]:
        """{phase: seconds} rounded to ms, with `other` = total_s minus every phase but those in `before`
        (which ran before total_s began counting), and `total` = total_s plus those."""
        counted = sum(v for k, v in self.seconds.items() if k not in before)
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["other"] = round(max(0.0, total_s - counted), 3)
        out["total"] = round(total_s + sum(v for k, v in self.seconds.items() if k in before), 3)
        return out

    def line(self, record: dict[str, float]) -> str:
        parts = [f"{LABELS.get(k, k)} {v:.2f} s" for k, v in record.items() if k != "total"]
        return f"phases: {', '.join(parts)} (total {record['total']:.1f} s)"


def figures(record: dict | None) -> dict[str, float]:
    """A result's phases as flat stage figures: {"phase_import_s": 2.31, ...}."""
    return {f"phase_{k}_s": round(float(v), 2) for k, v in (record or {}).items() if isinstance(v, int | float)}
