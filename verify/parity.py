"""Layer-by-layer comparison of the PyTorch model against a TF reference.

Every tap is compared in graph order; the first tap out of tolerance names the layer that is
wrong (every later tap inherits its error). Detections are matched one to one per
post-processing path.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import EfficientDet, flatten_outputs
from model.postprocess import NmsConfig, postprocess

from .reference import DetectionsRef, Reference, TapRef

# Tolerances, relative to the tap's scale (max |reference|). Two float32 implementations
# (oneDNN vs ATen kernels, other summation orders) agree to ~3e-5 of scale at the heads of
# d0/d1; the error then grows with depth through the BiFPN's feedback (measured: d4 5e-4,
# d7x 1.2e-3 at the box heads, diffuse: rel-L2 of the same order). 5e-3 keeps 4x headroom
# for the deepest variants, while every mapping, padding, BN or EMA mistake moves the first
# affected tap by > 1e-1 of its scale (tests/test_parity.py breaks each on purpose).
TAP_RTOL = 5e-3
# The input rebuilt from the JPEG (goldens too large to store it) may differ in the last bit
# of the resize; the network input is compared on its own scale with the same bound.
INPUT_RTOL = 1e-3
# Detections: box corners in original-image pixels within BOX_ATOL_PX + BOX_RTOL * L, where L
# is the larger of the box's extent and the image's longest side -- the deltas go through
# exp(), so the error scales with the decoded (unclipped) box, which reaches 4000 px (d1:
# 0.07 px error) and which clipping hides (hold-out d6: a [0, 0, 0, 56] box 0.28 px off); scores
# (after sigmoid and soft-NMS decay) within SCORE_ATOL; both sized like TAP_RTOL for the head
# outputs. Post-processing mistakes (decode, anchors, clipping, scaling) move boxes by strides.
BOX_ATOL_PX = 0.05
BOX_RTOL = 2e-3
SCORE_ATOL = 2e-3


@dataclass
class TapResult:
    name: str
    shape: tuple[int, ...]
    compared: int          # number of values compared (whole tensor or samples)
    max_abs: float
    mean_abs: float
    rel_l2: float          # ||a - b|| / ||b||
    rel_max: float         # max_abs / max |b|
    tolerance: float
    ok: bool


@dataclass
class DetectionResult:
    path: str              # 'global' | 'per_class' | 'pyfunc'
    expected: int
    produced: int
    matched: int
    swapped: int           # same boxes, scores exchanged by a near-tie in soft-NMS order
    at_cut: int            # unmatched rows within SCORE_ATOL of the lowest kept score
    max_box_err: float
    max_score_err: float
    ok: bool


@dataclass
class ParityReport:
    variant: str
    weights: str
    reference: str
    taps: list[TapResult] = field(default_factory=list)
    detections: list[DetectionResult] = field(default_factory=list)
    tap_rtol: float = TAP_RTOL

    @property
    def first_divergence(self) -> str | None:
        return next((t.name for t in self.taps if not t.ok), None)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.taps) and all(d.ok for d in self.detections)

    @property
    def worst_rel(self) -> float:
        return max((t.rel_max for t in self.taps), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(ok=self.ok, first_divergence=self.first_divergence,
                    tolerances={"tap_rtol": TAP_RTOL, "input_rtol": INPUT_RTOL,
                                "box_atol_px": BOX_ATOL_PX, "box_rtol": BOX_RTOL,
                                "score_atol": SCORE_ATOL})
        return data


def compare_tap(ref: TapRef, actual_nhwc: np.ndarray, rtol: float = TAP_RTOL) -> TapResult:
    """Compares an NHWC activation with its reference (whole or sampled)."""
    if tuple(actual_nhwc.shape) != tuple(ref.shape):
        return TapResult(ref.name, tuple(actual_nhwc.shape), 0, math.inf, math.inf, math.inf,
                         math.inf, rtol, False)
    got = ref.pick(actual_nhwc).astype(np.float64)
    want = ref.values.astype(np.float64).reshape(got.shape)
    diff = np.abs(got - want)
    scale = max(float(np.abs(want).max()), 1e-12)
    max_abs = float(diff.max())
    rel_l2 = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))
    finite = bool(np.isfinite(got).all())
    return TapResult(ref.name, tuple(ref.shape), int(got.size), max_abs, float(diff.mean()),
                     rel_l2, max_abs / scale, rtol, finite and max_abs <= rtol * scale)


def _max_matching(feasible: np.ndarray) -> dict[int, int]:
    """Maximum bipartite matching (Kuhn) of reference rows to produced rows: {ref: produced}."""
    owner = [-1] * feasible.shape[1]

    def claim(row: int, seen: list[bool]) -> bool:
        for col in np.flatnonzero(feasible[row]):
            if not seen[col]:
                seen[col] = True
                if owner[col] < 0 or claim(owner[col], seen):
                    owner[col] = row
                    return True
        return False

    for row in range(feasible.shape[0]):
        claim(row, [False] * feasible.shape[1])
    return {row: col for col, row in enumerate(owner) if row >= 0}


def match_detections(path: str, ref: DetectionsRef, boxes: np.ndarray, scores: np.ndarray,
                     classes: np.ndarray, image_extent: float = 0.0) -> DetectionResult:
    """One-to-one matching of detection rows: same class, box corners within BOX_ATOL_PX +
    BOX_RTOL * max(box extent, ``image_extent``), score within SCORE_ATOL. A maximum matching,
    not a greedy one: boxes clipped to the image border can be near-identical, and a greedy
    pass mis-pairs them.

    Two float32 near-ties are told apart from real differences, because noise far below the
    tap tolerance legitimately decides them:

    * greedy order: when two boxes of one class have almost equal scores, soft-NMS keeps the
      first one's score and decays the other; if the order flips, the same boxes come out with
      each other's scores (seen: hold-out d2 pyfunc, class 66, 0.4573 / 0.4461). Rows whose
      box matches but score differs are accepted only if, per class, their scores are the same set;
    * the cut: an unmatched reference row is accepted only if its score is within SCORE_ATOL
      of the lowest kept score (seen: d7x per_class row 100, 0.9269 in TF vs 0.9272 here).
    """
    extent = np.maximum.reduce([ref.boxes_yxyx[:, 2] - ref.boxes_yxyx[:, 0],
                                ref.boxes_yxyx[:, 3] - ref.boxes_yxyx[:, 1],
                                np.full(len(ref.scores), image_extent)])
    box_errors = np.abs(ref.boxes_yxyx[:, None, :] - boxes[None, :, :]).max(axis=2) \
        if len(boxes) else np.zeros((len(ref.scores), 0))
    box_ok = (ref.classes[:, None] == classes[None, :]) & \
        (box_errors <= BOX_ATOL_PX + BOX_RTOL * extent[:, None])
    score_errors = np.abs(ref.scores[:, None] - scores[None, :])
    exact = _max_matching(box_ok & (score_errors <= SCORE_ATOL))
    rest_ref = [r for r in range(len(ref.scores)) if r not in exact]
    rest_out = sorted(set(range(len(scores))) - set(exact.values()))
    by_box = _max_matching(box_ok[np.ix_(rest_ref, rest_out)]) if rest_ref and rest_out else {}
    reordered: dict[float, list[tuple[float, float]]] = {}
    for r, p in by_box.items():
        reordered.setdefault(float(ref.classes[rest_ref[r]]), []).append(
            (float(ref.scores[rest_ref[r]]), float(scores[rest_out[p]])))
    swapped = 0
    for rows in reordered.values():
        want, got = (np.sort(np.array(column)) for column in zip(*rows))
        if len(rows) > 1 and np.all(np.abs(want - got) <= SCORE_ATOL):
            swapped += len(rows)
    cut = float(ref.scores.min()) if len(ref.scores) else 0.0
    at_cut = sum(1 for i, r in enumerate(rest_ref)
                 if i not in by_box and ref.scores[r] <= cut + SCORE_ATOL)
    pairs = list(exact.items())
    ok = len(exact) + swapped + at_cut == len(ref.scores) == len(scores)
    return DetectionResult(
        path, len(ref.scores), len(scores), len(exact), swapped, at_cut,
        max((float(box_errors[r, p]) for r, p in pairs), default=0.0),
        max((float(score_errors[r, p]) for r, p in pairs), default=0.0), ok)


def network_input(model: EfficientDet, reference: Reference) -> tuple[torch.Tensor, float, TapResult | None]:
    """The golden's stored input, or the input rebuilt from its image (checked on samples)."""
    if reference.input is not None and reference.input.indices is None:
        image = torch.from_numpy(reference.input.values).permute(0, 3, 1, 2).contiguous()
        return image, reference.image_scale_to_original, None
    if reference.image_file is None:
        raise FileNotFoundError("the golden's input is not stored whole and its image was not found")
    from model.preprocess import load_image, preprocess_batch
    config = model.config
    batch, scales = preprocess_batch([load_image(reference.image_file)], config.image_size,
                                     config.mean_rgb, config.stddev_rgb, config.scale_range)
    check = None
    if reference.input is not None:
        check = compare_tap(reference.input, batch.permute(0, 2, 3, 1).numpy(), INPUT_RTOL)
    return batch, float(scales[0]), check


@torch.no_grad()
def run_parity(model: EfficientDet, reference: Reference, weights: str = "", source: str = "",
               device: str = "cpu") -> ParityReport:
    """Runs ``model`` on the reference input and compares every tap and detection path."""
    model = model.to(device).eval()
    report = ParityReport(model.config.name, weights, source)
    image, scale, input_check = network_input(model, reference)
    if input_check is not None:
        report.taps.append(input_check)
    (class_outputs, box_outputs), taps = model.forward_with_taps(image.to(device))
    for ref in reference.taps:
        if ref.name not in taps:
            report.taps.append(TapResult(ref.name, ref.shape, 0, math.inf, math.inf, math.inf,
                                         math.inf, TAP_RTOL, False))
            continue
        actual = taps[ref.name].permute(0, 2, 3, 1).cpu().numpy()
        report.taps.append(compare_tap(ref, actual))
    cls_logits, box_deltas = flatten_outputs(class_outputs, box_outputs)
    nms = NmsConfig.from_dict(model.config.nms_configs)
    scales = torch.tensor([scale], dtype=torch.float32, device=device)
    for path, ref in reference.detections.items():
        dets = postprocess(path, cls_logits, box_deltas, model.anchors.boxes_yxyx,
                           model.config.image_size, scales, nms)
        valid = int(dets.valid[0])
        report.detections.append(match_detections(
            path, ref, dets.boxes_yxyx[0, :valid].cpu().numpy(),
            dets.scores[0, :valid].cpu().numpy(), dets.classes[0, :valid].cpu().numpy(),
            image_extent=max(model.config.image_size) * scale))
    return report


def format_table(report: ParityReport) -> list[str]:
    """Human-readable rows: taps in graph order, then detections and the verdict."""
    lines = [f"{'tap':<26} {'shape':<22} {'max abs':>9} {'rel max':>9} {'status':>6}"]
    for t in report.taps:
        shape = "x".join(str(d) for d in t.shape)
        lines.append(f"{t.name:<26} {shape:<22} {t.max_abs:>9.2e} {t.rel_max:>9.2e} "
                     f"{'ok' if t.ok else 'FAIL':>6}")
    for d in report.detections:
        cut = (f", {d.swapped} near-tie swaps" if d.swapped else "") + \
            (f", {d.at_cut} near-tie at the cut" if d.at_cut else "")
        lines.append(f"detections/{d.path:<15} matched {d.matched}/{d.expected}{cut} "
                     f"(produced {d.produced}), max box err {d.max_box_err:.3g} px, "
                     f"max score err {d.max_score_err:.2g}: {'ok' if d.ok else 'FAIL'}")
    first = report.first_divergence
    lines.append(f"first diverging tap: {first}" if first else
                 f"all {len(report.taps)} taps within {TAP_RTOL:g} of their scale")
    return lines


def verdict(report: ParityReport) -> str:
    """One line: ``PASS``, or ``FAIL:`` with the first diverging tap (or detection path), its
    error against the tolerance, and the likeliest cause."""
    if report.ok:
        return "PASS"
    first = next((t for t in report.taps if not t.ok), None)
    if first is None:
        paths = ", ".join(d.path for d in report.detections if not d.ok)
        return (f"FAIL: every tap matches but detections differ ({paths}); hint: NMS settings "
                f"(nms_configs / score_thresh) or image size differ from the reference")
    if not first.compared:
        return (f"FAIL: tap {first.name} is missing or has another shape {first.shape}; hint: "
                f"wrong variant, image size or num_classes")
    measured = f"{first.rel_max:.2g} of its scale > {first.tolerance:g}"
    if first.name.startswith("input/"):
        hint = "preprocessing differs: image size, mean_rgb/stddev_rgb (AdvProp?) or decoder"
    else:
        hint = ("raw vs EMA weights? (convert --no-ema, or --golden-name golden_noema); "
                "otherwise this layer's mapping, padding or BN statistics")
    return f"FAIL: first diverging tap {first.name} ({measured}); hint: {hint}"


def plot_errors(report: ParityReport, path: str | Path) -> None:
    """Every tap's relative error (log scale), one labelled row per tap in graph order, with
    the tolerance line, failing taps in red and the legend outside the data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .io_utils import atomic_write_bytes
    taps = report.taps
    finite = [t.rel_max for t in taps if math.isfinite(t.rel_max) and t.rel_max > 0]
    low = min(finite + [report.tap_rtol]) / 3
    high = max(finite + [report.tap_rtol]) * 10
    errors = [min(max(t.rel_max, low), high) if math.isfinite(t.rel_max) else high for t in taps]
    rows = list(range(len(taps)))
    fig, ax = plt.subplots(figsize=(10, max(4.0, 0.2 * len(taps) + 1.5)))
    ax.plot(errors, rows, color="0.75", linewidth=1, zorder=1)
    groups = (("ok", "tab:blue", "o", lambda t: t.ok),
              ("over tolerance", "tab:red", "o", lambda t: not t.ok and math.isfinite(t.rel_max)),
              ("missing or non-finite", "tab:red", "x", lambda t: not math.isfinite(t.rel_max)))
    for label, colour, marker, keep in groups:
        picked = [i for i, t in enumerate(taps) if keep(t)]
        if picked:
            ax.scatter([errors[i] for i in picked], picked, color=colour, marker=marker, s=22,
                       zorder=2, label=f"{label} ({len(picked)})")
    ax.axvline(report.tap_rtol, color="tab:red", linestyle="--", linewidth=1.2,
               label=f"tolerance {report.tap_rtol:g} x scale")
    first = report.first_divergence
    if first is not None:
        index = [t.name for t in taps].index(first)
        ax.annotate("first divergence", (errors[index], index), xytext=(8, 0),
                    textcoords="offset points", va="center", fontsize=8, color="tab:red")
    ax.set_xscale("log")
    ax.set_xlim(low, high * 3)
    ax.set_yticks(rows)
    ax.set_yticklabels([t.name for t in taps], fontsize=8)
    ax.set_ylim(len(taps) - 0.5, -0.5)          # graph order from the top
    ax.grid(axis="x", which="major", color="0.9")
    ax.set_xlabel("max |PyTorch - TF| / max |TF| per tap (log scale)")
    ax.set_ylabel("tap, in graph order")
    ax.set_title(f"{report.variant}: PyTorch vs TF reference - {verdict(report).split(';')[0]}",
                 fontsize=10, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    import io
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
