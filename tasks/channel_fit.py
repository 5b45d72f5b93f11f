"""Which channels this machine can use, decided from probe's facts before anything is downloaded.

- `machine(run_dir)`: the driver's CUDA version and the GPUs' compute capabilities, from the run's
  probe record (gpus.json) when there is one, else from a quick probe (tasks/probe.py's collect).
- `unfit(channel, facts)`: why a channel cannot work here (a driver of an older CUDA major, or builds
  with no kernels for a GPU), or None; install skips such a channel without downloading it. A newer
  minor is not refused (CUDA's minor-version compatibility; cuda_check's kernels decide).
- `pick_auto(catalog, facts)`: the `auto` channel, the newest catalog channel whose CUDA the driver
  supports (driver >= build, judge_driver's PASS) and whose arch list covers every GPU, with the
  reasoning as lines for torch_version.txt.

The rules themselves (version order, arch coverage) are tasks/cuda_rules.py's; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tasks import cuda_rules, jsonfile, layout
from tasks.config import AUTO_CHANNEL, Channel, ConfigError, major_minor


@dataclass
class Gpu:
    index: int
    name: str
    capability: tuple[int, int] | None  # (9, 0); None when the driver did not say

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}" if self.capability else "sm_?"


@dataclass
class Machine:
    driver_cuda: str | None  # "13.0"
    gpus: list[Gpu] = field(default_factory=list)
    origin: str = ""  # where these facts come from, for the report
    found: str = ""  # what the probe found when there is no usable GPU

    def describe(self) -> str:
        gpus = "; ".join(f"GPU {g.index} {g.name} ({g.sm})" for g in self.gpus) or "no GPU"
        return f"driver supports CUDA {self.driver_cuda or '?'}; {gpus} (from {self.origin})"

    def usable(self) -> str | None:
        """Why no CUDA torch can be verified here (None: a driver and at least one GPU)."""
        if self.driver_cuda is None or not self.gpus:
            what = self.found or ("no GPU" if self.driver_cuda else "no NVIDIA driver")
            return f"no NVIDIA GPU to verify a CUDA torch on ({what}; from {self.origin})"
        return None


def _capability(text) -> tuple[int, int] | None:
    return major_minor(str(text)) if text else None


def from_gpus_json(path: Path) -> Machine:
    """The run's probe record (gpus.json, schema 1)."""
    try:
        doc = jsonfile.read(path)
    except jsonfile.Unreadable as e:
        raise ConfigError(f"{path} cannot be read ({e}); run `nox -s probe` again") from None
    gpus = [
        Gpu(int(g.get("index", i)), str(g.get("name", "?")), _capability(g.get("compute_capability")))
        for i, g in enumerate(doc.get("gpus") or [])
    ]
    found = (doc.get("gate") or {}).get("line", "") if not gpus or not doc.get("driver_cuda") else ""
    return Machine(doc.get("driver_cuda"), gpus, origin=f"the run's probe record {path.name}", found=found)


def quick_probe() -> Machine:
    """NVML, else nvidia-smi, as the probe stage collects them (nothing written)."""
    from tasks import probe  # only when there is no probe record: probe is the one place that collects

    facts, _ = probe.collect()
    gpus = [Gpu(g.index, g.name, _capability(g.compute_capability)) for g in facts.gpus]
    return Machine(facts.driver_cuda, gpus, origin=f"a quick probe ({facts.source})", found=facts.found or "")


def machine(run_dir: Path) -> Machine:
    record = Path(run_dir) / layout.GPUS_JSON
    return from_gpus_json(record) if record.is_file() else quick_probe()


# --------------------------------------------------------------------------- rules


def driver_verdict(ch: Channel, m: Machine):
    """cuda_rules.judge_driver for this channel's CUDA: PASS (the driver supports it), WARN (a newer minor:
    CUDA's minor-version compatibility runs it), FAIL (a newer major); SKIP for a channel of any CUDA."""
    return cuda_rules.judge_driver(m.driver_cuda, ch.cuda, m.origin)


def uncovered(ch: Channel, m: Machine) -> list[Gpu]:
    """The GPUs no architecture of the channel's builds runs on (none when its archs are not listed)."""
    if not ch.archs:
        return []
    return [g for g in m.gpus if g.capability is None or not cuda_rules.arch_list_covers(list(ch.archs), g.capability)]


def unfit(ch: Channel, m: Machine) -> str | None:
    """Why channel `ch` cannot give a working torch on this machine, known before any download."""
    if driver_verdict(ch, m).status == cuda_rules.FAIL:
        return (
            f"its CUDA {ch.cuda} is a newer major than the {m.driver_cuda} the driver supports "
            f"(update the NVIDIA driver, or use a channel for CUDA <= {m.driver_cuda})"
        )
    if missing := uncovered(ch, m):
        g = missing[0]
        return f"its builds carry {' '.join(ch.archs)}, nothing for GPU {g.index} {g.name} ({g.sm})"
    return None


def candidates(catalog: dict[str, Channel]) -> list[Channel]:
    """Channels `auto` may pick: an index with a CUDA version and an arch list, not retired; newest first."""
    pool = [c for c in catalog.values() if c.kind == "index" and c.cuda and c.archs and not c.retired]
    return sorted(pool, key=lambda c: major_minor(c.cuda) or (0, 0), reverse=True)


def fitting(catalog: dict[str, Channel], m: Machine) -> list[Channel]:
    """Index channels, not retired, that fit this machine (as far as the catalog knows); newest CUDA first."""
    pool = [c for c in catalog.values() if c.kind in ("index", "pypi") and not c.retired and unfit(c, m) is None]
    return sorted(pool, key=lambda c: major_minor(c.cuda) or (0, 0), reverse=True)


def pick_auto(catalog: dict[str, Channel], m: Machine) -> tuple[str | None, list[str]]:
    """(channel name or None, the reasoning lines): newest CUDA the driver supports, covering every GPU."""
    lines = [f"{AUTO_CHANNEL}: {m.describe()}"]
    chosen = None
    for ch in candidates(catalog):
        why = unfit(ch, m)
        if why is None and driver_verdict(ch, m).status != cuda_rules.PASS:  # auto wants full support
            why = f"its CUDA {ch.cuda} is newer than the {m.driver_cuda} the driver supports"
        if why is None and chosen is None:
            chosen = ch.name
            lines.append(
                f"  {ch.name}: CUDA {ch.cuda} <= {m.driver_cuda}, kernels for every GPU → chosen (the newest that fits)"
            )
        elif why is None:
            lines.append(f"  {ch.name}: fits too, but older")
        else:
            lines.append(f"  {ch.name}: skipped, {why}")
    if chosen is None:
        lines.append(f"  no channel fits: {no_fit_advice(catalog, m)}")
    return chosen, lines


def no_fit_advice(catalog: dict[str, Channel], m: Machine) -> str:
    covering = [c for c in candidates(catalog) if not uncovered(c, m)]
    if not covering:
        sms = ", ".join(sorted({g.sm for g in m.gpus}))
        return f"no channel of the catalog has kernels for {sms}; use -p system with a torch built for it"
    need = min(covering, key=lambda c: major_minor(c.cuda) or (0, 0))
    return (
        f"the GPUs need {need.name} or newer (CUDA >= {need.cuda}) but the driver supports CUDA "
        f"{m.driver_cuda}: update the NVIDIA driver"
    )
