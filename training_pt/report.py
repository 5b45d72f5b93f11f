"""What train.py writes: the log (stdout and training_log.txt) and the loss curve as a small SVG."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from tasks import layout


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + k * step, 10) for k in range(int((hi - first) / step + 1e-9) + 1)]


def loss_svg(
    losses: list[float], title: str, reference: float | None = None, width: int = 720, height: int = 360
) -> str:
    """The loss curve as a small self-contained SVG (no plotting library needed); `reference` (ln V, the
    loss of a uniform guess) as a dashed line."""
    left, right, top, bottom = 64, 20, 36, 44
    pw, ph = width - left - right, height - top - bottom
    finite = [v for v in losses if math.isfinite(v)] or [0.0]
    lo, hi = min(finite + ([reference] if reference else [])), max(finite + ([reference] if reference else []))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    last = max(1, len(losses) - 1)

    def xy(i: float, v: float) -> tuple[float, float]:
        return left + pw * i / last, top + ph * (hi - v) / (hi - lo)

    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)))
    esc = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{esc}</text>',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>',
    ]
    for v in nice_ticks(lo, hi):
        _, y = xy(0, v)
        out += [
            f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#ddd"/>',
            f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>',
        ]
    for i in nice_ticks(0, last, 7):
        x, _ = xy(i, lo)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 18}" text-anchor="middle">{i:g}</text>')
    if reference:
        _, y = xy(0, reference)
        out += [
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#d62728" stroke-dasharray="6 4"/>',
            f'<text x="{left + pw - 4}" y="{y - 5:.1f}" text-anchor="end" fill="#d62728">'
            f"ln(V) = {reference:.2f}: a uniform guess</text>",
        ]
    out += [
        f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">step</text>',
        f'<text x="16" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {top + ph / 2})">loss</text>',
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points}"/>',
        "</svg>",
    ]
    return "\n".join(out) + "\n"


class Log:
    """Lines to stdout and (the node's first process) training_log.txt; other ranks add only their failure lines.

    Each node writes into its own run folder, so the leader is local rank 0 (rank 0 on one node)."""

    def __init__(self, out: Path, rank: int, leader: bool | None = None):
        self.rank, self.path = rank, out / layout.TRAIN_LOG
        self.leader = rank == 0 if leader is None else leader
        if self.leader:
            self.path.write_text("")  # a fresh log; every write below appends, so other ranks' lines stay

    def __call__(self, text: str = "", *, to_file: bool | None = None) -> None:
        if self.leader:
            print(text, flush=True)
        if to_file if to_file is not None else self.leader:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(text + "\n")

    def failure(self, text: str, *, own: bool) -> None:
        """A FAIL line. Another rank's goes to the file too when the failure is its own (out of memory, a
        crash); config errors and the checks (on the all-reduced loss) fail every rank alike."""
        if self.leader:
            self(text)
            return
        line = f"[rank {self.rank}] {text}"
        print(line, file=sys.stderr, flush=True)
        if own:
            self(line, to_file=True)


def fmt_int(n: float) -> str:
    return f"{n:,.0f}"
