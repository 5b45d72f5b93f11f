"""tasks/jsonfile.py: the one way a run's JSON files are read back (stage records, each stage's own file,
summary.json): a JSON object of at most MAX_BYTES, UTF-8, nested at most MAX_DEPTH deep; anything else is
Unreadable with a one-line reason, never a crash, a hang or memory spent on a file this tool never writes."""

from __future__ import annotations

import json
import os

import pytest

from tasks import evidence, jsonfile, layout


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
