"""Shared fixtures: a run folder, and the fake-GPU machines the probe tests run on (tests/fake_gpu.py).

`smi_machine`: NVML cannot load and PATH holds only an empty bin folder; a test puts its fake
`nvidia-smi` there (fake_gpu.working_smi(smi_machine), ...), or leaves it empty ("binary missing").
`nvml_machine`: a 2-GPU H100 NVML (fake pynvml values) and no nvidia-smi on PATH.
"""

from __future__ import annotations

from types import SimpleNamespace

import fake_gpu
import pynvml
import pytest


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return d


@pytest.fixture
def smi_machine(monkeypatch, tmp_path):
    """The bin folder that alone is on PATH, with NVML unavailable."""
    fake_gpu.no_nvml(monkeypatch)
    bin_dir = tmp_path / "bin"
    fake_gpu.only_on_path(monkeypatch, bin_dir)
    return bin_dir


class FakeNvml:
    """Values a 2-GPU H100 machine's NVML returns; GPU 1 does not support ECC queries.

    The probe asks NVML in a child process: `calls` are kept in a file, so the test sees the child's.
    """

    def __init__(self, monkeypatch, calls_file):
        self.calls_file = calls_file
        fns = {
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: self.record("shutdown"),
            "nvmlSystemGetDriverVersion": lambda: "580.95.05",
            "nvmlSystemGetCudaDriverVersion_v2": lambda: 13000,
            "nvmlDeviceGetCount": lambda: 2,
            "nvmlDeviceGetHandleByIndex": lambda i: i,
            "nvmlDeviceGetName": lambda h: fake_gpu.H100,
            "nvmlDeviceGetUUID": lambda h: f"GPU-aaaa-{h}",
            "nvmlDeviceGetPciInfo": lambda h: SimpleNamespace(busId=f"00000000:{0x18 + h:02X}:00.0".encode()),
            "nvmlDeviceGetCudaComputeCapability": lambda h: (9, 0),
            "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(total=81559 * 2**20, free=81004 * 2**20, used=0),
            "nvmlDeviceGetEccMode": self.ecc_mode,
            "nvmlDeviceGetTotalEccErrors": lambda h, kind, counter: 0 if counter == pynvml.NVML_VOLATILE_ECC else 3,
            "nvmlDeviceGetPersistenceMode": lambda h: 1,
            "nvmlDeviceGetCurrentClocksEventReasons": lambda h: 0x1 if h == 0 else 0x1 | 0x40,
            "nvmlDeviceGetMigMode": self.not_supported,  # an H100 whose MIG mode NVML does not report
        }
        for name, fn in fns.items():
            monkeypatch.setattr(pynvml, name, fn)

    def record(self, call: str) -> None:
        with open(self.calls_file, "a") as f:
            f.write(call + "\n")

    @property
    def calls(self) -> list[str]:
        return self.calls_file.read_text().split() if self.calls_file.exists() else []

    @staticmethod
    def not_supported(*args):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    @staticmethod
    def ecc_mode(h):
        if h == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [1, 1]


@pytest.fixture
def nvml_machine(monkeypatch, tmp_path):
    """A fake 2-GPU NVML, and PATH without any nvidia-smi: NVML alone must be enough."""
    nvml = FakeNvml(monkeypatch, tmp_path / "nvml-calls.txt")
    fake_gpu.only_on_path(monkeypatch, tmp_path / "empty")
    return nvml
