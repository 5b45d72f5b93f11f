"""Loading and validating the data in `configs/` (YAML, safe_load only).

Every problem is a ConfigError whose message is one line: the file, the key, what is wrong, the fix.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from tasks import layout


class ConfigError(Exception):
    exit_code = layout.EXIT_USAGE


def load_yaml(path: Path, *, empty_ok: bool = False) -> dict:
    """The mapping a YAML file holds (safe_load), or ConfigError with one line naming the file and the fix.

    The one YAML loader: configs/, channel catalogs, training and bench settings. `empty_ok`: an empty
    file is {} (a settings file whose every value has a default).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass an existing file") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; pass a file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror}); check its permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}; fix the syntax") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _require(cond: object, path: Path, key: str, msg: str) -> None:
    if not cond:
        _fail(path, key, msg)


def _fail(path: Path, key: str, msg: str) -> NoReturn:
    raise ConfigError(f"{path}: {key}: {msg}")


def parse_version(text: str) -> tuple[int, ...]:
    """'12.8' -> (12, 8), '12.8.61' -> (12, 8, 61); raises ValueError on anything else.

    The one version parser (CUDA, driver CUDA, settings); `major_minor` and `version_arg` build on it.
    """
    if not re.fullmatch(r"\d+(\.\d+)*", str(text).strip()):
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(x) for x in str(text).strip().split("."))


def major_minor(text: str | None) -> tuple[int, int] | None:
    """'12.8.61' -> (12, 8), '13' -> (13, 0); None for None or anything that is not a version."""
    try:
        parts = parse_version(str(text)) if text is not None else None
    except ValueError:
        return None
    return None if parts is None else (parts[0], parts[1] if len(parts) > 1 else 0)


def version_arg(text: str) -> str:
    """An argparse `type=` for a version like 12.8."""
    try:
        parse_version(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version like 12.8") from None
    return text.strip()


# --------------------------------------------------------------------------- settings (m40.yaml)


SETTINGS_KEYS = ("min_driver_cuda", "channel_order", "gpu_packages", "gpu_packages_no_deps")


def load_settings(path: Path | None = None) -> dict:
    path = Path(path or layout.SETTINGS_FILE)
    data = load_yaml(path)
    for key in data:
        if key not in SETTINGS_KEYS:
            raise ConfigError(
                f"{path}: unknown key {key}; the keys are {', '.join(SETTINGS_KEYS)} (see configs/m40.yaml)"
            )
    for key in ("min_driver_cuda", "channel_order", "gpu_packages"):
        _require(key in data, path, key, "missing; add it (see configs/m40.yaml in the repository)")
    try:
        parse_version(data["min_driver_cuda"])
    except ValueError:
        raise ConfigError(
            f'{path}: min_driver_cuda: {data["min_driver_cuda"]!r} is not a version like "12.8"'
        ) from None
    _require(
        isinstance(data["channel_order"], list) and data["channel_order"],
        path,
        "channel_order",
        "must be a non-empty list of channel names",
    )
    _require(isinstance(data["gpu_packages"], list), path, "gpu_packages", "must be a list of requirement strings")
    for i, entry in enumerate(data["gpu_packages"]):
        requirement(entry, path, f"gpu_packages[{i}]")
    no_deps = data.setdefault("gpu_packages_no_deps", [])
    _require(isinstance(no_deps, list), path, "gpu_packages_no_deps", "must be a list of requirement strings")
    for i, entry in enumerate(no_deps):
        requirement(entry, path, f"gpu_packages_no_deps[{i}]")
    return data


def requirement(entry, path: Path, key: str) -> str:
    """One PEP 508 requirement (`name[extras] specifier`), never a pip option or two lines."""
    text = entry if isinstance(entry, str) else ""
    fix = 'write one requirement like "transformers>=4.46" (no pip options, one line)'
    _require(
        bool(text.strip()) and not text.lstrip().startswith("-") and "\n" not in text and "\r" not in text,
        path,
        key,
        f"{entry!r} is not a requirement; {fix}",
    )
    try:
        req = Requirement(text)
    except InvalidRequirement:
        raise ConfigError(f"{path}: {key}: {entry!r} is not a requirement; {fix}") from None
    _require(req.url is None, path, key, f"{entry!r} names a URL; name a package from the index instead")
    return text


def specifier(entry, path: Path, key: str) -> str:
    """A version specifier for torch (e.g. ">=2.7,<2.12"), validated as one."""
    text = "" if entry is None else entry if isinstance(entry, str) else None
    fix = 'write a specifier like ">=2.7,<2.12"'
    if text is None or "\n" in text or "\r" in text:
        _fail(path, key, f"{entry!r} is not one line; {fix}")
    try:
        SpecifierSet(text)
    except InvalidSpecifier:
        raise ConfigError(f"{path}: {key}: {entry!r} is not a version specifier; {fix}") from None
    return text.strip()


# --------------------------------------------------------------------------- channels (channels.yaml)

CHANNEL_KINDS = ("index", "pypi", "provisioned", "wheelhouse")
AUTO_CHANNEL = "auto"  # not a catalog entry: install picks one from the driver and GPUs (tasks/channel_fit.py)
SOURCE_KEYS = ("index_url", "pre", "torch", "retired", "label")
CHANNEL_KEYS = ("kind", "cuda", "archs", "sources", "note", "files_from", *SOURCE_KEYS)


@dataclass(frozen=True)
class ChannelSource:
    """One index a channel may install torch from; a channel tries its sources in order."""

    index_url: str
    pre: bool = False  # allow pre-releases (nightlies)
    torch: str = ""  # version specifier, e.g. ">=2.7,<2.12"
    retired: str = ""  # upstream stopped publishing it (date, where that was said): tried fast, reported
    label: str = ""  # a short name for reports, e.g. "nightly"

    @property
    def name(self) -> str:
        return self.label or (self.index_url or "")


@dataclass(frozen=True)
class Channel:
    name: str
    kind: str
    cuda: str | None  # the CUDA version the installed torch must report, e.g. "12.8"
    sources: tuple[ChannelSource, ...] = ()
    note: str = ""
    # URL prefixes the index's files may be served from besides the index itself (PyPI serves from
    # files.pythonhosted.org, PyTorch's indexes from download-r2.pytorch.org): the provenance check.
    files_from: tuple[str, ...] = ()
    archs: tuple[str, ...] = ()  # the GPU architectures its builds carry (the `auto` choice reads them)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def tag(self) -> str | None:
        """The local version tag a wheel of this channel carries ('cu128'), if any."""
        if self.cuda is None:
            return None
        major, minor = parse_version(self.cuda)[:2]
        return f"cu{major}{minor}"

    @property
    def retired(self) -> str:
        """Why the channel cannot work any more: every source retired ('' otherwise)."""
        if self.sources and all(s.retired for s in self.sources):
            return "; ".join(s.retired for s in self.sources)
        return ""


def channels_file(path: Path | str | None = None) -> Path:
    """The catalog in force: an explicit path, else $M40_CHANNELS_FILE, else configs/channels.yaml."""
    return Path(path or os.environ.get(layout.CHANNELS_ENV) or layout.CHANNELS_FILE)


def load_channels(path: Path | str | None = None) -> dict[str, Channel]:
    path = channels_file(path)
    data = load_yaml(path)
    raw = data.get("channels")
    if not isinstance(raw, dict) or not raw:
        _fail(path, "channels", "must be a mapping of channel name -> settings")
    out: dict[str, Channel] = {}
    for name, spec in raw.items():
        key = f"channels.{name}"
        _require(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)) is not None,
            path,
            key,
            "a channel name may hold only letters, digits, '.', '_' and '-'",
        )
        _require(
            str(name) != AUTO_CHANNEL, path, key, f"'{AUTO_CHANNEL}' is reserved (install picks a channel); rename it"
        )
        _require(isinstance(spec, dict), path, key, "must be a mapping")
        out[str(name)] = _channel(str(name), spec, path, key)
    return out


def _channel(name: str, spec: dict, path: Path, key: str) -> Channel:
    unknown = set(spec) - set(CHANNEL_KEYS)
    _require(not unknown, path, key, f"unknown key(s) {sorted(unknown)}; remove them")
    kind = spec.get("kind")
    _require(kind in CHANNEL_KINDS, path, f"{key}.kind", f"{kind!r} is not one of {list(CHANNEL_KINDS)}")
    cuda = spec.get("cuda")
    if cuda is not None:
        cuda = str(cuda)
        try:
            parse_version(cuda)
        except ValueError:
            raise ConfigError(f'{path}: {key}.cuda: {cuda!r} is not a version like "12.8"') from None
    files_from = spec.get("files_from", [])
    _require(
        isinstance(files_from, list) and all(isinstance(u, str) and "://" in u for u in files_from),
        path,
        f"{key}.files_from",
        "must be a list of URL prefixes like https://files.pythonhosted.org/",
    )
    archs = spec.get("archs", [])
    _require(
        isinstance(archs, list)
        and all(isinstance(a, str) and re.fullmatch(r"(sm|compute)_\d+[af]?", a) for a in archs),
        path,
        f"{key}.archs",
        "must be a list like [sm_80, sm_90]",
    )
    return Channel(
        name=name,
        kind=str(kind),
        cuda=cuda,
        sources=_sources(str(kind), spec, path, key),
        note=str(spec.get("note") or ""),
        files_from=tuple(files_from),
        archs=tuple(archs),
    )


def _sources(kind: str, spec: dict, path: Path, key: str) -> tuple[ChannelSource, ...]:
    """`sources: [...]` in order, or the channel's own index_url/pre/torch/retired as its one source."""
    inline = {k: spec[k] for k in SOURCE_KEYS if k in spec}
    listed = spec.get("sources")
    _require(
        not (listed is not None and inline),
        path,
        key,
        f"give either sources: [...] or {', '.join(sorted(inline))} directly, not both",
    )
    if listed is None:
        listed = [inline] if inline or kind == "pypi" else []
    _require(
        isinstance(listed, list), path, f"{key}.sources", "must be a list of sources (index_url, pre, torch, retired)"
    )
    _require(
        kind in ("index", "pypi") or not listed, path, key, f"a '{kind}' channel has no index sources; remove them"
    )
    _require(kind != "index" or listed, path, f"{key}.sources", "an 'index' channel needs an index_url")
    out = []
    for i, src in enumerate(listed):
        where = f"{key}.sources[{i}]" if "sources" in spec else key
        _require(isinstance(src, dict), path, where, "must be a mapping")
        unknown = set(src) - set(SOURCE_KEYS)
        _require(not unknown, path, where, f"unknown key(s) {sorted(unknown)}; remove them")
        url = src.get("index_url")
        if kind == "pypi" and url is None:
            url = "https://pypi.org/simple"
        if not isinstance(url, str) or "://" not in url or url.strip() != url:
            _fail(path, f"{where}.index_url", "must be an index URL like https://download.pytorch.org/whl/cu128")
        _require(isinstance(src.get("pre", False), bool), path, f"{where}.pre", "must be true or false")
        out.append(
            ChannelSource(
                index_url=url,
                pre=src.get("pre", False),
                torch=specifier(src.get("torch"), path, f"{where}.torch"),
                retired=str(src.get("retired") or ""),
                label=str(src.get("label") or ""),
            )
        )
    return tuple(out)


def channel_names(path: Path | str | None = None) -> list[str]:
    """Channel names for `nox -l` (the catalog's, then `auto`); an unreadable catalog yields [] so nox can
    still list sessions (and the stage names the broken file)."""
    try:
        return [*load_channels(path), AUTO_CHANNEL]
    except ConfigError:
        return []


# --------------------------------------------------------------------------- GPU datasheet (gpus.yaml)


@dataclass(frozen=True)
class GpuSpec:
    model: str
    match: tuple[str, ...]  # words the device name must hold (see name_words)
    exclude: tuple[str, ...]  # words it must not hold ("laptop")
    bf16_tflops: float | None  # dense, no sparsity; None: no bf16 tensor cores or no published figure
    mem_bw_tbs: float | None
    memory_gb: float
    mig_slices: int | None = None  # compute slices a MIG-capable GPU is cut into (7 on A100/H100); None: no MIG data

    def figure(self, unit: str) -> tuple[str, float | None]:
        """The datasheet key and value a speed in `unit` ("TFLOP/s" or "TB/s") is judged against."""
        return ("bf16_tflops", self.bf16_tflops) if unit == "TFLOP/s" else ("mem_bw_tbs", self.mem_bw_tbs)


def name_words(name: str) -> tuple[str, ...]:
    """'NVIDIA A100-SXM4-80GB' -> ('nvidia', 'a100', 'sxm4', '80gb'): lower case, cut at non-alphanumerics.

    A MIG slice's profile is not part of its GPU's name: 'NVIDIA A100-SXM4-80GB MIG 3g.40gb' has the
    words of its A100 80GB, never a '40gb' that would match the 40 GB model."""
    words = tuple(w for w in re.split(r"[^a-z0-9]+", str(name).lower()) if w)
    return words[: words.index("mig")] if "mig" in words else words


def _figure(value, path: Path, key: str) -> float | None:
    ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)
    _require(ok, path, key, f"{value!r} must be a positive number (or null: no published figure)")
    return None if value is None else float(value)


def load_gpus(path: Path | None = None) -> list[GpuSpec]:
    path = Path(path or layout.GPUS_FILE)
    data = load_yaml(path)
    raw = data.get("gpus")
    if not isinstance(raw, list) or not raw:
        _fail(path, "gpus", "must be a list of GPU models")
    out: list[GpuSpec] = []
    seen: dict[frozenset[str], str] = {}
    for i, g in enumerate(raw):
        key = f"gpus[{i}]"
        _require(isinstance(g, dict), path, key, "must be a mapping")
        for k in ("model", "match", "bf16_tflops", "mem_bw_tbs", "memory_gb"):
            _require(k in g, path, f"{key}.{k}", "missing")
        for k in ("match", "exclude"):
            _require(isinstance(g.get(k, []), list), path, f"{key}.{k}", "must be a list of words")
        match = tuple(w for s in g["match"] for w in name_words(s))
        _require(bool(match), path, f"{key}.match", "must name at least one word of the device name")
        _require(
            frozenset(match) not in seen,
            path,
            f"{key}.match",
            f"same words as {seen.get(frozenset(match))!r}: make one of them more specific",
        )
        seen[frozenset(match)] = g["model"]
        slices = g.get("mig_slices")
        _require(
            slices is None or positive_whole(slices),
            path,
            f"{key}.mig_slices",
            f"{slices!r} must be a positive whole number (compute slices)",
        )
        memory = _figure(g["memory_gb"], path, f"{key}.memory_gb")
        if memory is None:
            _fail(path, f"{key}.memory_gb", "must be the GPU's memory in GB")
        out.append(
            GpuSpec(
                model=str(g["model"]),
                match=match,
                exclude=tuple(w for s in g.get("exclude", []) for w in name_words(s)),
                bf16_tflops=_figure(g["bf16_tflops"], path, f"{key}.bf16_tflops"),
                mem_bw_tbs=_figure(g["mem_bw_tbs"], path, f"{key}.mem_bw_tbs"),
                memory_gb=memory,
                mig_slices=slices,
            )
        )
    return out


def gpu_spec_for(device_name: str, specs: list[GpuSpec] | None = None) -> GpuSpec | None:
    """The datasheet entry for a device name ('NVIDIA H100 80GB HBM3'); None when unknown (no guess).

    Of the entries whose `match` words the name holds and whose `exclude` words it does not, the one
    with the most `match` words wins (the most specific: 'H200 NVL' over 'H200').
    """
    words = set(name_words(device_name))
    hits = [
        s
        for s in (specs if specs is not None else load_gpus())
        if words.issuperset(s.match) and not words.intersection(s.exclude)
    ]
    return max(hits, key=lambda s: len(s.match), default=None)


# --------------------------------------------------------------------------- cuda_check (cuda_check.yaml)

CUDA_CHECK_TOLERANCES = (
    "matmul_fp32",
    "matmul_tf32",
    "matmul_bf16",
    "matmul_fp16",
    "conv2d_fp32",
    "conv2d_bf16",
    "sdpa_bf16",
    "reduction_fp32",
    "compile_fp32",
)
CUDA_CHECK_SIZES = ("matmul", "speed_matmul", "copy_mib", "allreduce_mib")


def check_share(value, what: str, top: float = 1.0) -> float:
    """A share in (0, top]: returns it as float, else ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= top:
        raise ValueError(f"{what} must be a number in (0, {top:g}], got {value!r}")
    return float(value)


def share_arg(top: float = 1.0):
    """An argparse `type=` for a share in (0, top], with check_share's message on a bad value."""

    def parse(text: str) -> float:
        try:
            return check_share(float(text), "the share", top)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def load_cuda_check(path: Path | None = None) -> dict:
    """The cuda_check stage's tolerances, shares, sizes and timeouts, validated."""
    path = Path(path or layout.CUDA_CHECK_FILE)
    data = load_yaml(path)
    for key in (
        "tolerances",
        "memory_share",
        "speed_share",
        "sizes",
        "repeats",
        "timeout_s",
        "allreduce_timeout_s",
        "min_cuda_for_arch",
    ):
        _require(key in data, path, key, f"missing; add it ({CUDA_CHECK_FIX})")
    _cuda_check_tolerances(data["tolerances"], path)
    for key, top in (("memory_share", 0.9), ("speed_share", 1.0)):
        try:
            data[key] = check_share(data[key], key, top)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
    for group, keys in (("sizes", CUDA_CHECK_SIZES), ("repeats", ("warmup", "timed"))):
        _require(isinstance(data[group], dict), path, group, "must be a mapping")
        for key in keys:
            value = data[group].get(key)
            _require(
                positive_whole(value),
                path,
                f"{group}.{key}",
                f"{value!r} must be a positive whole number",
            )
    for key in ("timeout_s", "allreduce_timeout_s"):
        _require(positive_number(data[key]), path, key, f"{data[key]!r} must be a positive number of seconds")
    data["min_cuda_for_arch"] = _min_cuda_for_arch(data["min_cuda_for_arch"], path)
    return data


CUDA_CHECK_FIX = "see configs/cuda_check.yaml in the repository"


def positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def positive_whole(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value > 0


def _cuda_check_tolerances(tol, path: Path) -> None:
    _require(isinstance(tol, dict), path, "tolerances", "must be a mapping of check -> relative error")
    for key in CUDA_CHECK_TOLERANCES:
        _require(key in tol, path, f"tolerances.{key}", f"missing; add it ({CUDA_CHECK_FIX})")
        _require(
            positive_number(tol[key]) and tol[key] < 1,
            path,
            f"tolerances.{key}",
            f"{tol[key]!r} must be a relative error in (0, 1)",
        )


def _min_cuda_for_arch(arch, path: Path) -> dict[str, str]:
    """{"sm_90": "12.0", ...}: every key an arch, every value a CUDA version."""
    _require(isinstance(arch, dict), path, "min_cuda_for_arch", "must be a mapping of sm_XY -> CUDA version")
    for key, value in arch.items():
        _require(
            re.fullmatch(r"sm_\d+[af]?", str(key)) is not None, path, f"min_cuda_for_arch.{key}", "keys look like sm_90"
        )
        try:
            parse_version(str(value))
        except ValueError:
            raise ConfigError(f'{path}: min_cuda_for_arch.{key}: {value!r} is not a version like "12.8"') from None
    return {str(k): str(v) for k, v in arch.items()}


# --------------------------------------------------------------------------- probe (probe.yaml)


def positive_seconds(value) -> bool:
    return positive_number(value) and value < float("inf")


def load_probe(path: Path | None = None) -> dict:
    """The probe's settings: `timeout_s`, its one deadline for NVML and nvidia-smi together."""
    path = Path(path or layout.PROBE_FILE)
    data = load_yaml(path)
    _require("timeout_s" in data, path, "timeout_s", "missing; add it (see configs/probe.yaml in the repository)")
    _require(
        positive_seconds(data["timeout_s"]),
        path,
        "timeout_s",
        f"{data['timeout_s']!r} must be a positive number of seconds",
    )
    data["timeout_s"] = float(data["timeout_s"])
    return data


def seconds_arg(text: str) -> float:
    """An argparse `type=` for a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not positive_seconds(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


# --------------------------------------------------------------------------- NVML facts (nvml.yaml)


@dataclass(frozen=True)
class NvmlTables:
    """The clock-event reason bits (bit -> (name, is_fault)) and the Xid classes (code -> description)."""

    clock_events: dict[int, tuple[str, bool]]
    xid_hardware: dict[int, str]
    xid_application: dict[int, str]


def load_nvml(path: Path | None = None) -> NvmlTables:
    path = Path(path or layout.NVML_FILE)
    data = load_yaml(path)
    events = data.get("clock_events")
    if not isinstance(events, list) or not events:
        _fail(path, "clock_events", "must be a list of {bit, name, fault}")
    table: dict[int, tuple[str, bool]] = {}
    for i, e in enumerate(events):
        key = f"clock_events[{i}]"
        _require(isinstance(e, dict) and set(e) == {"bit", "name", "fault"}, path, key, "must be {bit, name, fault}")
        _require(
            isinstance(e["bit"], int) and e["bit"] > 0 and e["bit"] & (e["bit"] - 1) == 0,
            path,
            f"{key}.bit",
            f"{e['bit']!r} must be a single bit like 0x40",
        )
        _require(isinstance(e["fault"], bool), path, f"{key}.fault", "must be true or false")
        table[e["bit"]] = (str(e["name"]), e["fault"])
    xids = {}
    for group in ("xid_hardware", "xid_application"):
        raw = data.get(group)
        if not isinstance(raw, dict) or not all(isinstance(k, int) and k > 0 for k in raw):
            _fail(path, group, "must be a mapping of Xid number -> description")
        xids[group] = {k: str(v) for k, v in raw.items()}
    both = set(xids["xid_hardware"]) & set(xids["xid_application"])
    _require(not both, path, "xid_application", f"Xid {sorted(both)} also listed in xid_hardware; keep one")
    return NvmlTables(table, xids["xid_hardware"], xids["xid_application"])


@functools.cache
def nvml_tables() -> NvmlTables:
    """configs/nvml.yaml, loaded once per process."""
    return load_nvml()


# --------------------------------------------------------------------------- burn-in (burnin.yaml)

BURNIN_SEVERITIES = ("FAIL", "WARN")
# group -> {key: kind}: "s" seconds/positive number, "n" positive whole number, "share" in (0, 1],
# "sev" FAIL or WARN, "map" a mapping of name -> positive number.
BURNIN_KEYS = {
    None: {"duration_s": "s", "extra_timeout_s": "s", "sample_interval_s": "s"},
    "burn": {"matmul_n": "n", "window_s": "s", "clock_share": "share", "low_clock_share": "share"},
    "memory": {"share": "share", "chunk_words": "n"},
    "peers": {"below_median_share": "share", "severity": "sev"},
    "pcie": {
        "link_severity": "sev",
        "slot_severity": "sev",
        "copy_mib": "n",
        "repeats": "n",
        "warn_share": "share",
        "fail_share": "share",
    },
    "nvlink": {"down_severity": "sev", "errors_severity": "sev"},
    "p2p": {"copy_mib": "n", "repeats": "n", "below_median_share": "share", "severity": "sev"},
    "collectives": {
        "min_bytes": "n",
        "max_bytes": "n",
        "warmup": "n",
        "iters": "n",
        "timeout_s": "s",
        "expect_busbw_gbs": "map",
        "severity": "sev",
    },
    "dcgm": {"level": "n", "timeout_s": "s", "severity": "sev"},
}


def _burnin_value(path: Path, key: str, kind: str, value) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "s":
        _require(positive_number(value), path, key, f"{value!r} must be a positive number")
    elif kind == "n":
        _require(positive_whole(value), path, key, f"{value!r} must be a positive whole number")
    elif kind == "share":
        _require(number and 0 < value <= 1, path, key, f"{value!r} must be a share in (0, 1]")
    elif kind == "sev":
        _require(value in BURNIN_SEVERITIES, path, key, f"{value!r} must be one of {list(BURNIN_SEVERITIES)}")
    elif kind == "map":
        _require(
            isinstance(value, dict)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value.values()),
            path,
            key,
            "must be a mapping of name -> positive number",
        )


def load_burnin(path: Path | None = None) -> dict:
    """The long level's durations, sizes and thresholds (configs/burnin.yaml), validated."""
    path = Path(path or layout.BURNIN_FILE)
    data = load_yaml(path)
    for group, keys in BURNIN_KEYS.items():
        section = data if group is None else data.get(group)
        if not isinstance(section, dict):
            _fail(path, str(group), "missing or not a mapping; see configs/burnin.yaml")
        for key, kind in keys.items():
            name = key if group is None else f"{group}.{key}"
            _require(key in section, path, name, "missing; add it (see configs/burnin.yaml in the repository)")
            _burnin_value(path, name, kind, section[key])
    _require(
        data["pcie"]["fail_share"] <= data["pcie"]["warn_share"],
        path,
        "pcie.fail_share",
        "must not exceed pcie.warn_share",
    )
    _require(
        data["collectives"]["min_bytes"] <= data["collectives"]["max_bytes"],
        path,
        "collectives.min_bytes",
        "must not exceed collectives.max_bytes",
    )
    _require(data["dcgm"]["level"] in (1, 2, 3, 4), path, "dcgm.level", "must be 1, 2, 3 or 4 (dcgmi diag -r)")
    return data
