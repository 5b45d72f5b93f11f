"""training_pt/gelu_mlp.py and cublaslt.py: the MLP with its GELU in c_fc's epilogue, as far as a CPU shows it
(the op's torch path, the gradients, the swap into GPT-2, the fallbacks); cuBLASLt itself runs on the GPU."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from training_pt import cublaslt, gelu_mlp
from training_pt import model as M
from training_pt.configurator import EXIT_CHECK, TrainError


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test starts with nothing checked, no plan made and no shape left to torch."""
    monkeypatch.setattr(gelu_mlp, "WORKED", set())
    monkeypatch.setattr(gelu_mlp, "LEFT_TO_TORCH", {})
    monkeypatch.setattr(cublaslt, "PLANS", {})


def tiny_gpt2(act="gelu_pytorch_tanh"):
    from transformers import AutoModelForCausalLM, GPT2Config

    conf = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=64, activation_function=act)
    conf.resid_pdrop = conf.embd_pdrop = conf.attn_pdrop = 0.0
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(conf)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, cublaslt.TOLERANCE)])
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


def test_works_falls_back_when_the_epilogue_does_not_run_and_fails_the_run_when_it_disagrees(monkeypatch):
    gpu = torch.device("cuda", 0)  # never touched: trial and the GPU's synchronize are replaced

    def broken(*args, **kwargs):
        raise cublaslt.LtError("cublasLtMatmul returned cuBLAS status 15")

    monkeypatch.setattr(gelu_mlp, "trial", broken)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)  # the GPU still works after it
    assert gelu_mlp.works(gpu, 768, 3072) == (
        False,
        "cuBLASLt's GELU epilogue did not run (LtError: cublasLtMatmul returned cuBLAS status 15)",
    )
    assert gelu_mlp.WORKED == set()  # a failure is not kept: the next run (a bench row) checks again
    cases = (([1e-3, 0.8, 1e-3], "input gradient", "0.8"), ([float("nan")] * 6, "output", "nan"))
    for errors, name, word in cases:
        monkeypatch.setattr(gelu_mlp, "trial", lambda *a, errors=errors, **k: errors)
        with pytest.raises(TrainError, match=f"fused MLP's {name} disagreed with torch .*error {word}.*mlp=plain") as e:
            gelu_mlp.works(gpu, 768, 3072)
        assert e.value.code == EXIT_CHECK  # wrong numbers on this GPU fail the run, never a quiet fallback
    monkeypatch.setattr(gelu_mlp, "trial", lambda *a, **k: [3e-3] * 6)
    assert gelu_mlp.works(gpu, 768, 3072) == (True, "")
    assert gelu_mlp.works(gpu, 770, 3072)[1].endswith("widths divisible by 8, not 770 and 3072")


def test_a_cuda_error_the_trial_leaves_behind_fails_the_run_there_in_one_line(monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def dead(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")

    monkeypatch.setattr(gelu_mlp, "trial", crash)
    monkeypatch.setattr(torch.cuda, "synchronize", dead)  # the context is gone: no plain MLP could run either
    with pytest.raises(TrainError, match=r"left a CUDA error on cuda:0 \(RuntimeError: CUDA error: an illegal") as e:
        gelu_mlp.works(torch.device("cuda", 0), 768, 3072)
    assert e.value.code == EXIT_CHECK and "\n" not in str(e.value)


def test_a_cuda_error_mid_run_fails_the_run_in_one_line_and_any_other_error_is_itself(monkeypatch, lt_on_cpu):
    def crash(x, w, bias):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(cublaslt, "gelu_bias", crash)
    monkeypatch.setattr(gelu_mlp, "cuda_error_left", lambda device: "RuntimeError: CUDA error: an illegal memory")
    with pytest.raises(TrainError, match="train.mlp fused: cuBLASLt's GELU epilogue left a CUDA error on cpu"):
        torch.ops.m40.gelu_bias_mm(*mlp_inputs())
    monkeypatch.setattr(gelu_mlp, "cuda_error_left", lambda device: "")
    with pytest.raises(RuntimeError, match="^CUDA error: an illegal memory access was encountered$"):
        torch.ops.m40.gelu_bias_mm(*mlp_inputs())


def test_torch_before_2_4_imports_the_module_and_says_why_not():
    code = (
        "import torch; del torch.library.custom_op\n"
        "from training_pt import gelu_mlp\n"
        "print(gelu_mlp.works(torch.device('cuda', 0), 768, 3072))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "(False, 'cuBLASLt's GELU epilogue needs torch 2.4 or later" in out.replace('"', "'")


@pytest.fixture
def lt_on_cpu(monkeypatch):
    """The op takes its cuBLASLt branch on the CPU's bf16 tensors; gelu_bias is replaced by each test."""
    monkeypatch.setattr(gelu_mlp, "on_cublaslt", lambda x: x.dtype == torch.bfloat16)


def mlp_inputs(tokens=64, width=32, inner=128):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=gen).bfloat16()
    return x, (torch.randn(width, inner, generator=gen) * 0.02).bfloat16(), torch.randn(inner, generator=gen).bfloat16()


def test_a_cublaslt_error_mid_run_leaves_that_shape_to_torch_and_says_so(monkeypatch, lt_on_cpu):
    def no_algorithm(x, w, bias):
        raise cublaslt.LtError("no cuBLASLt GELU_AUX_BIAS algorithm ran at 64 x 128 x 32")

    monkeypatch.setattr(cublaslt, "gelu_bias", no_algorithm)
    x, w, bias = mlp_inputs()
    h, pre = torch.ops.m40.gelu_bias_mm(x, w, bias)
    want = torch.addmm(bias, x, w)
    assert torch.equal(pre, want) and torch.equal(h, torch.nn.functional.gelu(want, approximate="tanh"))
    lm = swapped(tiny_gpt2())
    assert gelu_mlp.path(lm) == (
        "fused (cuBLASLt GELU epilogue); torch's kernels at 64 x 128 x 32 "
        "(LtError: no cuBLASLt GELU_AUX_BIAS algorithm ran at 64 x 128 x 32)"
    )


def test_works_says_no_where_cublaslt_left_its_own_check_to_torch(monkeypatch, lt_on_cpu):
    def no_algorithm(x, w, bias):
        raise cublaslt.LtError("no cuBLASLt GELU_AUX_BIAS algorithm ran at 1024 x 128 x 32")

    real = gelu_mlp.trial
    monkeypatch.setattr(cublaslt, "gelu_bias", no_algorithm)
    monkeypatch.setattr(
        gelu_mlp, "trial", lambda device, width, inner, tokens: real(torch.device("cpu"), width, inner, tokens)
    )
    ok, why = gelu_mlp.works(torch.device("cuda", 0), 32, 128)
    assert not ok and why == (
        "cuBLASLt's GELU epilogue did not run (LtError: no cuBLASLt GELU_AUX_BIAS algorithm ran at 1024 x 128 x 32)"
    )
    assert gelu_mlp.LEFT_TO_TORCH == {}  # the check's shape is not the run's: the plain MLP runs, nothing left over


def test_fuse_starts_each_model_with_no_shape_left_to_torch(monkeypatch):
    gelu_mlp.LEFT_TO_TORCH["64 x 128 x 32"] = "LtError: an earlier bench row's"
    monkeypatch.setattr(gelu_mlp, "works", lambda device, width, inner: (True, ""))
    lm = tiny_gpt2()
    assert gelu_mlp.fuse(lm, torch.device("cuda", 0), torch.bfloat16) == (True, "")
    assert gelu_mlp.path(lm) == "fused (cuBLASLt GELU epilogue)"


def test_a_disagreement_mid_run_fails_the_run(monkeypatch, lt_on_cpu):
    def wrong(x, w, bias):
        raise cublaslt.Disagreed("every cuBLASLt GELU_AUX_BIAS algorithm at 64 x 128 x 32 disagreed with torch")

    monkeypatch.setattr(cublaslt, "gelu_bias", wrong)
    with pytest.raises(TrainError, match="at 64 x 128 x 32 disagreed with torch.*train.mlp=plain") as e:
        torch.ops.m40.gelu_bias_mm(*mlp_inputs())
    assert e.value.code == EXIT_CHECK


def right_answer(x, w, bias):
    pre = torch.addmm(bias, x, w)
    return torch.nn.functional.gelu(pre, approximate="tanh"), pre


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
    assert "train.mlp fused: the plain MLP instead (cuBLASLt's GELU epilogue needs a CUDA GPU, not cpu)" in logged
    logged.clear()
    M.build_model({**cfg, "train": {**cfg["train"], "mlp": "plain"}}, torch.device("cpu"), logged.append)
    assert not any("train.mlp" in line for line in logged)
