"""The identity of the torch a stage ran: {version, file, record_sha256}, one rule for every stage.

install (its verifier), cuda_check (the checker) and train (train.py) each record
`torch_identity = identity.of_torch(torch.__file__, torch.__version__)`; tasks/verdict.py FAILs a run
whose stages disagree. The RECORD hash tells apart two wheels with one version string (a force-
reinstall in place). Torch-free: it reads the dist-info beside the imported package, never
importlib.metadata (which a PYTHONPATH could point at another copy).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def record_of(package_file: str | Path, dist: str = "torch") -> Path | None:
    """The RECORD of the dist installed beside the package whose __init__.py is `package_file`."""
    site = Path(package_file).resolve().parent.parent
    found = sorted(site.glob(f"{dist}-*.dist-info/RECORD"))
    return found[0] if len(found) == 1 else None


def of_torch(torch_file: str | Path, version: str) -> dict:
    """{version, file, record_sha256}; record_sha256 is "" when no single RECORD sits beside it."""
    record = record_of(torch_file)
    digest = hashlib.sha256(record.read_bytes()).hexdigest() if record is not None else ""
    return {"version": str(version), "file": str(Path(torch_file).resolve()), "record_sha256": digest}
