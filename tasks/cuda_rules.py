"""The decisions of the cuda_check stage, as pure functions of measured values (no torch, no NVML).

`training_pt/gpu_checks.py` measures inside `.venv-gpu` and asks these functions for every verdict; the
tests feed them injected values on a machine without a GPU. Each judge returns a Verdict: PASS, WARN,
FAIL or SKIP, the measured value as text, and a one-line reason (why it failed or was skipped, or a note).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from tasks import config

# WARN: the check ran and found something worth reading that does not make the GPU unusable (a build
# for a newer CUDA minor than the driver's, an Xid another program raised); it does not fail the stage.
PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
STATUSES = (PASS, WARN, FAIL, SKIP)

# The environment variable that replaces torch.cuda.get_arch_list() in the arch check: a test seam,
# so a run on a supported GPU can show the FAIL line ("sm_80,sm_86" on an H100).
ARCH_LIST_SEAM_ENV = "M40_TEST_ARCH_LIST"


@dataclass
class Verdict:
    status: str
    value: str = ""
    reason: str = ""
    data: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown check status {self.status!r}")
        self.reason = " ".join(str(self.reason).split())


@dataclass
class Check:
    """One line of cuda_check.txt: a verdict with its name, GPU (None: not per GPU) and duration."""

    name: str
    gpu: int | None
    status: str
    value: str = ""
    reason: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, gpu: int | None, v: Verdict, seconds: float = 0.0) -> Check:
        return cls(name, gpu, v.status, v.value, v.reason, round(seconds, 3), dict(v.data))

    @property
    def where(self) -> str:
        return "-" if self.gpu is None else f"gpu{self.gpu}"


# --------------------------------------------------------------------------- versions


def cuda_version_from_int(value: int | None) -> str | None:
    """CUDA's integer version (cudaDriverGetVersion, NVML): 13000 -> '13.0', 12080 -> '12.8'; 0 -> None."""
    if not value or value <= 0:
        return None
    return f"{value // 1000}.{(value % 1000) // 10}"


def cudnn_version_text(value: int | None) -> str | None:
    """torch.backends.cudnn.version(): 91002 -> '9.10.2' (cuDNN >= 9), 8902 -> '8.9.2'."""
    if not value:
        return None
    if value >= 90000:
        return f"{value // 10000}.{(value % 10000) // 100}.{value % 100}"
    return f"{value // 1000}.{(value % 1000) // 100}.{value % 100}"


def judge_build(
    torch_version: str, cuda: str | None, hip: str | None = None, cudnn: str | None = None, nccl: str | None = None
) -> Verdict:
    """Check a: the build must be a CUDA build."""
    value = f"torch {torch_version}, CUDA {cuda or '-'}, cuDNN {cudnn or '-'}, NCCL {nccl or '-'}"
    data = {"torch": torch_version, "cuda": cuda, "cudnn": cudnn, "nccl": nccl}
    if hip:
        return Verdict(
            FAIL,
            value,
            f"torch {torch_version} is a ROCm (HIP {hip}) build, not a CUDA build; "
            "install a CUDA build (`nox -s install -p <channel>`)",
            data,
        )
    if not cuda:
        return Verdict(
            FAIL,
            value,
            f"torch {torch_version} is a CPU build (torch.version.cuda is None): it cannot "
            "use any GPU; install a CUDA build (`nox -s install -p <channel>`)",
            data,
        )
    notes = [f"no {n}" for n, v in (("cuDNN", cudnn), ("NCCL", nccl)) if not v]
    return Verdict(PASS, value, "; ".join(notes), data)


def judge_driver(
    driver_cuda: str | None, build_cuda: str | None, source: str, nvml_cuda: str | None = None, error: str = ""
) -> Verdict:
    """Check b: the CUDA version the driver supports (as torch reads it) against the build's.

    An older major FAILs. A newer minor of the same major WARNs: CUDA's minor-version compatibility
    runs a 12.9 build on a 12.8 driver (features that need the newer driver, such as JIT-compiling
    newer PTX, fail), so the kernel checks decide.
    """
    data = {"driver_cuda": driver_cuda, "build_cuda": build_cuda, "source": source, "nvml_cuda": nvml_cuda}
    if build_cuda is None:
        return Verdict(SKIP, "", "not a CUDA build (see build)", data)
    if driver_cuda is None:
        return Verdict(
            SKIP,
            f"build CUDA {build_cuda}",
            f"no NVIDIA driver found ({source}: {error or 'version 0'}); "
            "install the NVIDIA driver on a machine with a GPU",
            data,
        )
    value = f"driver CUDA {driver_cuda} (from {source}), build CUDA {build_cuda}"
    if nvml_cuda and nvml_cuda != driver_cuda:
        value += f"; NVML says {nvml_cuda}"
    drv, build = config.major_minor(driver_cuda), config.major_minor(build_cuda)
    if drv is None or build is None:
        return Verdict(FAIL, value, "cannot compare the versions", data)
    if drv[0] < build[0]:
        return Verdict(
            FAIL,
            value,
            f"the driver supports CUDA {driver_cuda} but this torch is built for CUDA {build_cuda}, a newer "
            f"major: update the NVIDIA driver to one for CUDA >= {build_cuda}, or install a channel built "
            f"for CUDA {drv[0]}.x",
            data,
        )
    if drv < build:
        return Verdict(
            WARN,
            value,
            f"the driver supports CUDA {driver_cuda} and this torch is built for CUDA {build_cuda}: "
            f"CUDA's minor-version compatibility runs it, except features that need a newer driver "
            f"(the kernel checks decide); a driver for CUDA >= {build_cuda} removes the doubt",
            data,
        )
    return Verdict(PASS, value, "", data)


# --------------------------------------------------------------------------- device count (check c)


def visible_devices(
    cvd: str | None, nvml_count: int, uuids: tuple[str, ...] = (), mig_enabled: bool = False
) -> list[str] | None:
    """The devices CUDA_VISIBLE_DEVICES lets CUDA see, as CUDA parses it; None when it is unset.

    Entries are indexes or (prefixes of) GPU-/MIG- UUIDs, comma-separated; CUDA stops at the first
    entry that names no device (invalid, out of range, or repeated) and ignores the rest.
    """
    if cvd is None:
        return None
    seen: list[str] = []
    for raw in cvd.split(","):
        token = raw.strip()
        if not token:
            break
        if re.fullmatch(r"\d+", token):
            index = int(token)
            key = f"index {index}"
            ok = index < nvml_count
            if ok and index < len(uuids):
                key = uuids[index]
        elif token.startswith("GPU-"):
            hits = [u for u in uuids if u.startswith(token)]
            ok = len(hits) == 1
            key = hits[0] if ok else token
        elif token.startswith("MIG-"):
            ok, key = mig_enabled, token
        else:
            ok, key = False, token
        if not ok or key in seen:
            break
        seen.append(key)
    return seen


def _cvd_text(cvd: str | None) -> str:
    return "CUDA_VISIBLE_DEVICES unset" if cvd is None else f"CUDA_VISIBLE_DEVICES={cvd!r}"


@dataclass(frozen=True)
class _CountSeen:
    """What judge_count's cases share: the torch count, CUDA_VISIBLE_DEVICES, and the verdict's wording."""

    torch: int
    cvd: str | None
    env: str  # CUDA_VISIBLE_DEVICES as the reasons name it
    mig: str  # the MIG sentence ("" without MIG)
    extra: str  # " (CUDA said: ...)" or ""
    value: str
    data: dict

    def verdict(self, status: str, reason: str) -> Verdict:
        return Verdict(status, self.value, reason, self.data)


def judge_count(
    nvml_count: int | None,
    torch_count: int,
    cvd: str | None,
    *,
    uuids: tuple[str, ...] = (),
    mig_gpus: tuple[int, ...] = (),
    nvml_error: str = "",
    cuda_error: str = "",
) -> Verdict:
    """Check c: the GPUs NVML lists vs the CUDA devices torch sees, in the same environment.

    No GPU at all (no driver, NVML 0 and torch 0) is a SKIP: the per-GPU checks say the same and
    the stage fails on "no GPU checked". A GPU that NVML lists and torch cannot see is a FAIL.
    """
    env = _cvd_text(cvd)
    seen = _CountSeen(
        torch=torch_count,
        cvd=cvd,
        env=env,
        mig=_mig_sentence(mig_gpus),
        extra=f" (CUDA said: {cuda_error})" if cuda_error else "",
        value=f"NVML {nvml_count if nvml_count is not None else 'n/a'}, torch {torch_count} ({env})",
        data={"nvml": nvml_count, "torch": torch_count, "cuda_visible_devices": cvd, "mig_gpus": list(mig_gpus)},
    )
    if nvml_count is None:
        return _count_without_nvml(seen, nvml_error)
    if nvml_count == 0 and torch_count == 0:
        return seen.verdict(SKIP, "no NVIDIA GPU here: NVML lists none and torch sees none" + seen.extra)
    if cvd is not None and not cvd.strip() and torch_count == 0:
        return seen.verdict(
            FAIL,
            f"torch sees 0 of {nvml_count} GPU(s): CUDA_VISIBLE_DEVICES is set but "
            "empty, which hides every GPU; unset it (or list the GPUs to use)" + seen.extra,
        )
    visible = visible_devices(cvd, nvml_count, uuids, bool(mig_gpus))
    if visible is not None and cvd is not None:  # CUDA_VISIBLE_DEVICES set and not empty
        return _count_selected(seen, nvml_count, cvd, visible)
    return _count_all(seen, nvml_count)


def _mig_sentence(mig_gpus: tuple[int, ...]) -> str:
    if not mig_gpus:
        return ""
    return (
        f"MIG is enabled on GPU {', '.join(map(str, mig_gpus))}: CUDA sees MIG instances there, not "
        "the whole GPU (one instance unless CUDA_VISIBLE_DEVICES names MIG UUIDs); "
    )


def _count_without_nvml(seen: _CountSeen, nvml_error: str) -> Verdict:
    """NVML gave no count: torch's count stands alone."""
    if seen.torch > 0:
        return seen.verdict(PASS, f"NVML unavailable ({nvml_error}); torch sees {seen.torch} GPU(s)")
    if seen.cvd is not None and not seen.cvd.strip():
        return seen.verdict(
            FAIL,
            "torch sees no GPU and CUDA_VISIBLE_DEVICES is set but empty, which hides "
            "every GPU: unset it (or list the GPUs to use)" + seen.extra,
        )
    return seen.verdict(
        SKIP, f"no NVIDIA GPU here: NVML unavailable ({nvml_error}) and torch sees no CUDA device" + seen.extra
    )


def _count_selected(seen: _CountSeen, nvml_count: int, cvd: str, visible: list[str]) -> Verdict:
    """CUDA_VISIBLE_DEVICES is set and not empty: torch should see the devices it selects."""
    tokens = [t.strip() for t in cvd.split(",")]
    if len(visible) < len(tokens):
        bad = tokens[len(visible)]
        why = (
            f"CUDA_VISIBLE_DEVICES={cvd!r} names {bad!r}, which is no device of the {nvml_count} NVML "
            f"lists (indexes 0..{nvml_count - 1}) or a repeat; CUDA ignores it and everything after it"
        )
        if seen.torch == 0:
            return seen.verdict(FAIL, f"torch sees no GPU: {why}; fix or unset CUDA_VISIBLE_DEVICES" + seen.extra)
        if seen.torch == len(visible):
            return seen.verdict(PASS, f"torch sees {seen.torch} of {nvml_count} GPU(s): {why}")
    elif seen.torch == len(visible):
        note = (
            ""
            if seen.torch == nvml_count
            else f"torch sees {seen.torch} of {nvml_count} GPU(s), as CUDA_VISIBLE_DEVICES selects"
        )
        return seen.verdict(PASS, note)
    if seen.torch == 0:
        return seen.verdict(
            FAIL,
            f"torch sees no GPU although {seen.env} selects {len(visible)}: {seen.mig}"
            "the CUDA runtime could not use them" + seen.extra,
        )
    return seen.verdict(
        FAIL,
        f"torch sees {seen.torch} GPU(s) but {seen.env} selects {len(visible)}: {seen.mig}"
        "check the GPUs with nvidia-smi" + seen.extra,
    )


def _count_all(seen: _CountSeen, nvml_count: int) -> Verdict:
    """No selection by CUDA_VISIBLE_DEVICES: torch should see every GPU NVML lists (one per MIG GPU)."""
    torch_count, extra = seen.torch, seen.extra
    if torch_count == nvml_count:
        return seen.verdict(PASS, seen.mig.rstrip("; ") if seen.mig else "")
    if seen.mig:
        return seen.verdict(
            FAIL if torch_count == 0 else PASS,
            f"torch sees {torch_count}, NVML lists {nvml_count} GPU(s): {seen.mig}"
            "name the MIG UUIDs in CUDA_VISIBLE_DEVICES to use several" + extra,
        )
    if torch_count == 0:
        return seen.verdict(
            FAIL,
            f"torch sees 0 of the {nvml_count} GPU(s) NVML lists, with CUDA_VISIBLE_DEVICES "
            "unset and no MIG: the CUDA runtime cannot use them (driver/library mismatch, missing "
            "/dev/nvidia* in a container, or a GPU in a bad state: see dmesg for Xid)" + extra,
        )
    if torch_count < nvml_count:
        return seen.verdict(
            FAIL,
            f"torch sees {torch_count} of the {nvml_count} GPU(s) NVML lists, with "
            "CUDA_VISIBLE_DEVICES unset and no MIG: a GPU failed CUDA initialisation or is hidden "
            "from this process (container device list); see nvidia-smi and dmesg for Xid" + extra,
        )
    return seen.verdict(
        FAIL,
        f"torch sees {torch_count} GPU(s), more than the {nvml_count} NVML lists: the CUDA "
        "driver library and NVML disagree (two driver versions installed?)" + extra,
    )


# --------------------------------------------------------------------------- architecture (check d)


@dataclass(frozen=True)
class Arch:
    kind: str  # "sm" (binary cubin) or "compute" (PTX, JIT-compiled by the driver)
    major: int
    minor: int
    suffix: str = ""  # "a" (arch-specific: that exact GPU only) or "f" (family: same major, minor >=)

    @property
    def text(self) -> str:
        return f"{self.kind}_{self.major}{self.minor}{self.suffix}"


def parse_arch(entry: str) -> Arch | None:
    """'sm_86' -> Arch('sm', 8, 6); 'sm_120' -> 12.0; 'compute_90a' -> PTX 9.0 'a'; junk -> None."""
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", entry.strip().lower())
    if not m:
        return None
    return Arch(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))


def arch_runs_on(arch: Arch, major: int, minor: int) -> bool:
    """Whether code built for `arch` runs on a device of capability major.minor.

    Binary (sm_XY): same major and minor <= the device's. PTX (compute_XY): any device >= X.Y (the
    driver compiles it). Suffix 'a': that exact capability only; 'f': same major, minor >= (family).
    """
    device, code = (major, minor), (arch.major, arch.minor)
    if arch.suffix == "a":
        return device == code
    if arch.kind == "sm" or arch.suffix == "f":
        return major == arch.major and minor >= arch.minor
    return device >= code


def arch_list_covers(arch_list: list[str], capability: tuple[int, int] | list[int]) -> bool:
    """Whether any entry of a build's arch list (torch.cuda.get_arch_list()) runs on this capability."""
    major, minor = int(capability[0]), int(capability[1])
    return any(arch_runs_on(a, major, minor) for a in (parse_arch(str(e)) for e in arch_list or []) if a)


def judge_arch(
    capability: tuple[int, int],
    arch_list: list[str],
    gpu_name: str,
    min_cuda_for_arch: dict[str, str] | None = None,
    source: str = "torch.cuda.get_arch_list()",
    torch_warnings: Sequence[str] = (),
) -> Verdict:
    """Check d: does this build carry kernels (or PTX) for the device's compute capability?"""
    major, minor = capability
    sm = f"sm_{major}{minor}"
    value = f"{sm} ({gpu_name}); build has {' '.join(arch_list) or 'nothing'}"
    data = {"capability": f"{major}.{minor}", "arch_list": list(arch_list), "source": source}
    parsed = [a for a in (parse_arch(e) for e in arch_list) if a is not None]
    binary = [a.text for a in parsed if a.kind == "sm" and arch_runs_on(a, major, minor)]
    ptx = [a.text for a in parsed if a.kind == "compute" and arch_runs_on(a, major, minor)]
    seam = f" [arch list from {source}]" if source != "torch.cuda.get_arch_list()" else ""
    warned = f"; torch warned: {torch_warnings[0][:200]}" if torch_warnings else ""
    if not arch_list:
        return Verdict(FAIL, value, f"{source} is empty: this torch carries no CUDA kernels{seam}", data)
    if binary:
        data["runs_with"] = binary[-1]
        return Verdict(PASS, value, f"kernels {binary[-1]}{seam}{warned}", data)
    if ptx:
        data["runs_with"] = ptx[-1]
        return Verdict(
            PASS,
            value,
            f"no {sm} kernels; PTX {ptx[-1]} is JIT-compiled by the driver on first use (slow start){seam}{warned}",
            data,
        )
    need = (min_cuda_for_arch or {}).get(sm)
    hint = f" (cu{need.replace('.', '')} or later for {sm})" if need else ""
    return Verdict(
        FAIL,
        value,
        f"this PyTorch build has no kernels for {sm} ({gpu_name}); use a channel built for it{hint}{seam}{warned}",
        data,
    )


# --------------------------------------------------------------------------- correctness (check e)


def judge_error(rel_err: float | None, tol: float, *, nonfinite: int = 0, note: str = "") -> Verdict:
    """‖out − ref‖ / ‖ref‖ against a tolerance; NaN/inf in the output or the error never passes."""
    data = {"rel_err": rel_err, "tol": tol, "nonfinite": nonfinite}
    if rel_err is None:
        return Verdict(FAIL, "", "no result to compare", data)
    value = f"rel err {rel_err:.2e} (tol {tol:.0e})"
    suffix = f"; {note}" if note else ""
    if nonfinite:
        return Verdict(
            FAIL, value, f"{nonfinite} NaN/inf value(s) in the output (unwritten or overflowed)" + suffix, data
        )
    if not math.isfinite(rel_err):
        return Verdict(FAIL, value, "the error is NaN/inf" + suffix, data)
    if rel_err > tol:
        return Verdict(
            FAIL,
            value,
            f"relative error {rel_err:.2e} exceeds the tolerance {tol:.0e}: the GPU computes a wrong result" + suffix,
            data,
        )
    return Verdict(PASS, value, note, data)


SDPA_LABELS = {
    "FLASH_ATTENTION": "flash",
    "EFFICIENT_ATTENTION": "efficient",
    "CUDNN_ATTENTION": "cudnn",
    "MATH": "math",
    "ERROR": "none",
    "OVERRIDEABLE": "overrideable",
}


def sdpa_backend_label(name: str) -> str:
    """torch.nn.attention.SDPBackend member name -> the short name reports use ('flash')."""
    return SDPA_LABELS.get(name, name.lower())


def judge_sdpa(
    default_backend: str, default: tuple[float, int], forced: dict[str, tuple[float, int] | str], tol: float
) -> Verdict:
    """Causal attention: the backend torch picks by default must be right, and so must every backend
    that runs when forced (`forced[name]` is (rel_err, nonfinite), or a string: 'n/a…' when torch has no
    kernel for it here, 'error: …' when it raised). A wrong number from any backend is a FAIL; a forced
    backend that raises is noted, not failed (it fails loudly, and torch does not pick it here)."""
    err, bad = default
    base = judge_error(err, tol, nonfinite=bad)
    parts = []
    for name, res in forced.items():
        parts.append(f"{name} {res[0]:.1e}" if isinstance(res, tuple) else f"{name} {res.split(':')[0]}")
    value = f"default {default_backend}: {base.value}; forced: {', '.join(parts)}"
    data = {
        "backend": default_backend,
        "default": {"rel_err": err, "nonfinite": bad},
        "forced": {k: ({"rel_err": v[0], "nonfinite": v[1]} if isinstance(v, tuple) else v) for k, v in forced.items()},
        "tol": tol,
    }
    if base.status == FAIL:
        return Verdict(FAIL, value, f"the default backend ({default_backend}): {base.reason}", data)
    wrong = [
        name
        for name, res in forced.items()
        if isinstance(res, tuple) and judge_error(res[0], tol, nonfinite=res[1]).status == FAIL
    ]
    if wrong:
        return Verdict(
            FAIL,
            value,
            f"backend {', '.join(wrong)} computes a wrong result (tolerance {tol:.0e}); "
            "torch may pick it for other shapes",
            data,
        )
    raised = [
        f"{name} raised {res[len('error: ') :]}"
        for name, res in forced.items()
        if isinstance(res, str) and res.startswith("error")
    ]
    return Verdict(PASS, value, "; ".join(raised), data)


def judge_allreduce(world: int, results: list[dict], hung: list[int], timeout_s: float) -> Verdict:
    """NCCL all-reduce, one process per GPU: every rank's sum exact, nobody hung or failed."""
    data: dict = {"world": world, "results": results, "hung": hung}
    errors = [f"rank {r.get('rank')}: {r['error']}" for r in results if r.get("error") and r.get("rank") not in hung]
    stuck = f"rank(s) {', '.join(map(str, hung))} did not finish within {timeout_s:g} s" if hung else ""
    if errors:
        return Verdict(FAIL, f"{world} ranks", "; ".join(errors + ([stuck] if stuck else [])), data)
    if hung:
        return Verdict(
            FAIL,
            f"{world} ranks",
            f"{stuck}: NCCL hangs (check peer access and NCCL_DEBUG=INFO output, and other jobs on the GPUs)",
            data,
        )
    wrong = [(r["rank"], r["wrong"]) for r in results if r.get("wrong")]
    checked = results[0].get("checked", 0) if results else 0
    times = [r["seconds"] for r in results if r.get("seconds")]
    value = f"sum of {checked} random integers on {world} GPUs"
    if times:
        seconds, nbytes = max(times), results[0].get("bytes", 0)
        algbw = nbytes / seconds / 1e9
        busbw = algbw * 2 * (world - 1) / world
        data.update(algbw_gbs=algbw, busbw_gbs=busbw)
        value += f"; {nbytes / 2**20:.0f} MiB all-reduce {seconds * 1e3:.2f} ms, bus bandwidth {busbw:.0f} GB/s"
    if wrong:
        detail = ", ".join(f"rank {r}: {n} wrong" for r, n in wrong)
        return Verdict(FAIL, value, f"the all-reduced sum is wrong ({detail}): GPU-to-GPU transfers corrupt data", data)
    return Verdict(PASS, value, "", data)


def judge_memory(
    mismatches: int, words: int, alloc_gib: float, free_gib: float, total_gib: float, error: str = ""
) -> Verdict:
    """Check f: every word of the written pattern (and its inverse) reads back."""
    value = f"{alloc_gib:.1f} GiB of {free_gib:.1f} GiB free ({total_gib:.1f} GiB total)"
    data = {"alloc_gib": alloc_gib, "free_gib": free_gib, "total_gib": total_gib, "mismatches": mismatches}
    if error:
        return Verdict(FAIL, value, f"could not allocate or verify {alloc_gib:.1f} GiB: {error}", data)
    if mismatches:
        return Verdict(
            FAIL,
            value,
            f"{mismatches} of {words} 8-byte words read back wrong: faulty memory "
            "(check ECC / remapped rows with nvidia-smi -q -d ECC,ROW_REMAPPER)",
            data,
        )
    return Verdict(PASS, value, "pattern and inverse read back", data)


# --------------------------------------------------------------------------- speed (check g)


@dataclass(frozen=True)
class MigSlice:
    compute: int  # compute slices ("1g" -> 1)
    memory_gb: float  # its memory ("10gb" -> 10)


def parse_mig(device_name: str) -> MigSlice | None:
    """'NVIDIA H100 80GB HBM3 MIG 1g.10gb' -> MigSlice(1, 10.0); None for a whole GPU."""
    m = re.search(r"\bMIG\s+(\d+)g\.(\d+(?:\.\d+)?)gb", device_name, re.IGNORECASE)
    return MigSlice(int(m.group(1)), float(m.group(2))) if m else None


def speed_expectation(spec: config.GpuSpec | None, unit: str, gpu_name: str) -> tuple[float | None, str | None, str]:
    """(datasheet figure to judge a speed in `unit` against, the model as reported, why there is none).

    A MIG slice is judged against its share of the GPU: its compute slices of `mig_slices` for TFLOP/s,
    its memory of the GPU's for TB/s (bandwidth comes with the memory slices). A slice of a model with
    no `mig_slices` in configs/gpus.yaml is not judged, and the reason says so.
    """
    if spec is None:
        return None, None, ""
    key, peak = spec.figure(unit)
    mig = parse_mig(gpu_name)
    if mig is None or peak is None:
        return peak, spec.model, ""
    label = f"{spec.model} MIG {mig.compute}g.{mig.memory_gb:g}gb"
    if not spec.mig_slices:
        return (
            None,
            label,
            (
                f"speed not judged: {gpu_name!r} is a MIG slice and configs/gpus.yaml gives no "
                f"mig_slices for {spec.model} to scale its {key} by; add the count of compute slices"
            ),
        )
    if unit == "TFLOP/s":
        return peak * mig.compute / spec.mig_slices, f"{label} ({mig.compute}/{spec.mig_slices} of its compute)", ""
    share = min(1.0, mig.memory_gb / spec.memory_gb)
    return peak * share, f"{label} ({mig.memory_gb:g}/{spec.memory_gb:g} GB of its memory)", ""


def judge_speed(
    kind: str,
    measured: float,
    unit: str,
    peak: float | None,
    share: float,
    model: str | None,
    gpu_name: str,
    causes: Sequence[str] = (),
    why_missing: str = "",
) -> Verdict:
    """Check g: a measured rate against the datasheet of the device's model.

    No datasheet figure (a model not in configs/gpus.yaml, or listed without this figure): SKIP,
    naming the figure and where to add it; the measurement stays in the value. Below `share` of the
    datasheet: FAIL naming the likely causes seen.
    """
    data = {"measured": measured, "unit": unit, "peak": peak, "model": model, "share": None}
    value = f"{measured:.1f} {unit}" if unit == "TFLOP/s" else f"{measured:.2f} {unit}"
    if not math.isfinite(measured) or measured <= 0:
        return Verdict(FAIL, value, f"{kind}: no valid measurement", data)
    if peak is None:
        return Verdict(SKIP, value, why_missing or missing_figure(gpu_name, model, unit), data)
    frac = measured / peak
    data["share"] = frac
    value += f" = {frac:.0%} of {model} datasheet {peak:g} {unit}"
    if frac < share:
        seen = "; ".join(causes) if causes else "none of them seen by NVML right now"
        return Verdict(
            FAIL,
            value,
            f"{kind} below {share:.0%} of the datasheet: likely clock throttling "
            f"(thermal, power cap or brake), a lowered power limit, or another process on the GPU "
            f"(seen: {seen})",
            data,
        )
    return Verdict(PASS, value, "; ".join(causes), data)


def judge_speed_for(
    kind: str,
    measured: float,
    unit: str,
    spec: config.GpuSpec | None,
    share: float,
    gpu_name: str,
    causes: Sequence[str] = (),
) -> Verdict:
    """judge_speed against the device's datasheet entry (None: not listed), a MIG slice against its share."""
    peak, model, why = speed_expectation(spec, unit, gpu_name)
    return judge_speed(kind, measured, unit, peak, share, model, gpu_name, causes, why)


def missing_figure(gpu_name: str, model: str | None, unit: str) -> str:
    """Why a speed is not judged: which datasheet figure is missing and where to add it."""
    key = "bf16_tflops" if unit == "TFLOP/s" else "mem_bw_tbs"
    if model is None:
        return (
            f"speed not judged: {gpu_name!r} is not in configs/gpus.yaml; add an entry with its datasheet's "
            f"dense {key} (and the other figures) to judge it"
        )
    return (
        f"speed not judged: configs/gpus.yaml gives no {key} for {model} (no bf16 tensor cores or no "
        "published figure); add the datasheet's dense figure there to judge it"
    )


# --------------------------------------------------------------------------- health (check j)


def clock_event_names(mask: int | None) -> list[str]:
    """An NVML clocks-event (throttle) bitmask -> the reasons' names in bit order (configs/nvml.yaml);
    a bit the table does not know is named unknown_0x..."""
    if not mask:
        return []
    table = config.nvml_tables().clock_events
    names = [name for bit, (name, _) in sorted(table.items()) if mask & bit]
    unknown = mask & ~sum(table)
    return names + ([f"unknown_{unknown:#x}"] if unknown else [])


def clock_event_is_fault(name: str) -> bool:
    """Whether a clock-event reason is a fault (thermal, power brake, HW slowdown) or information."""
    return any(n == name and fault for n, fault in config.nvml_tables().clock_events.values())


def decode_throttle(mask: int | None) -> tuple[list[str], list[str]]:
    """An NVML clocks-event (throttle) bitmask -> (fault names, information names)."""
    names = clock_event_names(mask)
    return [n for n in names if clock_event_is_fault(n)], [n for n in names if not clock_event_is_fault(n)]


def judge_throttle(samples: dict[str, int | None]) -> Verdict:
    """Throttle reasons sampled at several moments ('before', 'under load', 'after')."""
    data = {k: v for k, v in samples.items()}
    if all(v is None for v in samples.values()):
        return Verdict(SKIP, "", "NVML cannot read clock throttle reasons on this GPU", data)
    parts, faults = [], []
    for when, mask in samples.items():
        if mask is None:
            continue
        bad, info = decode_throttle(mask)
        faults += [f"{b} ({when})" for b in bad]
        parts.append(f"{when}: {', '.join(bad + info) or 'none'}")
    value = "; ".join(parts)
    if faults:
        return Verdict(
            FAIL,
            value,
            f"clocks throttled by {', '.join(faults)}: check cooling and power "
            "(nvidia-smi -q -d PERFORMANCE,TEMPERATURE,POWER)",
            data,
        )
    return Verdict(PASS, value, "", data)


def judge_ecc(before: int | None, after: int | None) -> Verdict:
    """Volatile uncorrectable ECC errors must not grow during the checks."""
    data = {"before": before, "after": after}
    if before is None or after is None:
        return Verdict(SKIP, "", "NVML reports no ECC counters here (ECC off or not supported)", data)
    value = f"volatile uncorrectable ECC {before} -> {after}"
    if after > before:
        return Verdict(
            FAIL,
            value,
            f"{after - before} new uncorrectable ECC error(s) during the checks: "
            "faulty GPU memory; drain the GPU and contact the provider",
            data,
        )
    note = f"{before} uncorrectable error(s) since the last driver load" if before else ""
    return Verdict(PASS, value, note, data)


def judge_pages(retired_pending: bool | None, remap: tuple[int, int, bool, bool] | None) -> Verdict:
    """No page retirement pending, no row remapping pending or failed (needs a GPU reset)."""
    data = {"retired_pending": retired_pending, "remap": list(remap) if remap else None}
    if retired_pending is None and remap is None:
        return Verdict(SKIP, "", "NVML reports neither retired pages nor remapped rows here", data)
    parts, faults = [], []
    if retired_pending is not None:
        parts.append(f"retired pages pending: {'yes' if retired_pending else 'no'}")
        if retired_pending:
            faults.append("a page retirement is pending")
    if remap is not None:
        corr, unc, pending, failed = remap
        parts.append(
            f"remapped rows {corr} corr / {unc} uncorr, pending {'yes' if pending else 'no'}, "
            f"failure {'yes' if failed else 'no'}"
        )
        if pending:
            faults.append("a row remapping is pending")
        if failed:
            faults.append("a row remapping failed")
    value = "; ".join(parts)
    if faults:
        return Verdict(FAIL, value, f"{' and '.join(faults)}: the GPU needs a reset (or service) before use", data)
    return Verdict(PASS, value, "", data)


def judge_xid(events: list[int] | None, error: str = "") -> Verdict:
    """Xid critical-error events NVML delivered during the checks (classes in configs/nvml.yaml).

    A hardware or driver Xid FAILs; an application Xid (a program's own fault, maybe another tenant's
    on a shared machine) and an unclassified one WARN, each named.
    """
    data = {"xids": events}
    if events is None:
        return Verdict(SKIP, "", f"Xid events cannot be watched here: {error}", data)
    if not events:
        return Verdict(PASS, "no Xid events", "", data)
    tables = config.nvml_tables()

    def name(x: int) -> str:
        if x in tables.xid_hardware:
            return f"Xid {x} ({tables.xid_hardware[x]}: hardware/driver)"
        if x in tables.xid_application:
            return f"Xid {x} ({tables.xid_application[x]}: application)"
        return f"Xid {x} (not in configs/nvml.yaml: see NVIDIA's Xid catalog)"

    named = ", ".join(name(x) for x in dict.fromkeys(events))
    value = f"{len(events)} Xid event(s)"
    if any(x in tables.xid_hardware for x in events):
        return Verdict(
            FAIL,
            value,
            f"{named} during the checks: a hardware or driver fault; see dmesg and drain or reset the GPU",
            data,
        )
    return Verdict(
        WARN,
        value,
        f"{named} during the checks: raised by a program (this one's kernels passed "
        "their checks, so maybe another process on the GPU); see dmesg",
        data,
    )


# --------------------------------------------------------------------------- summary


def counts(checks: list[Check]) -> dict[str, int]:
    out = {s: 0 for s in STATUSES}
    for c in checks:
        out[c.status] += 1
    return out


def gpus_checked(checks: list[Check]) -> int:
    """GPUs on which at least one per-GPU check ran (PASS or FAIL)."""
    return len({c.gpu for c in checks if c.gpu is not None and c.status != SKIP})


EXIT_OK, EXIT_FAIL, EXIT_NO_GPU = 0, 1, 3


def exit_code(checks: list[Check]) -> int:
    """0: no FAIL and at least one GPU checked; 1: a check failed; 3: no FAIL but no GPU was checked."""
    if any(c.status == FAIL for c in checks):
        return EXIT_FAIL
    return EXIT_OK if gpus_checked(checks) else EXIT_NO_GPU


def stage_reason(checks: list[Check]) -> str:
    """The stage's one-line reason: the first failure in full, the count of the others; with no failure, the
    first warning and every per-GPU check that did not run, grouped by why (a speed check's missing datasheet
    figure and where to add it, a compile check without triton, health checks NVML could not make)."""
    failed = [c for c in checks if c.status == FAIL]
    if failed:
        first = failed[0]
        name = first.name if first.gpu is None else f"{first.where} {first.name}"
        more = f" (+{len(failed) - 1} more FAIL, see cuda_check.txt)" if len(failed) > 1 else ""
        return f"{len(failed)} check(s) FAIL: {name}: {first.reason or first.value}{more}"
    if not gpus_checked(checks):
        count = next((c for c in checks if c.name == "device_count"), None)
        why = (count.reason or count.value) if count else "no device check ran"
        return f"no CUDA device visible to torch: {why}"
    notes = []
    warned = [c for c in checks if c.status == WARN]
    if warned:
        first = warned[0]
        name = first.name if first.gpu is None else f"{first.where} {first.name}"
        more = f" (+{len(warned) - 1} more WARN, see cuda_check.txt)" if len(warned) > 1 else ""
        notes.append(f"{len(warned)} check(s) WARN: {name}: {first.reason or first.value}{more}")
    unjudged = [c for c in checks if c.status == SKIP and c.gpu is not None]
    for why in dict.fromkeys(c.reason for c in unjudged):  # each reason once, with the checks it stopped
        stopped = [c for c in unjudged if c.reason == why]
        names = dict.fromkeys(c.name for c in stopped)
        where = ", ".join(f"{gpu_span([c.gpu for c in stopped if c.name == n])} {n}" for n in names)
        notes.append(f"{where} SKIP: {why}")
    return "; ".join(notes)


# torch's device index (c10::DeviceIndex) is an 8-bit signed number: no process sees a GPU past 127.
GPU_INDEX_MAX = 127


def gpu_index_problem(gpu) -> str:
    """ "" when `gpu` is a GPU index (a plain int, not a bool, from 0 to GPU_INDEX_MAX); else what it is instead,
    naming it as JSON spells it (it comes from cuda_check.json): 'gpu "3", not a GPU index (...)'."""
    if isinstance(gpu, int) and not isinstance(gpu, bool) and 0 <= gpu <= GPU_INDEX_MAX:
        return ""
    spelled = json.dumps(gpu, default=str)
    spelled = spelled if len(spelled) <= 40 else spelled[:39] + "…"
    return f"gpu {spelled}, not a GPU index (a whole number from 0 to {GPU_INDEX_MAX})"


def gpu_span(gpus: list) -> str:
    """'gpu0', 'gpu0-7' for a run of GPUs, 'gpu0,2,5' otherwise: one line on an 8-GPU machine too. ValueError
    for a value that is not a GPU index (gpu_index_problem)."""
    for gpu in gpus:
        if why := gpu_index_problem(gpu):
            raise ValueError(why)
    nums = sorted(set(gpus))
    if len(nums) > 2 and nums[-1] - nums[0] == len(nums) - 1:  # distinct whole numbers: a run without a gap
        return f"gpu{nums[0]}-{nums[-1]}"
    return "gpu" + ",".join(str(n) for n in nums)


def format_line(c: Check) -> str:
    """One report line: status, where, check, seconds, value — reason."""
    line = f"{c.status:<4}  {c.where:<5} {c.name:<20} {c.seconds:6.2f} s"
    text = " — ".join(t for t in (c.value, c.reason) if t)
    return f"{line}  {text}" if text else line


HEADER = f"{'':<4}  {'where':<5} {'check':<20} {'time':>8}  value — reason"
