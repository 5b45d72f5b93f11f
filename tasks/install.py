"""Stage install: a verified CUDA build of PyTorch in `.venv-gpu`, from a channel of configs/channels.yaml.

Channels are tried in order (`--channel NAME`, else `--channels a,b`, else the settings'
`channel_order`) until one installs AND verifies. Each attempt:

1. builds a staging venv next to `.venv-gpu` (`.venv-gpu.staging-<pid>`) with `python -m venv`;
2. installs torch from the channel's source only (kinds `index`/`pypi`: `--index-url`, `wheelhouse`:
   `--no-index --find-links DIR`; binary only, `--pre` where the channel says), isolated from the
   machine's pip config, and checks that every installed file came from that source; a
   `provisioned` channel instead reuses the torch another interpreter imports (a `.pth` file lists
   its site-packages; that environment is never modified);
3. verifies torch with the staging venv's own Python (tasks/verify_torch.py): the channel's CUDA,
   a CUDA build, CUDA available, kernels for every visible GPU;
4. installs the settings' `gpu_packages` from the default index (or `--wheelhouse` /
   `--deps-index-url`), constrained to every version already installed so torch cannot change;
5. swaps the staging venv in (tasks/venvs.py), verifies again there, and writes the marker.

A re-run whose channel is already installed and verifies again is a no-op. Writes torch_version.txt,
requirements-gpu.txt and install_log.txt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks import config, identity, installers, layout, records, venvs
from tasks.config import Channel, ConfigError
from tasks.installers import CommandLog, Installed, StepFailed
from tasks.records import Outcome, StageStatus

DESCRIPTION = ("Install a CUDA build of PyTorch into .venv-gpu from a channel of configs/channels.yaml: "
               "staging venv, one source per step, provenance check, verification, then swap")
REPORT = layout.STAGE_FILES["install"][0]  # torch_version.txt
VERIFY_SCRIPT = Path(__file__).resolve().parent / "verify_torch.py"
TOOLING = {"pip", "setuptools", "wheel"}  # never pinned in the constraints of the second step

# Run with the interpreter whose torch a `provisioned` channel reuses, exactly as its user runs it
# (its own environment, PYTHONPATH included), from a neutral folder.
_SOURCE_SCRIPT = r"""
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

def _csv(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give channel names separated by commas, e.g. cu128,cu124")
    return names


def add_arguments(parser) -> None:
    parser.add_argument("--channel", default=None, metavar="NAME",
                        help="install from this one channel (`nox -s install -p NAME` passes it)")
    parser.add_argument("--channels", type=_csv, default=None, metavar="A,B,...",
                        help="channels to try in order until one installs and verifies "
                             "(default: channel_order of configs/m40.yaml, i.e. cu128 then cu124)")
    parser.add_argument("--channels-file", type=Path, default=None, metavar="PATH",
                        help=f"channel catalog to use instead of configs/channels.yaml (also ${layout.CHANNELS_ENV})")
    parser.add_argument("--from-python", default=None, metavar="PATH",
                        help="interpreter whose CUDA torch a provisioned channel (system) reuses, default the "
                             "first python3 on PATH; for other channels, the Python .venv-gpu is built from "
                             "(default: the one running nox)")
    parser.add_argument("--wheelhouse", type=Path, default=None, metavar="DIR",
                        help="folder of wheels: the source of the wheelhouse channel, and of the gpu_packages "
                             "step for any channel (offline: no index at all)")
    parser.add_argument("--installer", choices=("auto", "pip", "uv"), default="auto",
                        help="auto: uv when on PATH (faster for the GB of CUDA wheels), else pip")
    parser.add_argument("--keep-pip-config", action="store_true",
                        help="keep the machine's pip/uv config files and PIP_*/UV_* variables (e.g. a proxy "
                             "set there); by default they are ignored; provenance is checked either way")
    parser.add_argument("--deps-index-url", default=None, metavar="URL",
                        help="index for the gpu_packages step (default: PyPI)")
    parser.add_argument("--venv", type=Path, default=None, metavar="PATH",
                        help="the GPU venv to manage (default .venv-gpu; other stages always use .venv-gpu)")
    parser.add_argument("--reinstall", action="store_true",
                        help="install again even when .venv-gpu already holds a verified install of the channel")


# --------------------------------------------------------------------------- data

@dataclass
class Attempt:
    channel: Channel
    status: str = StageStatus.FAIL
    category: str = ""
    detail: str = ""
    seconds: float = 0.0
    source: str = ""
    installer: str = ""
    files: list = field(default_factory=list)  # Installed
    facts: dict = field(default_factory=dict)  # from verify_torch.py
    provisioned: dict | None = None  # the source interpreter of a provisioned channel
    venv_note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == StageStatus.PASS

    def line(self) -> str:
        if self.ok:
            return f"{self.channel.name}: PASS torch {self.facts.get('torch_version')} ({self.seconds:.1f} s)"
        text = f"{self.channel.name}: {self.category}: {self.detail}"
        if self.channel.retired and self.category in (installers.UNREACHABLE, installers.NO_WHEEL):
            text += f" [{self.channel.retired}]"
        return text

    def summary(self) -> dict:
        return {"channel": self.channel.name, "status": self.status, "category": self.category,
                "detail": self.detail, "seconds": self.seconds, "source": self.source}


@dataclass
class Context:
    run_dir: Path
    args: argparse.Namespace
    catalog: dict
    gpu_packages: list
    venv: Path
    log: CommandLog
    env_line: str
    workdir: Path


def entry_of(ch: Channel) -> dict:
    """The catalog entry that defines what a channel installs (the note is only words)."""
    return {"kind": ch.kind, "cuda": ch.cuda, "index_url": ch.index_url, "pre": ch.pre, "torch": ch.torch,
            "files_from": list(ch.files_from)}


# --------------------------------------------------------------------------- verification

def verify(python: Path, log: CommandLog) -> dict:
    """Run tasks/verify_torch.py with `python` (isolated: -I) and return its JSON facts."""
    rc, out = log.run([python, "-I", VERIFY_SCRIPT], echo=False)
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return {"import_error": f"verification script failed (exit {rc}): {installers._last_error(out)}"}


def arch_covers(arch_list, capability) -> bool:
    """Does torch's arch list run on a device of this compute capability?

    sm_XY (a cubin) runs on the same major with minor >= Y; sm_XYa only on exactly X.Y;
    compute_XY (PTX) is JIT-compiled for any device of capability >= X.Y.
    """
    major, minor = int(capability[0]), int(capability[1])
    for arch in arch_list or []:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", str(arch))
        if not m:
            continue
        kind, amaj, amin, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if suffix == "a":
            ok = (amaj, amin) == (major, minor)
        elif kind == "sm":
            ok = amaj == major and amin <= minor
        else:
            ok = (amaj, amin) <= (major, minor)
        if ok:
            return True
    return False


def _major_minor(version: str | None) -> tuple[int, ...] | None:
    try:
        return config.parse_version(str(version))[:2]
    except ValueError:
        return None


def judge(ch: Channel, facts: dict) -> StepFailed | None:
    """What is wrong with the torch these facts describe, for this channel (None: nothing)."""
    if "import_error" in facts:
        return StepFailed(installers.FAILED, f"torch does not import: {facts['import_error']}")
    version, cuda = facts.get("torch_version", "?"), facts.get("cuda")
    local = version.split("+", 1)[1] if "+" in version else ""
    if cuda is None or local == "cpu" or facts.get("cuda_built") is not True:
        return StepFailed(installers.CPU_BUILD, f"installed torch {version} is a CPU build; refusing")
    if ch.tag and local.startswith("cu") and local != ch.tag:
        return StepFailed(installers.CUDA_MISMATCH,
                          f"wanted {ch.tag} (CUDA {ch.cuda}), got torch {version} (CUDA {cuda}); refusing")
    if ch.cuda and _major_minor(cuda) != _major_minor(ch.cuda):
        return StepFailed(installers.CUDA_MISMATCH, f"wanted CUDA {ch.cuda}, got torch {version} with CUDA {cuda}; refusing")
    if facts.get("cuda_available") is not True and hidden_by_cuda_visible_devices():
        return StepFailed(installers.NOT_USABLE,
                          f"torch {version} is a CUDA {cuda} build but sees no GPU: {HIDDEN_GPUS}")
    if facts.get("cuda_available") is not True:
        return StepFailed(installers.NOT_USABLE,
                          f"torch {version} is a CUDA {cuda} build but torch.cuda.is_available() is "
                          f"{facts.get('cuda_available')}: no GPU it can use (check nvidia-smi, CUDA_VISIBLE_DEVICES, "
                          f"and that the driver supports CUDA {cuda})")
    devices = facts.get("devices") or []
    if not devices:
        return StepFailed(installers.NOT_USABLE, f"torch {version} sees no CUDA device")
    arch_list = facts.get("arch_list") if isinstance(facts.get("arch_list"), list) else []
    for d in devices:
        cap = d.get("capability")
        if not isinstance(cap, list) or not arch_covers(arch_list, cap):
            sm = f"sm_{cap[0]}{cap[1]}" if isinstance(cap, list) else str(cap)
            return StepFailed(installers.NOT_USABLE,
                              f"torch {version} has kernels for {' '.join(arch_list) or 'no architecture'} but GPU "
                              f"{d.get('index')} ({d.get('name')}) is {sm}: not usable on this GPU")
    return None


# --------------------------------------------------------------------------- helpers

def _channel_list(args, catalog: dict, settings: dict) -> list[str]:
    if args.channel and args.channels:
        raise ConfigError(f"give --channel or --channels, not both (got --channel {args.channel} "
                          f"and --channels {','.join(args.channels)})")
    names = [args.channel] if args.channel else (args.channels or list(settings["channel_order"]))
    unknown = [n for n in names if n not in catalog]
    if unknown:
        raise ConfigError(f"unknown channel(s) {', '.join(unknown)}; the catalog {config.channels_file(args.channels_file)} "
                          f"has {', '.join(catalog)}")
    for n in names:
        if catalog[n].kind == "wheelhouse" and args.wheelhouse is None:
            raise ConfigError(f"channel {n} installs from a folder of wheels: pass --wheelhouse DIR")
    return names


def check_inputs(args) -> None:
    """Refuse, before any stage runs, what install would refuse: its catalog, settings, channel names and
    --from-python (ConfigError, exit 2). Called by tasks/validate.py for `nox -s install` and `nox -s m40`."""
    catalog = config.load_channels(args.channels_file)
    _channel_list(args, catalog, config.load_settings(getattr(args, "settings", None)))
    if args.from_python and _resolve_python(args.from_python, Path(args.venv or layout.VENV_GPU).absolute()) is None:
        raise ConfigError(f"--from-python {args.from_python}: no such interpreter; pass the path of a Python")


def _dists(python: Path, log: CommandLog) -> dict:
    rc, out = log.run([python, "-I", VERIFY_SCRIPT, "--env"], echo=False)
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
    if rc != 0 or line is None:
        raise StepFailed(installers.FAILED, f"{python} does not run (exit {rc}): {installers._last_error(out)}")
    return json.loads(line)


def _freeze(python: Path, log: CommandLog) -> str:
    rc, out = log.run([python, "-I", "-m", "pip", "freeze"], echo=False)
    if rc == 0:
        return out
    dists = _dists(python, log)["dists"]  # no pip in the venv: the same list, from importlib.metadata
    return "".join(f"{d['name']}=={d['version']}\n" for d in sorted(dists, key=lambda d: d["name"].lower()))


def _default_python3(venv: Path) -> str | None:
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


def _resolve_python(spec: str | None, venv: Path) -> str | None:
    if spec is None:
        return _default_python3(venv)
    if os.sep in spec:
        return spec if Path(spec).exists() else None
    return shutil.which(spec)


def _inspect_source(python: str | None, ctx: Context) -> dict:
    """Facts about the interpreter a provisioned channel reuses (run as its user runs it)."""
    if python is None:
        what = ctx.args.from_python or "python3 on PATH (outside .nox/ and .venv-gpu)"
        raise StepFailed(installers.NO_TORCH, f"{what} not found; pass --from-python PATH")
    res = subprocess.run([python, "-c", _SOURCE_SCRIPT], capture_output=True, text=True, cwd=ctx.workdir,
                         errors="replace")
    ctx.log.record([python, "-c", "<inspect site-packages and torch>"], res.stdout + res.stderr, res.returncode)
    line = next((ln for ln in reversed(res.stdout.splitlines()) if ln.startswith("{")), None)
    if res.returncode != 0 or line is None:
        raise StepFailed(installers.NO_TORCH, f"{python} does not run (exit {res.returncode})")
    info = json.loads(line)
    prefix = Path(info["prefix"]).resolve()
    venv = ctx.venv.resolve()
    if prefix == venv or prefix.name.startswith(f"{venv.name}.") and prefix.parent == venv.parent:
        raise StepFailed(installers.NO_TORCH, f"{python} is .venv-gpu's own Python; pass --from-python with the "
                                              "interpreter that has the CUDA torch (e.g. /opt/torch/.venv/bin/python3)")
    if not info["torch"]:
        raise StepFailed(installers.NO_TORCH, f"{python} ({info['executable']}) has no torch module; pass "
                                              "--from-python with an interpreter that can")
    return info


def _pip_wheels(wheelhouse: Path | None) -> list[Path]:
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


def _bootstrap_pip(python: Path, ctx: Context) -> str:
    """Make `python -m pip` work in a venv made --without-pip: install pip from a pip wheel at hand."""
    for whl in _pip_wheels(ctx.args.wheelhouse):
        rc, _ = ctx.log.run([python, "-I", f"{whl}/pip", "install", "--no-index", "--disable-pip-version-check",
                             "--no-input", whl])
        if rc == 0:
            return f"pip bootstrapped from {whl}"
    raise StepFailed(installers.FAILED, f"no pip for the new venv ({python}): its base Python has no ensurepip and "
                                        "no pip wheel was found; install python3-venv, or put a pip wheel in --wheelhouse")


def _constraints(dists: dict, path: Path) -> Path:
    """Pin every distribution the venv sees (but pip's own tooling) to its exact version."""
    lines = [f"{d['name']}=={d['version']}" for d in dists["dists"] if d["name"].lower() not in TOOLING
             and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", d["name"])
             and re.fullmatch(r"[0-9][0-9A-Za-z.+!_-]*", d["version"])]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- one attempt

def attempt(ctx: Context, ch: Channel) -> Attempt:
    """Install and verify one channel into a staging venv; swap it in when all is well."""
    a = Attempt(channel=ch)
    t0 = time.perf_counter()
    staging = venvs.staging_path(ctx.venv)
    venvs.discard(staging)
    args = ctx.args
    print(f"install: channel {ch.name} ({ch.kind}) → staging venv {staging}", flush=True)
    try:
        # 1. the staging venv (a source that is plainly not there fails before it is built)
        if ch.kind in ("index", "pypi"):
            src = installers.index_source(ch.index_url or installers.PYPI_SIMPLE, ch.files_from)
        elif ch.kind == "wheelhouse":
            src = installers.wheelhouse_source(args.wheelhouse)
        else:
            src = None
        if src is not None:
            a.source = src.label
            if (why := src.missing()) is not None:
                raise StepFailed(installers.UNREACHABLE, why)
        if ch.kind == "provisioned":
            a.provisioned = _inspect_source(_resolve_python(args.from_python, ctx.venv), ctx)
            base = a.provisioned["base_executable"]
            a.source = f"provisioned: {a.provisioned['executable']}"
        else:
            base = _resolve_python(args.from_python, ctx.venv) if args.from_python else sys.executable
            if base is None:
                raise ConfigError(f"--from-python {args.from_python}: no such interpreter")
        a.venv_note = venvs.create(staging, base, prompt=ctx.venv.name, log=ctx.log.record)
        spy = layout.gpu_python(staging)
        info = _dists(spy, ctx.log)
        where = installers.platform_phrase(info["python_tag"], info["platform"])
        if a.provisioned is not None:
            if info["version"].rsplit(".", 1)[0] != a.provisioned["version"]:
                raise StepFailed(installers.FAILED, f"{base} is Python {info['version']}, but "
                                                    f"{a.provisioned['executable']} is {a.provisioned['version']}")
            pth = Path(info["purelib"]) / layout.VENV_PROVISIONED_PTH
            pth.write_text("".join(f"{d}\n" for d in a.provisioned["site_dirs"]))
        inst = installers.choose(args.installer, provisioned=ch.kind == "provisioned")
        if inst.name == "pip":
            version = installers.pip_version(spy, ctx.log)
            if version is None:
                a.venv_note = "; ".join(filter(None, [a.venv_note, _bootstrap_pip(spy, ctx)]))
                version = installers.pip_version(spy, ctx.log)
            inst.version = version or "?"
        a.installer = inst.describe()

        # 2. torch, from the channel's source only
        if src is not None:
            a.files = installers.install(inst, ctx.log, spy, [f"torch{ch.torch}"], src, pre=ch.pre,
                                         constraints=None, workdir=ctx.workdir, step="torch", where=where,
                                         keep_config=args.keep_pip_config)

        # 3. verify torch before spending anything on the other packages
        a.facts = verify(spy, ctx.log)
        if (problem := judge(ch, a.facts)) is not None:
            raise problem

        # 4. the other packages, constrained to what is there (torch cannot change)
        if ctx.gpu_packages:
            if args.wheelhouse is not None:
                deps_src = installers.wheelhouse_source(args.wheelhouse)
            elif args.deps_index_url:
                deps_src = installers.deps_index_source(args.deps_index_url)
            else:
                deps_src = installers.default_source()
            before = _dists(spy, ctx.log)
            have = {(installers._norm(d["name"]), d["version"]) for d in before["dists"]}
            pins = _constraints(before, ctx.workdir / "constraints-gpu.txt")
            deps = installers.install(inst, ctx.log, spy, list(ctx.gpu_packages), deps_src, pre=False,
                                      constraints=pins, workdir=ctx.workdir, step="deps", where=where,
                                      keep_config=args.keep_pip_config)
            a.files += [f for f in deps if (installers._norm(f.name), f.version) not in have]

        # 5. the marker, the swap, and the same verification in the final place
        marker = {
            "channel": ch.name, "entry": entry_of(ch), "gpu_packages": list(ctx.gpu_packages),
            "from_python": a.provisioned["executable"] if a.provisioned else None,
            "wheelhouse": str(args.wheelhouse.resolve()) if ch.kind == "wheelhouse" else None,
            "torch_version": a.facts.get("torch_version"), "cuda": a.facts.get("cuda"),
            "installed": records.now_iso(), "source": a.source, "installer": a.installer,
            "files": [asdict(f) for f in a.files], "provisioned": a.provisioned,
        }
        (staging / layout.VENV_MARKER).write_text(json.dumps(marker, indent=2) + "\n")

        def check(final: Path) -> None:
            again = verify(layout.gpu_python(final), ctx.log)
            if (problem := judge(ch, again)) is not None:
                raise problem
            if again.get("torch_version") != a.facts.get("torch_version"):
                raise StepFailed(installers.FAILED, f"torch changed from {a.facts.get('torch_version')} to "
                                                    f"{again.get('torch_version')} while installing gpu_packages")
            a.facts = again

        venvs.swap_in(staging, ctx.venv, check)
        a.status = StageStatus.PASS
    except StepFailed as e:
        a.category, a.detail = e.category, e.detail
    except venvs.VenvError as e:
        a.category, a.detail = installers.FAILED, str(e)
    finally:
        venvs.discard(staging)
        a.seconds = round(time.perf_counter() - t0, 1)
    print(f"install: {a.line()}", flush=True)
    return a


# --------------------------------------------------------------------------- no-op re-run

def satisfied(ctx: Context, names: list[str]) -> tuple[dict, dict] | None:
    """(marker, facts) when .venv-gpu holds a verified install of one of `names` that still verifies."""
    marker_path = ctx.venv / layout.VENV_MARKER
    if ctx.args.reinstall or not marker_path.is_file():
        return None
    try:
        marker = json.loads(marker_path.read_text())
    except ValueError:
        return None
    name = marker.get("channel")
    if name not in names:
        return None
    ch = ctx.catalog[name]
    if marker.get("entry") != entry_of(ch) or marker.get("gpu_packages") != list(ctx.gpu_packages):
        return None
    if ch.kind == "provisioned":
        python = _resolve_python(ctx.args.from_python, ctx.venv)
        if python is None or (marker.get("provisioned") or {}).get("executable") not in (
                python, str(Path(python).absolute())):
            return None
    if ch.kind == "wheelhouse" and marker.get("wheelhouse") != str(ctx.args.wheelhouse.resolve()):
        return None
    facts = verify(layout.gpu_python(ctx.venv), ctx.log)
    if judge(ch, facts) is not None or facts.get("torch_version") != marker.get("torch_version") \
            or facts.get("cuda") != marker.get("cuda"):
        return None
    return marker, facts


# --------------------------------------------------------------------------- reports

HIDDEN_GPUS = ("CUDA_VISIBLE_DEVICES is set but empty, which hides every GPU from CUDA; "
               "unset it (or list the GPUs to use) and run again")


def hidden_by_cuda_visible_devices() -> bool:
    """CUDA_VISIBLE_DEVICES set to "" hides every GPU: no channel can help, so none is suggested."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return cvd is not None and not cvd.strip()


def suggest(ctx: Context, attempts: list[Attempt]) -> str:
    """Which channel to use instead: those the driver supports, from the probe record if any."""
    if hidden_by_cuda_visible_devices():
        return "another channel would not help: the GPUs are hidden, not unsupported"
    tried = {a.channel.name for a in attempts}
    rest = [c for c in ctx.catalog.values() if c.name not in tried and not c.retired]
    provisioned = [c.name for c in rest if c.kind == "provisioned"]
    probe = records.read(ctx.run_dir, "probe")
    driver = _major_minor((probe.figures if probe else {}).get("driver_cuda"))
    if driver is not None:
        fits = [c for c in rest if c.kind in ("index", "pypi") and c.cuda and _major_minor(c.cuda) <= driver]
        fits.sort(key=lambda c: (c.pre, tuple(-x for x in _major_minor(c.cuda))))
        names = [c.name for c in fits] + provisioned
        head = f"the driver supports CUDA {'.'.join(map(str, driver))}"
    else:
        names = [n for n in ("system", "cu130", "stable-cu128") if n in ctx.catalog and n not in tried]
        names = names or [c.name for c in rest]
        head = "driver CUDA unknown (nox -s probe records it)"
    if not names:
        return f"{head}; add a channel to {config.channels_file(ctx.args.channels_file)}"
    text = f"{head}: use instead {', '.join(names)} (e.g. nox -s install -p {names[0]}, or nox -s m40 -- --channels {names[0]})"
    if all(a.category == installers.UNREACHABLE for a in attempts):
        text += "; this machine cannot reach the index: -p system reuses an installed CUDA torch, -p wheelhouse -- --wheelhouse DIR installs offline"
    return text


def _fmt_facts(facts: dict) -> list[str]:
    devices = facts.get("devices") or []
    dev = "; ".join(f"{d.get('index')}: {d.get('name')} (sm_{''.join(map(str, d.get('capability') or []))})"
                    for d in devices) or "none"
    archs = facts.get("arch_list")
    return [
        f"  torch              {facts.get('torch_version')}",
        f"  torch.version.cuda {facts.get('cuda')}",
        f"  cuDNN              {facts.get('cudnn')}",
        f"  git_version        {facts.get('git_version')}",
        f"  triton             {facts.get('triton') or 'not installed'}",
        f"  torchvision        {facts.get('torchvision') or 'not installed'}",
        f"  cuda available     {facts.get('cuda_available')}   (built with CUDA: {facts.get('cuda_built')})",
        f"  devices            {dev}",
        f"  arch list          {' '.join(archs) if isinstance(archs, list) else archs}",
        f"  python             {facts.get('python')} ({facts.get('executable')})",
        f"  torch location     {facts.get('torch_file')}",
    ]


def _fmt_files(files: list) -> list[str]:
    if not files:
        return ["  (none downloaded)"]
    out = []
    for f in files:
        f = f if isinstance(f, Installed) else Installed(**f)
        out.append(f"  {f.name} {f.version}\n      {installers.redact_url(f.url)}\n      sha256={f.sha256 or '?'}")
    return out


def write_report(ctx: Context, *, status: str, reason: str, attempts: list[Attempt], chosen: dict | None,
                 facts: dict | None, freeze: str, noop: bool, seconds: float) -> None:
    lines = [f"install: {status.upper()}" + (f" — {reason}" if reason else ""),
             f"written {records.now_iso()}; venv {ctx.venv}", ""]
    if chosen:
        ch = ctx.catalog.get(chosen["channel"])
        lines += [f"channel      {chosen['channel']} (kind {chosen['entry']['kind']})" + (f" — {ch.note}" if ch and ch.note else ""),
                  f"source       {installers.redact_url(chosen['source'])}",
                  f"installer    {chosen['installer']}",
                  f"pip config   {ctx.env_line}",
                  f"installed    {chosen['installed']}" + ("  (this run: no-op, verified again)" if noop else "")]
        if chosen.get("provisioned"):
            p = chosen["provisioned"]
            lines += [f"reuses torch of {p['executable']} (Python {p['version']}), unmodified; "
                      f".venv-gpu is built from {p['base_executable']} and its {layout.VENV_PROVISIONED_PTH} lists:"]
            lines += [f"    {d}" for d in p["site_dirs"]]
    else:
        lines.append(f"pip config   {ctx.env_line}")
    lines += ["", f"attempts ({len(attempts)}, {seconds:.1f} s in all):"]
    for i, a in enumerate(attempts, 1):
        lines.append(f"  {i}. {a.line()}  [{a.seconds:.1f} s; source {installers.redact_url(a.source) or '-'}; "
                     f"installer {a.installer or '-'}]")
        if a.channel.note:
            lines.append(f"     note: {a.channel.note}")
        if not a.ok and a.facts and "torch_version" in a.facts:
            lines.append(f"     it installed torch {a.facts['torch_version']} (torch.version.cuda {a.facts.get('cuda')}, "
                         f"cuda available {a.facts.get('cuda_available')}); discarded with the staging venv")
        if not a.ok and a.files:
            lines.append(f"     files it installed into the staging venv (discarded), {len(a.files)}:")
            lines += [f"       {f.name} {f.version} {installers.redact_url(f.url)} sha256={f.sha256 or '?'}" for f in a.files]
    if noop:
        lines.append("  (no-op: .venv-gpu already held this install and it verified again; nothing was run)")
    if facts:
        lines += ["", "torch (verified in .venv-gpu's own Python):", *_fmt_facts(facts)]
    if chosen:
        lines += ["", "wheels installed (URL, sha256):", *_fmt_files(chosen.get("files") or [])]
    lines += ["", "commands run:", *(f"  $ {c}" for c in ctx.log.commands)]
    if freeze:
        lines += ["", "pip freeze of .venv-gpu:", *(f"  {ln}" for ln in freeze.splitlines())]
    (ctx.run_dir / REPORT).write_text(installers.redact_url("\n".join(lines) + "\n"))


def write_requirements(ctx: Context, marker: dict, freeze: str) -> None:
    """requirements-gpu.txt: the freeze, each line pinned to the exact file installed where known."""
    by_name = {}
    for f in marker.get("files") or []:
        by_name.setdefault(installers._norm(f["name"]), f)
    head = [f"# .venv-gpu: channel {marker['channel']}, torch {marker['torch_version']}, installed {marker['installed']}",
            "# Reproduce: python -m venv .venv-gpu && .venv-gpu/bin/python -m pip install --no-deps "
            "--only-binary=:all: -r requirements-gpu.txt"]
    if marker.get("provisioned"):
        head.append(f"# (torch and the packages commented out below are reused from {marker['provisioned']['executable']}:"
                    " `nox -s install -p system -- --from-python` it rebuilds that part)")
    body, kept = [], []
    for line in freeze.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", line.strip())
        f = by_name.get(installers._norm(m.group(1))) if m else None
        if f and f["url"] and f["version"] == m.group(2):
            url = f["url"] + (f"#sha256={f['sha256']}" if f.get("sha256") else "")
            body.append(f"{f['name']} @ {url}")
        elif marker.get("provisioned"):
            kept.append(line)
        else:
            body.append(line)
    if kept:
        body += [f"# provided by {marker['provisioned']['executable']} (not downloaded, reused through "
                 f"{layout.VENV_PROVISIONED_PTH}):", *(f"# {ln}" for ln in kept)]
    (ctx.run_dir / layout.REQUIREMENTS_GPU).write_text(installers.redact_url("\n".join(head + body) + "\n"))


# --------------------------------------------------------------------------- the stage

def run(run_dir: Path, args) -> Outcome:
    t0 = time.perf_counter()
    catalog = config.load_channels(args.channels_file)
    settings = config.load_settings(getattr(args, "settings", None))
    names = _channel_list(args, catalog, settings)
    env, env_line = installers.child_env(args.keep_pip_config)
    log_path = run_dir / layout.INSTALL_LOG
    log = CommandLog(log_path, env=env)
    log.write(f"\n===== install {records.now_iso()}: channels {', '.join(names)} =====\n")
    venv = Path(args.venv or layout.VENV_GPU).absolute()
    # Inputs that would fail every attempt are refused before any download.
    if args.from_python and _resolve_python(args.from_python, venv) is None:
        raise ConfigError(f"--from-python {args.from_python}: no such interpreter; pass the path of a Python")
    files = [REPORT, layout.INSTALL_LOG]
    attempts: list[Attempt] = []
    with tempfile.TemporaryDirectory(prefix="m40-install-") as tmp:
        ctx = Context(run_dir, args, catalog, list(settings["gpu_packages"]), venv, log, env_line, Path(tmp))
        try:
            with venvs.locked(venv):
                for note in venvs.recover(venv):
                    print(f"install: {note}", flush=True)
                    log.write(f"# {note}\n")
                venvs.check_replaceable(venv)  # before any download, not at the swap
                if (done := satisfied(ctx, names)) is not None:
                    marker, facts = done
                    freeze = _freeze(layout.gpu_python(venv), log)
                    seconds = time.perf_counter() - t0
                    reason = ""
                    write_report(ctx, status=StageStatus.PASS, reason=reason, attempts=[], chosen=marker, facts=facts,
                                 freeze=freeze, noop=True, seconds=seconds)
                    write_requirements(ctx, marker, freeze)
                    print(f"install: .venv-gpu already holds channel {marker['channel']} (torch "
                          f"{marker['torch_version']}), verified again: nothing to do", flush=True)
                    return Outcome(StageStatus.PASS, "", _figures(marker, facts, 0, seconds, noop=True),
                                   files + [layout.REQUIREMENTS_GPU])
                for name in names:
                    attempts.append(attempt(ctx, catalog[name]))
                    if attempts[-1].ok:
                        break
        except venvs.VenvError as e:
            write_report(ctx, status=StageStatus.FAIL, reason=str(e), attempts=attempts, chosen=None, facts=None, freeze="",
                         noop=False, seconds=time.perf_counter() - t0)
            return Outcome(StageStatus.FAIL, str(e), {"attempts": len(attempts)}, files)
        except KeyboardInterrupt:
            write_report(ctx, status="interrupted", reason="Ctrl-C: .venv-gpu is as it was before this run",
                         attempts=attempts, chosen=None, facts=None, freeze="", noop=False,
                         seconds=time.perf_counter() - t0)
            raise
        seconds = time.perf_counter() - t0
        good = attempts[-1] if attempts and attempts[-1].ok else None
        if good is None:
            summary = "; ".join(a.line() for a in attempts)
            which = f"channel {names[0]}" if len(names) == 1 else f"all {len(names)} channels ({', '.join(names)})"
            reason = f"no CUDA torch installed: {which} failed — {summary}; {suggest(ctx, attempts)}"
            write_report(ctx, status=StageStatus.FAIL, reason=reason, attempts=attempts, chosen=None, facts=None, freeze="",
                         noop=False, seconds=seconds)
            return Outcome(StageStatus.FAIL, reason, {"attempts": len(attempts), "install_s": round(seconds, 1),
                                          "channel": "none"}, files)
        marker = json.loads((venv / layout.VENV_MARKER).read_text())
        freeze = _freeze(layout.gpu_python(venv), log)
        write_report(ctx, status=StageStatus.PASS, reason="", attempts=attempts, chosen=marker, facts=good.facts, freeze=freeze,
                     noop=False, seconds=seconds)
        write_requirements(ctx, marker, freeze)
        return Outcome(StageStatus.PASS, "", _figures(marker, good.facts, len(attempts), seconds, noop=False),
                       files + [layout.REQUIREMENTS_GPU])


def _figures(marker: dict, facts: dict, attempts: int, seconds: float, *, noop: bool) -> dict:
    figures = {"channel": marker["channel"], "kind": marker["entry"]["kind"], "torch": facts.get("torch_version"),
               "cuda": facts.get("cuda"), "installer": marker.get("installer", "").split(" (")[0],
               "attempts": attempts, "install_s": round(seconds, 1), "noop": noop,
               # the torch the verifier imported in .venv-gpu (tasks/verdict.py compares cuda_check's and train's)
               "torch_identity": identity.of_torch(facts["torch_file"], facts.get("torch_version"))
               if facts.get("torch_file") else None}
    if marker.get("provisioned"):
        figures["from_python"] = marker["provisioned"]["executable"]
    return figures
