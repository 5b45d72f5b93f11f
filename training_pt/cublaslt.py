"""A bf16 GEMM that finishes with bias + tanh GELU in cuBLASLt's epilogue, through ctypes (torch exposes none).

With the epilogue GELU_AUX_BIAS, cuBLASLt writes gelu(x @ w + bias) and keeps x @ w + bias (the GELU's input,
"aux") for the backward, as the GEMM's output tiles leave the tensor cores. torch's own path writes x @ w, then
an elementwise kernel reads it back and writes the GELU: one pass over a tokens x 4C tensor more (llm.c and
Transformer Engine use the same epilogue). The GELU is the tanh approximation (`gelu_pytorch_tanh`).

The library is the one torch already loaded (found in /proc/self/maps after a torch matmul), so its version is
torch's. Matrices are torch's row-major 2-D tensors; cuBLASLt is column-major, so the row-major M x N product
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
    """A cuBLASLt call returned an error status, or the library could not be found."""


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
    """The loaded library and a handle of its own, made once per process."""
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # loads cuBLAS(Lt) if nothing has
    so = ctypes.CDLL(library_path())
    for name, args in SIGNATURES.items():
        getattr(so, name).argtypes = args
    handle = ctypes.c_void_p()
    check(so.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
    return so, handle


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

    def __init__(self, m: int, n: int, k: int):
        so, handle = lib()
        self.so, self.handle = so, handle
        self.desc = ctypes.c_void_p()
        check(so.cublasLtMatmulDescCreate(ctypes.byref(self.desc), COMPUTE_32F, R_32F), "MatmulDescCreate")
        self.set(DESC_EPILOGUE, ctypes.c_uint32(GELU_AUX_BIAS))
        self.set(DESC_AUX_LD, ctypes.c_int64(n))
        self.w, self.x, self.h = layout(so, n, k), layout(so, k, m), layout(so, n, m)
        self.pointers(256, 256)  # the heuristic looks at the pointers' alignment: any 256-byte aligned
        self.candidates = self.heuristic()
        if not self.candidates:
            raise LtError(f"cuBLASLt has no GELU_AUX_BIAS algorithm for {m} x {n} x {k}")
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

    def run(self, h, x, w, bias, pre, algo: int = 0) -> None:
        self.pointers(bias.data_ptr(), pre.data_ptr())
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        ws = workspace(h.device.index)
        stream = ctypes.c_void_p(torch.cuda.current_stream(h.device).cuda_stream)
        hp = ctypes.c_void_p(h.data_ptr())
        status = self.so.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(one), ctypes.c_void_p(w.data_ptr()), self.w,
            ctypes.c_void_p(x.data_ptr()), self.x, ctypes.byref(zero), hp, self.h, hp, self.h,
            ctypes.byref(self.candidates[algo].algo), ctypes.c_void_p(ws.data_ptr()), ctypes.c_size_t(WORKSPACE_BYTES),
            stream,
        )  # fmt: skip
        check(status, "cublasLtMatmul")

    def tune(self, *tensors, reps: int = 3) -> None:
        """Time every candidate on these very tensors (CUDA events), fastest first; once per plan."""
        times = []
        for i in range(len(self.candidates)):
            self.run(*tensors, algo=i)  # warm
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                self.run(*tensors, algo=i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
        order = sorted(range(len(times)), key=times.__getitem__)
        self.candidates = [self.candidates[i] for i in order]
        self.times = [times[i] for i in order]

    def __call__(self, *tensors) -> None:
        if not self.times:
            self.tune(*tensors)
        self.run(*tensors)


PLANS: dict[tuple, Plan] = {}  # (device, m, n, k) -> its plan, made on first use


def gelu_bias(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu(x @ w + bias), x @ w + bias): x M x K, w K x N (a Conv1D's weight), all bf16 and contiguous."""
    m, k = x.shape
    n = w.shape[1]
    key = (x.device.index, m, n, k)
    h = torch.empty(m, n, dtype=x.dtype, device=x.device)
    pre = torch.empty_like(h)
    with torch.cuda.device(x.device):  # the launch on x's GPU, whichever is current
        if key not in PLANS:
            PLANS[key] = Plan(m, n, k)
        PLANS[key](h, x, w, bias, pre)
    return h, pre
