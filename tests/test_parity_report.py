"""The parity verdict line and plot (verify/parity.py), on hand-made reports: no model needed."""
from __future__ import annotations

import dataclasses
import math

from PIL import Image

from verify.parity import DetectionResult, ParityReport, TapResult, plot_errors, verdict


def _tap(name: str, rel: float, ok: bool | None = None) -> TapResult:
    return TapResult(name, (1, 4, 4, 8), 128, rel, rel / 2, rel, rel, 5e-3,
                     rel <= 5e-3 if ok is None else ok)


def _report(taps, detections=()) -> ParityReport:
    return ParityReport("efficientdet-d0", "w.pth", "golden", list(taps), list(detections))


def _detection(ok: bool) -> DetectionResult:
    return DetectionResult("per_class", 100, 100, 100 if ok else 90, 0, 0, 0.01, 1e-5, ok)


def test_verdict_names_the_first_diverging_tap_and_a_hint():
    assert verdict(_report([_tap("backbone/stem", 1e-6)], [_detection(True)])) == "PASS"
    line = verdict(_report([_tap("backbone/stem", 1e-6), _tap("backbone/block_00", 0.3),
                            _tap("backbone/block_01", 0.9)]))
    assert line.startswith("FAIL: first diverging tap backbone/block_00 (0.3 of its scale")
    assert "EMA" in line and "\n" not in line
    assert "preprocessing" in verdict(_report([_tap("input/image", 0.1)]))
    missing = dataclasses.replace(_tap("head/box_p3", math.inf, ok=False), compared=0)
    assert "missing or has another shape" in verdict(_report([missing]))
    only_dets = verdict(_report([_tap("backbone/stem", 1e-6)], [_detection(False)]))
    assert only_dets.startswith("FAIL: every tap matches but detections differ (per_class)")


def test_plot_has_one_row_per_tap_and_survives_non_finite_errors(tmp_path):
    taps = [_tap(f"fpn/cell_{i // 5}/p{3 + i % 5}", 10.0 ** -(6 - i % 6)) for i in range(60)]
    taps[7] = dataclasses.replace(taps[7], rel_max=math.inf, ok=False)
    plot_errors(_report(taps), tmp_path / "p.png")
    width, height = Image.open(tmp_path / "p.png").size
    assert height >= 60 * 0.2 * 100     # >= 0.2 inch per tap row at 110 dpi: labels stay legible
    assert width >= 1000
