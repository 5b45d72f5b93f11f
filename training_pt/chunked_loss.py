"""The LM head and the mean next-token cross-entropy fused (train.loss: fused), optionally in chunks.

Plain (train.loss: plain): logits = hidden @ W.T for all B x T tokens (6.6 GB in bf16 at batch 64 with
GPT-2's padded vocab of 50304), a log-softmax that reads them, and a backward that reads them again.
Fused: for each chunk of tokens the forward computes the chunk's logits, its losses and at once
d loss / d logits = (softmax - one_hot) / N, and from those its share of the gradients of the hidden states
(g @ W) and of W (g.T @ h); then the chunk's logits are dropped. The backward only scales the two stored
gradients by the incoming one. Same arithmetic as autocast's plain path: bf16 GEMMs accumulating in fp32,
the log-softmax in fp32. The idea of Liger Kernel's fused linear cross-entropy.

The loss kernel: on a GPU where it works, training_pt/ce_kernel.py's Triton kernel, which writes the
gradient over the logits (two reads and one write of them); then one chunk holds the whole micro-batch
unless train.loss_chunk_tokens says otherwise. Elsewhere `loss_and_grad` below (compiled by torch.compile
when the run compiles), which makes fp32 temporaries of chunk x vocab, so its chunks default to
TORCH_CHUNK_LOGITS logits. Without autograd (no_grad, or nothing to differentiate) the gradient GEMMs are
skipped. Runs in .venv-gpu (imports torch).
"""

from __future__ import annotations

import functools

import torch

from training_pt import ce_kernel, cublaslt, tuned_gemm

TORCH_CHUNK_LOGITS = 8192 * 50304  # logits per chunk for the torch kernel (8192 GPT-2 tokens): fp32 temporaries
# of 1.6 GB each; 1609 tokens at Gemma's vocab of 256000


def default_chunk(triton: bool, vocab: int) -> int | None:
    """Tokens per chunk when train.loss_chunk_tokens is 0: None (the whole micro-batch) for the Triton kernel,
    TORCH_CHUNK_LOGITS worth of logits for the torch kernel."""
    return None if triton else max(1, TORCH_CHUNK_LOGITS // vocab)


def loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, scale: float):
    """Per-token losses (fp32) and d(scale * sum of losses)/d logits (in the logits' dtype), one chunk.

    Under torch.compile this becomes kernels that cross the logits about four times and write the gradient
    to a new tensor (7.7 ms at 65536 x 50304 on an H200, against 4.7 ms for ce_kernel's).
    """
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, targets[:, None]).squeeze(1)
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    grad = (torch.exp(x - lse[:, None]) - hit.to(x.dtype)) * scale
    return loss, grad.to(logits.dtype)


@functools.cache
def compiled_loss_and_grad():
    """loss_and_grad through torch.compile, built once per process (the compile caches serve later runs)."""
    return torch.compile(loss_and_grad, dynamic=False)


def accumulate_mm(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, tuned: bool = False) -> torch.Tensor:
    """acc + a @ b in acc's fp32, with a and b in bf16: on CUDA one GEMM whose epilogue adds acc
    (aten::addmm's out_dtype), the first one tuned where `tuned`; elsewhere the product is rounded to bf16 first,
    as autocast's own backward rounds the weight gradient."""
    if acc is None:
        return tuned_gemm.mm(a, b, out32=True) if tuned else cublaslt.product32(a, b)
    if a.is_cuda and a.dtype != torch.float32:
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    return acc.add_(torch.mm(a, b).float())


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight.T, targets_i), computed chunk by chunk; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, dtype, kernel, grads, tuned):
        n = hidden.shape[0]
        mm = tuned_gemm.mm if tuned else torch.mm
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grad_h = torch.empty_like(h) if grads else None
            grad_w = None
            losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
            for start in range(0, n, chunk):
                rows = slice(start, min(start + chunk, n))
                losses[rows], g = kernel(mm(h[rows], w.t()), targets[rows], 1.0 / n)
                if grads:
                    mm(g, w, out=grad_h[rows])
                    grad_w = accumulate_mm(grad_w, g.t(), h[rows], tuned)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return losses.sum() / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_h * grad_loss).to(hidden_dtype), (grad_w * grad_loss).to(weight_dtype), *[None] * 6


def linear_cross_entropy(
    hidden, weight, targets, chunk: int = 0, triton: bool = False, kernel=loss_and_grad, tuned: bool = False
) -> torch.Tensor:
    """The mean cross-entropy of hidden (N x D) @ weight.T (V x D) against targets (N), `chunk` tokens at a
    time (0: the default of the kernel in use, see the module docstring), with the Triton loss kernel or
    `kernel`; the matmuls in the autocast dtype when autocast is on (as F.linear would run them), on
    training_pt/tuned_gemm.py's tuned cuBLASLt algorithms where `tuned` (train.gemm)."""
    dtype = tuned_gemm.matmul_dtype(hidden)
    n = hidden.shape[0]
    if triton:
        kernel = ce_kernel.loss_and_grad
    chunk = min(n, chunk or default_chunk(triton, weight.shape[0]) or n)
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(hidden, weight, targets, max(chunk, 1), dtype, kernel, grads, tuned)


def compiled_linear_cross_entropy():
    """linear_cross_entropy with the torch kernel compiled, all of it kept out of any graph around it (a graph
    break: the chunk loop runs as written). Built on demand: torch.compiler imports torch._dynamo (~2 s)."""
    return torch.compiler.disable(functools.partial(linear_cross_entropy, kernel=compiled_loss_and_grad()))
