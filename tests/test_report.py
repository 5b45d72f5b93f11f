"""training_pt/report.py: the loss curve as SVG."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from training_pt import report as T


def test_loss_svg_is_valid_and_skips_non_finite_points():
    svg = ET.fromstring(T.loss_svg([10.9, 9.0, float("nan"), 7.5], "loss <&>"))
    polyline = next(e for e in svg.iter() if e.tag.endswith("polyline"))
    assert len(polyline.get("points").split()) == 3


def test_loss_svg_has_round_ticks_and_a_dashed_line_at_ln_vocab():
    svg = T.loss_svg(
        [10.91] + [10.0 - 0.16 * i for i in range(1, 30)],
        "gpt2 training loss, H100 × 8 GPUs",
        reference=math.log(50257),
    )
    root = ET.fromstring(svg)
    labels = [e.text for e in root.iter() if e.tag.endswith("text")]
    assert "gpt2 training loss, H100 × 8 GPUs" in labels
    assert {"6", "8", "10"} <= set(labels) and {"0", "5", "10", "15", "20", "25"} <= set(labels)
    assert all(len(t) <= 4 for t in labels if t and t[0].isdigit())  # no 5.17-style tick labels
    dashed = [e for e in root.iter() if e.tag.endswith("line") and e.get("stroke-dasharray")]
    assert len(dashed) == 1 and "ln(V) = 10.82" in svg


def test_nice_ticks_are_round_numbers_covering_the_range():
    assert T.nice_ticks(4.9, 11.3) == [6.0, 8.0, 10.0]
    assert T.nice_ticks(0, 29, 7) == [0, 5, 10, 15, 20, 25]
