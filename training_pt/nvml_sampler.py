"""NVML samples of one GPU while the timed steps run (utilisation, memory, power, SM clock,
temperature), summarised as min/median/max. Runs in .venv-gpu (imports torch for the device index)."""

from __future__ import annotations

import statistics
import threading

import torch

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
        n, h = self.nvml, self.handle
        return {
            "util_pct": n.nvmlDeviceGetUtilizationRates(h).gpu,
            "mem_used_mib": n.nvmlDeviceGetMemoryInfo(h).used / 2**20,
            "power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
            "temp_c": n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
        }

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(self.sample())
            except Exception as e:
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
        if not self.samples:
            return {"samples": 0, "error": self.error or "no samples (the timed steps were shorter than the interval)"}
        out: dict = {"samples": len(self.samples)}
        for key, _ in NVML_FIELDS:
            values = [s[key] for s in self.samples]
            out[key] = [round(min(values), 1), round(statistics.median(values), 1), round(max(values), 1)]
        return out


def nvml_text(summary: dict) -> str:
    if not summary.get("samples"):
        return summary.get("error", "no samples")
    parts = [f"{label} {'/'.join(f'{v:g}' for v in summary[key])}" for key, label in NVML_FIELDS]
    return f"min/median/max over {summary['samples']} samples: " + ", ".join(parts)
