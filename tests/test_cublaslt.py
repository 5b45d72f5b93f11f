"""training_pt/cublaslt.py as far as a CPU shows it: how a GEMM is described to cuBLASLt (packing, layouts), how each
algorithm's output is held to torch, and how candidates are tuned and ranked; the library itself runs on the GPU."""

from __future__ import annotations

import math

import pytest
import torch

from training_pt import cublaslt

GELU = cublaslt.GELU_AUX_BIAS


@pytest.fixture(autouse=True)
def no_plans(monkeypatch):
    monkeypatch.setattr(cublaslt, "PLANS", {})


def mlp_inputs(tokens=64, width=32, inner=128):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=gen).bfloat16()
    return x, (torch.randn(width, inner, generator=gen) * 0.02).bfloat16(), torch.randn(inner, generator=gen).bfloat16()


def right_answer(x, w, bias):
    pre = torch.addmm(bias, x, w)
    return torch.nn.functional.gelu(pre, approximate="tanh"), pre


def gelu_call(outs, x, w, bias):
    return cublaslt.Call(tuple(outs), x, w, bias)


def test_every_row_of_an_algorithm_is_held_to_torch(monkeypatch):
    monkeypatch.setattr(cublaslt, "CHECK_ELEMENTS", 500 * 128)  # several chunks of rows
    x, w, bias = mlp_inputs(tokens=3000)
    h, pre = right_answer(x, w, bias)
    assert cublaslt.disagreement(gelu_call((h, pre), x, w, bias), GELU) < 1e-2  # bf16 rounding only
    no_bias = torch.nn.functional.gelu(x @ w, approximate="tanh")
    assert cublaslt.disagreement(gelu_call((no_bias, pre), x, w, bias), GELU) > 0.1
    tile = h.clone()
    tile[1001:1041, 64:128] = 0  # one wrong 40 x 64 tile, between two sampled rows
    assert not set(range(1001, 1041)) & set(cublaslt.sampled_rows(3000).tolist())
    assert cublaslt.disagreement(gelu_call((tile, pre), x, w, bias), GELU) > 0.1
    assert math.isnan(cublaslt.disagreement(gelu_call((h, pre * float("nan")), x, w, bias), GELU))


def test_a_product_in_fp32_of_a_transposed_view_is_held_to_torch_row_by_row(monkeypatch):
    monkeypatch.setattr(cublaslt, "CHECK_ELEMENTS", 10 * 48)  # chunks of 10 rows
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(2000, 96, generator=gen).bfloat16()  # tokens x vocab: the loss's gradient
    h = torch.randn(2000, 48, generator=gen).bfloat16()  # tokens x width: the hidden states
    a = g.t()  # the LM head's weight gradient g.t() @ h, its left operand packed by columns
    c = torch.mm(a, h).float()
    assert cublaslt.disagreement(cublaslt.Call((c,), a, h, None), cublaslt.DEFAULT) < 1e-2
    c[40:44, :16] *= 2  # one wrong tile
    assert cublaslt.disagreement(cublaslt.Call((c,), a, h, None), cublaslt.DEFAULT) > 0.1
    chunks = []  # the left operand's rows count too: a chunk of a transposed view may be copied whole
    real = cublaslt.torch_gemm
    monkeypatch.setattr(cublaslt, "torch_gemm", lambda a, *rest: chunks.append(a.numel()) or real(a, *rest))
    monkeypatch.setattr(cublaslt, "CHECK_ELEMENTS", 4000)
    cublaslt.disagreement(cublaslt.Call((c,), a, h, None), cublaslt.DEFAULT)
    assert chunks[:-1] == [2 * 2000] * 48  # then the sampled rows


def test_the_reference_itself_is_held_to_fp64_on_sampled_rows(monkeypatch):
    # were torch's own GEMM wrong the same way as cuBLASLt's (the same kernel), the fp64 rows still tell
    x, w, bias = mlp_inputs(tokens=300)
    real = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda b, a, m: a @ m if a.dtype == torch.bfloat16 else real(b, a, m))
    no_bias = x @ w
    call = gelu_call((torch.nn.functional.gelu(no_bias, approximate="tanh"), no_bias), x, w, bias)
    assert cublaslt.disagreement(call, GELU) > 0.1


def test_inputs_that_are_not_finite_are_no_reason_to_blame_cublaslt():
    x, w, bias = mlp_inputs()
    assert cublaslt.finite(gelu_call(right_answer(x, w, bias), x, w, bias))
    x[3, 5] = float("inf")
    assert not cublaslt.finite(gelu_call(right_answer(x, w, bias), x, w, bias))  # the loss check reports it


def test_ranked_keeps_the_candidates_fastest_first_and_any_that_disagrees_fails_the_run():
    ran = [("a", 3e-3, 0.50), ("b", 2e-3, 0.10), ("c", 4e-3, 0.40)]
    what = "cuBLASLt GELU_AUX_BIAS algorithms at 8 x 8 x 8"
    assert cublaslt.ranked(ran, what) == (["b", "c", "a"], [0.10, 0.40, 0.50])
    for bad in (0.9, float("nan")):
        with pytest.raises(cublaslt.Disagreed, match="1 of 4 cuBLASLt GELU_AUX_BIAS algorithms at 8 x 8 x 8 disagreed"):
            cublaslt.ranked([*ran, ("d", bad, 0.0)], what)
    with pytest.raises(cublaslt.LtError, match="no cuBLASLt GELU_AUX_BIAS algorithm at 8 x 8 x 8 ran"):
        cublaslt.ranked([], what)
    assert not issubclass(cublaslt.Disagreed, cublaslt.LtError)  # a fallback never swallows wrong numbers


class FakePlan(cublaslt.Plan):
    """A Plan without the library: each candidate is a function that fills the outputs, or raises LtError."""

    def __init__(self, candidates, epilogue=GELU):
        self.candidates, self.times, self.first_ms = candidates, [], float("nan")
        self.gemm = cublaslt.Gemm(0, 64, 128, 32, False, 32, False, 128, False, epilogue)

    def run(self, call, algo=None):
        algo = algo or self.candidates[0]
        for out, got in zip(call.outs, algo(call.a, call.b, call.bias), strict=True):
            out.copy_(got)

    def time(self, call, algo, reps):
        return algo.ms


def candidate(ms, fill):
    def algo(x, w, bias):
        return fill(x, w, bias)

    algo.ms = ms
    return algo


def test_tune_drops_an_algorithm_that_errors_and_uses_the_fastest_that_agrees():
    def errors(x, w, bias):
        raise cublaslt.LtError("cublasLtMatmul returned cuBLAS status 15")

    slow, fast, broken = candidate(0.5, right_answer), candidate(0.2, right_answer), candidate(0.1, errors)
    x, w, bias = mlp_inputs()
    h, pre = torch.empty(64, 128, dtype=torch.bfloat16), torch.empty(64, 128, dtype=torch.bfloat16)
    plan = FakePlan([slow, broken, fast])
    plan(gelu_call((h, pre), x, w, bias))
    assert plan.candidates == [fast, slow] and plan.times == [0.2, 0.5] and plan.first_ms == 0.5
    late = FakePlan([broken, fast])
    late(gelu_call((h, pre), x, w, bias))
    assert math.isnan(late.first_ms)  # the heuristic's first did not run: no figure for it
    assert torch.equal(h, right_answer(x, w, bias)[0])
    wrong = candidate(0.1, lambda x, w, bias: right_answer(x, w, bias * 2))
    with pytest.raises(cublaslt.Disagreed, match="1 of 2 cuBLASLt GELU_AUX_BIAS algorithms at 64 x 128 x 32 disagreed"):
        FakePlan([slow, wrong])(gelu_call((h, pre), x, w, bias))
    with pytest.raises(cublaslt.LtError, match="no cuBLASLt GELU_AUX_BIAS algorithm at 64 x 128 x 32 ran"):
        FakePlan([broken])(gelu_call((h, pre), x, w, bias))


def test_tune_holds_a_plain_product_to_torch_too():
    x, w, _ = mlp_inputs()
    c = torch.empty(64, 128, dtype=torch.bfloat16)
    right, transposed = candidate(0.3, lambda x, w, b: (x @ w,)), candidate(0.1, lambda x, w, b: (x @ w.flip(0),))
    with pytest.raises(cublaslt.Disagreed, match="1 of 2 cuBLASLt DEFAULT algorithms at 64 x 128 x 32 disagreed"):
        FakePlan([right, transposed], cublaslt.DEFAULT)(cublaslt.Call((c,), x, w, None))
    plan = FakePlan([right], cublaslt.DEFAULT)
    plan(cublaslt.Call((c,), x, w, None))
    assert torch.equal(c, x @ w)


def test_an_operand_is_described_by_its_packing():
    t = torch.empty(64, 40)
    assert cublaslt.packing(t) == (False, 40)  # rows
    assert cublaslt.packing(t.t()) == (True, 40)  # a transposed view: columns
    assert cublaslt.packing(t[:, :24]) == (False, 40)  # rows of a wider matrix
    with pytest.raises(cublaslt.LtError, match="packed by rows or by columns, not strides \\(80, 2\\)"):
        cublaslt.packing(t[::2, ::2])
    x, g = torch.empty(512, 48), torch.empty(512, 96)  # the weight gradient x.t() @ g
    assert cublaslt.gemm_of(x.t(), g, True, cublaslt.DEFAULT) == cublaslt.Gemm(
        None,
        48,
        96,
        512,
        True,
        48,
        False,
        96,
        True,
        cublaslt.DEFAULT,  # (the CPU's index)
    )


def test_inputs_cublaslt_cannot_take_are_an_lt_error_before_any_library_call():
    x, w, bias = mlp_inputs()
    cases = [
        ((x, w, bias), "on one CUDA GPU"),  # the CPU's tensors
        ((x, w, None), "on one CUDA GPU"),
        ((x.t().contiguous().t(), w.t().contiguous().t(), None), "on one CUDA GPU"),  # packed by columns: fine
        ((x.float(), w, bias), "bf16"),
        ((x[:, :30], w[:30], bias), "on one CUDA GPU"),  # K of 30: the leading dimensions are still 32 and 128
        ((x[:, 2:30:2], w[:14], bias), "packed by rows or by columns"),
        ((torch.zeros(64, 36).bfloat16(), torch.zeros(36, 128).bfloat16(), bias), "multiples of 8"),
        ((x, w[:, :100], bias[:100]), "multiples of 8"),  # an output row of 100
        ((x, w, bias[:64]), "64 x 32 @ 32 x 128 \\+ 64"),
    ]
    for args, words in cases:
        with pytest.raises(cublaslt.LtError, match=words):
            cublaslt.check_inputs(*args)  # dtype, shapes and layout are checked before the device


def test_a_bias_with_an_fp32_product_or_a_wrong_output_is_refused():
    x, w, bias = mlp_inputs()
    with pytest.raises(cublaslt.LtError, match="bias to a bf16 product only"):
        cublaslt.mm(x, w, bias, out32=True)
    with pytest.raises(cublaslt.LtError, match="take matrices, not 3-D @ 2-D"):
        cublaslt.mm(x[None], w)


def test_the_library_is_the_one_the_process_loaded(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n")
    with pytest.raises(cublaslt.LtError, match="torch has not loaded libcublasLt"):
        cublaslt.library_path(str(maps))
    lt = "/venv/lib/python3.11/site-packages/nvidia/cu13/lib/libcublasLt.so.13"
    maps.write_text(f"7f00-7f01 r-xp 00000000 08:01 1 {lt}\n")
    assert cublaslt.library_path(str(maps)) == lt


def test_an_operand_packed_neither_way_is_copied_and_one_packed_either_way_is_not():
    t = torch.zeros(16, 40)
    view = t.t()
    assert cublaslt.packed(t) is t and cublaslt.packed(view) is view
    strided = t[::2, ::2]
    assert cublaslt.packing(cublaslt.packed(strided)) == (False, 20)
    assert not cublaslt.finite(cublaslt.Call((), t.fill_(float("-inf")), t, None))


def test_a_plan_is_tuned_only_on_finite_inputs():
    x, w, bias = mlp_inputs()
    h, pre = torch.empty(64, 128, dtype=torch.bfloat16), torch.empty(64, 128, dtype=torch.bfloat16)
    first, fast = candidate(0.5, right_answer), candidate(0.2, right_answer)
    plan = FakePlan([first, fast])
    x[0, 0] = float("nan")
    plan(gelu_call((h, pre), x, w, bias))  # nothing to hold the candidates to: the first runs, none is kept
    assert plan.times == [] and plan.candidates == [first, fast]
    x[0, 0] = 0.0
    plan(gelu_call((h, pre), x, w, bias))
    assert plan.candidates == [fast, first] and plan.times == [0.2, 0.5]


def test_a_gemm_is_named_by_its_shape_epilogue_transposes_and_product():
    a, b = torch.zeros(64, 32), torch.zeros(48, 32)
    assert cublaslt.describe(a, b.t(), None, False) == "64 x 48 x 32 DEFAULT b^T"
    assert cublaslt.describe(b.t(), a, torch.zeros(32), False) == "32 x 32 x 48 BIAS a^T"
    assert cublaslt.describe(a, torch.zeros(32, 8), None, True) == "64 x 8 x 32 DEFAULT fp32"
    assert cublaslt.describe(torch.zeros(3), a, None, False) == "not 2-D DEFAULT"


def test_finiteness_reads_a_transposed_view_in_its_memorys_order(monkeypatch):
    # aminmax copies a transposed view whole (6.1 GiB at the LM head's weight gradient on an H200, call 26B)
    seen = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: seen.append(t.is_contiguous()) or real(t))
    g, h = torch.randn(300, 40).bfloat16(), torch.randn(300, 16).bfloat16()
    assert cublaslt.finite(cublaslt.Call((), g.t(), h, None)) and seen == [True, True]
    g[7, 3] = float("nan")
    assert not cublaslt.finite(cublaslt.Call((), g.t(), h, None))


def test_a_plan_the_heuristic_offered_nothing_is_an_lt_error_even_before_tuning():
    x, w, bias = mlp_inputs()
    x[0, 0] = float("nan")  # not finite: the first call would run the first candidate untuned
    h, pre = torch.empty(64, 128, dtype=torch.bfloat16), torch.empty(64, 128, dtype=torch.bfloat16)
    with pytest.raises(cublaslt.LtError, match="the heuristic offered no cuBLASLt GELU_AUX_BIAS algorithm at 64 x 128"):
        FakePlan([])(gelu_call((h, pre), x, w, bias))
