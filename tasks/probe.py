"""Stage probe: what driver and GPUs this machine has, and whether the driver is new enough.

Sources, in order: NVML (`import pynvml`, from nvidia-ml-py), else `nvidia-smi --query-gpu` plus the
"CUDA Version" in the header of plain `nvidia-smi`. Which one answered is figures["source"].

Writes into the run folder:
    env_info.txt    OS, kernel, glibc, Python, CPU, RAM, disk, the environment variables that
                    matter (secrets redacted, see tasks/redact.py), the GPU table and the gate verdict;
                    written in every case, also when there is no driver or no GPU
    nvidia_smi.txt  raw `nvidia-smi` and `nvidia-smi -q` (or the line saying why they could not run)
    gpus.json       the GPU list and the gate, machine-readable, for evidence (schema in `gpus_document`);
                    the stage's record takes its figures from it (`file_says`, to which tasks/verdict.py
                    holds the record)

Gate: the CUDA version the driver supports must be >= min_driver_cuda (configs/m40.yaml, or
--min-driver-cuda). Layout: pure functions parse values and text (tested with fakes); a thin layer
(`nvml_facts`, `run_commands`) makes the calls.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from tasks import config, layout, redact
from tasks.cuda_rules import clock_event_is_fault, clock_event_names, cuda_version_from_int
from tasks.records import FileSays, Outcome, StageStatus, now_iso
from tasks.text import one_line

DESCRIPTION = (
    "Probe the NVIDIA driver and GPUs (NVML, else nvidia-smi), record the machine in env_info.txt "
    "and gate on the CUDA version the driver supports."
)

NA = "N/A"
SOURCES = ("auto", "nvml", "nvidia-smi")

# nvidia-smi --query-gpu fields, in the order parse_smi_csv expects them. Older drivers may not know
# the later ones; then the core fields are asked again alone.
SMI_FIELDS = (
    "index",
    "name",
    "uuid",
    "pci.bus_id",
    "driver_version",
    "memory.total",
    "memory.free",
    "compute_cap",
    "ecc.mode.current",
    "ecc.mode.pending",
    "ecc.errors.uncorrected.volatile.total",
    "ecc.errors.uncorrected.aggregate.total",
    "persistence_mode",
    "clocks_event_reasons.active",
)
SMI_CORE_FIELDS = SMI_FIELDS[:7]
NO_GPU_TODO = "check that the GPU is attached and visible here (containers: --gpus all, NVIDIA_VISIBLE_DEVICES)"
_SMI_NA = {"", "n/a", "[n/a]", "not supported", "[not supported]", "unknown error", "[unknown error]"}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--min-driver-cuda",
        type=config.version_arg,
        default=None,
        metavar="X.Y",
        help="lowest CUDA version the driver must support (default: min_driver_cuda in configs/m40.yaml)",
    )
    parser.add_argument(
        "--settings",
        type=Path,
        default=None,
        metavar="PATH",
        help="settings file to read min_driver_cuda from (default: configs/m40.yaml)",
    )
    parser.add_argument(
        "--probe-source",
        choices=SOURCES,
        default="auto",
        help="where driver facts come from: auto (NVML, else nvidia-smi), nvml, nvidia-smi (default: auto)",
    )
    parser.add_argument(
        "--probe-timeout",
        type=config.seconds_arg,
        default=None,
        metavar="S",
        help="one deadline for NVML and every nvidia-smi call together; what still runs then is "
        "killed and the probe fails (default: timeout_s in configs/probe.yaml)",
    )


# --------------------------------------------------------------------------- facts


@dataclass
class Gpu:
    index: int
    name: str
    uuid: str = ""
    pci_bus_id: str = ""
    compute_capability: str = ""  # "9.0"
    memory_total_mib: int | None = None
    memory_free_mib: int | None = None
    ecc_current: str = NA  # "enabled" | "disabled" | "N/A"
    ecc_pending: str = NA
    ecc_uncorrected_volatile: int | None = None
    ecc_uncorrected_aggregate: int | None = None
    persistence_mode: str = NA  # "enabled" | "disabled" | "N/A"
    mig_mode: str = NA  # MIG mode now: "enabled" (CUDA sees slices, not this GPU) | "disabled" | "N/A"
    clock_event_reasons: list[str] | None = None  # decoded names; [] = none active; None = not known
    model: str | None = None  # datasheet model from configs/gpus.yaml, None when not listed


@dataclass
class DriverFacts:
    source: str  # "nvml" | "nvidia-smi" | "none"
    driver: str | None = None
    driver_cuda: str | None = None  # "13.0"
    gpus: list[Gpu] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. why NVML was not used
    found: str | None = None  # set when the facts themselves are missing: what was found instead
    todo: str | None = None  # and what to do about it
    hung: list[str] = field(default_factory=list)  # what did not answer before the deadline


class NvmlUnavailable(Exception):
    """NVML cannot be used here; the message says why (one phrase)."""


class NvmlHung(NvmlUnavailable):
    """NVML did not answer before the deadline (a hung driver or GPU)."""


# --------------------------------------------------------------------------- pure helpers


def enable_state(value) -> str:
    """NVML enable state (0/1) or nvidia-smi text ("Enabled") -> "enabled" | "disabled" | "N/A"."""
    if value is None:
        return NA
    text = str(value).strip().lower()
    if text in ("1", "enabled"):
        return "enabled"
    if text in ("0", "disabled"):
        return "disabled"
    return NA


def _text(value) -> str:
    """A string NVML returned, on one line (a name or version holding a newline cannot add a line anywhere)."""
    return one_line(value.decode(errors="replace") if isinstance(value, bytes) else value)


def gpu_from_nvml(raw: Mapping) -> Gpu:
    """Build a Gpu from the values NVML returned for one device (None where NVML had no answer)."""
    mem = raw.get("memory")
    cc = raw.get("compute_capability")
    ecc = raw.get("ecc_mode") or (None, None)
    reasons = raw.get("clock_event_reasons")
    return Gpu(
        index=int(raw["index"]),
        name=_text(raw["name"]),
        uuid=_text(raw.get("uuid") or ""),
        pci_bus_id=_text(raw.get("pci_bus_id") or ""),
        compute_capability=f"{cc[0]}.{cc[1]}" if cc else "",
        memory_total_mib=mem.total // 2**20 if mem is not None else None,
        memory_free_mib=mem.free // 2**20 if mem is not None else None,
        ecc_current=enable_state(ecc[0]),
        ecc_pending=enable_state(ecc[1]),
        ecc_uncorrected_volatile=raw.get("ecc_uncorrected_volatile"),
        ecc_uncorrected_aggregate=raw.get("ecc_uncorrected_aggregate"),
        persistence_mode=enable_state(raw.get("persistence_mode")),
        mig_mode=enable_state((raw.get("mig_mode") or (None,))[0]),
        clock_event_reasons=clock_event_names(reasons) if reasons is not None else None,
    )


class SmiParseError(ValueError):
    pass


def parse_smi_cuda(text: str) -> str | None:
    """The "CUDA Version: 13.0" of plain `nvidia-smi` (or "CUDA Version : 13.0" of `-q`)."""
    m = re.search(r"CUDA Version\s*:\s*(\d+\.\d+)", text or "")
    return m.group(1) if m else None


def parse_smi_driver(text: str) -> str | None:
    m = re.search(r"Driver Version\s*:\s*([0-9][0-9.]*)", text or "")
    return m.group(1) if m else None


def _smi_value(text: str) -> str | None:
    text = text.strip()
    return None if text.lower() in _SMI_NA else text


def _smi_int(text: str) -> int | None:
    value = _smi_value(text)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def parse_smi_csv(text: str, fields: tuple[str, ...] = SMI_FIELDS) -> tuple[str | None, list[Gpu]]:
    """`nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits` -> (driver version, GPUs).

    Raises SmiParseError naming the first line it cannot read.
    """
    gpus: list[Gpu] = []
    driver = None
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(fields):
            raise SmiParseError(f"expected {len(fields)} comma-separated fields, got {len(parts)} in {line[:80]!r}")
        row = dict(zip(fields, parts, strict=True))
        index = _smi_int(row["index"])
        if index is None or not row["name"]:
            raise SmiParseError(f"no GPU index and name in {line[:80]!r}")
        driver = _smi_value(row.get("driver_version", "")) or driver
        reasons = _smi_value(row.get("clocks_event_reasons.active", ""))
        try:
            reason_names = clock_event_names(int(reasons, 16)) if reasons else None
        except ValueError:
            reason_names = None
        gpus.append(
            Gpu(
                index=index,
                name=one_line(row["name"]),
                uuid=row.get("uuid", ""),
                pci_bus_id=row.get("pci.bus_id", ""),
                compute_capability=_smi_value(row.get("compute_cap", "")) or "",
                memory_total_mib=_smi_int(row.get("memory.total", "")),
                memory_free_mib=_smi_int(row.get("memory.free", "")),
                ecc_current=enable_state(_smi_value(row.get("ecc.mode.current", ""))),
                ecc_pending=enable_state(_smi_value(row.get("ecc.mode.pending", ""))),
                ecc_uncorrected_volatile=_smi_int(row.get("ecc.errors.uncorrected.volatile.total", "")),
                ecc_uncorrected_aggregate=_smi_int(row.get("ecc.errors.uncorrected.aggregate.total", "")),
                persistence_mode=enable_state(_smi_value(row.get("persistence_mode", ""))),
                clock_event_reasons=reason_names,
            )
        )
    return driver, gpus


def first_line(text: str, limit: int = 160) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            line = " ".join(line.split())
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return "no output"


# --------------------------------------------------------------------------- NVML (thin layer)


def load_pynvml():
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("nvidia-ml-py (pynvml) is not installed") from None
    return pynvml


def nvml_facts(nv) -> DriverFacts:
    """Ask NVML (the pynvml module, or a stand-in with its functions). Raises NvmlUnavailable."""
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        raise NvmlUnavailable(f"NVML cannot start: {e}") from None
    try:
        driver = _text(nv.nvmlSystemGetDriverVersion())
        cuda_int = nvml_optional(nv, "nvmlSystemGetCudaDriverVersion_v2", fallback="nvmlSystemGetCudaDriverVersion")
        gpus = [gpu_from_nvml(nvml_gpu(nv, i)) for i in range(nv.nvmlDeviceGetCount())]
    except nv.NVMLError as e:
        raise NvmlUnavailable(f"NVML failed while reading the GPUs: {e}") from None
    finally:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError:
            pass
    return DriverFacts(
        "nvml", driver=driver, driver_cuda=cuda_version_from_int(cuda_int) if cuda_int is not None else None, gpus=gpus
    )


def nvml_optional(nv, fn_name: str, *args, fallback: str | None = None):
    """nv.<fn_name>(*args), else the `fallback` function's answer, else None (an old driver, Not Supported)."""
    fn = getattr(nv, fn_name, None)
    try:
        if fn is None:
            raise AttributeError(fn_name)
        return fn(*args)
    except (nv.NVMLError, AttributeError):
        return nvml_optional(nv, fallback, *args) if fallback else None


def clock_events(nv, handle) -> int | None:
    """A GPU's clock-event ("throttle") reasons bitmask now: nvidia-ml-py's newer name for the call, else the
    older one (a driver before R535 lacks the newer function); None where NVML cannot say. cuda_check, the
    burn-in and the training's sampler read it here too."""
    return nvml_optional(
        nv, "nvmlDeviceGetCurrentClocksEventReasons", handle, fallback="nvmlDeviceGetCurrentClocksThrottleReasons"
    )


def nvml_gpu(nv, i: int) -> dict:
    """GPU `i` as NVML answers, raw (gpu_from_nvml makes the record of it)."""
    h = nv.nvmlDeviceGetHandleByIndex(i)
    pci = nvml_optional(nv, "nvmlDeviceGetPciInfo", h)
    ecc = nvml_optional(nv, "nvmlDeviceGetEccMode", h)
    ecc_on = bool(ecc) and enable_state(ecc[0]) == "enabled"

    def uncorrected(counter: str) -> int | None:
        if not ecc_on:
            return None
        errors = nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        return nvml_optional(nv, "nvmlDeviceGetTotalEccErrors", h, errors, getattr(nv, counter))

    return {
        "index": i,
        "name": nv.nvmlDeviceGetName(h),
        "uuid": nvml_optional(nv, "nvmlDeviceGetUUID", h),
        "pci_bus_id": getattr(pci, "busId", None) if pci is not None else None,
        "compute_capability": nvml_optional(nv, "nvmlDeviceGetCudaComputeCapability", h),
        "memory": nvml_optional(nv, "nvmlDeviceGetMemoryInfo", h),
        "ecc_mode": ecc,
        "ecc_uncorrected_volatile": uncorrected("NVML_VOLATILE_ECC"),
        "ecc_uncorrected_aggregate": uncorrected("NVML_AGGREGATE_ECC"),
        "persistence_mode": nvml_optional(nv, "nvmlDeviceGetPersistenceMode", h),
        "mig_mode": nvml_optional(nv, "nvmlDeviceGetMigMode", h),
        "clock_event_reasons": clock_events(nv, h),
    }


class Deadline:
    """One moment by which everything must have answered."""

    def __init__(self, seconds: float):
        self.seconds, self.at = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())


def nvml_in_child(nvml_loader, deadline: Deadline) -> DriverFacts:
    """nvml_facts in a forked child process: a driver that hangs NVML stops the child, which is killed at
    the deadline (NvmlHung), never the probe. NvmlUnavailable for any failure NVML reports."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, then leave without running the parent's cleanup
        try:
            # Hold nothing of the parent's but the answer pipe: a child stuck in the driver must not keep
            # the run folder's lock (or any other file) open after the probe has moved on.
            os.closerange(3, write_end)
            os.closerange(write_end + 1, os.sysconf("SC_OPEN_MAX"))
            answer: tuple[str, object]
            try:
                answer = ("facts", nvml_facts(nvml_loader()))
            except NvmlUnavailable as e:
                answer = ("unavailable", str(e))
            except BaseException as e:  # NVML is a foreign library: anything it throws means "use the fallback"
                answer = ("unavailable", f"NVML failed: {type(e).__name__}: {e}")
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(answer, pipe)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = read_until(read_end, deadline)
    finally:
        os.close(read_end)
        stop(pid)
    if data is None:
        raise NvmlHung(f"NVML did not answer within {deadline.seconds:g} s (driver or GPU hung?)")
    try:
        kind, value = pickle.loads(data)
    except Exception:
        raise NvmlUnavailable("NVML's child process ended without an answer (crashed in the driver library?)") from None
    if kind != "facts":
        raise NvmlUnavailable(value)
    return value


def read_until(fd: int, deadline: Deadline) -> bytes | None:
    """Everything written to `fd` until its writer closes it; None when the deadline comes first."""
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([fd], [], [], deadline.left())
        if not ready:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def stop(pid: int) -> None:
    """Kill a child if it still runs and reap it if it has ended (never waits for one that will not die)."""
    try:
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            for _ in range(20):
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    break
                time.sleep(0.05)
    except ChildProcessError:
        pass


# --------------------------------------------------------------------------- nvidia-smi (thin layer)


@dataclass
class CmdResult:
    cmd: list[str]
    rc: int | None = None  # None when it could not run
    out: str = ""
    error: str | None = None  # why it could not run / finish

    def describe(self) -> str:
        if self.error:
            return self.error
        return f"exit {self.rc}: {first_line(self.out)}"


def smi_query_cmd(fields: tuple[str, ...] = SMI_FIELDS) -> list[str]:
    return ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]


class Commands:
    """Independent commands started at once, each in a process group of its own with its output in a
    temporary file (a child that inherits the output and lives on cannot hold a pipe open).
    `finish` waits for them until the deadline and kills the whole group of each one still running."""

    def __init__(self, cmds: dict[str, list[str]]):
        self.started: dict[str, tuple[CmdResult, subprocess.Popen | None, IO[bytes]]] = {}
        for key, cmd in cmds.items():
            res, proc, out = CmdResult(cmd), None, tempfile.TemporaryFile()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,  # noqa: S603
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except FileNotFoundError:
                res.error = f"{cmd[0]} not found on PATH"
            except OSError as e:
                res.error = f"{cmd[0]} cannot run ({e.strerror})"
            self.started[key] = (res, proc, out)

    def finish(self, deadline: Deadline) -> dict[str, CmdResult]:
        try:
            for res, proc, out in self.started.values():
                if proc is not None:
                    try:
                        res.rc = proc.wait(timeout=deadline.left())
                    except subprocess.TimeoutExpired:
                        res.error = f"{res.cmd[0]} did not answer within {deadline.seconds:g} s (driver hung?)"
                    kill_group(proc)
                out.seek(0)
                res.out = out.read().decode(errors="replace")
                out.close()
        except BaseException:  # Ctrl-C meanwhile: its session kept the command from getting it too
            self.kill_all()
            raise
        return {key: res for key, (res, _, _) in self.started.items()}

    def kill_all(self) -> None:
        """Kill the group of every command still running (the probe stops waiting for them)."""
        for _, proc, _ in self.started.values():
            if proc is not None and proc.returncode is None:
                kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process left in the child's group (the child, or what it started and left behind)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        pass  # unkillable for now (stuck in the kernel): never wait for it


def run_commands(cmds: dict[str, list[str]], deadline: Deadline) -> dict[str, CmdResult]:
    """Run the commands at once, each with stdout+stderr joined, all within the deadline."""
    return Commands(cmds).finish(deadline)


def smi_facts(query: CmdResult, plain: CmdResult, full_q: CmdResult, fields=SMI_FIELDS) -> DriverFacts:
    """Driver facts from nvidia-smi's outputs (pure: takes the finished commands)."""
    facts = DriverFacts("nvidia-smi")
    if query.error:
        facts.source = "none"
        facts.found = query.error
        return facts
    if query.rc != 0:
        if "no devices were found" in query.out.lower():
            facts.found = "an NVIDIA driver but no GPU (nvidia-smi: No devices were found)"
            facts.todo = NO_GPU_TODO
            return facts
        facts.found = f"nvidia-smi failing ({query.describe()})"
        facts.todo = (
            "check that the NVIDIA kernel module is loaded (`nvidia-smi`, `lsmod | grep nvidia`); "
            "reinstall the driver or reboot"
        )
        return facts
    try:
        facts.driver, facts.gpus = parse_smi_csv(query.out, fields)
    except SmiParseError as e:
        facts.found = f"nvidia-smi output this probe cannot read ({e})"
        facts.todo = "run `nvidia-smi` by hand and repair or reinstall the NVIDIA driver"
        return facts
    facts.driver = facts.driver or parse_smi_driver(plain.out) or parse_smi_driver(full_q.out)
    facts.driver_cuda = parse_smi_cuda(plain.out) or parse_smi_cuda(full_q.out)
    if facts.driver_cuda is None:
        facts.found = f"nvidia-smi without a readable 'CUDA Version' in its header ({plain.describe()})"
        facts.todo = "run `nvidia-smi` by hand and repair or reinstall the NVIDIA driver"
    return facts


def raw_smi_text(plain: CmdResult, full_q: CmdResult, query: CmdResult | None = None) -> str:
    parts = [f"# nvidia_smi.txt, written by the probe stage at {now_iso()}\n"]
    for res in (plain, full_q, query):
        if res is None:
            continue
        head = "$ " + " ".join(res.cmd)
        if res.error:
            parts.append(f"{head}\n(could not be run: {res.error})\n")
        else:
            parts.append(f"{head}\n(exit {res.rc})\n{res.out.rstrip()}\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------- collecting


def collect(source: str = "auto", nvml_loader=load_pynvml, timeout_s: float = 30.0) -> tuple[DriverFacts, str]:
    """Driver facts plus the text of nvidia_smi.txt, all within one deadline of `timeout_s`.

    NVML (in a child process) and the nvidia-smi calls for nvidia_smi.txt run at the same time; the
    query nvidia-smi is only asked when NVML gave no facts.
    """
    deadline = Deadline(timeout_s)
    cmds = {"plain": ["nvidia-smi"], "q": ["nvidia-smi", "-q"]}
    if source == "nvidia-smi":
        cmds["query"] = smi_query_cmd(SMI_FIELDS)
    running = Commands(cmds)
    facts, nvml_note, nvml_hung = None, None, False
    if source in ("auto", "nvml"):
        try:
            facts = nvml_in_child(nvml_loader, deadline)
        except NvmlUnavailable as e:
            nvml_note, nvml_hung = str(e), isinstance(e, NvmlHung)
        except BaseException:  # Ctrl-C while NVML answers: the commands started above end too
            running.kill_all()
            raise
    else:
        nvml_note = "NVML not asked (--probe-source nvidia-smi)"
    res = running.finish(deadline)
    if facts is None and source == "auto" and "query" not in res:
        res["query"] = run_commands({"query": smi_query_cmd(SMI_FIELDS)}, deadline)["query"]
    plain, full_q, query = res["plain"], res["q"], res.get("query")

    if facts is None and source == "nvml":
        facts = DriverFacts(
            "none",
            found=f"NVML unavailable ({nvml_note})",
            todo="drop --probe-source nvml to fall back to nvidia-smi, or install the driver",
        )
    elif facts is None:
        assert query is not None  # asked above whenever NVML gave no facts (auto) or was not asked (nvidia-smi)
        fields: tuple[str, ...] = SMI_FIELDS
        if query.rc not in (0, None) and "field" in query.out.lower():  # an older driver: fewer fields
            fields = SMI_CORE_FIELDS
            query = run_commands({"query": smi_query_cmd(fields)}, deadline)["query"]
        facts = smi_facts(query, plain, full_q, fields)
        if facts.source == "none":
            facts.found = f"no NVIDIA driver ({nvml_note}; {facts.found})"
            facts.todo = "install the NVIDIA driver and reboot, or run on a machine with an NVIDIA GPU"
    if nvml_note:
        facts.notes.append(f"NVML not used: {nvml_note}")
    mig = [str(g.index) for g in facts.gpus if g.mig_mode == "enabled"]
    if mig:
        facts.notes.append(
            f"MIG is enabled on GPU {', '.join(mig)}: cuda_check judges each slice against its "
            "share of the GPU's datasheet (configs/gpus.yaml mig_slices)"
        )
    stuck = (["NVML"] if nvml_hung else []) + [
        command_label(r.cmd)
        for r in (plain, full_q, query)
        if r is not None and r.rc is None and r.error and "did not" in r.error
    ]
    facts.hung = [f"{what} did not answer within {timeout_s:g} s" for what in stuck]
    name_models(facts)
    return facts, raw_smi_text(plain, full_q, query)


def command_label(cmd: list[str]) -> str:
    """'nvidia-smi', 'nvidia-smi -q', 'nvidia-smi --query-gpu' (without the field list)."""
    return " ".join([cmd[0], *(c.split("=")[0] for c in cmd[1:2])])


def name_models(facts: DriverFacts) -> None:
    """Each GPU's datasheet model from configs/gpus.yaml (None when not listed)."""
    try:
        specs = config.load_gpus()
    except config.ConfigError as e:  # the datasheet is a nicety here: the facts are still written
        specs = []
        facts.notes.append(f"datasheet models not named: {e}")
    for gpu in facts.gpus:
        spec = config.gpu_spec_for(gpu.name, specs)
        gpu.model = spec.model if spec else None


# --------------------------------------------------------------------------- gate


def gate(facts: DriverFacts, min_cuda: str, min_from: str) -> tuple[bool, str]:
    """(passed, one line): what was found, what is needed, what to do."""
    need = f"need a driver supporting CUDA >= {min_cuda} ({min_from}) and at least one GPU"
    if facts.hung:
        return False, (
            f"found {' and '.join(facts.hung)} (a hung driver or GPU; what still ran was killed); "
            f"{need}; look for Xid errors in dmesg, then reset the GPU or reboot"
        )
    if facts.found:
        return False, f"found {facts.found}; {need}; {facts.todo or 'install or repair the NVIDIA driver'}"
    drv = f"driver {facts.driver or '?'}"
    if facts.driver_cuda is None:
        return False, (
            f"found {drv} but no CUDA version from {facts.source}; {need}; "
            "run `nvidia-smi` by hand and repair or reinstall the driver"
        )
    if not facts.gpus:
        return False, f"found {drv} (CUDA {facts.driver_cuda}) but no GPU; need at least one NVIDIA GPU; {NO_GPU_TODO}"
    if config.parse_version(facts.driver_cuda) < config.parse_version(min_cuda):
        return False, (
            f"found {drv} supporting CUDA {facts.driver_cuda}; need CUDA >= {min_cuda} ({min_from}); "
            f"upgrade the NVIDIA driver to one supporting CUDA {min_cuda} or newer, "
            "or lower the minimum with --min-driver-cuda"
        )
    return True, (f"{drv} supports CUDA {facts.driver_cuda} >= {min_cuda} ({min_from}) with {gpus_summary(facts.gpus)}")


def gpus_summary(gpus: list[Gpu]) -> str:
    """'1x NVIDIA H100 80GB HBM3' (or '2x A, 1x B'); 'no GPU' when empty."""
    if not gpus:
        return "no GPU"
    counts = Counter(g.name for g in gpus)
    return ", ".join(f"{n}x {name}" for name, n in counts.items())


# --------------------------------------------------------------------------- env_info.txt


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def system_facts(run_dir: Path) -> list[tuple[str, str]]:
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        os_name = ""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        glibc = ""
    glibc = glibc or " ".join(platform.libc_ver()).strip() or "unknown"
    cpuinfo = _read("/proc/cpuinfo")
    m = re.search(r"^(model name|Model|cpu model)\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    cpu = m.group(2).strip() if m else (platform.processor() or platform.machine())
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    meminfo = dict(re.findall(r"^(\w+):\s+(\d+) kB", _read("/proc/meminfo"), re.MULTILINE))
    ram = (
        f"{_gib(int(meminfo['MemTotal']) * 1024)} total, {_gib(int(meminfo.get('MemAvailable', 0)) * 1024)} available"
        if "MemTotal" in meminfo
        else "unknown"
    )
    disks = []
    for label, path in (("run folder", run_dir), ("project", layout.ROOT)):
        try:
            usage = shutil.disk_usage(path)
            disks.append(f"{_gib(usage.free)} free of {_gib(usage.total)} ({label}: {path})")
        except OSError as e:
            disks.append(f"unknown ({label}: {e.strerror})")
    return [
        ("host", socket.gethostname()),
        ("os", f"{os_name or platform.system()} ({platform.platform()})"),
        ("kernel", platform.release()),
        ("glibc", glibc),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("cpu", f"{cpu}, {os.cpu_count()} logical CPUs ({usable} usable by this process)"),
        ("ram", ram),
        *(("disk", d) for d in disks),
    ]


GPU_COLUMNS = (
    "idx",
    "name",
    "memory MiB (free)",
    "cc",
    "ecc cur/pend",
    "uncorr. ecc vol/agg",
    "persistence",
    "clock events",
    "pci bus",
    "uuid",
)


def gpu_rows(gpus: list[Gpu]) -> list[tuple[str, ...]]:
    def n(v):
        return NA if v is None else str(v)

    rows: list[tuple[str, ...]] = []
    for g in gpus:
        reasons = NA if g.clock_event_reasons is None else (",".join(g.clock_event_reasons) or "none")
        rows.append(
            (
                str(g.index),
                g.name,
                f"{n(g.memory_total_mib)} ({n(g.memory_free_mib)})",
                g.compute_capability or NA,
                f"{g.ecc_current}/{g.ecc_pending}",
                f"{n(g.ecc_uncorrected_volatile)}/{n(g.ecc_uncorrected_aggregate)}",
                g.persistence_mode,
                reasons,
                g.pci_bus_id or NA,
                g.uuid or NA,
            )
        )
    return rows


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in (header, *rows))


def env_info_text(
    system: list[tuple[str, str]], env: Mapping[str, str], facts: DriverFacts, passed: bool | None, gate_line: str
) -> str:
    """The file's text. Every line, and every cell of the GPU table, goes through one_line: a value
    from the machine (environment, GPU name, driver string, reason) cannot add a line or a section."""
    lines = [f"# env_info.txt, written by the probe stage at {now_iso()}", "", "## System"]
    width = max(len(k) for k, _ in system)
    lines += [f"{k.ljust(width)} : {v}" for k, v in system]
    lines += ["", "## Environment (names containing " + ", ".join(redact.SECRET_WORDS) + " are redacted)"]
    lines += redact.env_lines(env)
    lines += [
        "",
        f"## Driver and GPUs (source: {facts.source})",
        f"driver      : {facts.driver or 'none found'}",
        f"driver CUDA : {facts.driver_cuda or 'unknown'}",
        f"GPUs        : {len(facts.gpus)} ({gpus_summary(facts.gpus)})",
    ]
    lines += [f"note        : {note}" for note in facts.notes]
    lines += [f"hung        : {what} (killed at the probe's deadline)" for what in facts.hung]
    if facts.gpus:
        rows = [tuple(one_line(cell) for cell in row) for row in gpu_rows(facts.gpus)]
        lines += ["", *text_table(GPU_COLUMNS, rows).split("\n")]
        slow = sorted({r for g in facts.gpus for r in (g.clock_event_reasons or []) if clock_event_is_fault(r)})
        if slow:
            lines.append(f"warning     : clocks held down by {', '.join(slow)} (check cooling and power)")
    verdict = "PASS" if passed else ("FAIL" if passed is False else "NOT DECIDED")
    lines += ["", "## Gate", f"{verdict}: {gate_line}", ""]
    return "\n".join(one_line(line) for line in lines)


def gpus_document(facts: DriverFacts, passed: bool | None, gate_line: str, min_cuda: str | None) -> dict:
    """gpus.json (schema 1): source, driver, driver_cuda, min_driver_cuda, gate {passed, line}, notes,
    gpus [{index, name, model, uuid, pci_bus_id, compute_capability, memory_total_mib, memory_free_mib,
    ecc_current, ecc_pending, ecc_uncorrected_volatile, ecc_uncorrected_aggregate, persistence_mode,
    mig_mode, clock_event_reasons}], hung [what did not answer before the deadline]."""
    return {
        "schema": 1,
        "source": facts.source,
        "driver": facts.driver,
        "driver_cuda": facts.driver_cuda,
        "min_driver_cuda": min_cuda,
        "gate": {"passed": passed, "line": gate_line},
        "notes": facts.notes,
        "hung": facts.hung,
        "gpus": [asdict(g) for g in facts.gpus],
    }


# --------------------------------------------------------------------------- the stage


def check_inputs(args) -> None:
    """The settings files probe reads, refused before any stage runs (ConfigError, exit 2)."""
    config.load_settings(getattr(args, "settings", None))
    config.load_probe()


def run(run_dir: Path, args, *, env: Mapping[str, str] | None = None, nvml_loader=load_pynvml) -> Outcome:
    env = os.environ if env is None else env
    timeout_s = getattr(args, "probe_timeout", None) or config.load_probe()["timeout_s"]
    facts, smi_text = collect(getattr(args, "probe_source", "auto"), nvml_loader, timeout_s)

    min_cuda, min_from, config_error = min_driver_cuda(args)
    if config_error:
        passed, line = None, f"cannot decide: {config_error}"
    else:
        passed, line = gate(facts, str(min_cuda), min_from)

    print(
        f"probe: source {facts.source}; driver {facts.driver or 'none'} (CUDA {facts.driver_cuda or '?'}); "
        f"{gpus_summary(facts.gpus)}",
        flush=True,
    )
    for note in facts.notes:
        print(f"probe: {note}", flush=True)
    if passed:  # on failure the harness prints the reason
        print(f"probe: gate PASS: {line}", flush=True)

    env_file, smi_file = layout.STAGE_FILES["probe"]
    files = [env_file, smi_file, layout.GPUS_JSON]
    (run_dir / smi_file).write_text(smi_text)
    (run_dir / env_file).write_text(env_info_text(system_facts(run_dir), env, facts, passed, line))
    document = gpus_document(facts, passed, line, min_cuda)
    (run_dir / layout.GPUS_JSON).write_text(json.dumps(document, indent=2) + "\n")

    said = file_says(document)
    figures = {
        "host": socket.gethostname(),
        **said.figures,
        "gpus": gpus_summary(facts.gpus),
        "overrides": overrides(min_cuda),  # tasks/verdict.py: a changed gate is not a full PASS
    }
    if not said.failure:
        return Outcome(StageStatus.PASS, "", figures, files)
    return Outcome(StageStatus.FAIL, config_error or line, figures, files)


def file_says(document: dict) -> FileSays:
    """What gpus.json says: a pass (its gate passed) or what instead, and the figures this stage's record takes
    from it. tasks/verdict.py holds a passing record to them."""
    gate, gpus = document.get("gate"), document.get("gpus")
    gate = gate if isinstance(gate, dict) else {}
    failure = "" if gate.get("passed") is True else f"its gate did not pass: {gate.get('line')}"
    figures = {
        "source": document.get("source"),
        "driver": document.get("driver") or "none",
        "driver_cuda": document.get("driver_cuda") or "none",
        "min_driver_cuda": document.get("min_driver_cuda") or "unknown",
        "gpu_count": len(gpus) if isinstance(gpus, list) else 0,
    }
    return FileSays(failure, figures)


def min_driver_cuda(args) -> tuple[str | None, str, str | None]:
    """(the minimum in force, where it came from, a config error or None): --min-driver-cuda, else the
    settings file's min_driver_cuda."""
    settings_path = getattr(args, "settings", None) or layout.SETTINGS_FILE
    if getattr(args, "min_driver_cuda", None):
        return args.min_driver_cuda, "--min-driver-cuda", None
    try:
        return (
            str(config.load_settings(settings_path)["min_driver_cuda"]),
            f"min_driver_cuda in {_short(settings_path)}",
            None,
        )
    except config.ConfigError as e:
        return None, f"min_driver_cuda in {_short(settings_path)}", str(e)


def overrides(min_cuda: str | None) -> list[str]:
    """["min_driver_cuda=X"] when the minimum in force is not configs/m40.yaml's (from the option or
    another --settings file), else []."""
    try:
        default = str(config.load_settings(layout.SETTINGS_FILE)["min_driver_cuda"])
        same = min_cuda is not None and config.parse_version(min_cuda) == config.parse_version(default)
    except (config.ConfigError, ValueError):
        same = False
    return [] if same or min_cuda is None else [f"min_driver_cuda={min_cuda}"]


def _short(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(layout.ROOT))
    except ValueError:
        return str(path)
