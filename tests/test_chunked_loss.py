"""training_pt/chunked_loss.py: the fused, chunked LM head + cross-entropy gives the plain path's loss and
gradients (fp32 exactly up to summation order, bf16 autocast within bf16 rounding), with a ragged last chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training_pt import chunked_loss as C
from training_pt import model as M
from training_pt.configurator import TrainError


def plain_and_chunked(n=37, d=16, v=101, chunk=8, autocast=False):
    """(loss, grad hidden, grad weight) by F.linear + F.cross_entropy, and by the chunked path."""
    torch.manual_seed(0)
    hidden0, weight0 = torch.randn(n, d), torch.randn(v, d) * 0.3
    targets = torch.randint(0, v, (n,))
    out = []
    for chunked in (False, True):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if chunked:
                loss = C.linear_cross_entropy(hidden, weight, targets, chunk)
            else:
                logits = F.linear(hidden, weight)
                loss = F.cross_entropy(logits.float(), targets)
        (loss * 3).backward()  # a non-unit incoming gradient reaches both
        out.append((loss.detach(), hidden.grad, weight.grad))
    return out


def test_fp32_matches_the_plain_loss_and_gradients_with_a_ragged_last_chunk():
    (loss, gh, gw), (loss_c, gh_c, gw_c) = plain_and_chunked(n=37, chunk=8)  # chunks of 8, 8, 8, 8, 5
    assert loss_c.dtype == torch.float32
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    assert gh_c.dtype == gh.dtype == torch.float32 and gw_c.dtype == torch.float32
    torch.testing.assert_close(gh_c, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw_c, gw, rtol=1e-5, atol=1e-6)


def test_one_chunk_larger_than_the_batch_is_the_plain_path():
    (loss, gh, gw), (loss_c, gh_c, gw_c) = plain_and_chunked(n=12, chunk=4096)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw_c, gw, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_stays_within_bf16_rounding():
    (loss, gh, gw), (loss_c, gh_c, gw_c) = plain_and_chunked(n=64, chunk=16, autocast=True)
    assert gh_c.dtype == torch.float32 and gw_c.dtype == torch.float32  # the parameters' dtypes
    torch.testing.assert_close(loss_c, loss, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gh_c, gh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw_c, gw, rtol=2e-2, atol=2e-3)
    fp32 = plain_and_chunked(n=64, chunk=16)[0]
    assert not torch.equal(loss_c, fp32[0])  # bf16 matmuls did run: not the fp32 number


def test_the_loss_kernel_is_softmax_minus_one_hot():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, -1.0]])
    loss, grad = C.loss_and_grad(logits, torch.tensor([1, 0]), 0.5)
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([1, 0]), reduction="none"))
    torch.testing.assert_close(grad[0], torch.tensor([0.125, -0.375, 0.125, 0.125]))
    assert grad.sum().abs() < 1e-6  # each row's softmax minus its one-hot sums to zero


def tiny_gpt2():
    from transformers import AutoModelForCausalLM, GPT2Config

    conf = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf)


def test_next_token_loss_chunked_gives_the_models_gradients():
    lm = tiny_gpt2()
    x = torch.randint(0, 64, (3, 16))
    y = torch.roll(x, -1, dims=1)
    grads = []
    for fused, chunk in ((False, 0), (True, 10)):  # 48 tokens in chunks of 10: a ragged last chunk
        lm.zero_grad(set_to_none=True)
        loss = M.NextTokenLoss(lm, fused, chunk)(x, y)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}))
    (loss, plain), (loss_c, chunked) = grads
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    assert plain.keys() == chunked.keys()
    for name in plain:  # the tied embedding / LM head weight included
        torch.testing.assert_close(chunked[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_chunked_loss_is_not_compiled_with_the_blocks_and_eager_turns_its_kernel_back():
    lm = tiny_gpt2()
    net = M.NextTokenLoss(lm, True, 8)
    forward, eager = M.compile_net(net, lm, {"compile": True, "compile_mode": "default", "compile_scope": "blocks"})
    assert net.loss_fn is not C.linear_cross_entropy  # its kernel compiled apart, the loop a graph break
    assert "head_loss" not in vars(net)  # so the blocks scope does not compile the head + loss as a region
    assert eager() is net and net.loss_fn is C.linear_cross_entropy


def test_a_head_with_a_bias_is_refused_with_the_fix():
    lm = tiny_gpt2()
    lm.lm_head = torch.nn.Linear(32, 64)
    with pytest.raises(TrainError, match="fused needs an LM head without a bias; set train.loss: plain"):
        M.NextTokenLoss(lm, True)
    assert M.NextTokenLoss(lm, False).describe() == "plain"  # the plain loss takes any head


def test_off_a_gpu_the_fused_loss_says_it_uses_the_torch_kernel_and_its_chunk():
    net = M.NextTokenLoss(tiny_gpt2(), True)  # vocab 64: chunks of up to 8192 x 50304 / 64 tokens
    assert not net.triton
    assert net.describe() == (
        "fused, torch kernel (the Triton loss kernel needs a CUDA GPU, not cpu), chunks of up to 6438912 tokens"
    )
    assert M.NextTokenLoss(tiny_gpt2(), True, 512).describe().endswith("chunks of up to 512 tokens")


def test_the_torch_kernels_chunk_holds_a_fixed_number_of_logits_whatever_the_vocabulary(monkeypatch):
    sizes = []
    monkeypatch.setattr(C.LinearCrossEntropy, "apply", lambda h, w, t, chunk, *rest: sizes.append(chunk))
    for n, vocab in ((12, 50304), (20000, 50304), (20000, 256000)):
        C.linear_cross_entropy(torch.randn(n, 4), torch.randn(vocab, 4), torch.zeros(n, dtype=torch.long))
    C.linear_cross_entropy(torch.randn(20000, 4), torch.randn(9, 4), torch.zeros(20000, dtype=torch.long), 0, True)
    assert sizes == [12, 8192, 1609, 20000]  # GPT-2's and Gemma's vocab; the Triton kernel: the whole micro-batch


def test_without_autograd_the_fused_loss_skips_the_gradient_matmuls(monkeypatch):
    hidden, weight = torch.randn(10, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    targets = torch.randint(0, 9, (10,))
    want = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    calls = []
    monkeypatch.setattr(C, "accumulate_mm", lambda *a: calls.append(a))
    with torch.no_grad():
        loss = C.linear_cross_entropy(hidden, weight, targets, 4)
    torch.testing.assert_close(loss, want.detach())
    assert calls == [] and not loss.requires_grad


def test_a_frozen_input_still_gets_the_weights_gradient():
    hidden, weight = torch.randn(10, 4), torch.randn(9, 4, requires_grad=True)  # hidden needs no gradient
    targets = torch.randint(0, 9, (10,))
    torch.nn.functional.cross_entropy(hidden @ weight.t(), targets).backward()
    want, weight.grad = weight.grad.clone(), None
    C.linear_cross_entropy(hidden, weight, targets, 4).backward()
    torch.testing.assert_close(weight.grad, want, rtol=1e-5, atol=1e-6)
