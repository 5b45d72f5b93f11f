"""Tiny wheels and PEP 503 indexes for the install tests (no setuptools, no network beyond 127.0.0.1).

`build_wheel` writes a real wheel: the package files plus `*.dist-info/` METADATA, WHEEL and a RECORD
with sha256 digests, zipped. `standin_torch` builds a stand-in `torch` that reports fixed facts
(version, CUDA, devices) through the handful of attributes the install stage reads, and computes
nothing. `write_index` lays wheels out as a simple index that real pip (and uv) read, as `file://`;
`served_with_basic_auth` serves such folders over HTTP on 127.0.0.1 to one user and password only, as a
private index behind credentials does.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import re
import threading
import zipfile
from pathlib import Path

from tasks.identity import normalize


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def build_wheel(
    dest: Path,
    name: str,
    version: str,
    files: dict[str, str],
    *,
    requires: list[str] | tuple = (),
    tag: str = "py3-none-any",
) -> Path:
    """Write `<name>-<version>-<tag>.whl` into dest and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    dist = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    info = f"{dist}.dist-info"
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {r}" for r in requires]
    contents = dict(files)
    contents[f"{info}/METADATA"] = "\n".join(metadata) + "\n"
    contents[f"{info}/WHEEL"] = f"Wheel-Version: 1.0\nGenerator: tests/wheels.py\nRoot-Is-Purelib: true\nTag: {tag}\n"
    record = [f"{path},{_record_hash(text.encode())},{len(text.encode())}" for path, text in contents.items()]
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = dest / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, text in contents.items():
            zf.writestr(path, text)
    return wheel


def standin_torch(
    dest: Path,
    version: str,
    cuda: str | None,
    *,
    available: bool = True,
    capabilities: tuple = ((9, 0),),
    arch_list: tuple = ("sm_80", "sm_90"),
    cudnn: int | None = 91002,
    tag: str = "py3-none-any",
    requires: tuple = (),
) -> Path:
    """A `torch` wheel that reports `version`, `torch.version.cuda == cuda` and the given devices.

    cuda=None makes a CPU build: no CUDA, `backends.cuda.is_built()` False, no devices.
    """
    is_cuda = cuda is not None
    count = len(capabilities) if (is_cuda and available) else 0
    files = {
        "torch/__init__.py": (
            '"""Stand-in for PyTorch (tests/wheels.py): reports fixed facts, computes nothing."""\n'
            f"__version__ = {version!r}\n"
            "from torch import backends, cuda, version  # noqa: E402,F401\n"
        ),
        "torch/version.py": (
            f"__version__ = {version!r}\ncuda = {cuda!r}\n"
            f"git_version = {hashlib.sha1(version.encode()).hexdigest()!r}\n"
        ),
        "torch/cuda.py": (
            f"_CAPS = {list(capabilities) if count else []!r}\n"
            f"_ARCHS = {list(arch_list) if is_cuda else []!r}\n"
            f"def is_available():\n    return {bool(count)!r}\n"
            "def device_count():\n    return len(_CAPS)\n"
            "def get_arch_list():\n    return list(_ARCHS)\n"
            "def get_device_capability(i=0):\n    return tuple(_CAPS[i])\n"
            "def get_device_name(i=0):\n    return f'Stand-in GPU {i}'\n"
        ),
        "torch/backends/__init__.py": "from torch.backends import cuda, cudnn  # noqa: F401\n",
        "torch/backends/cuda.py": f"def is_built():\n    return {is_cuda!r}\n",
        "torch/backends/cudnn.py": f"def version():\n    return {cudnn if is_cuda else None!r}\n",
    }
    return build_wheel(dest, "torch", version, files, tag=tag, requires=list(requires))


def simple_wheel(dest: Path, name: str, version: str, requires: tuple = ()) -> Path:
    """A one-module pure-Python package `name` (importable as name with '-' -> '_')."""
    module = normalize(name).replace("-", "_")
    return build_wheel(
        dest, name, version, {f"{module}/__init__.py": f"__version__ = {version!r}\n"}, requires=list(requires)
    )


def write_index(root: Path, wheels: list[Path]) -> str:
    """Lay `wheels` out as a PEP 503 simple index under root; return its file:// URL."""
    root.mkdir(parents=True, exist_ok=True)
    projects: dict[str, list[Path]] = {}
    for w in wheels:
        projects.setdefault(normalize(w.name.split("-")[0]), []).append(w)
    for project, files in projects.items():
        d = root / project
        d.mkdir(parents=True, exist_ok=True)
        links = []
        for w in files:
            data = w.read_bytes()
            (d / w.name).write_bytes(data)
            links.append(f'<a href="{w.name}#sha256={hashlib.sha256(data).hexdigest()}">{w.name}</a><br/>')
        (d / "index.html").write_text("<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n")
    index = "\n".join(f'<a href="{p}/">{p}</a><br/>' for p in sorted(projects))
    (root / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{index}\n</body></html>\n")
    return root.resolve().as_uri()


@contextlib.contextmanager
def served_with_basic_auth(root: Path, user: str, password: str):
    """Serve folder `root` on 127.0.0.1 (a free port) to requests carrying this user and password (HTTP basic
    auth), 401 to any other; yields the base URL without credentials, e.g. `http://127.0.0.1:PORT`."""
    wanted = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def send_head(self):
            if self.headers.get("Authorization") != wanted:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="m40 test index"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return super().send_head()

        def log_message(self, *args):  # quiet: pytest shows a failing test's pip output instead
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
