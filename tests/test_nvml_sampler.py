"""training_pt/nvml_sampler.py: the NVML samples of the timed steps and their summary, with a stand-in NVML
module (no GPU here) that the sampler reads as it would read the driver."""

from __future__ import annotations

import sys
import time

import pynvml
import pytest
import torch

from training_pt import fabric
from training_pt.nvml_sampler import NvmlSampler, events_text, nvml_text, summarize

IDLE, POWER_CAP, HW_SLOWDOWN = 0x1, 0x4, 0x8  # configs/nvml.yaml's bits
NEW, OLD = "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"


class FakeNvml:
    """The calls NvmlSampler makes. Clock-event masks come from a script, one per reading, under the newer
    name, the older name only (an old nvidia-ml-py), or the newer name failing (a driver before R535)."""

    NVML_CLOCK_SM, NVML_TEMPERATURE_GPU = 1, 0
    NVMLError = pynvml.NVMLError

    def __init__(self, masks=(0,), reasons_as=NEW, util_supported=True):
        self.masks, self.reads, self.util_supported = list(masks), 0, util_supported
        if reasons_as in (NEW, OLD):
            setattr(self, reasons_as, self.reasons)
        if reasons_as == "new name missing in the driver":
            setattr(self, NEW, self.not_found)
            setattr(self, OLD, self.reasons)

    def reasons(self, h):
        self.reads += 1
        return self.masks[min(self.reads, len(self.masks)) - 1]

    def not_found(self, h):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"gpu{index}"

    def nvmlDeviceGetUtilizationRates(self, h):
        if not self.util_supported:  # as under MIG
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return type("Util", (), {"gpu": 100})()

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("Mem", (), {"used": 30 * 2**30})()

    def nvmlDeviceGetPowerUsage(self, h):
        return 690_000

    def nvmlDeviceGetClockInfo(self, h, which):
        return 1650

    def nvmlDeviceGetTemperature(self, h, which):
        return 61


@pytest.fixture
def sampler_of(monkeypatch):
    def make(fake: FakeNvml) -> NvmlSampler:
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        monkeypatch.setattr(fabric, "pynvml", fake)
        sampler = NvmlSampler(torch.device("cpu"), 0.005)
        assert sampler.handle == "gpu0", sampler.error
        return sampler

    return make


def readings(sampler: NvmlSampler, n: int) -> dict:
    sampler.samples = [sampler.sample() for _ in range(n)]
    return sampler.summary()


def test_a_power_capped_gpu_is_named_with_its_share_of_the_samples(sampler_of):
    summary = readings(sampler_of(FakeNvml([HW_SLOWDOWN, POWER_CAP, POWER_CAP, POWER_CAP | HW_SLOWDOWN])), 4)
    assert summary["samples"] == 4 and summary["sm_clock_mhz"] == [1650, 1650, 1650]
    assert summary["power_w"] == [690, 690, 690] and summary["util_pct"] == [100, 100, 100]
    assert summary["clock_events_pct"] == {"sw_power_cap": 75.0, "hw_slowdown": 50.0}  # the table's bit order
    assert nvml_text(summary).endswith("; clock events: sw_power_cap in 75% of samples, hw_slowdown in 50% of samples")


def test_a_rare_fault_still_shows_and_an_idle_gpu_is_named(sampler_of):
    summary = readings(sampler_of(FakeNvml([HW_SLOWDOWN] + [0] * 299)), 300)
    assert events_text(summary) == "clock events: hw_slowdown in <1% of samples"
    assert events_text(readings(sampler_of(FakeNvml([IDLE, 0])), 2)) == "clock events: gpu_idle in 50% of samples"
    assert events_text(readings(sampler_of(FakeNvml([0])), 3)) == "clock events: none"


@pytest.mark.parametrize("reasons_as", [OLD, "new name missing in the driver"])
def test_the_older_nvml_name_is_read_where_the_newer_is_missing(sampler_of, reasons_as):
    summary = readings(sampler_of(FakeNvml([POWER_CAP], reasons_as=reasons_as)), 2)
    assert summary["clock_events_pct"] == {"sw_power_cap": 100.0}


def test_fields_nvml_cannot_give_are_n_a_and_sampling_goes_on(sampler_of):
    summary = readings(sampler_of(FakeNvml(reasons_as="neither", util_supported=False)), 3)
    assert summary["samples"] == 3 and summary["util_pct"] is None and summary["sm_clock_mhz"] == [1650, 1650, 1650]
    assert summary["clock_events_pct"] is None
    text = nvml_text(summary)
    assert "GPU util % n/a" in text and "SM clock MHz 1650/1650/1650" in text
    assert text.endswith("; clock events: not readable")


def test_the_thread_samples_until_stopped(sampler_of):
    sampler = sampler_of(FakeNvml([POWER_CAP]))
    sampler.start()
    deadline = time.monotonic() + 30
    while len(sampler.samples) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    count = len(sampler.samples)
    time.sleep(0.05)
    assert count >= 3 and len(sampler.samples) == count  # stopped means stopped
    assert sampler.summary()["clock_events_pct"] == {"sw_power_cap": 100.0}


def test_no_samples_is_the_reason_not_a_summary():
    assert summarize([], "NVML unavailable (x)") == {"samples": 0, "error": "NVML unavailable (x)"}
    assert nvml_text(summarize([])).startswith("no samples")
