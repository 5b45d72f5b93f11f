"""What a venv (or another interpreter) holds, asked from its own Python; nothing here imports torch.

- `verify(python)`: torch's facts (training_pt/verify_torch.py, run isolated by proc's launcher), as JSON;
- `dists(python)`: its Python tags, purelib and distributions; `freeze(python)`: `pip freeze`;
- `record_hashes(dists)`: the sha256 of the RECORD file of torch, triton and the nvidia-* dists (a
  different wheel with the same version string has a different RECORD);
- `inspect_source(python)`: the interpreter a `provisioned` channel reuses, run as its user runs it;
- `resolve_python(spec)`, `bootstrap_pip(python)`, `constraints(dists)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from tasks import identity, jsonfile, layout, proc
from tasks.identity import normalize
from tasks.installers import FAILED, NO_TORCH, CommandLog, StepFailed, last_error

TOOLING = {"pip", "setuptools", "wheel"}  # never pinned in the constraints of the second step
HASHED = re.compile(r"^(torch|triton|pytorch-triton|nvidia-.*)$")  # the dists whose RECORD the marker keeps

# Run with the interpreter whose torch a `provisioned` channel reuses, exactly as its user runs it
# (its own environment, PYTHONPATH included), from a neutral folder.
SOURCE_SCRIPT = r"""
import importlib.util, json, os, sys, sysconfig
std = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
dirs = []
for p in sys.path:
    if not p or not os.path.isdir(p):
        continue
    rp = os.path.realpath(p)
    in_std = any(rp == s or rp.startswith(s + os.sep) for s in std)
    if in_std and "site-packages" not in rp and "dist-packages" not in rp:
        continue
    if p not in dirs:
        dirs.append(p)
spec = importlib.util.find_spec("torch")
print(json.dumps({"executable": sys.executable, "prefix": sys.prefix,
                  "base_executable": getattr(sys, "_base_executable", None) or sys.executable,
                  "version": "%d.%d" % sys.version_info[:2], "site_dirs": dirs,
                  "torch": spec.origin if spec else None}))
"""


def _json_line(out: str) -> dict | None:
    """The last line of `out` that starts with "{", as jsonfile parses it; None where none, or one it refuses."""
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
    try:
        return jsonfile.parse(line) if line else None
    except jsonfile.Unreadable:
        return None


def run_verifier(python: Path, log: CommandLog, *argv: str) -> tuple[int, str]:
    """The one place that launches training_pt/verify_torch.py with a venv's Python (proc's launcher: isolated)."""
    return log.run(proc.gpu_command(python, layout.VERIFY_MODULE, list(argv)), echo=False, whole_env=proc.gpu_env())


def verify(python: Path, log: CommandLog) -> dict:
    """torch's facts from `python`, or {"import_error": ...} when the script fails."""
    rc, out = run_verifier(python, log)
    facts = _json_line(out)
    return (
        facts if facts is not None else {"import_error": f"verification script failed (exit {rc}): {last_error(out)}"}
    )


def dists(python: Path, log: CommandLog) -> dict:
    rc, out = run_verifier(python, log, "--env")
    info = _json_line(out)
    if rc != 0 or info is None:
        raise StepFailed(FAILED, f"{python} does not run (exit {rc}): {last_error(out)}")
    return info


def freeze(python: Path, log: CommandLog) -> str:
    rc, out = log.run(freeze_command(python), echo=False)
    return out if rc == 0 else freeze_without_pip(python, log)


def freeze_command(python: Path) -> list:
    return [python, "-I", "-m", "pip", "freeze"]


def freeze_without_pip(python: Path, log: CommandLog) -> str:
    listed = dists(python, log)["dists"]  # no pip in the venv: the same list, from importlib.metadata
    return "".join(f"{d['name']}=={d['version']}\n" for d in sorted(listed, key=lambda d: d["name"].lower()))


@contextlib.contextmanager
def freezing(python: Path, log: CommandLog):
    """`freeze(python)` running in the background while the block runs (pip's second overlaps it); yields a
    function that awaits it and returns its text. Awaited (and logged) when the block ends in any case."""
    started = log.start(freeze_command(python))
    result: list[str] = []

    def text() -> str:
        if not result:
            rc, out = log.finish(started)
            result.append(out if rc == 0 else freeze_without_pip(python, log))
        return result[0]

    try:
        yield text
    finally:
        if not result:
            log.finish(started)


DISTRIBUTIONS = "every distribution (name==version)"  # record_hashes' key for the venv's whole list


def record_hashes(info: dict) -> dict[str, str]:
    """{"torch==2.9.0+cu128": sha256 of its RECORD, ...} for torch, triton and the nvidia-* dists, and under
    DISTRIBUTIONS the sha256 of the sorted name==version list of every other one but pip's tooling: a
    gpu_package or a dependency removed or changed since install is a change too."""
    out, listed = {}, []
    for d in info.get("dists", []):
        if HASHED.match(normalize(d["name"])):
            record = identity.record_in(d["location"], d["name"], d["version"])
            out[f"{d['name']}=={d['version']}"] = identity.sha256_of(record) if record else "no RECORD"
        elif normalize(d["name"]) not in TOOLING:
            listed.append(f"{normalize(d['name'])}=={d['version']}")
    out[DISTRIBUTIONS] = hashlib.sha256("\n".join(sorted(listed)).encode()).hexdigest()
    return out


def constraints(info: dict, path: Path) -> Path:
    """Pin every distribution the venv sees (but pip's own tooling) to its exact version."""
    lines = [
        f"{d['name']}=={d['version']}"
        for d in info["dists"]
        if d["name"].lower() not in TOOLING
        and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", d["name"])
        and re.fullmatch(r"[0-9][0-9A-Za-z.+!_-]*", d["version"])
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- interpreters


def default_python3(venv: Path) -> str | None:
    """The first python3 on PATH, skipping nox's own environments (`.nox/…`: in script mode nox puts
    its venv first on PATH) and the GPU venv itself (and its staging siblings)."""
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d:
            continue
        path = Path(d).absolute()
        if ".nox" in path.parts or any(part == venv.name or part.startswith(f"{venv.name}.") for part in path.parts):
            continue
        candidate = path / "python3"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def resolve_python(spec: str | None, venv: Path) -> str | None:
    if spec is None:
        return default_python3(venv)
    if os.sep in spec:  # a file that can run: a folder (--from-python /tmp) is no interpreter
        return spec if Path(spec).is_file() and os.access(spec, os.X_OK) else None
    return shutil.which(spec)


def inspect_source(python: str | None, wanted: str, venv: Path, log: CommandLog, workdir: Path) -> dict:
    """Facts about the interpreter a provisioned channel reuses (run as its user runs it)."""
    if python is None:
        raise StepFailed(NO_TORCH, f"{wanted} not found; pass --from-python PATH")
    res = subprocess.run([python, "-c", SOURCE_SCRIPT], capture_output=True, text=True, cwd=workdir, errors="replace")
    log.record([python, "-c", "<inspect site-packages and torch>"], res.stdout + res.stderr, res.returncode)
    info = _json_line(res.stdout)
    if res.returncode != 0 or info is None:
        raise StepFailed(NO_TORCH, f"{python} does not run (exit {res.returncode})")
    prefix, venv = Path(info["prefix"]).resolve(), venv.resolve()
    if prefix == venv or prefix.name.startswith(f"{venv.name}.") and prefix.parent == venv.parent:
        raise StepFailed(
            NO_TORCH,
            f"{python} is .venv-gpu's own Python; pass --from-python with the "
            "interpreter that has the CUDA torch (e.g. /opt/torch/.venv/bin/python3)",
        )
    if not info["torch"]:
        raise StepFailed(
            NO_TORCH,
            f"{python} ({info['executable']}) has no torch module; pass --from-python with an interpreter that can",
        )
    return info


def pip_wheels(wheelhouse: Path | None) -> list[Path]:
    """pip wheels at hand, offline: --wheelhouse, then those bundled with nox's Python or virtualenv."""
    dirs = [wheelhouse] if wheelhouse else []
    for module, sub in (("ensurepip", "_bundled"), ("virtualenv", "seed/wheels/embed")):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec and spec.origin:
            dirs.append(Path(spec.origin).parent / sub)
    return [w for d in dirs if d.is_dir() for w in sorted(d.glob("pip-*-py3-none-any.whl"), reverse=True)]


def bootstrap_pip(python: Path, log: CommandLog, wheelhouse: Path | None) -> str:
    """Make `python -m pip` work in a venv made --without-pip: install pip from a pip wheel at hand."""
    for whl in pip_wheels(wheelhouse):
        rc, _ = log.run(
            [python, "-I", f"{whl}/pip", "install", "--no-index", "--disable-pip-version-check", "--no-input", whl]
        )
        if rc == 0:
            return f"pip bootstrapped from {whl}"
    raise StepFailed(
        FAILED,
        f"no pip for the new venv ({python}): its base Python has no ensurepip and "
        "no pip wheel was found; install python3-venv, or put a pip wheel in --wheelhouse",
    )
