"""GPU memory tests' shared mechanics (imports torch): how many words a share of the free memory holds,
and one pass of write, read back, invert in place, read back again, chunk by chunk.

Used by the quick memory check (gpu_checks.Checker.check_memory, one address-dependent pattern) and by the
long level's patterns (burn.memory_patterns: walking ones, seeded random, address-in-address). Written and
compared in chunks: one torch.arange over more than 2**32 elements computed wrong values past 2**32 on an
H100 (torch 2.11+cu130, seen 2026-11-25), which read as bad memory. It judges nothing (the rules do).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def free_words(dev, share: float) -> tuple[int, int, int]:
    """(words, free, total): the int64 words in `share` of `dev`'s free memory, counted after the
    allocator's cache is returned (what earlier checks left cached counts as free); free and total in bytes."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    return int(free * share) // 8, free, total


def read_back_wrong(
    buf: torch.Tensor,
    chunk: int,
    expected: Callable[[int, int], torch.Tensor],
    after_write: Callable[[torch.Tensor], object] | None = None,
) -> int:
    """Write `expected(lo, hi)` (a fresh int64 tensor) over `buf[lo:hi]` chunk by chunk, read it back, invert
    `buf` in place and read it back against the inverse: the words read back wrong over both passes.
    `after_write(buf)`: the tests' seam to flip a bit, as faulty memory would."""
    words = buf.numel()
    spans = [(lo, min(lo + chunk, words)) for lo in range(0, words, chunk)]
    for lo, hi in spans:
        buf[lo:hi] = expected(lo, hi)
    if after_write is not None:
        after_write(buf)
    wrong = torch.zeros((), dtype=torch.int64, device=buf.device)
    for invert in (False, True):
        if invert:
            buf.bitwise_not_()
        for lo, hi in spans:
            want = expected(lo, hi)
            wrong += (buf[lo:hi] != (want.bitwise_not_() if invert else want)).sum()
    return int(wrong)
