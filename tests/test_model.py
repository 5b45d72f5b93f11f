"""training_pt/model.py: model config checks, the FLOPs and MFU arithmetic, compile scopes."""

from __future__ import annotations

import pytest
import torch

from training_pt import model as T
from training_pt.configurator import TrainError


def test_model_config_keys_are_checked_against_transformers():
    with pytest.raises(TrainError, match=r"model\.config\.n_layers is not a GPT2Config setting"):
        T.check_model_config("gpt2", {"n_layers": 2})
    with pytest.raises(TrainError, match=r"model\.config\.hidden_size must be an integer"):
        T.check_model_config("gemma", {"hidden_size": "big"})


def test_flops_and_mfu_match_a_hand_computation():
    # GPT-2 124M with the vocab padded to 50304: HF counts 124,439,808 parameters at vocab 50257;
    # + 47 x 768 padded rows - 1024 x 768 position table (a lookup, no matmul) = 123,689,472.
    from transformers import AutoModelForCausalLM, GPT2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=50304))
    n = T.matmul_params(model, "gpt2")
    assert n == 124_439_808 + 47 * 768 - 1024 * 768 == 123_689_472
    assert T.attention_shape(model) == (12, 12, 64)
    fpt = T.flops_per_token(n, 12, 12, 64, 1024)
    assert fpt == 6 * 123_689_472 + 12 * 12 * 12 * 64 * 1024 == 855_383_040
    assert T.model_flops(model, "gpt2", 1024) == (fpt, "6N + 12LHQT with N=123.7M, L=12, H=12, Q=64, T=1024")
    # 400K tok/s on an H100 SXM (989 TFLOP/s): 855.38e6 * 4e5 / 989e12 = 34.6%
    assert T.mfu(fpt, 400_000, 989) == pytest.approx(0.345959, abs=1e-6)


def tiny_gpt2():
    from transformers import AutoModelForCausalLM, GPT2Config

    conf = GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=16, vocab_size=64)
    return AutoModelForCausalLM.from_config(conf)


def test_a_bf16_residual_stream_reaches_every_block_and_the_embeddings_still_learn_in_fp32():
    lm = tiny_gpt2()
    assert T.cast_embeddings(lm, torch.bfloat16) == 2  # GPT-2's token and position tables
    seen = []
    for block in lm.transformer.h:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = torch.randint(0, 64, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = T.NextTokenLoss(lm)(x, x)
    loss.backward()
    assert seen == [torch.bfloat16] * 3 and torch.isfinite(loss)
    wte = lm.transformer.wte.weight
    assert wte.dtype == wte.grad.dtype == torch.float32 and wte.grad.abs().sum() > 0  # fp32 master weights
    seen.clear()
    assert torch.isfinite(T.NextTokenLoss(lm)(x, x)) and seen == [torch.float32] * 3  # no autocast: no cast
    bf16 = {"residual_dtype": "bfloat16", "autocast": "bfloat16"}
    assert T.residual_dtype({"model": {"dtype": "float32"}, "train": bf16}) == "bfloat16"
    assert T.residual_dtype({"model": {"dtype": "float32"}, "train": {**bf16, "autocast": "none"}}) == "float32"
    assert (
        T.residual_dtype({"model": {"dtype": "float32"}, "train": {**bf16, "residual_dtype": "float32"}}) == "float32"
    )
    assert (
        T.residual_dtype({"model": {"dtype": "bfloat16"}, "train": {**bf16, "residual_dtype": "float32"}}) == "bfloat16"
    )


SETTINGS = {"compile": True, "compile_mode": "default", "compile_scope": "blocks"}


def test_compile_scope_blocks_compiles_each_block_and_the_loss_head_and_eager_undoes_it():
    lm = tiny_gpt2()
    net = T.NextTokenLoss(lm)
    eager_blocks = list(lm.transformer.h)
    forward, eager = T.compile_net(net, lm, SETTINGS)
    assert forward is net  # compiled in place: the regions, not the whole graph
    assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in lm.transformer.h)
    assert "head_loss" in vars(net)
    assert eager() is net
    assert list(lm.transformer.h) == eager_blocks and "head_loss" not in vars(net)
    x = torch.randint(0, 64, (2, 8))
    assert torch.isfinite(net(x, x))  # the eager model still trains


def test_compile_scope_model_wraps_the_whole_step_and_compile_off_wraps_nothing():
    lm = tiny_gpt2()
    net = T.NextTokenLoss(lm)
    forward, eager = T.compile_net(net, lm, {**SETTINGS, "compile_scope": "model"})
    assert isinstance(forward, torch._dynamo.eval_frame.OptimizedModule) and eager() is net
    forward, eager = T.compile_net(net, lm, {**SETTINGS, "compile": False})
    assert forward is net and eager() is net


def test_decoder_blocks_are_the_base_models_list():
    lm = tiny_gpt2()
    assert T.decoder_blocks(lm) is lm.transformer.h

    class Flat(torch.nn.Module):
        base_model = torch.nn.Linear(2, 2)

    with pytest.raises(TrainError, match="Flat has no list of blocks; use train.compile_scope=model"):
        T.decoder_blocks(Flat())


def test_importing_the_training_code_leaves_torch_dynamo_unimported():
    # torch._dynamo costs ~2 s to import (1.8 s more per train start on the H200 when a decorator pulled it
    # in at import time); torch.compile imports it when a run compiles, and only then.
    import subprocess
    import sys

    code = "import sys, training_pt.train, training_pt.bench; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
