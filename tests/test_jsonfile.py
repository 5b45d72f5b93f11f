"""tasks/jsonfile.py: the one way a run's JSON files are read back (stage records, each stage's own file,
summary.json): a JSON object of at most MAX_BYTES, UTF-8, nested at most MAX_DEPTH deep; anything else is
Unreadable with a one-line reason, never a crash, a hang or memory spent on a file this tool never writes."""

from __future__ import annotations

import json
import os

import pytest

from tasks import channel_fit, cuda_check, evidence, fleet, jsonfile, layout, records, train
from tasks.config import ConfigError


def test_a_json_object_reads_back_as_written(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"a": [1, {"b": "é"}]}, ensure_ascii=False), encoding="utf-8")
    assert jsonfile.read(path) == {"a": [1, {"b": "é"}]}


def nested(depth: int) -> str:
    return '{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("{not json", "not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        ("", "not JSON (Expecting value: line 1 column 1 (char 0))"),
        ("[1, 2]", "not a JSON object"),
        (nested(jsonfile.MAX_DEPTH + 1), f"nested too deep to read (more than {jsonfile.MAX_DEPTH} levels)"),
        ("[" * 100_000 + "]" * 100_000, f"nested too deep to read (more than {jsonfile.MAX_DEPTH} levels)"),
        ('{"n": 1%s}' % ("0" * 5000), "not JSON (Exceeds the limit (4300 digits) for integer string conversion: "),
    ],
)
def test_what_is_not_a_json_object_this_tool_writes_is_unreadable_with_one_line(body, why):
    with pytest.raises(jsonfile.Unreadable) as e:
        jsonfile.parse(body)
    assert str(e.value).startswith(why) and "\n" not in str(e.value), str(e.value)


def test_a_document_nested_exactly_as_deep_as_allowed_reads():
    assert jsonfile.parse(nested(jsonfile.MAX_DEPTH))["a"] is not None


def test_a_file_over_the_cap_is_too_large_without_being_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonfile, "MAX_BYTES", 100)
    path = tmp_path / "x.json"
    path.write_text('{"a": "' + "x" * 200 + '"}')
    with pytest.raises(jsonfile.Unreadable, match=r"^too large to be this tool's: 209 bytes$"):
        jsonfile.read(path)
    path.write_text('{"a": "' + "x" * 91 + '"}')  # 100 bytes: read
    assert jsonfile.read(path) == {"a": "x" * 91}


def test_bytes_that_are_not_utf8_are_unreadable(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(jsonfile.Unreadable, match=r"^not UTF-8 \("):
        jsonfile.read(path)


def test_what_is_not_a_regular_file_is_never_opened(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    for path in (fifo, tmp_path, tmp_path / "missing.json"):
        with pytest.raises(jsonfile.Unreadable, match=r"^not a regular file$"):
            jsonfile.read(path)


def test_the_unreadable_reason_is_a_value_error_for_callers_that_catch_those():
    assert issubclass(jsonfile.Unreadable, ValueError)


def test_the_own_files_evidence_holds_the_records_to_say_why_one_cannot_be_read(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonfile, "MAX_BYTES", 10)
    (tmp_path / layout.TRAIN_RESULT).write_text('{"status": "pass"}')
    (tmp_path / layout.GPUS_JSON).write_text("{}")
    own = evidence.own_files(tmp_path)
    assert own[layout.GPUS_JSON] == "{}" and layout.CUDA_CHECK_JSON not in own
    assert str(own[layout.TRAIN_RESULT]) == "too large to be this tool's: 18 bytes"


# Every reader of a run's JSON files, each reading a file nested deeper than MAX_DEPTH (but not so deep that
# Python's own parser gives up): they share jsonfile's rule, so none of them takes it.
def stage_record(tmp_path, body: str):
    path = layout.stage_record_path(tmp_path, "train")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return records.read(tmp_path, "train")


READERS = {
    "train.read_result": lambda d, body: train.read_result(write(d / layout.TRAIN_RESULT, body).parent),
    "cuda_check.read_result": lambda d, body: cuda_check.read_result(write(d / layout.CUDA_CHECK_JSON, body)),
    "evidence.read_gpus": lambda d, body: evidence.read_gpus(write(d / layout.GPUS_JSON, body).parent) or None,
    "fleet.read_json": lambda d, body: fleet.read_json(write(d / layout.SUMMARY_FILE, body)),
}


def write(path, body: str):
    path.write_text(body)
    return path


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_of_a_runs_json_refuses_what_jsonfile_refuses(tmp_path, reader):
    body = json.dumps({"status": "pass", "exit_code": 0, "figures": {"thresholds": "DEEP"}})
    deep = body.replace('"DEEP"', "[" * 100 + "]" * 100)
    assert READERS[reader](tmp_path, deep) is None
    assert READERS[reader](tmp_path, body) is not None


def test_a_stage_record_nested_too_deep_is_a_fail_record_naming_why(tmp_path):
    deep = json.dumps({"stage": "train", "status": "pass", "figures": {"x": "DEEP"}}).replace(
        '"DEEP"', "[" * 100 + "]" * 100
    )
    rec = stage_record(tmp_path, deep)
    assert rec.status == records.StageStatus.FAIL
    assert rec.reason.startswith("stages/train.json is not a valid stage record (nested too deep to read"), rec.reason


def test_install_reads_the_runs_gpus_json_by_the_same_rule(tmp_path):
    deep = json.dumps({"driver_cuda": "13.0", "gpus": [{"name": "DEEP"}]}).replace('"DEEP"', "[" * 100 + "]" * 100)
    (tmp_path / layout.GPUS_JSON).write_text(deep)
    with pytest.raises(
        ConfigError, match=r"gpus.json cannot be read \(nested too deep to read .*\); run `nox -s probe`"
    ):
        channel_fit.machine(tmp_path)
