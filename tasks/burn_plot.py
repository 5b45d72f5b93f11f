"""burn.svg and burn_samples.csv: the long level's NVML samples (and the burn's TFLOP/s) over time.

Torch-free and matplotlib-free: plain SVG text, one panel per quantity, one line per GPU.
"""

from __future__ import annotations

import csv
import io
from html import escape

PANELS = (("tflops", "burn TFLOP/s"), ("sm_mhz", "SM clock MHz"), ("power_w", "power W"), ("temp_c", "temperature °C"))
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
CSV_FIELDS = (
    "t_s",
    "gpu",
    "phase",
    "tflops",
    "sm_mhz",
    "sm_max_mhz",
    "mem_mhz",
    "power_w",
    "temp_c",
    "reasons",
    "pcie_gen",
    "pcie_width",
)


def samples_csv(samples: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for s in samples:
        row = dict(s)
        if row.get("reasons") is not None:
            row["reasons"] = f"0x{row['reasons']:x}"
        writer.writerow(row)
    return out.getvalue()


def burn_svg(samples: list[dict], title: str, width: int = 760, panel_h: int = 150) -> str:
    """Four panels (TFLOP/s, SM clock, power, temperature) against seconds, a line per GPU."""
    left, right, top, gap = 70, 20, 40, 36
    height = top + len(PANELS) * (panel_h + gap)
    t_max = max((s["t_s"] for s in samples), default=1.0) or 1.0
    gpus = sorted({s["gpu"] for s in samples})
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14">{escape(title)}</text>',
    ]
    for k, g in enumerate(gpus):
        out.append(
            f'<text x="{width - right - 60 * (len(gpus) - k)}" y="20" fill="{COLORS[k % len(COLORS)]}">gpu{g}</text>'
        )
    for p, (key, label) in enumerate(PANELS):
        y0 = top + p * (panel_h + gap)
        values = [s[key] for s in samples if s.get(key) is not None]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        lo, hi = (
            (0.0, hi * 1.05 or 1.0) if key == "tflops" else (lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1))
        )
        out.append(
            f'<rect x="{left}" y="{y0}" width="{width - left - right}" height="{panel_h}" fill="none" stroke="#999"/>'
        )
        out.append(f'<text x="{left}" y="{y0 - 6}">{escape(label)}</text>')
        out.append(f'<text x="{left - 6}" y="{y0 + 12}" text-anchor="end">{hi:.0f}</text>')
        out.append(f'<text x="{left - 6}" y="{y0 + panel_h}" text-anchor="end">{lo:.0f}</text>')
        for k, g in enumerate(gpus):
            pts = [(s["t_s"], s[key]) for s in samples if s["gpu"] == g and s.get(key) is not None]
            if len(pts) < 2:
                continue
            xy = " ".join(
                f"{left + t / t_max * (width - left - right):.1f},{y0 + panel_h - (v - lo) / (hi - lo) * panel_h:.1f}"
                for t, v in pts
            )
            out.append(f'<polyline fill="none" stroke="{COLORS[k % len(COLORS)]}" stroke-width="1.5" points="{xy}"/>')
    y_axis = top + len(PANELS) * (panel_h + gap) - gap + 16
    out.append(f'<text x="{left}" y="{y_axis}">0 s</text>')
    out.append(f'<text x="{width - right}" y="{y_axis}" text-anchor="end">{t_max:.0f} s</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
