"""The identity of the torch a stage ran: {version, file, record_sha256}, one rule for every stage.

install (its verifier), cuda_check (the checker) and train (train.py) each record
`torch_identity = identity.of_torch(torch.__file__, torch.__version__)`; tasks/verdict.py FAILs a run
whose stages disagree. The RECORD hash tells apart two wheels with one version string (a force-
reinstall in place). Torch-free: it reads the dist-info beside the imported package, never
importlib.metadata (which a PYTHONPATH could point at another copy).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path


def normalize(name: str) -> str:
    """A distribution's name as the index compares it (PEP 503): `Foo_Bar.baz` -> `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def record_in(site: str | Path, dist: str, version: str | None = None) -> Path | None:
    """The RECORD of `dist` (any spelling of its name; at `version` when given) installed in `site`,
    or None unless exactly one such dist-info with a RECORD sits there. The one RECORD reader."""
    found = []
    for info_dir in sorted(Path(site).glob("*.dist-info")):
        name, _, found_version = info_dir.name[: -len(".dist-info")].rpartition("-")
        record = info_dir / "RECORD"
        if normalize(name) == normalize(dist) and version in (None, found_version) and record.is_file():
            found.append(record)
    return found[0] if len(found) == 1 else None


def sha256_of(record: Path) -> str:
    return hashlib.sha256(record.read_bytes()).hexdigest()


def of_torch(torch_file: str | Path, version: str) -> dict:
    """{version, file, record_sha256}; record_sha256 is "" when no single RECORD sits beside it."""
    record = record_in(Path(torch_file).resolve().parent.parent, "torch")
    digest = sha256_of(record) if record is not None else ""
    return {"version": str(version), "file": str(Path(torch_file).resolve()), "record_sha256": digest}
