"""training_pt/tuned_gemm.py: the linears and the LM head on tuned cuBLASLt GEMMs, as far as a CPU shows it (the op's
torch path, the gradients, the swap into GPT-2, which GEMMs go through it, the fallbacks); cuBLASLt runs on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from training_pt import chunked_loss, cublaslt, gelu_mlp, tuned_gemm
from training_pt import model as M
from training_pt.configurator import EXIT_CHECK, TrainError


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test starts with nothing checked, no plan made and no shape left to torch."""
    monkeypatch.setattr(tuned_gemm, "WORKED", set())
    monkeypatch.setattr(tuned_gemm, "LEFT_TO_TORCH", {})
    monkeypatch.setattr(cublaslt, "PLANS", {})


@pytest.fixture
def lt_on_cpu(monkeypatch):
    """The op takes its cuBLASLt branch on the CPU's bf16 tensors; cublaslt.mm is replaced by each test."""
    monkeypatch.setattr(tuned_gemm, "on_cublaslt", lambda a: a.dtype == torch.bfloat16)


def tiny_gpt2():
    from transformers import AutoModelForCausalLM, GPT2Config

    conf = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=64)
    conf.activation_function = "gelu_pytorch_tanh"
    conf.resid_pdrop = conf.embd_pdrop = conf.attn_pdrop = 0.0
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, cublaslt.TOLERANCE)])
def test_the_linear_and_its_three_gradients_agree_with_torch(dtype, bound):
    errors = tuned_gemm.trial(torch.device("cpu"), 32, tokens=64, dtype=dtype)
    assert len(errors) == len(tuned_gemm.OUTPUTS) and max(errors) < bound


@pytest.mark.parametrize("compiled", [False, True])
def test_gpt2_with_tuned_linears_and_head_is_the_same_model(compiled):
    plain = tiny_gpt2()
    tuned = copy.deepcopy(plain)
    for block in tuned.base_model.h:
        block.mlp = gelu_mlp.FusedGeluMLP(block.mlp)
    tuned_gemm.swap(tuned.base_model)
    tuned.m40_tuned_gemm = set()
    assert [n for n, _ in tuned.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert isinstance(tuned.base_model.h[0].attn.c_attn, tuned_gemm.TunedLinear)
    assert tuned.base_model.h[0].mlp.tuned and not plain.base_model.h[0].mlp.__dict__.get("tuned")
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for lm in (plain, tuned):
        net = M.NextTokenLoss(lm, fused=True)
        loss = (torch.compile(net) if compiled else net)(x, x)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in lm.parameters()], net.tuned))
    (loss_p, grads_p, tuned_p), (loss_t, grads_t, tuned_t) = results
    assert (tuned_p, tuned_t) == (False, True)
    assert torch.allclose(loss_p, loss_t, rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_p, grads_t, strict=True))


def test_a_linear_with_its_weight_out_by_in_computes_the_same():
    layer = torch.nn.Linear(16, 24)
    swapped = tuned_gemm.TunedLinear(layer)
    assert swapped.weight is layer.weight and swapped.bias is layer.bias
    x = torch.randn(3, 5, 16, requires_grad=True)
    want = layer(x)
    want_grads = torch.autograd.grad(want.square().sum(), (x, layer.weight, layer.bias))
    got = swapped(x)
    assert got.shape == (3, 5, 24) and torch.allclose(got, want, atol=1e-6)
    got_grads = torch.autograd.grad(got.square().sum(), (x, layer.weight, layer.bias))
    assert [g.shape for g in got_grads] == [(3, 5, 16), (24, 16), (24,)]
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got_grads, want_grads, strict=True))
    assert not tuned_gemm.swappable(torch.nn.Linear(4, 4, bias=False))  # TunedLinear computes a bias


def test_the_fused_mlps_other_gemms_go_through_the_tuned_op_when_marked(monkeypatch, lt_on_cpu):
    seen = []

    def recording(a, b, bias=None, out32=False, out=None):
        seen.append((tuple(a.shape), tuple(b.shape), cublaslt.describe(a, b, bias, out32).split(" ", 5)[-1]))
        return tuned_gemm.torch_mm(a, b, bias, out32, out)

    monkeypatch.setattr(cublaslt, "mm", recording)
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(0)
    c_fc, c_proj = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)  # weights as a Conv1D's: in x out
    c_fc.weight.data, c_proj.weight.data = (
        torch.randn(8, 32, generator=gen) * 0.1,
        torch.randn(32, 8, generator=gen) * 0.1,
    )
    mlp = gelu_mlp.FusedGeluMLP(SimpleNamespace(c_fc=c_fc, c_proj=c_proj, dropout=torch.nn.Identity()))
    x = torch.randn(16, 8, generator=gen).bfloat16().requires_grad_()
    want = mlp(x)
    want_grads = torch.autograd.grad(want.float().sum(), (x, c_fc.weight, c_proj.weight))
    assert seen == []  # not marked: torch's own ops
    mlp.tuned = True
    got = mlp(x)
    got_grads = torch.autograd.grad(got.float().sum(), (x, c_fc.weight, c_proj.weight))
    assert torch.equal(got, want) and all(torch.equal(g, w) for g, w in zip(got_grads, want_grads, strict=True))
    assert seen == [
        ((16, 32), (32, 8), "BIAS"),  # c_proj's forward
        ((16, 8), (8, 32), "DEFAULT b^T"),  # c_proj's input gradient
        ((16, 32), (32, 8), "DEFAULT b^T"),  # c_fc's input gradient
        ((8, 16), (16, 32), "DEFAULT a^T"),  # c_fc's weight gradient
        ((32, 16), (16, 8), "DEFAULT a^T"),  # c_proj's weight gradient
    ]


def test_a_bias_with_an_fp32_product_is_added_by_torchs_path_too(lt_on_cpu):
    a, b, bias = torch.randn(8, 16).bfloat16(), torch.randn(16, 24).bfloat16(), torch.randn(24)
    got = tuned_gemm.mm(a, b, bias, out32=True)  # cuBLASLt refuses it (LtError): torch's kernels, with the bias
    assert got.dtype == torch.float32 and torch.allclose(got, (a @ b).float() + bias)
    assert "8 x 24 x 16 BIAS fp32" in tuned_gemm.LEFT_TO_TORCH


def test_tune_says_why_not_and_leaves_the_model_as_it_was():
    lm = tiny_gpt2()
    before = str(lm)
    assert tuned_gemm.tune(lm, torch.device("cpu"), torch.bfloat16) == (
        False,
        "the tuned GEMMs need a CUDA GPU, not cpu",
    )
    assert tuned_gemm.tune(lm, torch.device("cuda", 0), torch.float32)[1].startswith("train.gemm tuned is for bf16")
    assert str(lm) == before and not tuned_gemm.in_use(lm) and tuned_gemm.path(lm) == "torch"


def test_tune_says_so_where_the_model_has_no_linear_it_computes(monkeypatch):
    class Gated(torch.nn.Module):  # linears without a bias, as Gemma's
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"hidden_size": 16})()
            self.base_model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))

    monkeypatch.setattr(tuned_gemm, "works", lambda device, width: (True, ""))
    lm = Gated()
    ok, why = tuned_gemm.tune(lm, torch.device("cuda", 0), torch.bfloat16)
    assert (ok, why) == (False, "the model has no linear with a bias (train.gemm tuned is for GPT-2's Conv1D layers)")
    assert not tuned_gemm.in_use(lm) and tuned_gemm.path(lm) == "torch"
    gpt2 = tiny_gpt2()
    assert tuned_gemm.tune(gpt2, torch.device("cuda", 0), torch.bfloat16) == (True, "") and tuned_gemm.in_use(gpt2)
    assert tuned_gemm.swap(gpt2.base_model) == 0  # swapped once: nothing left to swap


def test_a_cublaslt_error_mid_run_leaves_that_shape_to_torch_and_says_so(monkeypatch, lt_on_cpu):
    calls = []

    def no_algorithm(a, b, bias=None, out32=False, out=None):
        calls.append(a.shape)
        raise cublaslt.LtError("no cuBLASLt DEFAULT algorithm at 64 x 48 x 32 ran")

    monkeypatch.setattr(cublaslt, "mm", no_algorithm)
    a, b = torch.randn(64, 32).bfloat16(), torch.randn(32, 48).bfloat16()
    for _ in range(2):
        assert torch.equal(tuned_gemm.mm(a, b), a @ b)
    assert len(calls) == 1 and list(tuned_gemm.LEFT_TO_TORCH) == ["64 x 48 x 32 DEFAULT"]
    assert torch.equal(tuned_gemm.mm(b.t(), a.t()), b.t() @ a.t()) and len(calls) == 2  # another GEMM: tried
    assert list(tuned_gemm.LEFT_TO_TORCH)[1] == "48 x 64 x 32 DEFAULT a^T b^T"
    lm = torch.nn.Module()
    lm.m40_tuned_gemm = set()
    assert tuned_gemm.path(lm) == (
        "tuned (cuBLASLt, each shape's fastest algorithm); torch's kernels at 64 x 48 x 32 DEFAULT "
        "(LtError: no cuBLASLt DEFAULT algorithm at 64 x 48 x 32 ran); torch's kernels at 48 x 64 x 32 DEFAULT a^T "
        "b^T (LtError: no cuBLASLt DEFAULT algorithm at 64 x 48 x 32 ran)"
    )


def test_wrong_numbers_or_a_cuda_error_mid_run_fail_the_run_in_one_line(monkeypatch, lt_on_cpu):
    a, b = torch.randn(64, 32).bfloat16(), torch.randn(32, 48).bfloat16()

    def wrong(*args, **kwargs):
        raise cublaslt.Disagreed("1 of 8 cuBLASLt DEFAULT algorithms at 64 x 48 x 32 disagreed with torch")

    monkeypatch.setattr(cublaslt, "mm", wrong)
    with pytest.raises(TrainError, match="at 64 x 48 x 32 disagreed with torch.*train.gemm=torch") as e:
        torch.ops.m40.mm(a, b, None, False)
    assert e.value.code == EXIT_CHECK

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(cublaslt, "mm", crash)
    monkeypatch.setattr(tuned_gemm, "cuda_error_left", lambda device: "RuntimeError: CUDA error: an illegal memory")
    with pytest.raises(TrainError, match="train.gemm tuned: cuBLASLt left a CUDA error on cpu") as e:
        tuned_gemm.mm(a, b)
    assert e.value.code == EXIT_CHECK and "\n" not in str(e.value)
    monkeypatch.setattr(tuned_gemm, "cuda_error_left", lambda device: "")
    with pytest.raises(RuntimeError, match="illegal memory access"):  # the GPU still works: the error is itself
        tuned_gemm.mm(a, b)


def test_works_falls_back_where_cublaslt_does_not_run_and_fails_the_run_where_it_disagrees(monkeypatch):
    cuda = torch.device("cuda", 0)

    def broken(*args, **kwargs):
        raise OSError("libcublasLt.so: cannot open shared object file")

    monkeypatch.setattr(tuned_gemm, "trial", broken)
    monkeypatch.setattr(tuned_gemm, "cuda_error_left", lambda device: "")
    assert tuned_gemm.works(cuda, 768) == (
        False,
        "cuBLASLt's GEMMs did not run (OSError: libcublasLt.so: cannot open shared object file)",
    )

    def left(*args, **kwargs):
        tuned_gemm.LEFT_TO_TORCH["1024 x 2304 x 768"] = "LtError: no cuBLASLt DEFAULT algorithm ran"
        return [3e-3] * 4

    monkeypatch.setattr(tuned_gemm, "trial", left)
    assert tuned_gemm.works(cuda, 768) == (
        False,
        "cuBLASLt's GEMMs did not run (LtError: no cuBLASLt DEFAULT algorithm ran)",
    )
    assert tuned_gemm.LEFT_TO_TORCH == {}  # the trial's shapes are not the run's
    for errors, output in (
        ([3e-3, 0.4, 3e-3, 3e-3], "input gradient"),
        ([3e-3, 3e-3, 3e-3, float("nan")], "bias gradient"),
    ):
        monkeypatch.setattr(tuned_gemm, "trial", lambda *a, errors=errors, **k: errors)
        with pytest.raises(TrainError, match=f"a linear's {output} disagreed with torch on cuda:0") as e:
            tuned_gemm.works(cuda, 768)
        assert e.value.code == EXIT_CHECK
    assert tuned_gemm.WORKED == set()  # no failure is kept
    monkeypatch.setattr(tuned_gemm, "trial", lambda *a, **k: [3e-3] * 4)
    assert tuned_gemm.works(cuda, 768) == (True, "")
    monkeypatch.setattr(tuned_gemm, "trial", broken)
    assert tuned_gemm.works(cuda, 768) == (True, "")  # a pass is kept for the process


def test_the_lm_heads_three_gemms_go_through_the_tuned_op(monkeypatch, lt_on_cpu):
    seen = []

    def recording(a, b, bias=None, out32=False, out=None):
        seen.append((tuple(a.shape), tuple(b.shape), a.stride(0) == 1, out32))
        return tuned_gemm.torch_mm(a, b, bias, out32, out)

    monkeypatch.setattr(cublaslt, "mm", recording)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=gen).requires_grad_()
    weight = (torch.randn(24, 16, generator=gen) * 0.1).requires_grad_()
    targets = torch.randint(0, 24, (40,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = chunked_loss.linear_cross_entropy(hidden, weight, targets)
        got = chunked_loss.linear_cross_entropy(hidden, weight, targets, tuned=True)
    assert torch.equal(got, want)
    logits, input_grad, weight_grad = (
        ((40, 16), (16, 24), False, False),
        ((40, 24), (24, 16), False, False),
        ((24, 40), (40, 16), True, True),
    )
    assert seen == [logits, input_grad, weight_grad]  # the weight gradient in fp32, its left operand g.t()
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got_grads = torch.autograd.grad(got, (hidden, weight))
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads, strict=True))
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = chunked_loss.linear_cross_entropy(hidden, weight, targets, chunk=16, tuned=True)
    assert torch.allclose(chunked, want) and len(seen) == 7  # three chunks of logits and input gradients, and
    assert seen[2] == ((24, 16), (16, 16), True, True)  # the first chunk's weight gradient (the rest add to it)
