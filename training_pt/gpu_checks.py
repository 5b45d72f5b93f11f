#!/usr/bin/env python3
"""The cuda_check checker: does PyTorch compute correctly and at speed on every GPU of this machine?

Runs inside `.venv-gpu` (it imports torch) as one fresh process, started by tasks/cuda_check.py through
tasks/proc.py's launcher, or standalone from the repository root with any Python that has torch, pyyaml
and (for the NVML checks) nvidia-ml-py:

    python3 -m training_pt.gpu_checks --out DIR [--seed N] [--mem-share F] [--speed-share F]

It writes DIR/cuda_check.txt line by line as the checks finish (the same lines go to stdout) and
DIR/cuda_check.json at the end. Every check is PASS, FAIL or SKIP with its measured value, reason
and duration; the verdicts come from tasks/cuda_rules.py (no torch there, unit-tested on the CPU).
Exit code: 0 no FAIL and at least one GPU checked; 1 a check failed; 3 no FAIL but no GPU was
checked (a machine without one); 2 bad options or settings.

Test seam: M40_TEST_ARCH_LIST="sm_80,sm_86" replaces torch.cuda.get_arch_list() in the arch check
only (the kernels still run), to show the arch FAIL line on a GPU this build supports.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

from tasks import phases as timing  # noqa: E402  (torch-free; first, so the start-up below is the interpreter's)

_STARTUP_S = timing.process_age_s()

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

# Never NVLink multicast (NCCL's NVLS, PyTorch's symmetric memory, NVSHMEM): on shared hosts it can
# put the GPUs out of service. One Inductor compile thread (no worker pool to start for one small
# kernel). Set before torch and NCCL read them; the all-reduce processes inherit them.
from tasks import layout  # noqa: E402

os.environ.update(layout.NO_MULTICAST_ENV)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

from tasks import cuda_rules as rules  # noqa: E402
from tasks import identity, probe, proc  # noqa: E402
from tasks.cuda_rules import FAIL, PASS, SKIP, WARN, Check, Verdict  # noqa: E402
from tasks.records import now_iso  # noqa: E402
from training_pt import burn, fabric, memtest, quick_exit  # noqa: E402
from training_pt.fabric import first_line  # noqa: E402

try:
    import pynvml
except ImportError:  # the NVML checks SKIP with the reason
    pynvml = None

_IMPORT_S = time.perf_counter() - _T0

PER_GPU = (
    "arch",
    "matmul.fp32",
    "matmul.tf32",
    "matmul.bf16",
    "matmul.fp16",
    "conv2d.fp32",
    "conv2d.bf16",
    "sdpa.causal",
    "reduction",
    "memory",
    "speed.copy",
    "speed.matmul_bf16",
    "compile",
)
MULTI_GPU = ("peer_access", "allreduce")
HEALTH = ("health.ecc", "health.pages", "health.throttle", "health.xid")
# The checks timed as phases of their own (tasks/phases.py); every other check counts in "checks" (or "long").
PHASE_OF = {"init": "cuda_init", "compile": "compile", "peer_access": "multi_gpu", "allreduce": "multi_gpu"}
MATMUL_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64: the memory pattern's multiplier
TXT_FILE = layout.STAGE_FILES["cuda_check"][0]


# --------------------------------------------------------------------------- NVML


class Nvml:
    """NVML as far as this machine offers it; every missing piece is None plus a reason."""

    def __init__(self) -> None:
        self.error = ""
        self.count: int | None = None
        self.handles: list = []
        self.uuids: tuple[str, ...] = ()
        self.pci: tuple[str, ...] = ()
        self.mig_gpus: tuple[int, ...] = ()
        self.driver = self.cuda = None
        self._events = None
        self.xid_error: dict[int, str] = {}
        if pynvml is None:
            self.error = "nvidia-ml-py (pynvml) is not installed"
            return
        try:
            pynvml.nvmlInit()
            self.count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as e:
            self.error = f"nvmlInit failed: {e}"
            self.count = None
            return
        # A GPU NVML cannot open (lost, in a bad state) keeps a None handle: its checks SKIP.
        self.handles = [self.call(pynvml.nvmlDeviceGetHandleByIndex, i) for i in range(self.count)]
        self.uuids = tuple(
            self._text(self.call(pynvml.nvmlDeviceGetUUID, h)) if h is not None else "" for h in self.handles
        )
        self.pci = tuple(
            self._text(getattr(self.call(pynvml.nvmlDeviceGetPciInfo, h), "busId", "")).lower() if h is not None else ""
            for h in self.handles
        )
        mig = []
        for i, h in enumerate(self.handles):
            mode = self.call(pynvml.nvmlDeviceGetMigMode, h) if h is not None else None
            if mode and mode[0] == 1:
                mig.append(i)
        self.mig_gpus = tuple(mig)
        self.driver = self._text(self.call(pynvml.nvmlSystemGetDriverVersion))
        self.cuda = rules.cuda_version_from_int(self.call(pynvml.nvmlSystemGetCudaDriverVersion))

    @property
    def ok(self) -> bool:
        return self.count is not None

    @staticmethod
    def _text(value) -> str:
        return value.decode() if isinstance(value, bytes) else (value or "")

    @staticmethod
    def call(fn, *args):
        try:
            return fn(*args)
        except pynvml.NVMLError:
            return None

    def index_for(self, props) -> int | None:
        """The NVML index of a torch device: by UUID, else by PCI bus id."""
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:
            for i, u in enumerate(self.uuids):
                if u and u in (uuid, f"GPU-{uuid}", f"MIG-{uuid}"):
                    return i
        if hasattr(props, "pci_bus_id"):
            bus = (props.pci_domain_id, f"{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0")
            for i, p in enumerate(self.pci):
                domain, _, rest = p.partition(":")
                if rest and (int(domain, 16), rest) == bus:
                    return i
        return None

    def throttle(self, i: int | None) -> int | None:
        if i is None or not self.ok or self.handles[i] is None:
            return None
        return probe.clock_events(pynvml, self.handles[i])

    def snapshot(self, i: int | None) -> dict:
        if i is None or not self.ok or self.handles[i] is None:
            return {}
        h = self.handles[i]
        pending = self.call(pynvml.nvmlDeviceGetRetiredPagesPendingStatus, h)
        remap = self.call(pynvml.nvmlDeviceGetRemappedRows, h)
        return {
            "ecc": self.call(
                pynvml.nvmlDeviceGetTotalEccErrors,
                h,
                pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                pynvml.NVML_VOLATILE_ECC,
            ),
            "retired_pending": None if pending is None else pending == pynvml.NVML_FEATURE_ENABLED,
            "remap": None if remap is None else tuple(int(x) for x in remap[:4]),
            "throttle": self.throttle(i),
        }

    def load_causes(self, i: int | None, under_load: int | None) -> list[str]:
        """What NVML shows that could slow a GPU: throttling, a lowered power limit, other processes,
        a PCIe link narrower than it can be."""
        if i is None or not self.ok or self.handles[i] is None:
            return []
        h, causes = self.handles[i], []
        bad, info = rules.decode_throttle(under_load)
        if bad or info:
            causes.append(f"clocks under load limited by {', '.join(bad + info)}")
        limit = self.call(pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
        default = self.call(pynvml.nvmlDeviceGetPowerManagementDefaultLimit, h)
        if limit and default and limit < 0.95 * default:
            causes.append(f"power limit {limit / 1000:.0f} W of the default {default / 1000:.0f} W")
        procs = self.call(pynvml.nvmlDeviceGetComputeRunningProcesses, h) or []
        others = [p.pid for p in procs if p.pid != os.getpid()]
        if others:
            causes.append(f"{len(others)} other process(es) on the GPU (pid {', '.join(map(str, others[:4]))})")
        width = self.call(pynvml.nvmlDeviceGetCurrPcieLinkWidth, h)
        max_width = self.call(pynvml.nvmlDeviceGetMaxPcieLinkWidth, h)
        if width and max_width and width < max_width:
            causes.append(f"PCIe link x{width} of x{max_width}")
        return causes

    def watch_xid(self) -> None:
        if not self.ok:
            return
        try:
            self._events = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as e:
            self.xid_error = {i: f"nvmlEventSetCreate: {e}" for i in range(len(self.handles))}
            return
        for i, h in enumerate(self.handles):
            if h is None:
                self.xid_error[i] = "NVML cannot open this GPU"
                continue
            try:
                pynvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, self._events)
            except pynvml.NVMLError as e:
                self.xid_error[i] = f"nvmlDeviceRegisterEvents: {e}"

    def xid_events(self) -> dict[int, list[int]]:
        """Xid events delivered since watch_xid, by NVML index."""
        out: dict[int, list[int]] = {i: [] for i in range(len(self.handles))}
        if self._events is None:
            return out
        for _ in range(1000):
            try:
                ev = pynvml.nvmlEventSetWait_v2(self._events, 1)
            except pynvml.NVMLError:  # NVML_ERROR_TIMEOUT: no more events
                break
            uuid = self._text(self.call(pynvml.nvmlDeviceGetUUID, ev.device))
            index = self.uuids.index(uuid) if uuid in self.uuids else None
            if index is not None:
                out[index].append(int(ev.eventData))
        self.call(pynvml.nvmlEventSetFree, self._events)
        self._events = None
        return out


# --------------------------------------------------------------------------- measuring helpers


def cpu_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """(‖out − ref‖ / ‖ref‖ in float64, count of non-finite outputs)."""
    o = out.detach().to("cpu", torch.float64)
    nonfinite = int((~torch.isfinite(o)).sum())
    err = float(torch.linalg.vector_norm(o - ref) / torch.linalg.vector_norm(ref))
    return err, nonfinite


@contextmanager
def tf32(enabled: bool):
    """TF32 for cuBLAS matmuls and cuDNN convolutions on or off (the legacy flags only: mixing them
    with the newer fp32_precision API raises in recent torch)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def bench(fn, warmup: int, timed: int, during=None) -> tuple[float, object]:
    """Median seconds of fn() over `timed` runs, timed with CUDA events after `warmup` runs.

    `during()` is called once the timed runs are queued, while the GPU still works through them.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(timed)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(timed)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    seen = during() if during else None
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) / 1e3, seen


def causal_attention_f64(q, k, v):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v


def _compiled_probe(x, y):
    return torch.nn.functional.gelu(x) * torch.sin(y) + x.sum(dim=-1, keepdim=True)


# The persistent caches a compile may use, by torch's counter group and key prefix, as the compile line names them.
COMPILE_CACHES = (
    ("inductor", "fxgraph_cache_", "FX graph cache"),
    ("aot_autograd", "autograd_cache_", "AOTAutograd cache"),
)


def compile_cache_counts() -> dict[tuple[str, str], int]:
    """torch's counters of its FX graph and AOTAutograd caches so far ({} where this torch keeps none)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {
        (label, key.removeprefix(prefix)): n
        for group, prefix, label in COMPILE_CACHES
        for key, n in counters[group].items()
        if key.startswith(prefix)
    }


def compile_cache_state(before: dict, after: dict) -> str:
    """What the persistent caches (tasks/proc.py) did for one compile, e.g. "FX graph cache hit, AOTAutograd
    cache hit" ('' where torch counted nothing)."""
    grew = {key for key, n in after.items() if n > before.get(key, 0)}
    said = [(label, sorted(what for lab, what in grew if lab == label)) for _, _, label in COMPILE_CACHES]
    return ", ".join(f"{label} {'/'.join(whats)}" for label, whats in said if whats)


# --------------------------------------------------------------------------- the checker


class Checker:
    def __init__(self, settings: dict, specs: list, seed: int, out_dir: Path) -> None:
        self.s, self.specs, self.seed = settings, specs, seed
        self.out_dir = out_dir
        self.checks: list[Check] = []
        self.txt = open(out_dir / TXT_FILE, "w", encoding="utf-8")
        self.phases = timing.Phases()
        self.phases.add("startup", _STARTUP_S)
        self.phases.add("import", _IMPORT_S)
        with self.phases.timed("nvml"):
            self.nvml = Nvml()
        self.gpus: list[dict] = []
        self.torch_warnings: list[str] = []
        self._seed_step = 0
        self._compiled = None
        self.started = now_iso()

    # ---- report
    def emit(self, line: str = "") -> None:
        print(line, flush=True)
        self.txt.write(line + "\n")
        self.txt.flush()

    def add(self, name: str, gpu: int | None, verdict: Verdict, seconds: float = 0.0) -> Check:
        check = Check.of(name, gpu, verdict, seconds)
        self.checks.append(check)
        if seconds:  # a check SKIPped without running adds no phase (the quick level shows no "long level 0 s")
            self.phases.add(self.phase_of(name), seconds)
        self.emit(rules.format_line(check))
        return check

    def run(self, name: str, gpu: int | None, fn, *args) -> Check:
        """Time fn(*args) -> Verdict; an exception is a FAIL with its first line."""
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                verdict = fn(*args)
        except Exception as e:  # a CUDA error, an OOM, a compiler failure: what the check is for
            verdict = Verdict(FAIL, "", first_line(e))
        return self.add(name, gpu, verdict, time.perf_counter() - t0)

    @staticmethod
    def phase_of(name: str) -> str:
        """The phase a check's seconds count in (the compile check and CUDA init apart from the others)."""
        if name in PHASE_OF:
            return PHASE_OF[name]
        if name.startswith("health."):
            return "nvml"
        quick = name in PER_GPU or name in ("build", "driver", "device_count") or name.startswith("peers.")
        return "checks" if quick else "long"

    def next_seed(self) -> int:
        self._seed_step += 1
        return self.seed + 1000 * self._seed_step

    # ---- the whole run
    def run_all(self) -> None:
        self.header()
        self.run("build", None, self.check_build)
        self.run("driver", None, self.check_driver)
        count = self.run("device_count", None, self.check_count)
        n = count.data.get("torch", 0) if torch.version.cuda else 0
        if n and self.run("init", None, self.check_init).status == FAIL:
            n = 0
        if not n:
            if not torch.version.cuda:
                why = f"torch {torch.__version__} is a CPU build (see build)"
            elif n == 0 and count.data.get("torch", 0):
                why = "CUDA could not be initialised (see init)"
            else:
                why = "no CUDA device visible to torch (see device_count)"
            for name in PER_GPU + MULTI_GPU + HEALTH + burn.skipped_names(self.level):
                self.add(name, None, Verdict(SKIP, "", why))
            return
        with self.phases.timed("nvml"):
            self.nvml.watch_xid()
        with self.phases.timed("describe"):
            self.describe_gpus(n)
        for g in self.gpus:
            self.per_gpu(g)
        burn.peer_checks(self)
        self.multi_gpu()
        if self.level == "long":
            burn.run_long(self, self.duration, self.dcgm_level)
        self.health()

    def header(self) -> None:
        v = self.versions()
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        tol = self.s["tolerances"]
        self.emit("cuda_check: does PyTorch compute correctly and at speed on every GPU of this machine?")
        self.emit(
            f"date {now_iso()}  host {socket.gethostname()}  python {platform.python_version()} "
            f"({sys.executable})  seed {self.seed}"
        )
        self.emit(
            f"torch {v['torch']}  CUDA {v['cuda'] or '-'}  cuDNN {v['cudnn'] or '-'}  NCCL {v['nccl'] or '-'}  "
            f"triton {v['triton'] or '-'}  (import torch {_IMPORT_S:.2f} s)"
        )
        self.emit(
            f"driver {self.nvml.driver or '-'}  NVML {'ok' if self.nvml.ok else self.nvml.error}  "
            f"CUDA_VISIBLE_DEVICES={'<unset>' if cvd is None else repr(cvd)}  NVLink multicast off (NCCL_NVLS_ENABLE=0)"
        )
        self.emit(
            f"settings: memory share {self.s['memory_share']:.0%}, speed FAIL below {self.s['speed_share']:.0%} "
            "of the datasheet, tolerances " + ", ".join(f"{k} {tol[k]:.0e}" for k in tol)
        )
        if os.environ.get(rules.ARCH_LIST_SEAM_ENV):
            self.emit(
                f"TEST SEAM ACTIVE: {rules.ARCH_LIST_SEAM_ENV}={os.environ[rules.ARCH_LIST_SEAM_ENV]!r} "
                "replaces torch.cuda.get_arch_list() in the arch check"
            )
        self.emit("")
        self.emit(rules.HEADER)

    def versions(self) -> dict:
        if not hasattr(self, "_versions"):
            nccl = None
            if torch.version.cuda:
                try:
                    raw = torch.cuda.nccl.version()
                    nccl = ".".join(map(str, raw)) if isinstance(raw, tuple) else str(raw)
                except Exception:  # a build without NCCL
                    nccl = None
            triton = None
            for dist in ("triton", "pytorch-triton"):
                try:
                    triton = importlib.metadata.version(dist)
                    break
                except importlib.metadata.PackageNotFoundError:
                    continue
            cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
            self._versions = {
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "hip": getattr(torch.version, "hip", None),
                "cudnn": rules.cudnn_version_text(cudnn),
                "nccl": nccl,
                "triton": triton,
                "python": platform.python_version(),
                "driver": self.nvml.driver,
                "torch_file": torch.__file__,
            }
        return self._versions

    # ---- a, b, c: the build, the driver, the devices
    def check_build(self) -> Verdict:
        v = self.versions()
        return rules.judge_build(v["torch"], v["cuda"], v["hip"], v["cudnn"], v["nccl"])

    def check_driver(self) -> Verdict:
        value, source, error = None, "", ""
        if hasattr(torch._C, "_cuda_getDriverVersion"):
            source = "cudaDriverGetVersion via torch._C._cuda_getDriverVersion"
            try:
                value = torch._C._cuda_getDriverVersion()
            except Exception as e:
                error = first_line(e)
        else:
            source = "cuDriverGetVersion of libcuda.so.1 (ctypes)"
            try:
                import ctypes

                lib, out = ctypes.CDLL("libcuda.so.1"), ctypes.c_int(0)
                rc = lib.cuDriverGetVersion(ctypes.byref(out))
                value, error = (out.value, "") if rc == 0 else (None, f"CUresult {rc}")
            except OSError as e:
                error = f"libcuda.so.1 cannot be loaded ({e})"
        return rules.judge_driver(rules.cuda_version_from_int(value), torch.version.cuda, source, self.nvml.cuda, error)

    def check_count(self) -> Verdict:
        torch_count, cuda_error = 0, ""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                torch_count = torch.cuda.device_count() if torch.version.cuda else 0
            except Exception as e:
                cuda_error = first_line(e)
        if caught and not torch_count:
            cuda_error = cuda_error or str(caught[0].message).strip().splitlines()[0][:200]
        return rules.judge_count(
            self.nvml.count,
            torch_count,
            os.environ.get("CUDA_VISIBLE_DEVICES"),
            uuids=self.nvml.uuids,
            mig_gpus=self.nvml.mig_gpus,
            nvml_error=self.nvml.error,
            cuda_error=cuda_error,
        )

    def check_init(self) -> Verdict:
        """Initialise CUDA and a context on every GPU, keeping torch's own compatibility warnings (they
        name unsupported GPUs)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.init()
            for i in range(torch.cuda.device_count()):
                torch.cuda.get_device_properties(i)
                torch.empty(1, device=f"cuda:{i}")  # creates the context (an allocation, no kernel launch)
        self.torch_warnings = [" ".join(str(w.message).split()) for w in caught]
        note = f"torch warned: {' | '.join(w[:300] for w in self.torch_warnings)}" if self.torch_warnings else ""
        return Verdict(
            PASS,
            f"CUDA initialised, {torch.cuda.device_count()} device(s)",
            note,
            {"torch_warnings": self.torch_warnings},
        )

    def describe_gpus(self, n: int) -> None:
        from tasks.config import gpu_spec_for

        self.emit("")
        for i in range(n):
            p = torch.cuda.get_device_properties(i)
            spec = gpu_spec_for(p.name, self.specs)
            nvml_index = self.nvml.index_for(p) if self.nvml.ok else None
            g = {
                "index": i,
                "name": p.name,
                "capability": (p.major, p.minor),
                "total_gib": p.total_memory / 2**30,
                "sms": p.multi_processor_count,
                "spec": spec,
                "nvml": nvml_index,
            }
            g["health_before"] = self.nvml.snapshot(nvml_index)
            self.gpus.append(g)
            figures = (
                [
                    f"{v:g} {unit}" if v else f"no {unit}"
                    for v, unit in ((spec.bf16_tflops, "TFLOP/s bf16"), (spec.mem_bw_tbs, "TB/s"))
                ]
                if spec
                else []
            )
            sheet = (
                f"datasheet {spec.model} ({', '.join(figures)})"
                if spec
                else "no datasheet entry in configs/gpus.yaml (speed not judged)"
            )
            where = f"NVML index {nvml_index}" if nvml_index is not None else "no NVML match"
            self.emit(
                f"gpu{i}: {p.name}, sm_{p.major}{p.minor}, {g['total_gib']:.1f} GiB, "
                f"{p.multi_processor_count} SMs, {sheet}, {where}"
            )
        self.emit("")

    # ---- d..h: per GPU
    def per_gpu(self, g: dict) -> None:
        i = g["index"]
        torch.cuda.set_device(i)
        dev = torch.device("cuda", i)
        tol = self.s["tolerances"]
        self.run("arch", i, self.check_arch, g)
        for name in MATMUL_DTYPES:
            self.run(f"matmul.{name}", i, self.check_matmul, dev, name, tol[f"matmul_{name}"])
        self.run("conv2d.fp32", i, self.check_conv, dev, torch.float32, tol["conv2d_fp32"])
        self.run("conv2d.bf16", i, self.check_conv, dev, torch.bfloat16, tol["conv2d_bf16"])
        self.run("sdpa.causal", i, self.check_sdpa, dev, tol["sdpa_bf16"])
        self.run("reduction", i, self.check_reduction, dev, tol["reduction_fp32"])
        self.run("memory", i, self.check_memory, dev)
        self.run("speed.copy", i, self.check_copy, dev, g)
        self.run("speed.matmul_bf16", i, self.check_speed_matmul, dev, g)
        self.run("pcie.link", i, burn.quick_pcie_link, self, g)
        self.run("compile", i, self.check_compile, dev, tol["compile_fp32"])
        torch.cuda.empty_cache()

    def check_arch(self, g: dict) -> Verdict:
        seam = os.environ.get(rules.ARCH_LIST_SEAM_ENV)
        if seam:
            arch_list, source = (
                [a.strip() for a in seam.split(",") if a.strip()],
                f"{rules.ARCH_LIST_SEAM_ENV} (test seam)",
            )
        else:
            arch_list, source = torch.cuda.get_arch_list(), "torch.cuda.get_arch_list()"
        mine = [w for w in self.torch_warnings if g["name"] in w or f"GPU{g['index']} " in w]
        return rules.judge_arch(g["capability"], arch_list, g["name"], self.s["min_cuda_for_arch"], source, mine)

    def check_matmul(self, dev, name: str, tol: float) -> Verdict:
        n, dtype, gen = self.s["sizes"]["matmul"], MATMUL_DTYPES[name], cpu_gen(self.next_seed())
        a = torch.randn(n, n, dtype=torch.float64, generator=gen).to(dtype)
        b = torch.randn(n, n, dtype=torch.float64, generator=gen).to(dtype)
        ref = a.double() @ b.double()
        out = torch.full((n, n), float("nan"), dtype=dtype, device=dev)  # poison: unwritten stays NaN
        with tf32(name == "tf32"):
            torch.matmul(a.to(dev), b.to(dev), out=out)
            torch.cuda.synchronize(dev)
        err, bad = compare(out, ref)
        note = f"{n}x{n}x{n}" + {"fp32": ", TF32 off", "tf32": ", TF32 on"}.get(name, "")
        if name == "tf32" and err < 1e-5:
            note += "; error at float32 level: TF32 was not used on this GPU"
        return rules.judge_error(err, tol, nonfinite=bad, note=note)

    def check_conv(self, dev, dtype, tol: float) -> Verdict:
        gen = cpu_gen(self.next_seed())
        x = torch.randn(8, 64, 32, 32, dtype=torch.float64, generator=gen).to(dtype)
        w = (torch.randn(64, 64, 3, 3, dtype=torch.float64, generator=gen) / 24.0).to(dtype)
        ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
        with tf32(False):
            out = torch.nn.functional.conv2d(x.to(dev), w.to(dev), padding=1)
            torch.cuda.synchronize(dev)
        err, bad = compare(out, ref)
        note = "8x64x32x32 * 64x64x3x3" + (", TF32 off" if dtype == torch.float32 else "")
        return rules.judge_error(err, tol, nonfinite=bad, note=note)

    def check_sdpa(self, dev, tol: float) -> Verdict:
        """Causal attention in bf16 on the backend torch picks, then on each backend forced in turn."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa = torch.nn.functional.scaled_dot_product_attention
        gen = cpu_gen(self.next_seed())
        q, k, v = (torch.randn(2, 8, 512, 64, dtype=torch.float64, generator=gen).to(torch.bfloat16) for _ in range(3))
        ref = causal_attention_f64(q.double(), k.double(), v.double())
        qd, kd, vd = q.to(dev), k.to(dev), v.to(dev)
        try:
            chosen = SDPBackend(torch._fused_sdp_choice(qd, kd, vd, None, 0.0, True)).name
        except Exception:  # a private helper; without it the default's backend is not named
            chosen = "unknown"
        default = compare(sdpa(qd, kd, vd, is_causal=True), ref)
        forced: dict[str, tuple[float, int] | str] = {}
        for label, attr in (
            ("flash", "FLASH_ATTENTION"),
            ("efficient", "EFFICIENT_ATTENTION"),
            ("cudnn", "CUDNN_ATTENTION"),
            ("math", "MATH"),
        ):
            backend = getattr(SDPBackend, attr, None)
            if backend is None:
                forced[label] = "n/a: not in this torch"
                continue
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
                warnings.simplefilter("always")
                try:
                    out = sdpa(qd, kd, vd, is_causal=True)
                    torch.cuda.synchronize(dev)
                    forced[label] = compare(out, ref)
                except RuntimeError as e:
                    if "No available kernel" in str(e) or "No viable backend" in str(e):
                        why = next((str(w.message) for w in caught), "")
                        forced[label] = "n/a" + (f": {' '.join(why.split())[:80]}" if why else "")
                    else:
                        forced[label] = f"error: {first_line(e)}"
        return rules.judge_sdpa(rules.sdpa_backend_label(chosen), default, forced, tol)

    def check_reduction(self, dev, tol: float) -> Verdict:
        gen = cpu_gen(self.next_seed())
        x = torch.randn(2048, 4096, dtype=torch.float64, generator=gen).float()
        u = torch.rand(1 << 22, dtype=torch.float64, generator=gen).float() + 0.5
        rows = torch.full((2048,), float("nan"), device=dev)
        torch.sum(x.to(dev), dim=1, out=rows)
        total = u.to(dev).sum()
        torch.cuda.synchronize(dev)
        e_rows, bad = compare(rows, x.double().sum(dim=1))
        e_total, bad_total = compare(total.reshape(1), u.double().sum().reshape(1))
        return rules.judge_error(
            max(e_rows, e_total),
            tol,
            nonfinite=bad + bad_total,
            note=f"row sums 2048x4096 {e_rows:.1e}, sum of 4M {e_total:.1e}",
        )

    def check_memory(self, dev) -> Verdict:
        """Fill a share of the free memory with an address-dependent pattern, then its inverse, and
        read each back in chunks."""
        words, free, total = memtest.free_words(dev, self.s["memory_share"])
        mismatches, error = 0, ""
        try:
            mismatches = self._pattern_test(dev, words, self.next_seed())
        except torch.cuda.OutOfMemoryError as e:
            error = first_line(e)
        torch.cuda.empty_cache()
        return rules.judge_memory(mismatches, 2 * words, words * 8 / 2**30, free / 2**30, total / 2**30, error)

    @staticmethod
    def _pattern_test(dev, words: int, start: int, chunk: int = 1 << 26) -> int:
        """Word i holds (start + i) * GOLDEN (int64, wrapping), then its bitwise inverse, chunk by chunk
        (training_pt/memtest.py); returns the number of words that read back wrong over both passes."""
        buf = torch.empty(words, dtype=torch.int64, device=dev)
        return memtest.read_back_wrong(
            buf, chunk, lambda lo, hi: torch.arange(start + lo, start + hi, dtype=torch.int64, device=dev).mul_(GOLDEN)
        )

    def check_copy(self, dev, g: dict) -> Verdict:
        r = self.s["repeats"]
        nbytes = self.s["sizes"]["copy_mib"] << 20
        src = torch.randn(nbytes // 4, device=dev, generator=torch.Generator(dev).manual_seed(self.next_seed()))
        dst = torch.full_like(src, float("nan"))
        seconds, _ = bench(lambda: dst.copy_(src), r["warmup"], r["timed"])
        if not torch.equal(dst, src):
            return Verdict(FAIL, "", "the copied buffer differs from its source")
        tbs = 2 * nbytes / seconds / 1e12
        spec = g["spec"]
        verdict = rules.judge_speed_for(
            "device-to-device copy",
            tbs,
            "TB/s",
            spec,
            self.s["speed_share"],
            g["name"],
            self.nvml.load_causes(g["nvml"], None),
        )
        verdict.data.update(tbs=tbs, bytes=2 * nbytes, median_s=seconds)
        return verdict

    def check_speed_matmul(self, dev, g: dict) -> Verdict:
        r = self.s["repeats"]
        n = self.s["sizes"]["speed_matmul"]
        gen = torch.Generator(dev).manual_seed(self.next_seed())
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=gen)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=gen)
        out = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
        seconds, load = bench(
            lambda: torch.matmul(a, b, out=out), r["warmup"], r["timed"], during=lambda: self.nvml.throttle(g["nvml"])
        )
        g["throttle_load"] = load
        if not bool(torch.isfinite(out).all()):
            return Verdict(FAIL, "", "the timed matmul produced NaN/inf from finite random inputs")
        tflops = 2 * n**3 / seconds / 1e12
        spec = g["spec"]
        verdict = rules.judge_speed_for(
            f"bf16 matmul {n}^3",
            tflops,
            "TFLOP/s",
            spec,
            self.s["speed_share"],
            g["name"],
            self.nvml.load_causes(g["nvml"], load),
        )
        verdict.data.update(tflops=tflops, median_s=seconds)
        return verdict

    def check_compile(self, dev, tol: float) -> Verdict:
        if importlib.util.find_spec("triton") is None:
            return Verdict(
                SKIP,
                "",
                "Triton is not installed here, so torch.compile cannot generate GPU kernels; "
                "install the triton release that matches this torch",
            )
        if self._compiled is None:
            self._compiled = torch.compile(_compiled_probe, fullgraph=True)
        gen = torch.Generator(dev).manual_seed(self.next_seed())
        x = torch.randn(1024, 1024, device=dev, generator=gen)
        y = torch.randn(1024, 1024, device=dev, generator=gen)
        eager = _compiled_probe(x, y)
        counts_before = compile_cache_counts()
        compiled = self._compiled(x, y)
        torch.cuda.synchronize(dev)
        err, bad = compare(compiled, eager.double().cpu())
        cache = compile_cache_state(counts_before, compile_cache_counts())
        note = "gelu*sin+row sum, inductor/Triton vs eager" + (f"; {cache}" if cache else "")
        verdict = rules.judge_error(err, tol, nonfinite=bad, note=note)
        verdict.data["compile_cache"] = cache or None  # a hit skips code generation; the kernel still ran above
        return verdict

    # ---- i: more than one GPU
    def multi_gpu(self) -> None:
        n = len(self.gpus)
        if n < 2:
            for name in MULTI_GPU:
                self.add(name, None, Verdict(SKIP, "", "one GPU visible: nothing to connect"))
            return
        self.run("peer_access", None, self.check_peer, n)
        self.run("allreduce", None, self.check_allreduce, n)

    def check_peer(self, n: int) -> Verdict:
        """The peer-access matrix, and a round trip of random data between every pair of GPUs."""
        rows, bad = [], []
        for i in range(n):
            rows.append(
                "".join("-" if i == j else ("Y" if torch.cuda.can_device_access_peer(i, j) else "n") for j in range(n))
            )
        for i in range(n):
            x = torch.randn(16 << 20, device=f"cuda:{i}", generator=torch.Generator(f"cuda:{i}").manual_seed(i + 1))
            for j in range(n):
                if i != j and not torch.equal(x.to(f"cuda:{j}").to(f"cuda:{i}"), x):
                    bad.append(f"{i}->{j}")
        torch.cuda.synchronize()
        value = f"peer access {' '.join(f'gpu{i}:{r}' for i, r in enumerate(rows))} (Y yes, n no)"
        if bad:
            return Verdict(FAIL, value, f"64 MiB copied between GPUs came back different for {', '.join(bad)}")
        missing = sum(r.count("n") for r in rows)
        note = f"{missing} pair(s) without peer access: copies between them go through host memory" if missing else ""
        return Verdict(PASS, value, note, {"matrix": rows})

    def check_allreduce(self, n: int) -> Verdict:
        mib, timeout = self.s["sizes"]["allreduce_mib"], self.s["allreduce_timeout_s"]
        args = (self.next_seed(), mib, self.s["repeats"]["timed"], timeout)
        results, hung = fabric.run_ranks(allreduce_worker, n, args, timeout, "m40-allreduce-")
        return rules.judge_allreduce(n, results, hung, timeout)

    # ---- j: health after everything
    def health(self) -> None:
        xids = self.nvml.xid_events() if self.nvml.ok else {}
        for g in self.gpus:
            i, k = g["index"], g["nvml"]
            if k is None:
                why = (
                    f"NVML unavailable ({self.nvml.error})"
                    if not self.nvml.ok
                    else "this device matches no NVML device (UUID / PCI bus id)"
                )
                for name in HEALTH:
                    self.add(name, i, Verdict(SKIP, "", why))
                continue
            t0 = time.perf_counter()
            before, after = g["health_before"], self.nvml.snapshot(k)
            self.add("health.ecc", i, rules.judge_ecc(before.get("ecc"), after.get("ecc")))
            self.add("health.pages", i, rules.judge_pages(after.get("retired_pending"), after.get("remap")))
            self.add(
                "health.throttle",
                i,
                rules.judge_throttle(
                    {
                        "before": before.get("throttle"),
                        "under load": g.get("throttle_load"),
                        "after": after.get("throttle"),
                    }
                ),
            )
            err = self.nvml.xid_error.get(k)
            self.add(
                "health.xid", i, rules.judge_xid(None if err else xids.get(k, []), err or ""), time.perf_counter() - t0
            )

    # ---- the end
    def finish(self) -> dict:
        c = rules.counts(self.checks)
        total = time.perf_counter() - _T0
        checks_s = sum(x.seconds for x in self.checks)
        code = rules.exit_code(self.checks)
        self.emit("")
        self.emit(
            f"summary: {c[PASS]} PASS, {c[WARN]} WARN, {c[FAIL]} FAIL, {c[SKIP]} SKIP"
            f" on {rules.gpus_checked(self.checks)} GPU(s) "
            f"in {total:.1f} s (import torch {_IMPORT_S:.1f} s, checks {checks_s:.1f} s)"
        )
        slow = sorted(self.checks, key=lambda x: -x.seconds)[:5]
        self.emit("slowest: " + ", ".join(f"{x.where} {x.name} {x.seconds:.2f} s" for x in slow))
        phases = self.phases.record(total)
        self.emit(self.phases.line(phases))
        reason = rules.stage_reason(self.checks)
        self.emit(f"verdict: {'PASS' if code == rules.EXIT_OK else 'FAIL'}" + (f": {reason}" if reason else ""))
        self.txt.close()
        return {
            "schema": 1,
            "started": self.started,
            "ended": now_iso(),
            "seed": self.seed,
            "total_s": round(total, 3),
            "import_s": round(_IMPORT_S, 3),
            "checks_s": round(checks_s, 3),
            "phases": phases,  # seconds per phase, adding up to total_s plus the interpreter's start-up
            "versions": self.versions(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "arch_list_seam": os.environ.get(rules.ARCH_LIST_SEAM_ENV),
            "settings": {k: self.s[k] for k in ("memory_share", "speed_share", "tolerances", "sizes", "repeats")},
            "torch_identity": identity.of_torch(torch.__file__, torch.__version__),
            "gpus": [gpu_record(g) for g in self.gpus],
            "checks": [check_record(x) for x in self.checks],
            "counts": rules.counts(self.checks),
            "gpus_checked": rules.gpus_checked(self.checks),
            "exit_code": code,
            "reason": reason,
        }


def gpu_record(g: dict) -> dict:
    """One GPU as cuda_check.json names it."""
    return {
        "index": g["index"],
        "name": g["name"],
        "capability": "{}.{}".format(*g["capability"]),
        "total_gib": round(g["total_gib"], 2),
        "sms": g["sms"],
        "nvml_index": g["nvml"],
        "datasheet": g["spec"].model if g["spec"] else None,
    }


def check_record(x: Check) -> dict:
    """One check's verdict as cuda_check.json keeps it."""
    return {
        "name": x.name,
        "gpu": x.gpu,
        "status": x.status,
        "value": x.value,
        "reason": x.reason,
        "seconds": x.seconds,
        "data": x.data,
    }


def allreduce_worker(rank: int, world: int, tmp: str, seed: int, mib: int, timed: int, timeout: float) -> None:
    """One process per GPU: an NCCL all-reduce of random integers (exact in float32) checked against
    the sum every rank can compute, then the timed all-reduce of `mib` MiB."""
    import torch.distributed as dist

    proc.die_with_parent()  # never outlive the checker
    result: dict = {"rank": rank}
    try:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group(
            "nccl", init_method=f"file://{tmp}/store", rank=rank, world_size=world, timeout=timedelta(seconds=timeout)
        )
        n = 1 << 22
        parts = [torch.randint(-1000, 1000, (n,), generator=cpu_gen(seed + r)).float() for r in range(world)]
        x = parts[rank].to(dev)
        dist.all_reduce(x)
        torch.cuda.synchronize(dev)
        result["wrong"] = int((x.cpu() != torch.stack(parts).sum(0)).sum())
        result["checked"] = n
        y = torch.randn(mib << 18, device=dev)
        seconds, _ = bench(lambda: dist.all_reduce(y), 3, timed)
        result["seconds"] = seconds
        result["bytes"] = mib << 20
    except Exception as e:
        result["error"] = first_line(e)
    fabric.end_worker(tmp, rank, result)


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from tasks import config

    p = argparse.ArgumentParser(prog="python -m training_pt.gpu_checks", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for cuda_check.txt and cuda_check.json")
    p.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: a fresh one)")

    p.add_argument(
        "--mem-share",
        type=config.share_arg(0.9),
        default=None,
        help="share of free memory the memory check uses (default: configs/cuda_check.yaml)",
    )
    p.add_argument(
        "--speed-share",
        type=config.share_arg(1.0),
        default=None,
        help="FAIL a speed below this share of the datasheet (default: configs/cuda_check.yaml)",
    )
    p.add_argument("--config", type=Path, default=None, help="cuda_check settings (default configs/cuda_check.yaml)")
    p.add_argument("--gpus-file", type=Path, default=None, help="datasheet figures (default configs/gpus.yaml)")
    burn.add_options(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tasks import config

    try:
        settings = config.load_cuda_check(args.config)
        specs = config.load_gpus(args.gpus_file)
        burnin = config.load_burnin(args.burnin_config)
    except config.ConfigError as e:
        print(f"gpu_checks: error: {e}", file=sys.stderr)
        return 2
    if args.mem_share is not None:
        settings["memory_share"] = args.mem_share
    if args.speed_share is not None:
        settings["speed_share"] = args.speed_share
    args.out.mkdir(parents=True, exist_ok=True)
    faulthandler.dump_traceback_later(burn.time_limit(args, burnin, settings), exit=True)  # a hung GPU must not hang us
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") & 0x3FFFFFFF
    checker = Checker(settings, specs, seed, args.out)
    burn.configure(checker, args, burnin)
    checker.run_all()
    result = checker.finish()
    result["level"], result["duration_s"] = checker.level, checker.duration if checker.level == "long" else None
    tmp = args.out / (layout.CUDA_CHECK_JSON + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(args.out / layout.CUDA_CHECK_JSON)
    faulthandler.cancel_dump_traceback_later()
    return result["exit_code"]


if __name__ == "__main__":
    quick_exit.exit_quickly(main())
