"""One training step, the same in train.py and bench.py, and the clock that times steps without stopping them.

A step: `grad_accum` micro-batches of forward + backward under bf16 autocast and the preferred SDPA
kernel, gradient clipping, AdamW. It returns [loss, grad-norm] as one tensor on the device and does not
wait for the GPU: the caller copies it to the host without blocking and reads it one step later, once the
next step is queued, so the GPU never idles while Python logs and launches (a `.item()` per step costs
~20% of the step at GPT-2 124M and batch 16 on an H200: the queue drains, then refills).
Runs in .venv-gpu (imports torch).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch

from training_pt.model import param_groups, sdpa_backend


def lr_at(step: int, t: dict) -> float:
    """Linear warm-up over lr_warmup_steps, then cosine from lr down to min_lr at the last step."""
    if step < t["lr_warmup_steps"]:
        return t["lr"] * (step + 1) / t["lr_warmup_steps"]
    span = max(1, t["steps"] - 1 - t["lr_warmup_steps"])
    progress = min(1.0, (step - t["lr_warmup_steps"]) / span)
    return t["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (t["lr"] - t["min_lr"])


def make_optimizer(model, t: dict, device: torch.device) -> torch.optim.AdamW:
    """AdamW with nanoGPT's decay groups; fused (one CUDA kernel) where the YAML asks and a GPU runs it."""
    fused = t["fused_adamw"] and device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, t["weight_decay"]), lr=t["lr"], betas=(t["beta1"], t["beta2"]), fused=fused
    )


def autocast_for(t: dict, device: torch.device):
    if t["autocast"] == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Stepper:
    """`stepper(lr)`: one optimizer step of `forward(x, y) -> mean loss`; returns [loss, grad-norm] on the device.

    `no_sync()` (DDP's) skips the gradient all-reduce on all but the last micro-batch; `reduce(total)`
    averages the logged loss over ranks. `grad_accum` and `batches.batch_size` may change between steps
    (train.py halves the micro-batch after an out-of-memory first step).
    """

    def __init__(self, forward, model, optimizer, batches, t: dict, device: torch.device, *, no_sync=None, reduce=None):
        self.forward, self.model, self.optimizer, self.batches = forward, model, optimizer, batches
        self.grad_accum, self.grad_clip, self.sdpa = t["grad_accum"], t["grad_clip"], t["sdpa_backend"]
        self.device, self.autocast = device, autocast_for(t, device)
        self.no_sync, self.reduce = no_sync, reduce
        # CUDA graphs (these compile modes) reuse their output buffers: say where each step begins
        self.mark_step = t["compile"] and t["compile_mode"] in ("reduce-overhead", "max-autotune")

    def __call__(self, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        total = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.batches.next()
            last = micro == self.grad_accum - 1
            skip = self.no_sync() if self.no_sync and not last else contextlib.nullcontext()
            with skip, self.autocast, sdpa_backend(self.sdpa):
                loss = self.forward(x, y) / self.grad_accum
            loss.backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.reduce:
            self.reduce(total)
        return torch.stack([total.float(), norm.float()])


class StepClock:
    """Marks in the GPU's stream (CUDA events; perf_counter on the CPU): mark 0 before the first step, mark
    k + 1 at the end of step k. Reading a mark waits for that point only, never for the queue behind it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def wait(self, i: int) -> None:
        if self.cuda:
            self.marks[i].synchronize()

    def seconds(self, i: int, j: int) -> float:
        """Seconds from mark i to mark j (both reached: wait(j) first)."""
        if self.cuda:
            return self.marks[i].elapsed_time(self.marks[j]) / 1000
        return self.marks[j] - self.marks[i]

    def step_ms(self, step: int) -> float:
        return 1000 * self.seconds(step, step + 1)

    def spread(self, first: int, last: int) -> dict:
        """Median, min and max step time (ms) of steps first..last-1, and the seconds they took in all."""
        ms = [self.step_ms(k) for k in range(first, last)]
        return {
            "seconds": self.seconds(first, last),
            "steps": len(ms),
            "median_ms": statistics.median(ms),
            "min_ms": min(ms),
            "max_ms": max(ms),
        }


def to_host(values: torch.Tensor) -> torch.Tensor:
    """A copy on the host that arrives without stopping the queue (pinned memory); valid once the next
    clock mark is reached."""
    return values.detach().to("cpu", non_blocking=True)
