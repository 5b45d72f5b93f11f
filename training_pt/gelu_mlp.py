"""GPT-2's MLP (c_fc, tanh GELU, c_proj) with c_fc's bias and GELU in its GEMM's epilogue (train.mlp: fused).

Plain, a block's MLP forward is c_fc's GEMM, then an elementwise kernel that reads its tokens x 4C output
and writes the GELU of it (torch.compile fuses the bias in), then c_proj. Fused, on a CUDA GPU where it
works: c_fc's GEMM writes the GELU's output and its input in one go (training_pt/cublaslt.py), so that
elementwise pass is gone: on an H200 at 64 x 1024 tokens 0.56 ms a block instead of 0.70 (+1.2% tok/s in
the compiled step, docs/train.md).
The backward is torch's own ops (the GELU's backward, the GEMMs, the bias sums), so torch.compile fuses it
as before: cuBLASLt's backward epilogues (DGELU, BGRAD) measured slower than that.
The same arithmetic as plain (bf16 GEMMs accumulating in fp32, the epilogue in fp32, the GELU's input kept
in bf16), so the same model. Before a run uses it, the fused MLP and its gradients are checked against torch in
fp64 on the GPU (works()), and at every new shape each cuBLASLt algorithm is too (cublaslt.Plan.tune). Where
cuBLASLt cannot run (no library, no algorithm, an error status) the plain MLP runs, or torch's kernels at that
shape, and the log and the `mlp` figure say so; where it computes wrong numbers, or leaves a CUDA error, the run
fails (exit 3, one line): a GPU that gets a GEMM wrong is not one that trains.
Elsewhere (a CPU, fp32) the op is torch's kernels, so the code and its gradients are tested on a CPU.
torch.library.custom_op needs torch 2.4: before it, the plain MLP.
Runs in .venv-gpu (imports torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training_pt import cublaslt
from training_pt.configurator import EXIT_CHECK, TrainError
from training_pt.cublaslt import REGISTERED, cuda_error_left, on_cublaslt
from training_pt.fabric import first_line
from training_pt.tuned_gemm import matmul, matmul_dtype

GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # HF's names of the tanh approximation
TRIAL_TOKENS = 1024  # rows of works()'s check
OUTPUTS = ("output", "input gradient", "c_fc weight gradient", "c_fc bias gradient", "c_proj weight gradient")
OUTPUTS += ("c_proj bias gradient",)  # relative_errors' order
WORKED: set[tuple] = set()  # (device, width, inner) that works() passed in this process
LEFT_TO_TORCH: dict[str, str] = {}  # "M x N x K" -> why cuBLASLt could not take that shape, this model's run


def gelu_bias_mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu(x @ w + bias), x @ w + bias), w a Conv1D's K x N weight: cuBLASLt's epilogue on a GPU in bf16, else
    (or where cuBLASLt cannot take this shape, LEFT_TO_TORCH) torch's kernels."""
    shape = cublaslt.shape_name(x.shape[0], w.shape[1], x.shape[1])
    if on_cublaslt(x) and shape not in LEFT_TO_TORCH:
        try:
            return cublaslt.gelu_bias(x.contiguous(), w.contiguous(), bias.contiguous())
        except cublaslt.LtError as e:
            LEFT_TO_TORCH[shape] = first_line(e)[:200]
        except cublaslt.Disagreed as e:
            raise disagreed(str(e)) from None
        except Exception:
            if left := cuda_error_left(x.device):
                raise crashed(x.device, left) from None
            raise
    pre = torch.addmm(bias, x, w)
    return F.gelu(pre, approximate="tanh"), pre


def gelu_bias_mm_shape(x, w, bias):
    h = x.new_empty(x.shape[0], w.shape[1])
    return h, torch.empty_like(h)


if REGISTERED:
    torch.library.custom_op("m40::gelu_bias_mm", gelu_bias_mm, mutates_args=()).register_fake(gelu_bias_mm_shape)


def disagreed(what: str) -> TrainError:
    return TrainError(
        EXIT_CHECK,
        f"train.mlp fused: {what}: this GPU computes it wrong, or this tool's fused MLP is wrong for this torch "
        "and cuBLASLt; train.mlp=plain trains without it",
    )


def crashed(device, error: str) -> TrainError:
    return TrainError(
        EXIT_CHECK,
        f"train.mlp fused: cuBLASLt's GELU epilogue left a CUDA error on {device} ({error[:200]}); "
        "train.mlp=plain trains without it",
    )


class GeluMLPFunction(torch.autograd.Function):
    """c_proj(gelu(c_fc(x))) on 2-D x, with HF's Conv1D weights (in x out) and biases, all in one dtype; its other
    GEMMs the tuned op where `tuned` (train.gemm, training_pt/tuned_gemm.py), else torch's."""

    @staticmethod
    def forward(ctx, x, w_fc, b_fc, w_proj, b_proj, tuned=False):
        h, pre = torch.ops.m40.gelu_bias_mm(x, w_fc, b_fc)
        ctx.save_for_backward(x, w_fc, w_proj, pre, h)
        ctx.tuned = tuned
        return matmul(h, w_proj, b_proj, tuned)

    @staticmethod
    def backward(ctx, dout):
        x, w_fc, w_proj, pre, h = ctx.saved_tensors
        tuned = ctx.tuned
        dpre = torch.ops.aten.gelu_backward(matmul(dout, w_proj.t(), None, tuned), pre, approximate="tanh")
        dx, dw_fc = matmul(dpre, w_fc.t(), None, tuned), matmul(x.t(), dpre, None, tuned)
        return dx, dw_fc, dpre.sum(0), matmul(h.t(), dout, None, tuned), dout.sum(0), None


class FusedGeluMLP(torch.nn.Module):
    """Stands in for a GPT2MLP, holding its very c_fc, c_proj and dropout (the same parameter names); `tuned` once
    tuned_gemm.tune has marked it."""

    def __init__(self, mlp):
        super().__init__()
        self.c_fc, self.c_proj, self.dropout = mlp.c_fc, mlp.c_proj, mlp.dropout
        self.tuned = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = matmul_dtype(hidden)
        x = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
        params = (self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)
        out = GeluMLPFunction.apply(x, *(p.to(dtype) for p in params), self.tuned)
        return self.dropout(out.view(*hidden.shape[:-1], out.shape[-1]))


def reference(x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    w_fc, b_fc, w_proj, b_proj = params
    return torch.addmm(b_proj, F.gelu(torch.addmm(b_fc, x, w_fc), approximate="tanh"), w_proj)


def relative_errors(x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> list[float]:
    """Relative errors (norm) of GeluMLPFunction's output and five gradients against torch's in fp64 (no TF32),
    both from the same inputs and the same random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    out = GeluMLPFunction.apply(*leaves)
    gen = torch.Generator(out.device).manual_seed(1)
    dout = torch.randn(out.shape, device=out.device, generator=gen).to(out.dtype)
    got = [out, *torch.autograd.grad(out, leaves, dout)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(ref_leaves[0], tuple(ref_leaves[1:]))
    want = [ref, *torch.autograd.grad(ref, ref_leaves, dout.double())]
    return [((g.double() - w).norm() / w.norm().clamp_min(1e-30)).item() for g, w in zip(got, want, strict=True)]


def trial(device: torch.device, width: int, inner: int, tokens: int = 1024, dtype=torch.bfloat16) -> list[float]:
    """relative_errors on random inputs at a model's own width, GPT-2's init scale."""
    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    x = rand(tokens, width)
    params = (rand(width, inner, scale=0.02), rand(inner), rand(inner, width, scale=0.02), rand(width))
    return relative_errors(x, params)


def works(device: torch.device, width: int, inner: int) -> tuple[bool, str]:
    """(True, "") where the fused MLP runs on cuBLASLt and agrees with torch; (False, one line why) where it cannot
    run; TrainError (exit 3) where it runs and disagrees, or leaves a CUDA error. Only a pass is kept (WORKED):
    after a failure the next model (a bench row) checks again."""
    if (device, width, inner) in WORKED:
        return True, ""
    ok, why = check(device, width, inner)
    if ok:
        WORKED.add((device, width, inner))
    return ok, why


def check(device: torch.device, width: int, inner: int) -> tuple[bool, str]:
    if not REGISTERED:
        return (
            False,
            f"cuBLASLt's GELU epilogue needs torch 2.4 or later (torch.library.custom_op), not {torch.__version__}",
        )
    if device.type != "cuda":
        return False, f"cuBLASLt's GELU epilogue needs a CUDA GPU, not {device.type}"
    if width % 8 or inner % 8:
        return False, f"cuBLASLt's GELU epilogue needs widths divisible by 8, not {width} and {inner}"
    try:
        errors = trial(device, width, inner, tokens=TRIAL_TOKENS)
    except TrainError:  # it ran and disagreed at an algorithm's own check, or crashed (gelu_bias_mm)
        raise
    except Exception as e:  # the library not found, out of memory
        if left := cuda_error_left(device):
            raise crashed(device, left) from None
        return False, f"cuBLASLt's GELU epilogue did not run ({first_line(e)[:160]})"
    if (why := LEFT_TO_TORCH.pop(cublaslt.shape_name(TRIAL_TOKENS, inner, width), None)) is not None:
        return False, f"cuBLASLt's GELU epilogue did not run ({why})"  # torch's kernels ran instead
    if (worst := cublaslt.failing(errors)) is not None:
        raise disagreed(
            f"the fused MLP's {OUTPUTS[worst]} disagreed with torch on {device} (relative error {errors[worst]:.2g})"
        )
    return True, ""


def fuse(model, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Swap every GPT-2 MLP of `model` for FusedGeluMLP where works() for matmuls in `dtype`; (swapped, the
    reason if not)."""
    conf = model.config
    if getattr(conf, "model_type", "") != "gpt2" or conf.activation_function not in GELU_TANH:
        return False, "train.mlp fused is for GPT-2 with a tanh GELU"
    if dtype != torch.bfloat16:
        return False, "train.mlp fused is for bf16 matmuls (train.autocast bfloat16 or model.dtype bfloat16)"
    LEFT_TO_TORCH.clear()  # what an earlier model (a bench row) left is not this one's
    ok, why = works(device, conf.n_embd, conf.n_inner or 4 * conf.n_embd)
    if ok:
        for block in model.base_model.h:
            block.mlp = FusedGeluMLP(block.mlp)
    return ok, why


def path(model) -> str:
    """The MLP path in words, for the training log, its figures and the bench table: with the shapes left to
    torch's kernels mid-run, if any."""
    if not any(isinstance(m, FusedGeluMLP) for m in model.modules()):
        return "plain"
    left = "; ".join(f"torch's kernels at {shape} ({why})" for shape, why in LEFT_TO_TORCH.items())
    return "fused (cuBLASLt GELU epilogue)" + (f"; {left}" if left else "")
