"""bf16 GEMMs on cuBLASLt through ctypes, each shape's algorithm timed among the heuristic's candidates and kept
(torch's matmul takes one algorithm per shape, and exposes no epilogue but the bias).

mm(): a @ b (+ bias), the product in bf16 or fp32 (train.gemm: tuned; training_pt/tuned_gemm.py). On GPT-2's
GEMMs at 65536 tokens on an H200 the fastest of the heuristic's 8 candidates took up to 21% less time than torch's
matmul (the LM head's forward 6.97 ms against 8.84 in a scan, 6.42 against the heuristic's first pick's 7.02 in a
training run; docs/train.md).
gelu_bias(): with the epilogue GELU_AUX_BIAS, cuBLASLt writes gelu(x @ w + bias) and keeps x @ w + bias (the
GELU's input, "aux") for the backward, as the GEMM's output tiles leave the tensor cores. torch's own path writes
x @ w, then an elementwise kernel reads it back and writes the GELU: one pass over a tokens x 4C tensor more (llm.c
and Transformer Engine use the same epilogue). The GELU is the tanh approximation (`gelu_pytorch_tanh`).

The library is the one torch already loaded (found in /proc/self/maps after a torch matmul), so its version is
torch's. Before an algorithm is used at a shape, every row of its output is held to torch's bf16 GEMM and GELU,
and 64 rows to fp64 (so that a GEMM torch and cuBLASLt got wrong alike still shows). One that errors is dropped
(LtError when none is left: the caller then uses torch's kernels); one that computes wrong numbers is Disagreed
(the run fails: never a quiet fallback).
Matrices are torch's row-major 2-D tensors; cuBLASLt is column-major, so the row-major M x N product
is computed as its N x M transpose. Enum values and the heuristic's struct: cublasLt.h of CUDA 11.8 to 13
(unchanged). Runs in .venv-gpu (imports torch).
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch

from training_pt.fabric import first_line

OP_N, OP_T = 0, 1  # cublasOperation_t: no transpose, transpose
R_32F, R_16BF = 0, 14  # cudaDataType_t
COMPUTE_32F = 68  # cublasComputeType_t: fp32 accumulation
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE = 3, 4, 7  # cublasLtMatmulDescAttributes_t
DESC_BIAS, DESC_AUX, DESC_AUX_LD = 8, 11, 12  # ... the epilogue's pointers
PREF_MAX_WORKSPACE = 1  # cublasLtMatmulPreferenceAttributes_t
DEFAULT, BIAS, GELU_AUX_BIAS = 1, 4, 164  # cublasLtEpilogue_t; GELU_AUX_BIAS is GELU (32) | AUX (128) | BIAS (4)
EPILOGUE_NAMES = {DEFAULT: "DEFAULT", BIAS: "BIAS", GELU_AUX_BIAS: "GELU_AUX_BIAS"}
CANDIDATES = 8  # algorithms asked of the heuristic, each timed once on first use (the best of them took up to 21%
# less time than torch's matmul on GPT-2's GEMMs at 65536 tokens on an H200: docs/train.md)
TOLERANCE = 1e-2  # relative error (norm, of one row of an output) allowed against torch: bf16 rounding gives
# ~3e-3; a wrong layout, tile or epilogue gives ~0.3 to 1
SAMPLED_ROWS = 64  # rows of each output also held to fp64, spread over M, the first and last among them
CHECK_ELEMENTS = 8192 * 3072  # elements of an output (and of the left operand's rows) compared at a time against
# torch's: fp32 copies of 100 MB (a transposed left operand's rows of 32768 x 65536 cost 5 GB more, call 26A)
MIN_VERSION = 111100  # cublasLtGetVersion() of CUDA 11.8's cuBLAS (11.11): the enums and the struct are its
ALIGN = 256  # bytes: every pointer a plan runs on is aligned so (the heuristic's default assumption)
WORKSPACE_BYTES = 32 << 20  # what torch gives cuBLASLt on Hopper (CUBLASLT_WORKSPACE_SIZE's default)

REGISTERED = hasattr(torch.library, "custom_op")  # torch 2.4 and later: the ops on cuBLASLt (m40::*) exist

P, SIZE = ctypes.c_void_p, ctypes.c_size_t
SIGNATURES = {  # every argument typed, so that no 64-bit value is passed as a C int
    "cublasLtCreate": [P],
    "cublasLtMatmulDescCreate": [P, ctypes.c_int, ctypes.c_int],
    "cublasLtMatmulDescSetAttribute": [P, ctypes.c_int, P, SIZE],
    "cublasLtMatrixLayoutCreate": [P, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
    "cublasLtMatmulPreferenceCreate": [P],
    "cublasLtMatmulPreferenceSetAttribute": [P, ctypes.c_int, P, SIZE],
    "cublasLtMatmulPreferenceDestroy": [P],
    "cublasLtMatmulAlgoGetHeuristic": [P, P, P, P, P, P, P, ctypes.c_int, P, P],
    "cublasLtMatmul": [P, P, P, P, P, P, P, P, P, P, P, P, P, P, SIZE, P],
}


class LtError(RuntimeError):
    """cuBLASLt cannot do this GEMM here: an error status, no algorithm, inputs it does not take, no library."""


class Disagreed(RuntimeError):
    """cuBLASLt ran the GEMM and its numbers are wrong (not an LtError: no fallback may swallow it)."""


class Heuristic(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t: the algorithm (64 opaque bytes) cuBLASLt picked, and its needs."""

    _fields_ = [
        ("algo", ctypes.c_uint64 * 8),
        ("workspace", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


def on_cublaslt(t: torch.Tensor) -> bool:
    """Whether an op's cuBLASLt branch applies to t: bf16 on a CUDA GPU (elsewhere the op is torch's kernels)."""
    return t.is_cuda and t.dtype == torch.bfloat16


def cuda_error_left(device) -> str:
    """ "" where the GPU still runs work, else the CUDA error left in its context (one line)."""
    try:
        torch.cuda.synchronize(device)
    except Exception as e:
        return first_line(e)
    return ""


def library_path(maps: str = "/proc/self/maps") -> str:
    """The libcublasLt this process loaded (torch's, once a CUDA matmul has run)."""
    with open(maps, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            path = line.split(maxsplit=5)[-1].strip()
            if "/libcublasLt.so" in path:
                return path
    raise LtError("torch has not loaded libcublasLt (no CUDA matmul has run, or torch links it statically)")


@functools.cache
def lib():
    """The loaded library, its functions typed, once per process."""
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # loads cuBLAS(Lt) if nothing has
    so = ctypes.CDLL(library_path())
    so.cublasLtGetVersion.restype = ctypes.c_size_t
    if (version := so.cublasLtGetVersion()) < MIN_VERSION:
        raise LtError(f"cuBLASLt {version} is older than {MIN_VERSION} (CUDA 11.8's), which this code is written for")
    for name, args in SIGNATURES.items():
        getattr(so, name).argtypes = args
    return so


@functools.cache
def handle(device: int) -> ctypes.c_void_p:
    """A cuBLASLt handle of our own for one GPU, made with that GPU current."""
    made = ctypes.c_void_p()
    with torch.cuda.device(device):
        check(lib().cublasLtCreate(ctypes.byref(made)), "cublasLtCreate")
    return made


def check(status: int, what: str) -> None:
    if status != 0:
        raise LtError(f"{what} returned cuBLAS status {status}")


@functools.cache
def workspace(device: int) -> torch.Tensor:
    return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=f"cuda:{device}")


def layout(so, dtype: int, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
    """A column-major rows x cols matrix of `dtype`, its leading dimension ld."""
    desc = ctypes.c_void_p()
    shape = (ctypes.c_uint64(rows), ctypes.c_uint64(cols), ctypes.c_int64(ld))
    check(so.cublasLtMatrixLayoutCreate(ctypes.byref(desc), dtype, *shape), "MatrixLayoutCreate")
    return desc


class Gemm(NamedTuple):
    """One GEMM as a plan is made for it: row-major C (m x n) = A (m x k) @ B (k x n), each of A and B packed by
    rows or a transposed view packed by columns (`*_t`), its leading dimension `ld*`; C packed by rows, fp32 where
    out32 (else bf16); `epilogue` DEFAULT, BIAS (+ bias per column) or GELU_AUX_BIAS."""

    device: int
    m: int
    n: int
    k: int
    a_t: bool
    lda: int
    b_t: bool
    ldb: int
    out32: bool
    epilogue: int

    def name(self) -> str:
        return shape_name(self.m, self.n, self.k)

    def what(self) -> str:
        return f"cuBLASLt {self.kind()} algorithms at {self.name()}"

    def kind(self) -> str:
        """The epilogue, and which operands are transposed views, and an fp32 product: "DEFAULT a^T fp32"."""
        marks = [EPILOGUE_NAMES[self.epilogue], "a^T" if self.a_t else "", "b^T" if self.b_t else ""]
        return " ".join(m for m in [*marks, "fp32" if self.out32 else ""] if m)


class Call(NamedTuple):
    """The tensors of one run of a plan: its outputs (C, or h and pre for the GELU), inputs, and bias or None."""

    outs: tuple
    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None


class Plan:
    """One Gemm: its descriptors and the algorithms to try, made once; tuned on first use.

    Column-major, row-major C (m x n) is C^T (n x m) = B^T (n x k) @ A^T (k x m): cuBLASLt's A is our B and its B
    our A, and a matrix packed by rows is its own transpose packed by columns (so needs no transpose op).
    """

    def __init__(self, gemm: Gemm):
        so = lib()
        self.so, self.gemm, self.handle = so, gemm, handle(gemm.device)
        self.desc = ctypes.c_void_p()
        check(so.cublasLtMatmulDescCreate(ctypes.byref(self.desc), COMPUTE_32F, R_32F), "MatmulDescCreate")
        self.set(DESC_TRANSA, ctypes.c_int32(OP_T if gemm.b_t else OP_N))
        self.set(DESC_TRANSB, ctypes.c_int32(OP_T if gemm.a_t else OP_N))
        self.set(DESC_EPILOGUE, ctypes.c_uint32(gemm.epilogue))
        m, n, k = gemm.m, gemm.n, gemm.k
        self.lb = layout(so, R_16BF, *((k, n) if gemm.b_t else (n, k)), gemm.ldb)
        self.la = layout(so, R_16BF, *((m, k) if gemm.a_t else (k, m)), gemm.lda)
        self.lc = layout(so, R_32F if gemm.out32 else R_16BF, n, m, n)
        if gemm.epilogue == GELU_AUX_BIAS:
            self.set(DESC_AUX_LD, ctypes.c_int64(n))
        self.pointers(
            ALIGN, ALIGN
        )  # the heuristic looks at the pointers' alignment: those run() passes are ALIGN-aligned
        self.candidates = self.heuristic()
        self.times: list[float] = []  # ms per candidate, fastest first, once tuned
        self.first_ms = float("nan")  # the heuristic's first candidate's ms, where it ran (for the record)

    def heuristic(self) -> list[Heuristic]:
        so, pref = self.so, ctypes.c_void_p()
        check(so.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
        size = ctypes.c_uint64(WORKSPACE_BYTES)
        try:
            check(so.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE, ctypes.byref(size), 8), "Pref")
            found, count = (Heuristic * CANDIDATES)(), ctypes.c_int(0)
            args = (self.handle, self.desc, self.lb, self.la, self.lc, self.lc, pref, CANDIDATES, found)
            check(so.cublasLtMatmulAlgoGetHeuristic(*args, ctypes.byref(count)), "MatmulAlgoGetHeuristic")
        finally:
            so.cublasLtMatmulPreferenceDestroy(pref)
        return [found[i] for i in range(count.value) if found[i].state == 0]

    def set(self, attr: int, value) -> None:
        status = self.so.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value), ctypes.sizeof(value))
        check(status, f"MatmulDescSetAttribute {attr}")

    def pointers(self, bias: int, aux: int) -> None:
        if self.gemm.epilogue != DEFAULT:
            self.set(DESC_BIAS, ctypes.c_void_p(bias))
        if self.gemm.epilogue == GELU_AUX_BIAS:
            self.set(DESC_AUX, ctypes.c_void_p(aux))

    def run(self, call: Call, algo: Heuristic | None = None) -> None:
        c = call.outs[0]
        self.pointers(call.bias.data_ptr() if call.bias is not None else 0, call.outs[-1].data_ptr())
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        ws = workspace(c.device.index)
        stream = ctypes.c_void_p(torch.cuda.current_stream(c.device).cuda_stream)
        cp = ctypes.c_void_p(c.data_ptr())
        status = self.so.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(one), ctypes.c_void_p(call.b.data_ptr()), self.lb,
            ctypes.c_void_p(call.a.data_ptr()), self.la, ctypes.byref(zero), cp, self.lc, cp, self.lc,
            ctypes.byref((algo or self.candidates[0]).algo), ctypes.c_void_p(ws.data_ptr()),
            ctypes.c_size_t(WORKSPACE_BYTES), stream,
        )  # fmt: skip
        check(status, "cublasLtMatmul")

    def tune(self, call: Call, reps: int = 3) -> None:
        """Run every candidate on these very tensors; keep those that ran, each held to torch (disagreement()) and
        timed (CUDA events on this GPU's stream), fastest first: once per plan. LtError where none ran,
        Disagreed where any computed wrong numbers."""
        ran = []
        for i, algo in enumerate(self.candidates):
            try:
                self.run(call, algo)  # also the warm-up of the timing
            except LtError:
                continue
            error = disagreement(call, self.gemm.epilogue)
            ran.append((algo, error, self.time(call, algo, reps) if error < TOLERANCE else 0.0))
            self.first_ms = ran[0][2] if i == 0 else self.first_ms
        self.candidates, self.times = ranked(ran, self.gemm.what())

    def time(self, call: Call, algo: Heuristic, reps: int) -> float:
        stream = torch.cuda.current_stream(call.a.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            self.run(call, algo)
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / reps

    def __call__(self, call: Call) -> None:
        if not self.candidates:
            raise LtError(f"the heuristic offered no {self.gemm.what().replace(' algorithms ', ' algorithm ')}")
        if not self.times and finite(call):  # inputs not finite: nothing to hold it to (the loss check reports
            self.tune(call)  # such a run); the heuristic's first pick runs, and the next call tunes
        self.run(call)


def shape_name(m: int, n: int, k: int) -> str:
    return f"{m} x {n} x {k}"


def ranked(ran: list[tuple], what: str) -> tuple[list, list[float]]:
    """(algorithms, ms) fastest first, from (algorithm, relative error, ms) of each that ran; LtError where none
    ran, Disagreed where any computed wrong numbers (a GEMM this GPU gets wrong is a finding, not a detail).
    `what`: "cuBLASLt <epilogue> algorithms at M x N x K"."""
    wrong = [r[1] for r in ran if not r[1] < TOLERANCE]  # NaN never agrees
    if wrong:
        errors = ", ".join(f"{e:.2g}" for e in wrong)
        raise Disagreed(f"{len(wrong)} of {len(ran)} {what} disagreed with torch (relative error {errors})")
    if not ran:
        raise LtError(f"no {what.replace(' algorithms ', ' algorithm ')} ran")
    good = sorted(ran, key=lambda r: r[2])
    return [r[0] for r in good], [r[2] for r in good]


def failing(errors: list[float]) -> int | None:
    """The index of the worst of a check's relative errors (NaN the worst) where it is not below TOLERANCE, else
    None."""
    worst = max(range(len(errors)), key=lambda i: errors[i] if errors[i] == errors[i] else float("inf"))
    return None if errors[worst] < TOLERANCE else worst


def sampled_rows(m: int) -> torch.Tensor:
    return torch.linspace(0, m - 1, min(m, SAMPLED_ROWS)).round().long().unique()


def torch_gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, epilogue: int, out32: bool) -> tuple:
    """What a plan's outputs are held to, computed by torch in a's dtype: (C,), or (gelu(pre), pre) for the GELU;
    C accumulated and kept in fp32 where out32 (on a CPU: its bf16 product in fp32)."""
    if out32 and a.dtype == torch.bfloat16:  # (no bias: mm() takes none with out32)
        return (product32(a, b),)
    c = torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    if epilogue == GELU_AUX_BIAS:
        return torch.nn.functional.gelu(c, approximate="tanh"), c
    return (c,)


def product32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bf16 matrices accumulated and kept in fp32: one GEMM on CUDA (aten::mm's out_dtype); elsewhere the
    bf16 product in fp32, as autocast's own backward rounds a weight gradient."""
    on_gpu = a.is_cuda and a.dtype == torch.bfloat16
    return torch.mm(a, b, out_dtype=torch.float32) if on_gpu else torch.mm(a, b).float()


def finite(call: Call) -> bool:
    """Whether every input is finite, from its min and max (NaN and inf carry through them), each read in its memory's
    order: no mask or copy of a 6.6 GB operand is made (aminmax copies a transposed view: 6.1 GiB more at the LM
    head's weight gradient, call 26B)."""
    for t in (call.a, call.b, call.bias):
        if t is not None and t.numel():
            t = t.t() if transposed(t) else t
            low, high = torch.aminmax(t)
            if not bool(low.isfinite() & high.isfinite()):
                return False
    return True


def disagreement(call: Call, epilogue: int) -> float:
    """The largest relative error (norm) of any row of the plan's outputs: every row against torch's own GEMM in the
    same dtype (computed CHECK_ELEMENTS at a time, so no second full output exists), and SAMPLED_ROWS rows against
    fp64; row by row, so that one wrong tile is not averaged away over the rest. NaN where any is not finite."""
    a, b, bias, outs = call.a, call.b, call.bias, call.outs
    out32 = outs[0].dtype == torch.float32
    m, n = outs[0].shape
    step = max(1, CHECK_ELEMENTS // max(n, a.shape[1]))  # rows of the output, and of a (which torch may copy packed)
    errors = []
    for start in range(0, m, step):
        rows = slice(start, start + step)
        errors.append(row_error([o[rows] for o in outs], torch_gemm(a[rows], b, bias, epilogue, out32)))
    rows = sampled_rows(m).to(a.device)
    as64 = [t.double() if t is not None else None for t in (a[rows], b, bias)]
    errors.append(row_error([o[rows] for o in outs], torch_gemm(*as64, epilogue, False)))
    return float("nan") if any(e != e for e in errors) else max(errors)


def row_error(got: list, want: tuple) -> float:
    """The largest relative error (norm) of any row of `got` against `want`, computed in want's dtype if it is fp64,
    else in fp32 (enough for errors of 1e-3 and up, and half the bytes of fp64 over a 6.6 GB output)."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        w = w.to(dtype)
        errors = (g.to(dtype) - w).norm(dim=1) / w.norm(dim=1).clamp_min(1e-30)
        if not errors.isfinite().all():
            return float("nan")
        worst = max(worst, errors.max().item())
    return worst


PLANS: dict[Gemm, Plan] = {}  # each GEMM's plan, made on first use


def tuned_times(plans) -> list[str]:
    """Each tuned plan among `plans` (Gemms) in words: its shape, the kept algorithm's ms and the heuristic's first
    candidate's (nan where it did not run)."""
    return [
        f"{gemm.name()} {gemm.kind()}: {p.times[0]:.3f} ms (the heuristic's first {p.first_ms:.3f})"
        for gemm, p in PLANS.items()
        if p.times and gemm in plans
    ]


def gemm_of(a: torch.Tensor, b: torch.Tensor, out32: bool, epilogue: int) -> Gemm:
    """The Gemm of a @ b (operands as check_inputs passed them)."""
    (a_t, lda), (b_t, ldb) = packing(a), packing(b)
    m, k = a.shape
    return Gemm(a.device.index, m, b.shape[1], k, a_t, lda, b_t, ldb, out32, epilogue)


def describe(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out32: bool) -> str:
    """a @ b (+ bias) as its plan is named, "M x N x K <kind>", for any operands (never raises)."""
    shape = shape_name(a.shape[0], b.shape[-1], a.shape[-1]) if a.dim() == b.dim() == 2 else "not 2-D"
    a_t, b_t = transposed(a), transposed(b)
    gemm = Gemm(0, 0, 0, 0, a_t, 0, b_t, 0, out32, DEFAULT if bias is None else BIAS)
    return f"{shape} {gemm.kind()}"


def transposed(t: torch.Tensor) -> bool:
    """Whether t is a 2-D view packed by columns (packing()'s answer; False for anything it refuses)."""
    try:
        return t.dim() == 2 and packing(t)[0]
    except LtError:
        return False


def packing(t: torch.Tensor) -> tuple[bool, int]:
    """(transposed, leading dimension) of a 2-D operand packed by rows, or by columns (a transposed view)."""
    rows, cols = t.shape
    if t.stride(1) == 1 and t.stride(0) >= max(1, cols):
        return False, t.stride(0)
    if t.stride(0) == 1 and t.stride(1) >= max(1, rows):
        return True, t.stride(1)
    raise LtError(f"cuBLASLt here takes matrices packed by rows or by columns, not strides {tuple(t.stride())}")


def launch(gemm: Gemm, call: Call) -> None:
    with torch.cuda.device(call.a.device):  # the launch on a's GPU, whichever is current
        if gemm not in PLANS:
            PLANS[gemm] = Plan(gemm)
        PLANS[gemm](call)


def gelu_bias(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu(x @ w + bias), x @ w + bias): x M x K, w K x N (a Conv1D's weight), all bf16 and contiguous on one GPU.
    LtError where cuBLASLt cannot (the caller uses torch's kernels), Disagreed where its numbers are wrong."""
    x, w, bias = (aligned(t) for t in (x, w, bias))
    check_inputs(x, w, bias)
    h = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    pre = torch.empty_like(h)
    launch(gemm_of(x, w, False, GELU_AUX_BIAS), Call((h, pre), x, w, bias))
    return h, pre


def mm(a, b, bias=None, out32: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (+ bias), a M x K and b K x N in bf16 on one GPU, each packed by rows or a transposed view; the product
    in fp32 where out32; written into `out` (contiguous M x N) where given. LtError where cuBLASLt cannot (the
    caller uses torch's kernels), Disagreed where its numbers are wrong."""
    if a.dim() != 2 or b.dim() != 2:
        raise LtError(f"cuBLASLt's GEMMs take matrices, not {a.dim()}-D @ {b.dim()}-D")
    if out32 and bias is not None:
        raise LtError("cuBLASLt's GEMMs here add a bias to a bf16 product only")
    a, b = aligned(packed(a)), aligned(packed(b))
    bias = aligned(bias) if bias is not None else None
    check_inputs(a, b, bias)
    dtype = torch.float32 if out32 else a.dtype
    c = torch.empty(a.shape[0], b.shape[1], dtype=dtype, device=a.device) if out is None else out
    if c.shape != (a.shape[0], b.shape[1]) or c.dtype != dtype or not c.is_contiguous() or c.data_ptr() % ALIGN:
        raise LtError(f"cuBLASLt's GEMMs here write a packed, aligned {dtype} output of {a.shape[0]} x {b.shape[1]}")
    launch(gemm_of(a, b, out32, DEFAULT if bias is None else BIAS), Call((c,), a, b, bias))
    return c


def packed(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy packed by rows where it is packed neither by rows nor by columns (a strided view)."""
    try:
        packing(t)
    except LtError:
        return t.contiguous()
    return t


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy where it starts off an ALIGN boundary (a view into a larger tensor)."""
    return t if t.data_ptr() % ALIGN == 0 else t.clone(memory_format=torch.contiguous_format)


def check_inputs(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
    """LtError unless a (M x K), b (K x N) and bias (N, or None) are what a plan assumes: bf16, each matrix packed by
    rows or by columns with a leading dimension and N multiples of 8, on one CUDA GPU, starting ALIGN-aligned;
    checked in that order."""
    tensors = [t for t in (a, b, bias) if t is not None]
    shapes = " @ ".join(" x ".join(map(str, t.shape)) for t in (a, b))
    shapes += f" + {' x '.join(map(str, bias.shape))}" if bias is not None else ""
    if any(t.dtype != torch.bfloat16 for t in tensors):
        raise LtError(f"cuBLASLt's GEMMs here take bf16 only, not {[str(t.dtype) for t in tensors]}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or (bias is not None and bias.shape != (b.shape[1],)):
        raise LtError(f"cuBLASLt's GEMMs cannot take {shapes}")
    lds = [packing(a)[1], packing(b)[1], b.shape[1]]  # LtError where one is packed neither way
    if any(ld % 8 for ld in lds) or (bias is not None and not bias.is_contiguous()):
        raise LtError(f"cuBLASLt's GEMMs here take rows or columns of multiples of 8 only ({shapes})")
    if not (a.is_cuda and all(t.device == a.device for t in tensors)):
        raise LtError(f"cuBLASLt's GEMMs need all on one CUDA GPU, not {[str(t.device) for t in tensors]}")
    if any(t.data_ptr() % ALIGN for t in tensors):
        raise LtError(f"cuBLASLt's GEMMs here take {ALIGN}-byte aligned tensors only")
