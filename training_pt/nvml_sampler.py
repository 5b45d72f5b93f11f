"""NVML samples of one GPU while the timed steps run (utilisation, memory, power, SM clock,
temperature), summarised as min/median/max, and the share of samples that saw each clock-event reason
(`sw_power_cap`: the board at its power limit with the clock below boost; docs/train.md has what that costs
GPT-2 on an H200). Runs in .venv-gpu (imports torch for the device index)."""

from __future__ import annotations

import statistics
import threading

import torch

from tasks.cuda_rules import clock_event_names
from tasks.probe import clock_events
from training_pt.fabric import nvml_call

NVML_FIELDS = (
    ("util_pct", "GPU util %"),
    ("mem_used_mib", "memory used MiB"),
    ("power_w", "power W"),
    ("sm_clock_mhz", "SM clock MHz"),
    ("temp_c", "temperature C"),
)


class NvmlSampler:
    """Samples one GPU every interval_s in a background thread; summary() gives min/median/max per field."""

    def __init__(self, device: torch.device, interval_s: float):
        self.interval_s, self.samples, self.error = interval_s, [], ""
        self._stop, self._thread, self.handle = threading.Event(), None, None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            try:
                index = torch.cuda._get_nvml_device_index(device)  # honours CUDA_VISIBLE_DEVICES
            except Exception:
                index = device.index or 0
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # no pynvml, no driver access: reported, training goes on
            self.error = f"NVML unavailable ({type(e).__name__}: {e})"

    def sample(self) -> dict:
        """One reading; a field NVML cannot give on this GPU (Not Supported under MIG, say) is None."""
        n, h = self.nvml, self.handle
        util, mem = nvml_call(n.nvmlDeviceGetUtilizationRates, h), nvml_call(n.nvmlDeviceGetMemoryInfo, h)
        power = nvml_call(n.nvmlDeviceGetPowerUsage, h)
        return {
            "util_pct": None if util is None else util.gpu,
            "mem_used_mib": None if mem is None else mem.used / 2**20,
            "power_w": None if power is None else power / 1000.0,
            "sm_clock_mhz": nvml_call(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_SM),
            "temp_c": nvml_call(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU),
            "clock_events": clock_events(n, h),
        }

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(self.sample())
            except Exception as e:  # a lost GPU, a driver gone: what was sampled so far stays
                self.error = f"NVML sampling failed ({type(e).__name__}: {e})"
                return

    def start(self) -> None:
        if self.handle is not None:
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict:
        return summarize(self.samples, self.error)


def summarize(samples: list[dict], error: str = "") -> dict:
    """[min, median, max] per field (None where NVML never gave it); clock_events_pct: {reason: % of the
    samples that saw it}, in configs/nvml.yaml's bit order, over the samples whose reasons NVML could read
    (None where it read none); `error` kept when sampling stopped early."""
    if not samples:
        return {"samples": 0, "error": error or "no samples (the timed steps were shorter than the interval)"}
    out: dict = {"samples": len(samples), **({"error": error} if error else {})}
    for key, _ in NVML_FIELDS:
        values = [s[key] for s in samples if s.get(key) is not None]
        out[key] = (
            [round(min(values), 1), round(statistics.median(values), 1), round(max(values), 1)] if values else None
        )
    masks = [s["clock_events"] for s in samples if s.get("clock_events") is not None]
    seen = 0
    for mask in masks:
        seen |= mask
    out["clock_events_pct"] = (
        {
            name: round(100 * sum(name in clock_event_names(m) for m in masks) / len(masks), 1)
            for name in clock_event_names(seen)
        }
        if masks
        else None
    )
    return out


def pct_text(pct: float) -> str:
    """'97%', '<1%' (a rare fault still shows), '100%'."""
    return "<1%" if 0 < pct < 1 else f"{pct:.0f}%"


def nvml_text(summary: dict) -> str:
    if not summary.get("samples"):
        return summary.get("error", "no samples")
    parts = [
        f"{label} {'/'.join(f'{v:g}' for v in summary[key]) if summary.get(key) else 'n/a'}"
        for key, label in NVML_FIELDS
    ]
    stopped = f" ({summary['error']})" if summary.get("error") else ""
    return (
        f"min/median/max over {summary['samples']} samples{stopped}: " + ", ".join(parts) + f"; {events_text(summary)}"
    )


def events_text(summary: dict) -> str:
    """'clock events: sw_power_cap in 97% of samples', '... none', or '... not readable'."""
    events = summary.get("clock_events_pct")
    if events is None:
        return "clock events: not readable"
    if not events:
        return "clock events: none"
    return "clock events: " + ", ".join(f"{name} in {pct_text(pct)} of samples" for name, pct in events.items())


def clock_cell(nvml: dict | None) -> str:
    """'1650 (sw_power_cap 97%)': the median SM clock over the timed steps and the clock events seen;
    '(events n/a)' where NVML could not read them."""
    if not nvml or not nvml.get("samples"):
        return "n/a"
    clock = f"{nvml['sm_clock_mhz'][1]:g}" if nvml.get("sm_clock_mhz") else "n/a"
    events = nvml.get("clock_events_pct")
    if events is None:
        return f"{clock} (events n/a)"
    named = ", ".join(f"{name} {pct_text(pct)}" for name, pct in events.items())
    return clock + (f" ({named})" if named else "")
