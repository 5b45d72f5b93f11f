"""training_pt/gelu_mlp.py and cublaslt.py: the MLP with its GELU in c_fc's epilogue, as far as a CPU shows it
(the op's torch path, the gradients, the swap into GPT-2, the fallbacks); cuBLASLt itself runs on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from training_pt import cublaslt, gelu_mlp
from training_pt import model as M


def tiny_gpt2(act="gelu_pytorch_tanh"):
    from transformers import AutoModelForCausalLM, GPT2Config

    conf = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=64, activation_function=act)
    conf.resid_pdrop = conf.embd_pdrop = conf.attn_pdrop = 0.0
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, gelu_mlp.TOLERANCE)])
def test_the_function_and_its_five_gradients_agree_with_torch(dtype, bound):
    errors = gelu_mlp.trial(torch.device("cpu"), 32, 128, tokens=64, dtype=dtype)
    assert len(errors) == 6 and max(errors) < bound, errors  # out, dx, dw_fc, db_fc, dw_proj, db_proj


def test_a_wrong_gradient_is_caught_by_the_trial(monkeypatch):
    # the check works() relies on: a backward that drops the GELU's derivative is far outside the tolerance
    monkeypatch.setattr(torch.ops.aten, "gelu_backward", lambda d, pre, approximate: d)
    assert max(gelu_mlp.trial(torch.device("cpu"), 32, 128, tokens=64, dtype=torch.float32)) > 0.1


def swapped(lm):
    for block in lm.transformer.h:
        block.mlp = gelu_mlp.FusedGeluMLP(block.mlp)
    return lm


@pytest.mark.parametrize("compiled", [False, True])
def test_gpt2_with_the_fused_mlp_is_the_same_model_same_loss_and_gradients(compiled):
    plain = tiny_gpt2()
    fused = swapped(copy.deepcopy(plain))
    assert list(fused.state_dict()) == list(plain.state_dict())  # checkpoints and weight decay see the same names
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for lm in (plain, fused):
        net = M.NextTokenLoss(lm)
        step = torch.compile(net) if compiled and lm is fused else net
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step(x, x)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        want = grads[name].grad
        assert p.grad is not None and p.grad.dtype == torch.float32, name  # fp32 master weights keep fp32 grads
        assert (p.grad - want).norm() <= 0.03 * want.norm() + 1e-6, name


def test_fuse_says_why_not_and_leaves_the_model_as_it_was():
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    cases = [
        (tiny_gpt2(), cpu, bf16, "needs a CUDA GPU, not cpu"),
        (tiny_gpt2(), cpu, torch.float32, "is for bf16 matmuls"),
        (tiny_gpt2(act="relu"), cpu, bf16, "is for GPT-2 with a tanh GELU"),
    ]
    for lm, device, dtype, why in cases:
        ok, reason = gelu_mlp.fuse(lm, device, dtype)
        assert not ok and why in reason
        assert gelu_mlp.path(lm) == "plain" and not any(isinstance(m, gelu_mlp.FusedGeluMLP) for m in lm.modules())
    lm = swapped(tiny_gpt2())
    assert gelu_mlp.path(lm) == "fused (cuBLASLt GELU epilogue)"


def test_works_falls_back_when_the_epilogue_fails_or_disagrees(monkeypatch):
    gpu = torch.device("cuda", 0)  # never touched: trial is replaced

    def broken(*args, **kwargs):
        raise cublaslt.LtError("cublasLtMatmul returned cuBLAS status 15")

    monkeypatch.setattr(gelu_mlp, "trial", broken)
    gelu_mlp.works.cache_clear()
    assert gelu_mlp.works(gpu, 768, 3072) == (
        False,
        "cuBLASLt's GELU epilogue did not run (LtError: cublasLtMatmul returned cuBLAS status 15)",
    )
    for errors, word in (([1e-3, 0.8], "0.8"), ([float("nan")], "nan")):
        monkeypatch.setattr(gelu_mlp, "trial", lambda *a, errors=errors, **k: errors)
        gelu_mlp.works.cache_clear()
        ok, why = gelu_mlp.works(gpu, 768, 3072)
        assert not ok and f"disagreed with torch (relative error {word})" in why
    monkeypatch.setattr(gelu_mlp, "trial", lambda *a, **k: [3e-3] * 6)
    gelu_mlp.works.cache_clear()
    assert gelu_mlp.works(gpu, 768, 3072) == (True, "")
    assert gelu_mlp.works(gpu, 770, 3072)[1].endswith("widths divisible by 8, not 770 and 3072")
    gelu_mlp.works.cache_clear()


def test_the_library_is_the_one_the_process_loaded(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n")
    with pytest.raises(cublaslt.LtError, match="torch has not loaded libcublasLt"):
        cublaslt.library_path(str(maps))
    lt = "/venv/lib/python3.11/site-packages/nvidia/cu13/lib/libcublasLt.so.13"
    maps.write_text(f"7f00-7f01 r-xp 00000000 08:01 1 {lt}\n")
    assert cublaslt.library_path(str(maps)) == lt


def test_build_model_fuses_per_the_setting_and_says_why_not(tmp_path):
    from tasks import layout
    from training_pt.configurator import load_config

    logged = []
    cfg = load_config(
        layout.TRAIN_CONFIG, ["model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2"]
    )
    assert cfg["train"]["mlp"] == "fused"  # the smoke config's choice
    lm, _ = M.build_model(cfg, torch.device("cpu"), logged.append)
    assert gelu_mlp.path(lm) == "plain"
    assert logged[-1] == "train.mlp fused: the plain MLP instead (cuBLASLt's GELU epilogue needs a CUDA GPU, not cpu)"
    logged.clear()
    M.build_model({**cfg, "train": {**cfg["train"], "mlp": "plain"}}, torch.device("cpu"), logged.append)
    assert not any("train.mlp" in line for line in logged)
