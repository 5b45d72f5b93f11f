"""The stage record: the one small JSON each stage leaves in `stages/<stage>.json`.

Schema (version 1), the only contract between stages and `evidence`:

    stage       one of layout.STAGES
    status      a StageStatus: "pass" | "fail" | "skip" | "interrupted" | "running" (written when the
                stage starts, replaced when it ends: a record still "running" is a stage that never finished)
    reason      one line: why it failed / was skipped ("" on pass)
    started     ISO 8601 UTC time the stage began
    ended       ISO 8601 UTC time the stage ended
    duration_s  seconds, float
    figures     flat dict of key numbers/strings for the stage table and summary.json
    files       names (relative to the run folder) the stage wrote
    host        the machine's host name (socket.gethostname()); "" in a record from before the field
    schema      1

probe, cuda_check and train also leave their own machine-readable file (layout.STAGE_EVIDENCE); each
stage's `file_says` reads it (FileSays: pass or not, the figures its record takes from it).
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tasks import jsonfile, layout, redact, text

SCHEMA = 1


class StageStatus:
    """A stage record's status: lower-case words. (A single check's status inside cuda_check is a
    different thing, cuda_rules' upper-case word; the two never mix.)"""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    INTERRUPTED = "interrupted"
    RUNNING = "running"  # written as the stage starts; a record left so means it never finished
    ALL = (PASS, FAIL, SKIP, INTERRUPTED, RUNNING)


def this_host() -> str:
    return socket.gethostname()


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
    host: str = ""  # set by the stage that writes the record (this_host()), never when a record is read
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        if self.stage not in layout.STAGES:
            raise ValueError(f"unknown stage {self.stage!r}")
        if self.status not in StageStatus.ALL:
            raise ValueError(f"unknown status {self.status!r}")
        # A reason is one line by contract: whitespace runs collapse, other control characters are escaped.
        # No credential of a URL (an index's user:password@, a ?token=) is ever kept: records are sealed.
        self.reason = redact.redact_url(text.one_line(" ".join(str(self.reason).split())))
        if isinstance(self.figures, dict):
            self.figures = without_credentials(self.figures)

    @property
    def ok(self) -> bool:
        return self.status == StageStatus.PASS


def without_credentials(value):
    """`value` with every string in it (dict values, list items, at any depth) through redact.redact_url."""
    if isinstance(value, str):
        return redact.redact_url(value)
    if isinstance(value, dict):
        return {k: without_credentials(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_credentials(v) for v in value]
    return value


class Timer:
    """Measures a stage: `t = Timer.start()`, then `t.record(stage, status, ...)` stops it and builds its record."""

    def __init__(self) -> None:
        self.started = now_iso()
        self._t0 = time.perf_counter()
        self.ended, self.duration_s = "", 0.0

    @classmethod
    def start(cls) -> Timer:
        return cls()

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
            host=this_host(),
        )


def write(run_dir: Path, rec: StageRecord) -> Path:
    path = layout.stage_record_path(run_dir, rec.stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(asdict(rec), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    except BaseException as e:  # a full disk, a record made read-only: no half record left to be sealed later
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: this record is it
            e.filename = str(path)
        raise
    return path


def read(run_dir: Path, stage: str) -> StageRecord | None:
    path = layout.stage_record_path(run_dir, stage)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return _parse(jsonfile.read(path), stage)
    except (ValueError, TypeError) as e:  # a damaged or hand-made record (jsonfile.Unreadable too): FAIL, no crash
        return StageRecord(
            stage,
            StageStatus.FAIL,
            f"{layout.STAGES_DIR}/{path.name} is not a valid stage record ({e}); "
            f"run `nox -s {stage}` again, or start a new run",
        )


def _parse(data: dict, stage: str) -> StageRecord:
    rec = StageRecord(**{k: data[k] for k in StageRecord.__dataclass_fields__ if k in data})
    if rec.stage != stage:
        raise ValueError(f"it names stage {rec.stage!r}")
    if (
        not isinstance(rec.figures, dict)
        or not isinstance(rec.files, list)
        or not isinstance(rec.duration_s, (int, float))
        or isinstance(rec.duration_s, bool)
        or not isinstance(rec.host, str)
    ):
        raise ValueError("figures, files, duration_s or host of the wrong type")
    return rec


def read_all(run_dir: Path) -> dict[str, StageRecord]:
    return {s: r for s in layout.STAGES if (r := read(run_dir, s)) is not None}


@dataclass
class Outcome:
    """What a stage's `run()` returns; the harness (tasks/stage.py) adds the timing."""

    status: str
    reason: str = ""
    figures: dict = field(default_factory=dict)
    files: list = field(default_factory=list)


@dataclass(frozen=True)
class FileSays:
    """What a stage's own machine-readable file (layout.STAGE_EVIDENCE) says, as the stage itself reads it
    (its `file_says`): the stage builds its record from this, and tasks/verdict.py holds the record to it."""

    failure: str  # "" when the file says the stage passed; else what it says instead, e.g. "fail (exit 3): why"
    figures: dict  # the figures the stage's record takes from the file
