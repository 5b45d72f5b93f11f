"""training_pt/ce_kernel.py: the Triton loss kernel against torch's cross-entropy and its gradient.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, numpy on the CPU), the same
program the GPU compiles, in a fresh process (the variable is read when the kernel is defined), with the
triton the tests session installs apart (M40_TEST_TRITON_PATH, noxfile.py) or one this Python has.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from training_pt import ce_kernel

ROOT = Path(__file__).resolve().parents[1]

CHECKS = """
import torch, torch.nn.functional as F
from training_pt import ce_kernel as K, chunked_loss as C

def reference(logits, targets, scale):
    x = logits.float()
    grad = (torch.softmax(x, -1) - F.one_hot(targets, x.shape[1])) * scale
    return F.cross_entropy(x, targets, reduction="none"), grad

torch.manual_seed(0)
vocab = 2 * K.BLOCK + 300  # three blocks a row, the last one ragged
targets = torch.tensor([0, vocab - 1, 5, K.BLOCK, 17])
for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 4e-3)):
    logits = (torch.randn(5, vocab) * 4).to(dtype)
    want_loss, want_grad = reference(logits, targets, 0.25)
    buf = logits.clone()
    loss, grad = K.loss_and_grad(buf, targets, 0.25)
    assert grad.data_ptr() == buf.data_ptr() and grad.dtype == dtype  # written over the logits
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), want_grad, rtol=tol, atol=tol)
    print("ok", dtype)

logits = torch.randn(2, vocab)
logits[0, : K.BLOCK] = float("-inf")  # a row whose first block is all -inf: exp(-inf - -inf) must not poison it
pair = torch.tensor([[K.BLOCK + 5, 9], [3, 9]])[:, 0]  # a strided view of targets
want_loss, want_grad = reference(logits, pair.contiguous(), 1.0)
loss, grad = K.loss_and_grad(logits.clone(), pair, 1.0)
torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
print("ok -inf block, strided targets")

logits = torch.randn(3, 300)
loss, grad = K.loss_and_grad(logits.clone(), torch.tensor([-1, 300, 2]), 1.0)
assert loss[:2].isnan().all() and loss[2].isfinite()  # a target outside the vocabulary: NaN, no stray read
torch.testing.assert_close(grad[0], torch.softmax(logits[0], -1))  # no one-hot subtracted
print("ok invalid targets")

hidden, weight = torch.randn(37, 16, requires_grad=True), (torch.randn(101, 16) * 0.3).requires_grad_()
targets = torch.randint(0, 101, (37,))
(F.cross_entropy(F.linear(hidden, weight), targets) * 3).backward()
want = hidden.grad.clone(), weight.grad.clone()
hidden.grad = weight.grad = None
(C.linear_cross_entropy(hidden, weight, targets, 8, triton=True) * 3).backward()
torch.testing.assert_close(hidden.grad, want[0], rtol=1e-5, atol=1e-6)
torch.testing.assert_close(weight.grad, want[1], rtol=1e-5, atol=1e-6)
print("ok fused path")
assert K.trial(torch.device("cpu"))  # the check works() runs once per GPU passes on a correct kernel
print("ok trial")
"""


def test_the_kernel_matches_torch_in_tritons_interpreter():
    triton_dir = os.environ.get("M40_TEST_TRITON_PATH")
    if not triton_dir:
        pytest.importorskip("triton", reason="no triton here (its wheels are for Linux x86-64 only)")
    path = os.pathsep.join(filter(None, [str(ROOT), triton_dir, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHECKS)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:7] == [
        "ok torch.float32",
        "ok torch.bfloat16",
        "ok -inf block, strided targets",
        "ok invalid targets",
        "ok fused path",
        "ok trial",
        "",
    ]


def test_off_a_gpu_the_kernel_is_not_used_and_says_why():
    ok, why = ce_kernel.works(torch.device("cpu"))
    assert not ok and why == "the Triton loss kernel needs a CUDA GPU, not cpu"


def test_a_kernel_that_fails_on_a_gpu_is_not_used_and_says_why_in_one_line(monkeypatch):
    def broken(device):
        raise RuntimeError("Failed to find C compiler.\nPlease specify via CC environment variable.")

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(ce_kernel, "trial", broken)
    device = torch.device("cuda", 7)  # works() caches per device: one no other test asks about
    assert ce_kernel.works(device) == (
        False,
        "the Triton loss kernel did not run (RuntimeError: Failed to find C compiler.)",
    )
    monkeypatch.setattr(ce_kernel, "trial", lambda device: False)
    disagreed = "the Triton loss kernel disagreed with torch on a test tensor"
    assert ce_kernel.works.__wrapped__(device) == (False, disagreed)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 0))
    assert ce_kernel.works.__wrapped__(device) == (False, "the Triton loss kernel needs compute capability >= 8.0")


def test_an_empty_batch_launches_nothing():
    loss, grad = ce_kernel.loss_and_grad(torch.empty(0, 7), torch.empty(0, dtype=torch.long), 1.0)
    assert loss.shape == (0,) and grad.shape == (0, 7)
