"""Reading back the JSON files this tool reads: a run's stage records, each stage's own file (gpus.json,
cuda_check.json, train_result.json), summary.json; and beside them the .venv-gpu install marker, a lock file's
holder, pip's --report, multinode's all-reduce result. One rule for all of them, because a folder may hold
anything (a corrupted disk, a hand edit, a hostile copy): a file is a regular file of at most MAX_BYTES, UTF-8,
one JSON object nested at most MAX_DEPTH deep. Anything else is Unreadable, with a one-line reason.

Never a crash, a hang or memory spent on a file this tool could not have written: a FIFO is never opened, no
more than MAX_BYTES is read, and nesting is measured without recursion (a reader's own recursion, such as
records.without_credentials, is safe on what passes). Never imports torch.

Text already held (a child's stdout: dcgmi's JSON, the verifier's line) goes through `parse`: the same rule
but for the size cap and UTF-8, which are about reading a file (what a child printed is in memory already).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tasks import text

MAX_BYTES = 16 << 20  # the largest file this tool writes (cuda_check.json) is tens of kilobytes; pip's --report of
# torch's install (some 30 packages with their metadata) is well under a megabyte
MAX_DEPTH = 64  # the deepest it writes nests about six levels
TOO_DEEP = f"nested too deep to read (more than {MAX_DEPTH} levels)"


class Unreadable(ValueError):
    """Why a file is not a JSON object this tool writes, on one line, to follow its name: "too large to be this
    tool's: 17000000 bytes", "not JSON (...)", "nested too deep to read (...)"."""


def read(path: Path) -> dict:
    """The JSON object in the file at `path`; Unreadable for anything else."""
    return parse(read_text(path))


def read_text(path: Path) -> str:
    """The text of the file at `path`: a regular file of at most MAX_BYTES, UTF-8; Unreadable otherwise."""
    path = Path(path)
    if not path.is_file():
        raise Unreadable("not a regular file")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
            if len(data) > MAX_BYTES:
                raise Unreadable(f"too large to be this tool's: {os.fstat(f.fileno()).st_size} bytes")
    except OSError as e:
        raise Unreadable(f"unreadable ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unreadable(f"not UTF-8 ({e.reason} at byte {e.start})") from None


def parse(content: str) -> dict:
    """The JSON object `content` (a file's text, or a child's output) holds; Unreadable when it is not JSON, not
    an object or nested too deep."""
    try:
        document = json.loads(content)
    except RecursionError:
        raise Unreadable(TOO_DEEP) from None
    except ValueError as e:
        raise Unreadable(f"not JSON ({text.one_line(e)})") from None
    if not isinstance(document, dict):
        raise Unreadable("not a JSON object")
    if deeper_than(document, MAX_DEPTH):
        raise Unreadable(TOO_DEEP)
    return document


def deeper_than(value, levels: int) -> bool:
    """Whether lists and objects in `value` nest more than `levels` deep (`{}` is one level), found without
    recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > levels:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
