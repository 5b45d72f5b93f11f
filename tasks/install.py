"""Stage install: a verified CUDA build of PyTorch in `.venv-gpu`, from a channel of configs/channels.yaml.

Before anything is downloaded: the options and channel names are checked, and the machine is asked
(tasks/channel_fit.py: the run's probe record, else a quick probe) whether a CUDA torch can work here
at all, and which channels fit its driver and GPUs (`auto` picks the newest that fits). Channels are
tried in order (`-p NAME`, else `--channels a,b`, else `channel_order` of configs/m40.yaml) until one
installs AND verifies. Each attempt:

1. builds a staging venv next to `.venv-gpu` (`.venv-gpu.staging-<pid>`) with `python -m venv`;
2. installs torch from the channel's sources, tried in order (kinds `index`/`pypi`: `--index-url`,
   `wheelhouse`: `--no-index --find-links DIR`; binary only, `--pre` where the source says), isolated
   from the machine's pip config, and checks that every installed file came from that source; a
   `provisioned` channel instead reuses the torch another interpreter imports (a `.pth` file lists
   its site-packages; that environment is never modified);
3. verifies torch with the staging venv's own Python (tasks/venv_facts.py): the channel's CUDA,
   a CUDA build, CUDA available, kernels for every visible GPU;
4. installs `gpu_packages` (configs/m40.yaml) from the default index (or `--wheelhouse` /
   `--deps-index-url`), constrained to every version already installed so torch cannot change, then
   `gpu_packages_no_deps` without their dependencies; a package a `provisioned` channel reuses that
   fails one of them is named, with both versions and the fix (tasks/reused_fit.py), not blamed on torch;
5. swaps the staging venv in (tasks/venvs.py), verifies again there, and writes the marker (with the
   RECORD hashes of torch, triton and the nvidia-* dists; no credential of any URL).

A re-run whose channel is already installed, unchanged (same RECORD hashes) and verifies again is a
no-op. Writes torch_version.txt, requirements-gpu.txt (tasks/install_report.py) and install_log.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks import (
    channel_fit,
    config,
    cuda_rules,
    identity,
    install_report,
    installers,
    jsonfile,
    layout,
    proc,
    records,
    reused_fit,
    venv_facts,
    venvs,
)
from tasks.config import AUTO_CHANNEL, Channel, ChannelSource, ConfigError
from tasks.installers import CommandLog, StepFailed
from tasks.records import Outcome, StageStatus

DESCRIPTION = (
    "Install a CUDA build of PyTorch into .venv-gpu from a channel of configs/channels.yaml: "
    "staging venv, one source per step, provenance check, verification, then swap"
)
SKIPPED = "skipped, nothing downloaded"  # a channel the machine cannot use (channel_fit.unfit)
DEPS_FAILED = "gpu_packages step failed"  # the torch channel worked; the other packages' source did not
REUSED_UNMET = "reused package does not meet gpu_packages"  # torch reused fine; a package beside it (reused_fit)
TORCH_FINE = (DEPS_FAILED, REUSED_UNMET)  # failures after torch verified: the reason does not blame torch


def _csv(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give channel names separated by commas, e.g. cu128,cu124")
    return names


def add_arguments(parser) -> None:
    parser.add_argument("--session-channel", default=None, help=argparse.SUPPRESS)  # nox's `-p NAME`
    add_channel_arguments(parser)
    add_venv_arguments(parser)


def add_channel_arguments(parser) -> None:
    """Which channels to try, and where their torch comes from."""
    parser.add_argument(
        "--channel",
        default=None,
        metavar="NAME",
        help=f"install from this one channel, or {AUTO_CHANNEL} (under nox: `nox -s install -p NAME`)",
    )
    parser.add_argument(
        "--channels",
        type=_csv,
        default=None,
        metavar="A,B,...",
        help="channels to try in order until one installs and verifies (default: channel_order "
        f"of configs/m40.yaml, i.e. cu128 then cu124; {AUTO_CHANNEL}: from the driver and GPUs)",
    )
    parser.add_argument(
        "--channels-file",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"channel catalog to use instead of configs/channels.yaml (also ${layout.CHANNELS_ENV})",
    )
    parser.add_argument(
        "--from-python",
        default=None,
        metavar="PATH",
        help="interpreter whose CUDA torch a provisioned channel (system) reuses, default the "
        "first python3 on PATH; for other channels, the Python .venv-gpu is built from "
        "(default: the one running nox)",
    )
    parser.add_argument(
        "--wheelhouse",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of wheels: the source of the wheelhouse channel, and of the gpu_packages "
        "step for any channel (offline: no index at all)",
    )


def add_venv_arguments(parser) -> None:
    """How the installer runs, and which venv it manages."""
    parser.add_argument(
        "--installer",
        choices=("auto", "pip", "uv"),
        default="auto",
        help="auto: uv when on PATH (faster for the GB of CUDA wheels), else pip",
    )
    parser.add_argument(
        "--keep-pip-config",
        action="store_true",
        help="keep the machine's pip/uv config files and PIP_*/UV_* variables (e.g. a proxy "
        "set there); by default they are ignored; provenance is checked either way",
    )
    parser.add_argument(
        "--deps-index-url", default=None, metavar="URL", help="index for the gpu_packages step (default: PyPI)"
    )
    parser.add_argument(
        "--venv",
        type=Path,
        default=None,
        metavar="PATH",
        help="the GPU venv to manage (default .venv-gpu; other stages always use .venv-gpu)",
    )
    parser.add_argument(
        "--reinstall",
        action="store_true",
        help="install again even when .venv-gpu already holds a verified install of the channel",
    )


# --------------------------------------------------------------------------- data


@dataclass
class SourceTry:
    """One source of a channel, tried for torch."""

    source: ChannelSource
    status: str = StageStatus.FAIL
    category: str = ""
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        name = f"{self.source.label + ' ' if self.source.label else ''}{installers.redact_url(self.source.index_url)}"
        if self.status == StageStatus.PASS:
            return f"{name}: torch installed ({self.seconds:.1f} s)"
        retired = f" [retired: {self.source.retired}]" if self.source.retired else ""
        return f"{name}: {self.category}: {self.detail}{retired} ({self.seconds:.1f} s)"


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
    marker: dict = field(default_factory=dict)  # what it wrote as the venv's marker (marker_of)
    venv_note: str = ""
    tries: list[SourceTry] = field(default_factory=list)

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
        return {
            "channel": self.channel.name,
            "status": self.status,
            "category": self.category,
            "detail": self.detail,
            "seconds": self.seconds,
            "source": self.source,
            "sources": [
                {
                    "index_url": t.source.index_url,
                    "status": t.status,
                    "category": t.category,
                    "detail": t.detail,
                    "seconds": t.seconds,
                }
                for t in self.tries
            ],
        }


@dataclass
class Context:
    run_dir: Path
    args: argparse.Namespace
    catalog: dict
    settings: dict  # configs/m40.yaml: gpu_packages, gpu_packages_no_deps
    venv: Path
    log: CommandLog
    env_line: str
    workdir: Path
    machine: channel_fit.Machine | None = None
    auto_lines: list[str] = field(default_factory=list)

    @property
    def gpu_packages(self) -> list[str]:
        return list(self.settings["gpu_packages"])

    @property
    def no_deps_packages(self) -> list[str]:
        return list(self.settings.get("gpu_packages_no_deps") or [])


def entry_of(ch: Channel) -> dict:
    """The catalog entry that defines what a channel installs (the note is only words), as the marker keeps it:
    without the credentials of its URLs (a new password is the same source)."""
    return records.without_credentials(
        {
            "kind": ch.kind,
            "cuda": ch.cuda,
            "files_from": list(ch.files_from),
            "sources": [{"index_url": s.index_url, "pre": s.pre, "torch": s.torch} for s in ch.sources],
        }
    )


# --------------------------------------------------------------------------- verification


def judge(ch: Channel, facts: dict) -> StepFailed | None:
    """What is wrong with the torch these facts describe, for this channel (None: nothing)."""
    if "import_error" in facts:
        return StepFailed(installers.FAILED, f"torch does not import: {facts['import_error']}")
    version, cuda = facts.get("torch_version", "?"), facts.get("cuda")
    local = version.split("+", 1)[1] if "+" in version else ""
    if cuda is None or local == "cpu" or facts.get("cuda_built") is not True:
        return StepFailed(installers.CPU_BUILD, f"installed torch {version} is a CPU build; refusing")
    if ch.tag and local.startswith("cu") and local != ch.tag:
        return StepFailed(
            installers.CUDA_MISMATCH, f"wanted {ch.tag} (CUDA {ch.cuda}), got torch {version} (CUDA {cuda}); refusing"
        )
    if ch.cuda and config.major_minor(cuda) != config.major_minor(ch.cuda):
        return StepFailed(
            installers.CUDA_MISMATCH, f"wanted CUDA {ch.cuda}, got torch {version} with CUDA {cuda}; refusing"
        )
    if facts.get("cuda_available") is not True and hidden_by_cuda_visible_devices():
        return StepFailed(
            installers.NOT_USABLE, f"torch {version} is a CUDA {cuda} build but sees no GPU: {HIDDEN_GPUS}"
        )
    if facts.get("cuda_available") is not True:
        return StepFailed(
            installers.NOT_USABLE,
            f"torch {version} is a CUDA {cuda} build but torch.cuda.is_available() is "
            f"{facts.get('cuda_available')}: no GPU it can use (check nvidia-smi, CUDA_VISIBLE_DEVICES, "
            f"and that the driver supports CUDA {cuda})",
        )
    devices = facts.get("devices") or []
    if not devices:
        return StepFailed(installers.NOT_USABLE, f"torch {version} sees no CUDA device")
    arch_list = facts.get("arch_list")
    if not isinstance(arch_list, list):
        arch_list = []
    for d in devices:
        cap = d.get("capability")
        if not isinstance(cap, list) or not cuda_rules.arch_list_covers(arch_list, cap):
            sm = f"sm_{cap[0]}{cap[1]}" if isinstance(cap, list) else str(cap)
            return StepFailed(
                installers.NOT_USABLE,
                f"torch {version} has kernels for {' '.join(arch_list) or 'no architecture'} but GPU "
                f"{d.get('index')} ({d.get('name')}) is {sm}: not usable on this GPU",
            )
    return None


HIDDEN_GPUS = (
    "CUDA_VISIBLE_DEVICES is set but empty, which hides every GPU from CUDA; "
    "unset it (or list the GPUs to use) and run again"
)


def hidden_by_cuda_visible_devices() -> bool:
    """CUDA_VISIBLE_DEVICES set to "" hides every GPU: no channel can help, so none is suggested."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return cvd is not None and not cvd.strip()


# --------------------------------------------------------------------------- options, before anything runs


def channel_list(args, catalog: dict) -> list[str]:
    """The channels asked for, validated (`auto` stays a name here: it needs the machine's facts)."""
    session, channel, channels = getattr(args, "session_channel", None), args.channel, args.channels
    if session and channel and channel != session:
        raise ConfigError(
            f"-p {session} and --channel {channel} name two channels; name one: nox -s install -p {channel}"
        )
    if session and channels:
        raise ConfigError(
            f"nox -s install -p {session} installs channel {session}; --channels "
            f"{','.join(channels)} is for nox -s m40 -- --channels {','.join(channels)}: drop one"
        )
    channel = session or channel
    if channel and channels:
        raise ConfigError(
            f"give --channel or --channels, not both (got --channel {channel} and --channels {','.join(channels)})"
        )
    names = [channel] if channel else (channels or list(config.load_settings()["channel_order"]))
    unknown = [n for n in names if n not in catalog and n != AUTO_CHANNEL]
    if unknown:
        raise ConfigError(
            f"unknown channel(s) {', '.join(unknown)}; the catalog {config.channels_file(args.channels_file)} "
            f"has {', '.join([*catalog, AUTO_CHANNEL])}"
        )
    for n in names:
        if n in catalog and catalog[n].kind == "wheelhouse" and args.wheelhouse is None:
            raise ConfigError(f"channel {n} installs from a folder of wheels: pass --wheelhouse DIR")
    return list(dict.fromkeys(names))


def check_inputs(args) -> None:
    """Refuse, before any stage runs, what install would refuse (ConfigError, exit 2)."""
    check_arguments(args)


def check_arguments(args) -> tuple[dict, dict, list[str]]:
    """Every input install will use, validated: (catalog, settings, channel names)."""
    catalog = config.load_channels(args.channels_file)
    settings = config.load_settings()  # install's own reading of configs/m40.yaml
    names = channel_list(args, catalog)
    venv = Path(args.venv or layout.VENV_GPU).absolute()
    if args.from_python and venv_facts.resolve_python(args.from_python, venv) is None:
        raise ConfigError(f"--from-python {args.from_python}: no such interpreter; pass the path of a Python")
    if args.wheelhouse is not None and not Path(args.wheelhouse).is_dir():
        raise ConfigError(f"--wheelhouse {args.wheelhouse}: no such folder; pass a folder of wheels")
    if not venvs.swap_pending(venv) and (why := venvs.foreign(venv)) is not None:
        raise ConfigError(why)
    return catalog, settings, names


def resolve_auto(names: list[str], ctx: Context) -> list[str]:
    """`auto` replaced by the channel channel_fit picks for this machine (its reasoning kept for the report)."""
    if AUTO_CHANNEL not in names:
        return names
    assert ctx.machine is not None  # run() asks channel_fit for the machine before anything else
    chosen, ctx.auto_lines = channel_fit.pick_auto(ctx.catalog, ctx.machine)
    for line in ctx.auto_lines:
        print(f"install: {line}", flush=True)
    out = [chosen if n == AUTO_CHANNEL else n for n in names]
    return list(dict.fromkeys(n for n in out if n))


# --------------------------------------------------------------------------- one attempt


def torch_from_sources(ctx: Context, a: Attempt, inst, spy: Path, where: str) -> None:
    """Step 2: torch from the channel's sources in order; the first that installs one wins."""
    for src_entry in a.channel.sources:
        if a.tries and any(d["name"].lower() == "torch" for d in venv_facts.dists(spy, ctx.log)["dists"]):
            failed = a.tries[-1]  # never "already satisfied" by a torch from a source that failed
            raise StepFailed(
                failed.category or installers.FAILED,
                f"{failed.source.name}: {failed.detail}; its torch stayed in the staging venv: no later source tried",
            )
        t = SourceTry(src_entry)
        a.tries.append(t)
        t0 = time.perf_counter()
        src = installers.index_source(src_entry.index_url, a.channel.files_from)
        a.source = src.label
        if len(a.channel.sources) > 1:
            print(
                f"install: {a.channel.name}: source {len(a.tries)}/{len(a.channel.sources)} "
                f"{installers.redact_url(src.label)}"
                + (" (retired upstream: tried once, quickly)" if src_entry.retired else ""),
                flush=True,
            )
        try:
            a.files = installers.install(
                inst,
                ctx.log,
                spy,
                [f"torch{src_entry.torch}"],
                src,
                pre=src_entry.pre,
                constraints=None,
                workdir=ctx.workdir,
                step=f"torch{len(a.tries)}",
                where=where,
                keep_config=ctx.args.keep_pip_config,
                fast=bool(src_entry.retired),
            )
            t.status = StageStatus.PASS
            return
        except StepFailed as e:
            t.category, t.detail = e.category, e.detail
            last = e
        finally:
            t.seconds = round(time.perf_counter() - t0, 1)
    if len(a.tries) > 1:
        raise StepFailed(
            last.category,
            "; ".join(
                f"{t.source.name}: {t.detail}" + (f" [retired: {t.source.retired}]" if t.source.retired else "")
                for t in a.tries
            ),
        )
    raise last


def deps_source(args) -> installers.Source:
    if args.wheelhouse is not None:
        return installers.wheelhouse_source(args.wheelhouse)
    if args.deps_index_url:
        return installers.deps_index_source(args.deps_index_url)
    return installers.default_source()


def gpu_packages(ctx: Context, a: Attempt, inst, spy: Path, where: str) -> None:
    """Step 4: gpu_packages (constrained: torch cannot change), then gpu_packages_no_deps without dependencies.

    A source that is unreachable or lacks a wheel is the packages' source's failure, not the torch
    channel's: it says so (DEPS_FAILED). A conflict with the installed torch stays the channel's.
    """
    src = deps_source(ctx.args)
    for step, packages, no_deps in (("deps", ctx.gpu_packages, False), ("nodeps", ctx.no_deps_packages, True)):
        if not packages:
            continue
        before = venv_facts.dists(spy, ctx.log)
        have = {(identity.normalize(d["name"]), d["version"]) for d in before["dists"]}
        pins = venv_facts.constraints(before, ctx.workdir / f"constraints-{step}.txt")
        if a.provisioned is not None and (unmet := reused_fit.unmet(packages, before["dists"])) is not None:
            raise reused_unmet(a, unmet)  # pinned where it is: no source can help, and pip need not run to say so
        try:
            got = installers.install(
                inst,
                ctx.log,
                spy,
                packages,
                src,
                pre=False,
                constraints=pins,
                workdir=ctx.workdir,
                step=step,
                where=where,
                keep_config=ctx.args.keep_pip_config,
                no_deps=no_deps,
            )
        except StepFailed as e:
            if e.category in (installers.UNREACHABLE, installers.NO_WHEEL):  # the source's fault, not torch's
                raise StepFailed(DEPS_FAILED, f"{e.category}: {e.detail}") from None
            if a.provisioned is not None and (unmet := reused_fit.from_conflict(e.causes)) is not None:
                raise reused_unmet(a, unmet) from None  # a dependency of a gpu_package, pinned where it is
            raise
        a.files += [f for f in got if (identity.normalize(f.name), f.version) not in have]


def reused_unmet(a: Attempt, unmet: reused_fit.Unmet) -> StepFailed:
    """A package the provisioned channel reuses fails gpu_packages: named, with both versions and the fix."""
    assert a.provisioned is not None
    return StepFailed(REUSED_UNMET, unmet.detail(a.provisioned["executable"], a.facts.get("torch_version", "?")))


def staging_venv(ctx: Context, a: Attempt, staging: Path) -> tuple[Path, str, installers.Installer]:
    """Step 1: the staging venv (for a provisioned channel, over the interpreter it reuses)."""
    ch, args = a.channel, ctx.args
    if ch.kind == "provisioned":
        wanted = args.from_python or "python3 on PATH (outside .nox/ and .venv-gpu)"
        a.provisioned = venv_facts.inspect_source(
            venv_facts.resolve_python(args.from_python, ctx.venv), wanted, ctx.venv, ctx.log, ctx.workdir
        )
        base = a.provisioned["base_executable"]
        a.source = f"provisioned: {a.provisioned['executable']}"
    else:
        base = venv_facts.resolve_python(args.from_python, ctx.venv) if args.from_python else sys.executable
    # A provisioned venv sees the site-packages of the interpreter it reuses (the .pth below), pip usually among
    # them: no ensurepip (seconds) then; pip is bootstrapped into the venv only where that interpreter has none.
    provisioned = ch.kind == "provisioned"
    a.venv_note = venvs.create(staging, base, prompt=ctx.venv.name, log=ctx.log.record, pip=not provisioned)
    spy = layout.gpu_python(staging)
    info = venv_facts.dists(spy, ctx.log)
    where = installers.platform_phrase(info["python_tag"], info["platform"])
    if a.provisioned is not None:
        if info["version"].rsplit(".", 1)[0] != a.provisioned["version"]:
            raise StepFailed(
                installers.FAILED,
                f"{base} is Python {info['version']}, but {a.provisioned['executable']} is {a.provisioned['version']}",
            )
        pth = Path(info["purelib"]) / layout.VENV_PROVISIONED_PTH
        pth.write_text("".join(f"{d}\n" for d in a.provisioned["site_dirs"]))
    inst = installers.choose(args.installer, provisioned=provisioned)
    if inst.name == "pip":
        version = installers.pip_version(spy, ctx.log)
        if version is not None and provisioned:
            inst.note = "; ".join(filter(None, [inst.note, "pip of the reused interpreter (venv made --without-pip)"]))
        if version is None:
            a.venv_note = "; ".join(
                filter(None, [a.venv_note, venv_facts.bootstrap_pip(spy, ctx.log, args.wheelhouse)])
            )
            version = installers.pip_version(spy, ctx.log)
        inst.version = version or "?"
    a.installer = inst.describe()
    return spy, where, inst


def marker_of(ctx: Context, a: Attempt, spy: Path) -> dict:
    """What `.venv-gpu/m40-install.json` keeps: no credential of any URL in it."""
    ch, args = a.channel, ctx.args
    return records.without_credentials(
        {
            "channel": ch.name,
            "entry": entry_of(ch),
            "gpu_packages": ctx.gpu_packages,
            "gpu_packages_no_deps": ctx.no_deps_packages,
            "from_python": a.provisioned["executable"] if a.provisioned else None,
            "wheelhouse": str(args.wheelhouse.resolve()) if ch.kind == "wheelhouse" else None,
            "torch_version": a.facts.get("torch_version"),
            "cuda": a.facts.get("cuda"),
            "installed": records.now_iso(),
            "source": a.source,
            "installer": a.installer,
            "files": [asdict(f) for f in a.files],
            "provisioned": a.provisioned,
            "record_hashes": venv_facts.record_hashes(venv_facts.dists(spy, ctx.log)),
        }
    )


def attempt(ctx: Context, ch: Channel) -> Attempt:
    """Install and verify one channel into a staging venv; swap it in when all is well."""
    a = Attempt(channel=ch)
    t0 = time.perf_counter()
    staging = venvs.staging_path(ctx.venv)
    venvs.remove(staging, ctx.venv)
    print(f"install: channel {ch.name} ({ch.kind}) → staging venv {staging}", flush=True)
    try:
        if ch.kind == "wheelhouse":
            src = installers.wheelhouse_source(ctx.args.wheelhouse)
            a.source = src.label
        spy, where, inst = staging_venv(ctx, a, staging)
        if ch.kind in ("index", "pypi"):
            torch_from_sources(ctx, a, inst, spy, where)
        elif ch.kind == "wheelhouse":
            a.files = torch_from_wheelhouse(ctx, inst, spy, where, src)
        a.facts = venv_facts.verify(spy, ctx.log)  # 3. before spending anything on the other packages
        if (problem := judge(ch, a.facts)) is not None:
            raise problem
        gpu_packages(ctx, a, inst, spy, where)
        a.marker = marker_of(ctx, a, spy)
        (staging / layout.VENV_MARKER).write_text(json.dumps(a.marker, indent=2) + "\n")
        venvs.swap_in(staging, ctx.venv, lambda final: verify_again(ctx, ch, a, final))
        a.status = StageStatus.PASS
    except StepFailed as e:
        a.category, a.detail = e.category, e.detail
    except venvs.VenvError as e:
        a.category, a.detail = installers.FAILED, str(e)
    finally:
        venvs.remove(staging, ctx.venv)
        a.seconds = round(time.perf_counter() - t0, 1)
    print(f"install: {a.line()}", flush=True)
    return a


def torch_from_wheelhouse(
    ctx: Context, inst: installers.Installer, spy: Path, where: str, src: installers.Source
) -> list[installers.Installed]:
    """torch from --wheelhouse (no index at all) into the staging venv; the files installed."""
    return installers.install(
        inst,
        ctx.log,
        spy,
        ["torch"],
        src,
        pre=False,
        constraints=None,
        workdir=ctx.workdir,
        step="torch",
        where=where,
        keep_config=ctx.args.keep_pip_config,
    )


def verify_again(ctx: Context, ch: Channel, a: Attempt, final: Path) -> None:
    """The venv swapped in at `final` verifies again, with the torch the first verification saw."""
    again = venv_facts.verify(layout.gpu_python(final), ctx.log)
    if (problem := judge(ch, again)) is not None:
        raise problem
    if again.get("torch_version") != a.facts.get("torch_version"):
        raise StepFailed(
            installers.FAILED,
            f"torch changed from {a.facts.get('torch_version')} to "
            f"{again.get('torch_version')} while installing gpu_packages",
        )
    a.facts = again


def skipped(ch: Channel, why: str) -> Attempt:
    a = Attempt(channel=ch, category=SKIPPED, detail=why)
    print(f"install: {a.line()}", flush=True)
    return a


# --------------------------------------------------------------------------- no-op re-run


def satisfied(ctx: Context, names: list[str]) -> tuple[dict, dict, str] | None:
    """(marker, facts, pip freeze) when .venv-gpu holds a verified install of one of `names` that is unchanged
    (the same RECORD hashes of torch, triton and nvidia-*) and still verifies. A marker jsonfile cannot read
    (missing, damaged, not a JSON object) holds none: install again."""
    if ctx.args.reinstall:
        return None
    try:
        marker = jsonfile.read(ctx.venv / layout.VENV_MARKER)
    except jsonfile.Unreadable:
        return None
    name = marker.get("channel")
    kinds: dict[str, type | tuple[type, ...]] = {
        "record_hashes": dict,
        "provisioned": (dict, type(None)),
        "gpu_packages": list,
    }
    if name not in names or not all(isinstance(marker.get(k), t) for k, t in kinds.items()):
        return None  # not a channel asked for, or a marker this code did not write: install again
    ch = ctx.catalog[name]
    if (
        marker.get("entry") != entry_of(ch)
        or marker.get("gpu_packages") != ctx.gpu_packages
        or marker.get("gpu_packages_no_deps", []) != ctx.no_deps_packages
    ):
        return None
    if ch.kind == "provisioned":
        provided = venv_facts.resolve_python(ctx.args.from_python, ctx.venv)
        if provided is None or (marker.get("provisioned") or {}).get("executable") not in (
            provided,
            str(Path(provided).absolute()),
        ):
            return None
    if ch.kind == "wheelhouse" and marker.get("wheelhouse") != str(ctx.args.wheelhouse.resolve()):
        return None
    python = layout.gpu_python(ctx.venv)
    now = venv_facts.record_hashes(venv_facts.dists(python, ctx.log))
    if venv_facts.DISTRIBUTIONS not in (marker.get("record_hashes") or {}):  # a marker older than that hash:
        now.pop(venv_facts.DISTRIBUTIONS)  # judged as it was written, never gigabytes of torch again for it
    if now != marker.get("record_hashes"):
        changed = sorted(
            k
            for k in set(now) | set(marker.get("record_hashes") or {})
            if now.get(k) != (marker.get("record_hashes") or {}).get(k)
        )
        print(
            f"install: .venv-gpu changed since it was installed ({', '.join(changed[:3]) or 'no hashes kept'}): "
            "installing again",
            flush=True,
        )
        return None
    with venv_facts.freezing(python, ctx.log) as frozen:  # pip freeze meanwhile: its seconds overlap the verifier's
        facts = venv_facts.verify(python, ctx.log)
        if (
            judge(ch, facts) is not None
            or facts.get("torch_version") != marker.get("torch_version")
            or facts.get("cuda") != marker.get("cuda")
        ):
            return None
        return marker, facts, frozen()


# --------------------------------------------------------------------------- what to use instead


def suggest(ctx: Context, attempts: list[Attempt]) -> str:
    """What to do: for a gpu_packages failure, fix its source; else the channels that fit this machine."""
    if hidden_by_cuda_visible_devices():
        return "another channel would not help: the GPUs are hidden, not unsupported"
    last = attempts[-1] if attempts else None
    if last is not None and last.category == REUSED_UNMET:
        return ""  # its line says what to do already
    if last is not None and last.category == DEPS_FAILED:
        where = (
            f"--wheelhouse {ctx.args.wheelhouse}"
            if ctx.args.wheelhouse is not None
            else f"--deps-index-url {ctx.args.deps_index_url}"
            if ctx.args.deps_index_url
            else "PyPI"
        )
        fix = (
            "check that it is reachable"
            if last.detail.startswith(installers.UNREACHABLE)
            else "add the named wheel there"
        )
        return (
            f"torch from channel {last.channel.name} was fine; the gpu_packages source ({where}) is the problem: "
            f"{fix}, or point --deps-index-url/--wheelhouse at a source that has it"
        )
    tried = {a.channel.name for a in attempts}
    assert ctx.machine is not None  # run() asks channel_fit for the machine before anything else
    fits = [c.name for c in channel_fit.fitting(ctx.catalog, ctx.machine) if c.name not in tried]
    names = fits + [c.name for c in ctx.catalog.values() if c.kind == "provisioned" and c.name not in tried]
    head = f"the driver supports CUDA {ctx.machine.driver_cuda}"
    if not names:
        return f"{head}; add a channel to {config.channels_file(ctx.args.channels_file)}"
    text = (
        f"{head}: use instead {', '.join(names)} (e.g. nox -s install -p {names[0]}, or nox -s m40 -- --channels "
        f"{names[0]}; -p {AUTO_CHANNEL} picks the newest that fits)"
    )
    if attempts and all(a.category in (installers.UNREACHABLE, SKIPPED) for a in attempts):
        text += (
            "; if this machine cannot reach the index: -p system reuses an installed CUDA torch, "
            "-p wheelhouse -- --wheelhouse DIR installs offline"
        )
    return text


# --------------------------------------------------------------------------- the stage


def run(run_dir: Path, args) -> Outcome:
    t0 = time.perf_counter()
    catalog, settings, names = check_arguments(args)
    env, env_line = installers.child_env(args.keep_pip_config)
    log = CommandLog(run_dir / layout.INSTALL_LOG, env=env)
    log.write(f"\n===== install {records.now_iso()}: channels {', '.join(names)} =====\n")
    venv = Path(args.venv or layout.VENV_GPU).absolute()
    files = [install_report.REPORT, layout.INSTALL_LOG]
    with tempfile.TemporaryDirectory(prefix="m40-install-") as tmp:
        ctx = Context(run_dir, args, catalog, settings, venv, log, env_line, Path(tmp))
        ctx.machine = channel_fit.machine(run_dir)  # before any download: can a CUDA torch work here?
        report = _reporter(ctx, t0)
        if (why := ctx.machine.usable()) is not None:
            reason = (
                f"{why}: nothing downloaded; run install on the machine with the GPUs (nox -s probe says what it finds)"
            )
            report(StageStatus.FAIL, reason, [])
            return Outcome(StageStatus.FAIL, reason, {"attempts": 0, "channel": "none"}, files)
        names = resolve_auto(names, ctx)
        if not names:
            reason = f"{AUTO_CHANNEL} found no channel for this machine: {ctx.auto_lines[-1].strip()}"
            report(StageStatus.FAIL, reason, [])
            return Outcome(StageStatus.FAIL, reason, {"attempts": 0, "channel": "none"}, files)
        attempts: list[Attempt] = []
        try:
            with venvs.locked(venv):
                for note in venvs.recover(venv):
                    print(f"install: {note}", flush=True)
                    log.write(f"# {note}\n")
                if (why := venvs.foreign(venv)) is not None:  # before any download, not at the swap
                    raise ConfigError(why)
                if (done := satisfied(ctx, names)) is not None:
                    return _noop(ctx, *done, files, report)
                for name in names:
                    why = channel_fit.unfit(catalog[name], ctx.machine)
                    if (
                        why is None
                        and (v := channel_fit.driver_verdict(catalog[name], ctx.machine)).status == cuda_rules.WARN
                    ):
                        print(f"install: {name}: {v.reason}", flush=True)  # a newer minor: tried, with a warning
                    attempts.append(skipped(catalog[name], why) if why else attempt(ctx, catalog[name]))
                    if attempts[-1].ok or attempts[-1].category == DEPS_FAILED:
                        break  # another torch channel would not fix the other packages' source
        except venvs.VenvError as e:
            report(StageStatus.FAIL, str(e), attempts)
            return Outcome(StageStatus.FAIL, str(e), {"attempts": len(attempts)}, files)
        except KeyboardInterrupt as e:
            report("interrupted", f"{proc.interrupt_words(e)}: .venv-gpu is as it was before this run", attempts)
            raise
        return _finish(ctx, names, attempts, files, report, t0)


def _reporter(ctx: Context, t0: float):
    def report(status: str, reason: str, attempts: list, chosen=None, facts=None, freeze="", noop=False) -> None:
        install_report.write_report(
            ctx,
            status=status,
            reason=reason,
            attempts=attempts,
            chosen=chosen,
            facts=facts,
            freeze=freeze,
            noop=noop,
            seconds=time.perf_counter() - t0,
        )

    return report


def _noop(ctx: Context, marker: dict, facts: dict, freeze: str, files: list, report) -> Outcome:
    report(StageStatus.PASS, "", [], marker, facts, freeze, noop=True)
    install_report.write_requirements(ctx, marker, freeze)
    print(
        f"install: .venv-gpu already holds channel {marker['channel']} (torch "
        f"{marker['torch_version']}), verified again: nothing to do",
        flush=True,
    )
    return Outcome(StageStatus.PASS, "", _figures(marker, facts, 0, 0.0, noop=True), files + [layout.REQUIREMENTS_GPU])


def _finish(ctx: Context, names: list[str], attempts: list[Attempt], files: list, report, t0: float) -> Outcome:
    seconds = time.perf_counter() - t0
    good = attempts[-1] if attempts and attempts[-1].ok else None
    if good is None:
        summary = "; ".join(a.line() for a in attempts)
        which = f"channel {names[0]}" if len(names) == 1 else f"all {len(names)} channels ({', '.join(names)})"
        if attempts and attempts[-1].category == DEPS_FAILED and len(attempts) < len(names):
            which = f"channel {attempts[-1].channel.name}"
        torch_fine = bool(attempts) and attempts[-1].category in TORCH_FINE
        head = f"{ctx.venv.name} not installed" if torch_fine else "no CUDA torch installed"
        tip = suggest(ctx, attempts)
        reason = f"{head}: {which} failed — {summary}" + (f"; {tip}" if tip else "")
        report(StageStatus.FAIL, reason, attempts)
        return Outcome(
            StageStatus.FAIL,
            reason,
            {"attempts": len(attempts), "install_s": round(seconds, 1), "channel": "none"},
            files,
        )
    marker = good.marker  # as written, never read back (the lock on the venv is released by now)
    freeze = venv_facts.freeze(layout.gpu_python(ctx.venv), ctx.log)
    report(StageStatus.PASS, "", attempts, marker, good.facts, freeze)
    install_report.write_requirements(ctx, marker, freeze)
    return Outcome(
        StageStatus.PASS,
        "",
        _figures(marker, good.facts, len(attempts), seconds, noop=False),
        files + [layout.REQUIREMENTS_GPU],
    )


def _figures(marker: dict, facts: dict, attempts: int, seconds: float, *, noop: bool) -> dict:
    figures = {
        "channel": marker["channel"],
        "kind": marker["entry"]["kind"],
        "torch": facts.get("torch_version"),
        "cuda": facts.get("cuda"),
        "installer": marker.get("installer", "").split(" (")[0],
        "attempts": attempts,
        "install_s": round(seconds, 1),
        "noop": noop,
    }
    if marker.get("provisioned"):
        figures["from_python"] = marker["provisioned"]["executable"]
    if facts.get("torch_file"):  # what verdict compares with cuda_check's and train's (tasks/identity.py)
        figures["torch_identity"] = identity.of_torch(facts["torch_file"], facts.get("torch_version", "?"))
    return figures
