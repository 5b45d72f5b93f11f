"""A folder's contents as a comparable value, for the tests that check nothing earlier was touched.

Only for tests.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file (content hash), folder ("dir") and symlink (target) under root, by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out
