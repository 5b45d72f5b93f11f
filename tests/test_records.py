"""Stage records: the schema every stage writes and evidence reads."""

from __future__ import annotations

import json

import pytest

from tasks import layout, records


def test_record_round_trips_through_its_file(tmp_path):
    rec = records.StageRecord("probe", records.FAIL, "no driver", figures={"gpu_count": 0}, files=["env_info.txt"])
    path = records.write(tmp_path, rec)
    assert path == tmp_path / layout.STAGES_DIR / "probe.json"
    assert json.loads(path.read_text())["schema"] == records.SCHEMA
    assert records.read(tmp_path, "probe") == rec
    assert not list(path.parent.glob("*.tmp"))  # written atomically


def test_reason_is_always_one_line():
    rec = records.StageRecord("install", records.FAIL, "pip failed:\n  no matching\tdistribution  ")
    assert rec.reason == "pip failed: no matching distribution"


@pytest.mark.parametrize("kw", [{"stage": "nope", "status": "pass"}, {"stage": "probe", "status": "ok"}])
def test_unknown_stage_or_status_is_refused(kw):
    with pytest.raises(ValueError):
        records.StageRecord(**kw)


def test_read_all_returns_only_recorded_stages_in_order(tmp_path):
    for stage in ("train", "probe"):
        records.write(tmp_path, records.StageRecord(stage, records.PASS))
    assert list(records.read_all(tmp_path)) == ["probe", "train"]
    assert records.read(tmp_path, "install") is None


def test_read_ignores_fields_a_newer_writer_added(tmp_path):
    path = layout.stage_record_path(tmp_path, "probe")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"stage": "probe", "status": "pass", "added_later": 1}))
    assert records.read(tmp_path, "probe").status == records.PASS


def test_timer_records_start_end_and_duration():
    with records.Timer() as t:
        pass
    rec = t.record("train", records.SKIP, "not run: probe failed", figures={"a": 1})
    assert rec.started and rec.ended and rec.duration_s >= 0
    assert (rec.stage, rec.status, rec.figures) == ("train", records.SKIP, {"a": 1})
    assert not rec.ok and records.StageRecord("train", records.PASS).ok
