"""The stage record: the one small JSON each stage leaves in `stages/<stage>.json`.

Schema (version 1), the only contract between stages and `evidence`:

    stage       one of layout.STAGES
    status      "pass" | "fail" | "skip" | "interrupted"
    reason      one line: why it failed / was skipped ("" on pass)
    started     ISO 8601 UTC time the stage began
    ended       ISO 8601 UTC time the stage ended
    duration_s  seconds, float
    figures     flat dict of key numbers/strings for the stage table and summary.json
    files       names (relative to the run folder) the stage wrote
    schema      1
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tasks import layout

PASS, FAIL, SKIP, INTERRUPTED = "pass", "fail", "skip", "interrupted"
STATUSES = (PASS, FAIL, SKIP, INTERRUPTED)
SCHEMA = 1


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class StageRecord:
    stage: str
    status: str
    reason: str = ""
    started: str = ""
    ended: str = ""
    duration_s: float = 0.0
    figures: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        if self.stage not in layout.STAGES:
            raise ValueError(f"unknown stage {self.stage!r}")
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        # A reason is one line by contract.
        self.reason = " ".join(str(self.reason).split())

    @property
    def ok(self) -> bool:
        return self.status == PASS


class Timer:
    """Measures a stage: `with Timer() as t: ...; t.started, t.ended, t.duration_s`."""

    def __enter__(self) -> Timer:
        self.started = now_iso()
        self._t0 = time.perf_counter()
        self.ended, self.duration_s = "", 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if not self.ended:
            self.ended = now_iso()
            self.duration_s = round(time.perf_counter() - self._t0, 3)

    def record(self, stage: str, status: str, reason: str = "", figures=None, files=None) -> StageRecord:
        self.stop()
        return StageRecord(
            stage=stage,
            status=status,
            reason=reason,
            started=self.started,
            ended=self.ended,
            duration_s=self.duration_s,
            figures=dict(figures or {}),
            files=list(files or []),
        )


def write(run_dir: Path, rec: StageRecord) -> Path:
    path = layout.stage_record_path(run_dir, rec.stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(rec), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read(run_dir: Path, stage: str) -> StageRecord | None:
    path = layout.stage_record_path(run_dir, stage)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    known = {k: data[k] for k in StageRecord.__dataclass_fields__ if k in data}
    return StageRecord(**known)


def read_all(run_dir: Path) -> dict[str, StageRecord]:
    return {s: r for s in layout.STAGES if (r := read(run_dir, s)) is not None}


@dataclass
class Outcome:
    """What a stage's `run()` returns; the harness (tasks/stage.py) adds the timing."""

    status: str
    reason: str = ""
    figures: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
