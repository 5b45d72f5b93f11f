"""Stage records: the schema every stage writes and evidence reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import layout, records


def test_record_round_trips_through_its_file(tmp_path):
    rec = records.StageRecord(
        "probe", records.StageStatus.FAIL, "no driver", figures={"gpu_count": 0}, files=["env_info.txt"]
    )
    path = records.write(tmp_path, rec)
    assert path == tmp_path / layout.STAGES_DIR / "probe.json"
    assert json.loads(path.read_text())["schema"] == records.SCHEMA
    assert records.read(tmp_path, "probe") == rec
    assert not list(path.parent.glob("*.tmp"))  # written atomically


def test_reason_is_always_one_line():
    rec = records.StageRecord("install", records.StageStatus.FAIL, "pip failed:\n  no matching\tdistribution  ")
    assert rec.reason == "pip failed: no matching distribution"


@pytest.mark.parametrize("kw", [{"stage": "nope", "status": "pass"}, {"stage": "probe", "status": "ok"}])
def test_unknown_stage_or_status_is_refused(kw):
    with pytest.raises(ValueError):
        records.StageRecord(**kw)


def test_read_all_returns_only_recorded_stages_in_order(tmp_path):
    for stage in ("train", "probe"):
        records.write(tmp_path, records.StageRecord(stage, records.StageStatus.PASS))
    assert list(records.read_all(tmp_path)) == ["probe", "train"]
    assert records.read(tmp_path, "install") is None


def test_read_ignores_fields_a_newer_writer_added(tmp_path):
    path = layout.stage_record_path(tmp_path, "probe")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"stage": "probe", "status": "pass", "added_later": 1}))
    assert records.read(tmp_path, "probe").status == records.StageStatus.PASS


def test_timer_records_start_end_and_duration():
    t = records.Timer.start()
    rec = t.record("train", records.StageStatus.SKIP, "not run: probe failed", figures={"a": 1})
    assert rec.started and rec.ended and rec.duration_s >= 0
    assert (rec.stage, rec.status, rec.figures) == ("train", records.StageStatus.SKIP, {"a": 1})
    assert not rec.ok and records.StageRecord("train", records.StageStatus.PASS).ok


def test_a_record_names_the_machine_it_ran_on_and_an_old_record_none(tmp_path):
    """The host ties a run's stages to one machine (tasks/verdict.py); a record from before the field has
    none, never this machine's name."""
    import socket

    rec = records.Timer.start().record("probe", records.StageStatus.PASS)
    assert rec.host == socket.gethostname()
    records.write(tmp_path, rec)
    assert records.read(tmp_path, "probe").host == socket.gethostname()
    path = layout.stage_record_path(tmp_path, "train")
    path.write_text(json.dumps({"stage": "train", "status": "pass"}))
    assert records.read(tmp_path, "train").host == ""


def test_a_reason_cannot_carry_an_escape_sequence_or_a_second_line():
    rec = records.StageRecord("probe", records.StageStatus.FAIL, "bad\x1b[2J name\u2028## Gate")
    assert rec.reason == "bad\\x1b[2J name ## Gate"


def test_stage_statuses_are_words_apart_from_a_single_checks_status():
    from tasks import cuda_rules

    assert set(records.StageStatus.ALL) == {"pass", "fail", "skip", "interrupted", "running"}
    check_words = {v for k, v in vars(cuda_rules).items() if k in ("PASS", "FAIL", "SKIP", "WARN")}
    assert not check_words & set(records.StageStatus.ALL)


def test_the_stage_table_names_every_stage_in_order():
    from tasks import stage

    assert tuple(stage.MODULES) == layout.STAGES
    assert all(stage.MODULES[name].__name__ == f"tasks.{name}" for name in layout.STAGES)


def test_a_record_that_cannot_replace_the_old_one_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The evidence stage seals every file of the run: a failed write must not leave stages/*.json.tmp."""
    rec = records.Timer.start().record("probe", records.StageStatus.PASS)
    records.write(tmp_path, rec)

    def refuse(self, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "replace", refuse)
    with pytest.raises(PermissionError):
        records.write(tmp_path, rec)
    assert sorted(p.name for p in (tmp_path / layout.STAGES_DIR).iterdir()) == ["probe.json"]


def test_a_password_in_a_url_never_reaches_a_record(tmp_path):
    """An index URL with a user and password (--deps-index-url) was quoted whole in install's reason, so the
    sealed README, summary.json and stage records carried it. Every record's reason and text figures go
    through the redaction of URLs' credentials (tasks/redact.py)."""
    url = "https://user:secret123@pkgs.example/simple/?token=abc123"
    rec = records.StageRecord(
        "install",
        records.StageStatus.FAIL,
        f"the gpu_packages source (--deps-index-url {url}) is the problem",
        figures={"source": url, "nested": {"url": url}, "items": [url], "count": 3},
    )
    records.write(tmp_path, rec)
    text = layout.stage_record_path(tmp_path, "install").read_text()
    assert "secret123" not in text and "abc123" not in text
    assert "pkgs.example/simple/" in records.read(tmp_path, "install").reason
    assert records.read(tmp_path, "install").figures["count"] == 3


def test_a_full_disk_names_the_record_and_says_to_free_space(tmp_path, monkeypatch):
    """ENOSPC from a write carries no file name: the line read `cannot write None (...)`, with the fix for a
    read-only folder."""
    import errno
    from pathlib import Path as P

    from tasks import stage

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(P, "write_text", full)
    with pytest.raises(OSError) as caught:
        records.write(tmp_path, records.StageRecord("probe", records.StageStatus.RUNNING))
    line = stage.file_error(caught.value)
    assert line == (
        f"cannot write {layout.stage_record_path(tmp_path, 'probe')}: the disk is full (No space left on device); "
        "free space on it, or pass --run-dir DIR on another disk"
    )
    assert "None" not in stage.file_error(OSError(errno.EACCES, "Permission denied"))
