"""tasks/venv_facts.py: what a venv holds (the RECORD hashes its marker keeps)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tasks import installers, venv_facts


def test_record_hashes_keeps_torch_and_the_nvidia_dists_and_says_when_a_record_is_missing(tmp_path):
    info = tmp_path / "torch-2.11.0+cu128.dist-info"
    info.mkdir()
    (info / "RECORD").write_text("torch/__init__.py,sha256=abc,10\n")
    dists = [
        {"name": "torch", "version": "2.11.0+cu128", "location": str(tmp_path)},
        {"name": "nvidia-cublas-cu12", "version": "12.8.4.1", "location": str(tmp_path)},
        {"name": "numpy", "version": "2.1.0", "location": str(tmp_path)},
    ]
    assert venv_facts.record_hashes({"dists": dists}) == {
        "torch==2.11.0+cu128": hashlib.sha256((info / "RECORD").read_bytes()).hexdigest(),
        "nvidia-cublas-cu12==12.8.4.1": "no RECORD",
        venv_facts.DISTRIBUTIONS: hashlib.sha256(b"numpy==2.1.0").hexdigest(),  # the rest, by name and version
    }
    pip = {"name": "pip", "version": "25.0", "location": str(tmp_path)}
    assert venv_facts.record_hashes({"dists": [*dists, pip]}) == venv_facts.record_hashes({"dists": dists})


def test_from_python_names_a_file_that_runs_not_a_folder(tmp_path):
    from tasks import venv_facts

    venv = tmp_path / ".venv-gpu"
    assert venv_facts.resolve_python(str(tmp_path), venv) is None  # --from-python /tmp: a folder
    plain = tmp_path / "python3"
    plain.write_text("#!/bin/sh\n")
    assert venv_facts.resolve_python(str(plain), venv) is None  # not executable
    plain.chmod(0o755)
    assert venv_facts.resolve_python(str(plain), venv) == str(plain)


@pytest.mark.parametrize(
    "line",
    ['{"torch_version": ' + "[" * 100_000, '{"torch_version": ' + "[" * 100 + "]" * 100 + "}"],
    ids=["deep", "deeper than 64"],
)
def test_a_verifier_line_that_jsonfile_cannot_read_is_a_failed_verification_not_a_crash(monkeypatch, line):
    """The verifier's JSON line is held to jsonfile's rule: nesting that stops Python's parser, or deeper than
    this tool ever writes, is the verifier failing (its documented fallback), never a RecursionError."""
    monkeypatch.setattr(venv_facts, "run_verifier", lambda python, log, *argv: (0, "noise\n" + line + "\n"))
    facts = venv_facts.verify(Path("python"), None)
    assert list(facts) == ["import_error"] and facts["import_error"].startswith("verification script failed (exit 0)")
    with pytest.raises(installers.StepFailed, match=r"^install failed: python does not run \(exit 0\)"):
        venv_facts.dists(Path("python"), None)
