"""Stand-ins for a GPU machine on a machine without one: fake `nvidia-smi` scripts and no NVML.

Used by the probe, evidence, m40 and run-folder tests. Only for tests: nothing here runs on a real GPU.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pynvml

H100 = "NVIDIA H100 80GB HBM3"


def probe_gpu(**changes) -> dict:
    """One H100 as probe records it in gpus.json (index 0, idle, healthy), with `changes` applied."""
    gpu = {
        "index": 0,
        "name": H100,
        "model": "H100 SXM",
        "uuid": "GPU-1234",
        "pci_bus_id": "00000000:18:00.0",
        "compute_capability": "9.0",
        "memory_total_mib": 81559,
        "memory_free_mib": 81004,
        "ecc_current": "enabled",
        "ecc_pending": "enabled",
        "ecc_uncorrected_volatile": 0,
        "ecc_uncorrected_aggregate": 0,
        "persistence_mode": "enabled",
        "clock_event_reasons": [],
    }
    return gpu | changes


def header(driver: str, cuda: str) -> str:
    """The top of plain `nvidia-smi` as driver 580 prints it."""
    return (
        "Tue Nov 25 19:30:00 2026\n"
        "+-----------------------------------------------------------------------------------------+\n"
        f"| NVIDIA-SMI {driver}              Driver Version: {driver}      CUDA Version: {cuda}     |\n"
        "|-----------------------------------------+------------------------+----------------------+\n"
        "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |\n"
        f"|   0  {H100}          On  |   00000000:18:00.0 Off |                    0 |\n"
        "+-----------------------------------------+------------------------+----------------------+\n"
    )


def query_row(
    index: int = 0,
    name: str = H100,
    driver: str = "580.95.05",
    ecc: str = "Enabled",
    reasons: str = "0x0000000000000001",
) -> str:
    return (
        f"{index}, {name}, GPU-6c1f0f7e-1d3c-4a8e-9b5a-00000000000{index}, 00000000:{0x18 + index:02X}:00.0, "
        f"{driver}, 81559, 81004, 9.0, {ecc}, {ecc}, 0, 0, Enabled, {reasons}"
    )


def write_script(bin_dir: Path, body: str) -> Path:
    """An executable `nvidia-smi` in bin_dir running the sh `body` (it may use sh builtins only)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _say(text: str) -> str:
    """An sh command printing text exactly, with builtins only (PATH may hold nothing else)."""
    return "printf '%s\\n' " + " ".join("'" + line.replace("'", "'\\''") + "'" for line in text.splitlines())


def working_smi(bin_dir: Path, cuda: str = "13.0", driver: str = "580.95.05", gpus: int = 1) -> Path:
    """A fake nvidia-smi of a healthy driver supporting CUDA `cuda` with `gpus` H100s."""
    rows = "\n".join(query_row(i, driver=driver) for i in range(gpus))
    q = f"==============NVSMI LOG==============\n\nDriver Version : {driver}\nCUDA Version : {cuda}\n"
    return write_script(
        bin_dir,
        f"""case "$1" in
--query-gpu=*) {_say(rows)};;
-q) {_say(q)};;
*) {_say(header(driver, cuda))};;
esac
""",
    )


def failing_smi(bin_dir: Path) -> Path:
    """A fake nvidia-smi of a machine whose driver is not loaded (what a GPU-less VM with the tools shows)."""
    return write_script(
        bin_dir,
        _say(
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
            "Make sure that the latest NVIDIA driver is installed and running."
        )
        + "\nexit 9\n",
    )


def garbage_smi(bin_dir: Path) -> Path:
    return write_script(bin_dir, _say("Segmentation fault? lorem ipsum, dolor\n%%%%") + "\nexit 0\n")


def put_first_on_path(monkeypatch, bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def only_on_path(monkeypatch, bin_dir: Path) -> None:
    """PATH holds only bin_dir: no real nvidia-smi can be found (the 'binary missing' case when empty)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("PATH", str(bin_dir))


def no_nvml(monkeypatch) -> None:
    """Make NVML fail to load, as on a machine without the driver's libnvidia-ml.so.1."""

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)


def nvml_works_here() -> bool:
    """True on a machine with a real driver (then end-to-end tests pass --probe-source nvidia-smi)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True
