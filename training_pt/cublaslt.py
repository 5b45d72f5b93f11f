"""A bf16 GEMM that finishes with bias + tanh GELU in cuBLASLt's epilogue, through ctypes (torch exposes none).

With the epilogue GELU_AUX_BIAS, cuBLASLt writes gelu(x @ w + bias) and keeps x @ w + bias (the GELU's input,
"aux") for the backward, as the GEMM's output tiles leave the tensor cores. torch's own path writes x @ w, then
an elementwise kernel reads it back and writes the GELU: one pass over a tokens x 4C tensor more (llm.c and
Transformer Engine use the same epilogue). The GELU is the tanh approximation (`gelu_pytorch_tanh`).

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

import torch

OP_N = 0  # cublasOperation_t: no transpose
R_32F, R_16BF = 0, 14  # cudaDataType_t
COMPUTE_32F = 68  # cublasComputeType_t: fp32 accumulation
DESC_EPILOGUE, DESC_BIAS, DESC_AUX, DESC_AUX_LD = 7, 8, 11, 12  # cublasLtMatmulDescAttributes_t
PREF_MAX_WORKSPACE = 1  # cublasLtMatmulPreferenceAttributes_t
GELU_AUX_BIAS = 164  # cublasLtEpilogue_t: GELU (32) | AUX (128) | BIAS (4)
CANDIDATES = 8  # algorithms asked of the heuristic, each timed once on first use (its first pick was up to
# 40% slower than the best at 65536 x 3072 x 768 on an H200)
TOLERANCE = 1e-2  # relative error (norm, of a whole output or of one row of it) allowed against torch: bf16
# rounding gives ~3e-3; a wrong layout, tile or epilogue gives ~0.3 to 1
SAMPLED_ROWS = 64  # rows of each output also held to fp64, spread over M, the first and last among them
CHECK_ROWS = 8192  # rows compared at a time against torch's output (fp32 copies of at most 8192 x N)
MIN_VERSION = 111100  # cublasLtGetVersion() of CUDA 11.8's cuBLAS (11.11): the enums and the struct are its
ALIGN = 256  # bytes: every pointer gelu_bias passes is aligned so (the heuristic's default assumption)
WORKSPACE_BYTES = 32 << 20  # what torch gives cuBLASLt on Hopper (CUBLASLT_WORKSPACE_SIZE's default)

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


def layout(so, rows: int, cols: int) -> ctypes.c_void_p:
    """A bf16 column-major rows x cols matrix, packed (leading dimension = rows)."""
    desc = ctypes.c_void_p()
    shape = (ctypes.c_uint64(rows), ctypes.c_uint64(cols), ctypes.c_int64(rows))
    check(so.cublasLtMatrixLayoutCreate(ctypes.byref(desc), R_16BF, *shape), "MatrixLayoutCreate")
    return desc


class Plan:
    """One GEMM shape with the GELU_AUX_BIAS epilogue: its descriptors and the algorithms to try, made once.

    h (row-major M x N) = gelu(x (row-major M x K) @ w (row-major K x N) + bias); column-major that is
    h^T (N x M) = w^T (N x K, w's memory as it is) @ x^T (K x M), the bias one value per row of h^T.
    """

    def __init__(self, device: int, m: int, n: int, k: int):
        so = lib()
        self.so, self.handle, self.shape = so, handle(device), shape_name(m, n, k)
        self.desc = ctypes.c_void_p()
        check(so.cublasLtMatmulDescCreate(ctypes.byref(self.desc), COMPUTE_32F, R_32F), "MatmulDescCreate")
        self.set(DESC_EPILOGUE, ctypes.c_uint32(GELU_AUX_BIAS))
        self.set(DESC_AUX_LD, ctypes.c_int64(n))
        self.w, self.x, self.h = layout(so, n, k), layout(so, k, m), layout(so, n, m)
        self.pointers(ALIGN, ALIGN)  # the heuristic looks at the pointers' alignment: gelu_bias's are ALIGN-aligned
        self.candidates = self.heuristic()
        self.times: list[float] = []  # ms per candidate, fastest first, once tuned

    def heuristic(self) -> list[Heuristic]:
        so, pref = self.so, ctypes.c_void_p()
        check(so.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
        size = ctypes.c_uint64(WORKSPACE_BYTES)
        try:
            check(so.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE, ctypes.byref(size), 8), "Pref")
            found, count = (Heuristic * CANDIDATES)(), ctypes.c_int(0)
            args = (self.handle, self.desc, self.w, self.x, self.h, self.h, pref, CANDIDATES, found)
            check(so.cublasLtMatmulAlgoGetHeuristic(*args, ctypes.byref(count)), "MatmulAlgoGetHeuristic")
        finally:
            so.cublasLtMatmulPreferenceDestroy(pref)
        return [found[i] for i in range(count.value) if found[i].state == 0]

    def set(self, attr: int, value) -> None:
        status = self.so.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value), ctypes.sizeof(value))
        check(status, f"MatmulDescSetAttribute {attr}")

    def pointers(self, bias: int, aux: int) -> None:
        self.set(DESC_BIAS, ctypes.c_void_p(bias))
        self.set(DESC_AUX, ctypes.c_void_p(aux))

    def run(self, h, x, w, bias, pre, algo: Heuristic | None = None) -> None:
        self.pointers(bias.data_ptr(), pre.data_ptr())
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        ws = workspace(h.device.index)
        stream = ctypes.c_void_p(torch.cuda.current_stream(h.device).cuda_stream)
        hp = ctypes.c_void_p(h.data_ptr())
        status = self.so.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(one), ctypes.c_void_p(w.data_ptr()), self.w,
            ctypes.c_void_p(x.data_ptr()), self.x, ctypes.byref(zero), hp, self.h, hp, self.h,
            ctypes.byref((algo or self.candidates[0]).algo), ctypes.c_void_p(ws.data_ptr()),
            ctypes.c_size_t(WORKSPACE_BYTES), stream,
        )  # fmt: skip
        check(status, "cublasLtMatmul")

    def tune(self, h, x, w, bias, pre, reps: int = 3) -> None:
        """Run every candidate on these very tensors; keep those that ran, each held to torch (reference()) and
        timed (CUDA events on this GPU's stream), fastest first: once per plan. LtError where none ran,
        Disagreed where any computed wrong numbers."""
        want = reference(x, w, bias)
        ran = []
        for algo in self.candidates:
            try:
                self.run(h, x, w, bias, pre, algo)  # also the warm-up of the timing
            except LtError:
                continue
            error = disagreement(h, pre, want) if want is not None else 0.0  # not finite: the loss check's
            ran.append((algo, error, self.time(h, x, w, bias, pre, algo, reps) if error < TOLERANCE else 0.0))
        self.candidates, self.times = ranked(ran, self.shape)

    def time(self, h, x, w, bias, pre, algo: Heuristic, reps: int) -> float:
        stream = torch.cuda.current_stream(h.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            self.run(h, x, w, bias, pre, algo)
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / reps

    def __call__(self, *tensors) -> None:
        if not self.times:
            self.tune(*tensors)
        self.run(*tensors)


def shape_name(m: int, n: int, k: int) -> str:
    return f"{m} x {n} x {k}"


def ranked(ran: list[tuple], shape: str) -> tuple[list, list[float]]:
    """(algorithms, ms) fastest first, from (algorithm, relative error, ms) of each that ran; LtError where none
    ran, Disagreed where any computed wrong numbers (a GEMM this GPU gets wrong is a finding, not a detail)."""
    wrong = [r[1] for r in ran if not r[1] < TOLERANCE]  # NaN never agrees
    if wrong:
        errors = ", ".join(f"{e:.2g}" for e in wrong)
        raise Disagreed(
            f"{len(wrong)} of {len(ran)} cuBLASLt GELU_AUX_BIAS algorithms at {shape} disagreed with torch "
            f"(relative error {errors})"
        )
    if not ran:
        raise LtError(f"no cuBLASLt GELU_AUX_BIAS algorithm ran at {shape}")
    good = sorted(ran, key=lambda r: r[2])
    return [r[0] for r in good], [r[2] for r in good]


def sampled_rows(m: int) -> torch.Tensor:
    return torch.linspace(0, m - 1, min(m, SAMPLED_ROWS)).round().long().unique()


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> tuple | None:
    """What an algorithm's (h, pre) is held to: torch's own bf16 output, every row, and fp64 on sampled rows (no
    TF32, no bf16 rounding); None where the inputs are not finite (nothing to hold it to)."""
    if not all(t.isfinite().all() for t in (x, w, bias)):
        return None
    pre = torch.addmm(bias, x, w)
    rows = sampled_rows(x.shape[0]).to(x.device)
    pre64 = torch.addmm(bias.double(), x[rows].double(), w.double())
    gelu = functools.partial(torch.nn.functional.gelu, approximate="tanh")
    return (gelu(pre), pre), (rows, gelu(pre64), pre64)


def disagreement(h: torch.Tensor, pre: torch.Tensor, want: tuple) -> float:
    """The largest relative error (norm) of any row of h or pre against reference(): row by row, so that one wrong
    tile is not averaged away over the rest; NaN where any is not finite."""
    (h16, pre16), (rows, h64, pre64) = want
    worst = 0.0
    for got, ref in ((h, h16), (pre, pre16), (h[rows], h64), (pre[rows], pre64)):
        for start in range(0, got.shape[0], CHECK_ROWS):
            a, b = got[start : start + CHECK_ROWS].double(), ref[start : start + CHECK_ROWS].double()
            errors = (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)
            if not errors.isfinite().all():
                return float("nan")
            worst = max(worst, errors.max().item())
    return worst


PLANS: dict[tuple, Plan] = {}  # (device, m, n, k) -> its plan, made on first use


def gelu_bias(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu(x @ w + bias), x @ w + bias): x M x K, w K x N (a Conv1D's weight), all bf16 and contiguous on one GPU.
    LtError where cuBLASLt cannot (the caller uses torch's kernels), Disagreed where its numbers are wrong."""
    x, w, bias = (aligned(t) for t in (x, w, bias))
    check_inputs(x, w, bias)
    m, k = x.shape
    n = w.shape[1]
    key = (x.device.index, m, n, k)
    h = torch.empty(m, n, dtype=x.dtype, device=x.device)
    pre = torch.empty_like(h)
    with torch.cuda.device(x.device):  # the launch on x's GPU, whichever is current
        if key not in PLANS:
            PLANS[key] = Plan(*key)
        PLANS[key](h, x, w, bias, pre)
    return h, pre


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy where it starts off an ALIGN boundary (a view into a larger tensor)."""
    return t if t.data_ptr() % ALIGN == 0 else t.clone(memory_format=torch.contiguous_format)


def check_inputs(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> None:
    """LtError unless x (M x K), w (K x N) and bias (N) are what Plan assumes: bf16, packed rows whose lengths are
    multiples of 8, on one CUDA GPU, starting ALIGN-aligned; checked in that order."""
    tensors = (x, w, bias)
    shapes = " @ ".join(" x ".join(map(str, t.shape)) for t in (x, w)) + f" + {' x '.join(map(str, bias.shape))}"
    if any(t.dtype != torch.bfloat16 for t in tensors):
        raise LtError(f"cuBLASLt's GELU epilogue here takes bf16 only, not {[str(t.dtype) for t in tensors]}")
    if x.dim() != 2 or w.dim() != 2 or bias.shape != (w.shape[1],) or x.shape[1] != w.shape[0]:
        raise LtError(f"cuBLASLt's GELU epilogue cannot take {shapes}")
    if not all(t.is_contiguous() for t in tensors) or w.shape[0] % 8 or w.shape[1] % 8:
        raise LtError(f"cuBLASLt's GELU epilogue here takes contiguous rows of multiples of 8 only ({shapes})")
    if not (x.is_cuda and w.device == x.device and bias.device == x.device):
        raise LtError(f"cuBLASLt's GELU epilogue needs all on one CUDA GPU, not {[str(t.device) for t in tensors]}")
    if any(t.data_ptr() % ALIGN for t in tensors):
        raise LtError(f"cuBLASLt's GELU epilogue here takes {ALIGN}-byte aligned tensors only")
