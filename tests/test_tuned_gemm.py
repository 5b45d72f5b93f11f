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
    tuned.m40_tuned_gemm = True
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
    x = torch.randn(3, 5, 16, requires_grad=True)
    want = layer(x)
    got = swapped(x)
    assert got.shape == (3, 5, 24) and torch.allclose(got, want, atol=1e-6)
    (want_x,) = torch.autograd.grad(want.sum(), x)
    layer.zero_grad()
    got.sum().backward()
    assert torch.allclose(x.grad, want_x, atol=1e-6)
    assert not tuned_gemm.swappable(torch.nn.Linear(4, 4, bias=False))  # TunedLinear computes a bias


def test_tune_says_why_not_and_leaves_the_model_as_it_was():
    lm = tiny_gpt2()
    before = str(lm)
    assert tuned_gemm.tune(lm, torch.device("cpu"), torch.bfloat16) == (
        False,
        "the tuned GEMMs need a CUDA GPU, not cpu",
    )
    assert tuned_gemm.tune(lm, torch.device("cuda", 0), torch.float32)[1].startswith("train.gemm tuned is for bf16")
    assert str(lm) == before and not tuned_gemm.in_use(lm) and tuned_gemm.path(lm) == "torch"


def test_a_cublaslt_error_mid_run_leaves_that_shape_to_torch_and_says_so(monkeypatch, lt_on_cpu):
    calls = []

    def no_algorithm(a, b, bias=None, out32=False):
        calls.append(a.shape)
        raise cublaslt.LtError("no cuBLASLt DEFAULT algorithm at 64 x 48 x 32 ran")

    monkeypatch.setattr(cublaslt, "mm", no_algorithm)
    a, b = torch.randn(64, 32).bfloat16(), torch.randn(32, 48).bfloat16()
    for _ in range(2):
        assert torch.equal(tuned_gemm.mm(a, b), a @ b)
    assert len(calls) == 1 and list(tuned_gemm.LEFT_TO_TORCH) == ["64 x 48 x 32"]
    lm = torch.nn.Module()
    lm.m40_tuned_gemm = True
    assert tuned_gemm.path(lm) == (
        "tuned (cuBLASLt, each shape's fastest algorithm); torch's kernels at 64 x 48 x 32 "
        "(LtError: no cuBLASLt DEFAULT algorithm at 64 x 48 x 32 ran)"
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

    def recording(a, b, bias=None, out32=False):
        seen.append((tuple(a.shape), tuple(b.shape), a.stride(0) == 1, out32))
        return tuned_gemm.torch_mm(a, b, bias, out32)

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
