"""The decoder's linears (with a bias: GPT-2's Conv1D layers) and, under the fused loss, the LM head's GEMMs on
cuBLASLt, each shape's algorithm the fastest of the heuristic's candidates (train.gemm: tuned).

torch's matmul takes one algorithm per shape. On GPT-2's GEMMs at 64 x 1024 tokens on an H200 the fastest of the 8
candidates cuBLASLt's heuristic offers took up to 21% less time (the LM head's forward 6.97 ms against torch's 8.84
in a scan; 6.42 against the heuristic's first pick's 7.02 in training; +1.0% tok/s in the compiled bench row;
docs/train.md), so here each shape's candidates are timed once, on first use, and the fastest kept
(training_pt/cublaslt.py). The arithmetic is the same: bf16 GEMMs accumulating in fp32, a bias added in the epilogue
as torch's addmm does. Before an algorithm is used at a shape every row of its output is held to torch's own GEMM
(64 rows to fp64), and before a run uses any of it a linear's output and gradients are checked against fp64 torch
(works()). Where cuBLASLt cannot run (no CUDA GPU, not bf16, torch before 2.4, no library, no algorithm, an error
status) torch's kernels run, for the model or at that one shape, and the log and the `gemm` figure say so; where it
computes wrong numbers, or leaves a CUDA error, the run fails (exit 3, one line).
Elsewhere (a CPU, fp32) the op is torch's kernels, so the code and its gradients are tested on a CPU.
Runs in .venv-gpu (imports torch).
"""

from __future__ import annotations

import torch

from training_pt import cublaslt
from training_pt.configurator import EXIT_CHECK, TrainError
from training_pt.cublaslt import REGISTERED, cuda_error_left, on_cublaslt
from training_pt.fabric import first_line

TRIAL_TOKENS = 1024  # rows of works()'s check
OUTPUTS = ("output", "input gradient", "weight gradient", "bias gradient")  # relative_errors' order
WORKED: set[tuple] = set()  # (device, width) that works() passed in this process
LEFT_TO_TORCH: dict[str, str] = {}  # "M x N x K <kind>" (cublaslt.describe) -> why cuBLASLt could not take that
# GEMM, this model's run


def torch_mm(a, b, bias=None, out32: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch's a @ b (+ bias); the product in fp32 where out32 (cublaslt.product32); into `out` where given."""
    if out32:
        c = cublaslt.product32(a, b)
        c = c if bias is None else c + bias
        return c if out is None else out.copy_(c)
    if bias is None:
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    return torch.addmm(bias, a, b) if out is None else torch.addmm(bias, a, b, out=out)


def mm(a, b, bias=None, out32: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (+ bias), into `out` where given: cuBLASLt's tuned algorithm on a GPU in bf16, else (or where cuBLASLt
    cannot take this GEMM, LEFT_TO_TORCH) torch's kernels. TrainError (exit 3) where cuBLASLt computes it wrong or
    leaves a CUDA error."""
    key = cublaslt.describe(a, b, bias, out32)
    if on_cublaslt(a) and key not in LEFT_TO_TORCH:
        try:
            return cublaslt.mm(a, b, bias, out32, out)
        except cublaslt.LtError as e:
            LEFT_TO_TORCH[key] = first_line(e)[:200]
        except cublaslt.Disagreed as e:
            raise failed(wrong(str(e))) from None
        except Exception:
            if left := cuda_error_left(a.device):
                raise crashed(a.device, left) from None
            raise
    return torch_mm(a, b, bias, out32, out)


def op(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, out32: bool = False) -> torch.Tensor:
    """mm() as the custom op m40::mm sees it (a new output, never an input's memory)."""
    return mm(a, b, bias, out32)


def mm_shape(a, b, bias=None, out32=False):
    return a.new_empty(a.shape[0], b.shape[1], dtype=torch.float32 if out32 else a.dtype)


if REGISTERED:
    torch.library.custom_op("m40::mm", op, mutates_args=()).register_fake(mm_shape)


def failed(what: str) -> TrainError:
    return TrainError(EXIT_CHECK, f"train.gemm tuned: {what}; train.gemm=torch trains without it")


def crashed(device, left: str) -> TrainError:
    return failed(f"cuBLASLt left a CUDA error on {device} ({left[:200]})")


def wrong(what: str) -> str:
    return f"{what}: this GPU computes it wrong, or this tool's use of cuBLASLt is wrong for this torch"


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on t runs in: autocast's where autocast is on for t's device, else t's own."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, tuned: bool) -> torch.Tensor:
    """a @ b (+ bias) in a traced graph: the tuned op (opaque to torch.compile) or torch's own."""
    if tuned:
        return torch.ops.m40.mm(a, b, bias, False)
    return a @ b if bias is None else torch.addmm(bias, a, b)


class LinearFunction(torch.autograd.Function):
    """x @ w + bias on 2-D x, w the K x N operand (a Conv1D's weight, or a Linear's weight transposed); every GEMM
    of the forward and the backward the tuned op."""

    @staticmethod
    def forward(ctx, x, w, bias):
        ctx.save_for_backward(x, w)
        return torch.ops.m40.mm(x, w, bias, False)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = torch.ops.m40.mm(dy, w.t(), None, False)
        dw = torch.ops.m40.mm(x.t(), dy, None, False)
        return dx, dw, dy.sum(0)


class TunedLinear(torch.nn.Module):
    """Stands in for an HF Conv1D (weight in x out) or a torch Linear (weight out x in), both with a bias, holding
    its very parameters (the same names)."""

    def __init__(self, layer):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.linear = isinstance(layer, torch.nn.Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = matmul_dtype(x)
        w = self.weight.to(dtype)
        out = LinearFunction.apply(
            x.reshape(-1, x.shape[-1]).to(dtype), w.t() if self.linear else w, self.bias.to(dtype)
        )
        return out.view(*x.shape[:-1], out.shape[-1])


def swappable(layer) -> bool:
    """An HF Conv1D or a torch Linear, with a bias (what TunedLinear computes)."""
    conv1d = type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")
    return (conv1d or isinstance(layer, torch.nn.Linear)) and getattr(layer, "bias", None) is not None


def relative_errors(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> list[float]:
    """Relative errors (norm) of LinearFunction's output and three gradients against torch's in fp64 (no TF32),
    both from the same inputs and the same random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias)]
    out = LinearFunction.apply(*leaves)
    gen = torch.Generator(out.device).manual_seed(1)
    dout = torch.randn(out.shape, device=out.device, generator=gen).to(out.dtype)
    got = [out, *torch.autograd.grad(out, leaves, dout)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = torch.addmm(ref_leaves[2], ref_leaves[0], ref_leaves[1])
    want = [ref, *torch.autograd.grad(ref, ref_leaves, dout.double())]
    return [((g.double() - w_).norm() / w_.norm().clamp_min(1e-30)).item() for g, w_ in zip(got, want, strict=True)]


def trial(device: torch.device, width: int, tokens: int = TRIAL_TOKENS, dtype=torch.bfloat16) -> list[float]:
    """relative_errors on random inputs of a model's width (width x 3 width: GPT-2's QKV), GPT-2's init scale."""
    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    return relative_errors(rand(tokens, width), rand(width, 3 * width, scale=0.02), rand(3 * width))


def works(device: torch.device, width: int) -> tuple[bool, str]:
    """(True, "") where the tuned linear runs on cuBLASLt and agrees with torch; (False, one line why) where it
    cannot run; TrainError (exit 3) where it runs and disagrees, or leaves a CUDA error. Only a pass is kept
    (WORKED): after a failure the next model (a bench row) checks again."""
    if (device, width) in WORKED:
        return True, ""
    ok, why = check(device, width)
    if ok:
        WORKED.add((device, width))
    return ok, why


def check(device: torch.device, width: int) -> tuple[bool, str]:
    if not REGISTERED:
        return False, f"the tuned GEMMs need torch 2.4 or later (torch.library.custom_op), not {torch.__version__}"
    if device.type != "cuda":
        return False, f"the tuned GEMMs need a CUDA GPU, not {device.type}"
    if width % 8:
        return False, f"the tuned GEMMs need a width divisible by 8, not {width}"
    try:
        errors = trial(device, width)
    except TrainError:  # it ran and disagreed at an algorithm's own check, or crashed (mm)
        raise
    except Exception as e:  # the library not found, out of memory
        if left := cuda_error_left(device):
            raise crashed(device, left) from None
        return False, f"cuBLASLt's GEMMs did not run ({first_line(e)[:160]})"
    if LEFT_TO_TORCH:  # torch's kernels ran instead at one of the trial's shapes
        why = next(iter(LEFT_TO_TORCH.values()))
        LEFT_TO_TORCH.clear()
        return False, f"cuBLASLt's GEMMs did not run ({why})"
    if (worst := cublaslt.failing(errors)) is not None:
        what = f"a linear's {OUTPUTS[worst]} disagreed with torch on {device} (relative error {errors[worst]:.2g})"
        raise failed(wrong(what))
    return True, ""


def tune(model, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Swap every linear with a bias in `model`'s base model (its blocks) for TunedLinear, and mark its fused MLPs
    and its LM head tuned, where works() for matmuls in `dtype`; (swapped, the reason if not)."""
    if dtype != torch.bfloat16:
        return False, "train.gemm tuned is for bf16 matmuls (train.autocast bfloat16 or model.dtype bfloat16)"
    LEFT_TO_TORCH.clear()  # what an earlier model (a bench row) left is not this one's
    ok, why = works(device, model.config.hidden_size)
    if ok and not swap(model.base_model):
        return False, "the model has no linear with a bias (train.gemm tuned is for GPT-2's Conv1D layers)"
    if ok:
        model.m40_tuned_gemm = set(cublaslt.PLANS)  # in_use() (NextTokenLoss's LM head reads it); timings() reports
        # the plans made after these (works()'s trial's and an earlier bench row's)
    return ok, why


def swap(module: torch.nn.Module) -> int:
    """Swap module's linears with a bias for TunedLinear and mark its fused MLPs tuned, at any depth; how many."""
    count = 0
    for name, child in module.named_children():
        if swappable(child):
            setattr(module, name, TunedLinear(child))
            count += 1
        elif hasattr(child, "tuned"):  # a FusedGeluMLP: its GEMMs but the GELU epilogue's go tuned
            child.tuned = True
            count += 1
        else:
            count += swap(child)
    return count


def in_use(model) -> bool:
    return getattr(model, "m40_tuned_gemm", None) is not None


def path(model) -> str:
    """The GEMM path in words, for the training log, its figures and the bench table: with the shapes left to
    torch's kernels mid-run, if any."""
    if not in_use(model):
        return "torch"
    left = "; ".join(f"torch's kernels at {shape} ({why})" for shape, why in LEFT_TO_TORCH.items())
    return "tuned (cuBLASLt, each shape's fastest algorithm)" + (f"; {left}" if left else "")


def timings(model) -> str:
    """One line: each GEMM tuned for `model` (since tune()), the fastest algorithm's ms and the heuristic's first's."""
    return "; ".join(cublaslt.tuned_times(set(cublaslt.PLANS) - getattr(model, "m40_tuned_gemm", set())))
