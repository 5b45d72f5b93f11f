"""training_pt/memtest.py: write, read back, invert, read back again, chunk by chunk (on the CPU)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from training_pt import memtest  # noqa: E402


def ramp(lo, hi):
    return torch.arange(lo, hi, dtype=torch.int64).mul_(3)


def test_every_word_reads_back_right_across_a_ragged_last_chunk():
    buf = torch.empty(1000, dtype=torch.int64)
    assert memtest.read_back_wrong(buf, 256, ramp) == 0
    assert torch.equal(buf, ramp(0, 1000).bitwise_not_())  # the inverse is what stays written


def test_a_flipped_bit_counts_once_in_the_pattern_and_once_in_its_inverse():
    def flip(buf):
        buf[999] ^= 1 << 62

    assert memtest.read_back_wrong(torch.empty(1000, dtype=torch.int64), 256, ramp, after_write=flip) == 2
