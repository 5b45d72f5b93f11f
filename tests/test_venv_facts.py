"""tasks/venv_facts.py: what a venv holds (the RECORD hashes its marker keeps)."""

from __future__ import annotations

import hashlib

from tasks import venv_facts


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
