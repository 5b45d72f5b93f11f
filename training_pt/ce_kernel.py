"""Cross-entropy's loss and gradient in one Triton kernel that overwrites the logits with their gradient.

Per row of logits (one token): pass 1 reads the row, keeping a running max and sum of exponentials
(online softmax), to get log-sum-exp; the loss is lse - logit[target]. Pass 2 reads the row again and
writes (softmax - one_hot) * scale over it. So the logits cross device memory three times (two reads, one
write; at GPT-2's sizes the second read mostly misses L2) where torch.compile's kernels for the same
formula cross it four times and allocate a second B x T x V tensor for the gradient. The arithmetic is
fp32 whatever the logits' dtype. A target outside 0 .. vocab - 1 gives that token a NaN loss (which
train.py's finite-loss check stops on), never a read outside its row. Measured on an H200 at 65536 x 50304
bf16 logits: 4.7 ms, ~4.2 TB/s (Nsight Compute: 13.2 GB read, 6.6 GB written), against 7.7 ms for the
kernel torch.compile generates from chunked_loss.loss_and_grad. Runs in .venv-gpu (imports torch; triton
is imported only when the kernel is first used on a GPU).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from training_pt.fabric import first_line

BLOCK = 4096  # columns per step: 16 per thread at 8 warps (two 16-byte bf16 loads); 2048-16384 were slower
WARPS = 8


MIN_CAPABILITY = (8, 0)  # Ampere and newer: native bf16; older GPUs get the torch kernel


@functools.cache
def works(device: torch.device) -> tuple[bool, str]:
    """(True, "") where the kernel compiles and agrees with torch on this device; else (False, one line why).

    Tried once per device (trial()): triton may be missing, the GPU too old, or triton unable to build its
    launcher (it needs a C compiler) on this machine.
    """
    if device.type != "cuda":
        return False, f"the Triton loss kernel needs a CUDA GPU, not {device.type}"
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return False, f"the Triton loss kernel needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    try:
        agrees = trial(device)
    except Exception as e:  # ImportError, triton's compile or launch errors
        return False, f"the Triton loss kernel did not run ({first_line(e)[:160]})"
    return (True, "") if agrees else (False, "the Triton loss kernel disagreed with torch on a test tensor")


def trial(device: torch.device) -> bool:
    """Whether the kernel's loss and gradient match torch's on a small bf16 tensor whose rows span two
    blocks, the first of them all -inf in one row; its width is a multiple of 16, as a padded vocabulary's,
    so this compiles the variant a run then uses."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(3, BLOCK + 912, device=device, generator=gen).to(torch.bfloat16)
    logits[1, :BLOCK] = float("-inf")
    targets = torch.tensor([0, BLOCK + 7, BLOCK + 911], device=device)
    want_loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    want_grad = (torch.softmax(logits.float(), -1) - torch.nn.functional.one_hot(targets, logits.shape[1])) / 3
    loss, grad = loss_and_grad(logits.clone(), targets, 1 / 3)
    # bf16 gradients below 0.5 are exact to 2e-3 (one step of their last bit); the loss is fp32
    return torch.allclose(loss, want_loss, atol=1e-4) and torch.allclose(grad.float(), want_grad, atol=2e-3)


@functools.cache
def kernel():
    """The Triton kernel, compiled on first use (triton's cache keeps it across runs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def loss_grad_rows(logits, row_stride, targets, losses, n_cols, scale, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * row_stride
        target = tl.load(targets + row).to(tl.int64)
        valid = (target >= 0) & (target < n_cols)
        top = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            new_top = tl.maximum(top, tl.max(x, 0))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # all -inf so far: exp(-inf - -inf) is NaN
            total = total * tl.exp(top - shift) + tl.sum(tl.exp(x - shift), 0)
            top = new_top
        lse = top + tl.log(total)
        picked = tl.load(base + target, mask=valid, other=float("nan")).to(tl.float32)
        tl.store(losses + row, lse - picked)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            keep = cols < n_cols
            x = tl.load(base + cols, mask=keep, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(base + cols, (grad * scale).to(logits.dtype.element_ty), mask=keep)

    return loss_grad_rows


def loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, scale: float):
    """(per-row losses in fp32, the gradient of scale * their sum) with the gradient written over `logits`.

    The same contract as chunked_loss.loss_and_grad, which does not reuse its input: a caller must not
    read `logits` afterwards. A target outside 0 .. vocab - 1 gets a NaN loss (checking it here would
    wait for the GPU).
    """
    logits, targets = logits.contiguous(), targets.contiguous()  # no-ops for a matmul's output and a slice
    n, vocab = logits.shape
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():  # triton's GPU
            kernel()[(n,)](logits, logits.stride(0), targets, losses, vocab, scale, BLOCK=BLOCK, num_warps=WARPS)
    return losses, logits
