"""NMS: TF NonMaxSuppressionV5 and automl's numpy soft-NMS, on hand-made boxes.

Expected values are the TF 2.21 measurements in shared/reference/README.md (4-6 printed digits,
hence ``atol=5e-5`` where they are quoted) or hand-computed. The TensorFlow cross-checks (marked
``needs_tf``) require bit-identical indices and scores, soft and hard.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import nms
from model.nms import (batched_nms_np, batched_non_max_suppression_v5, iou_tf, nms_np,
                       non_max_suppression_v5)

# automl's eval NMS: NonMaxSuppressionV5(iou_threshold=0.5, score_threshold=0.001, soft_nms_sigma=0.25).
SOFT = dict(iou_threshold=0.5, score_threshold=0.001, soft_nms_sigma=0.25)
# README: TF factors for IoU 0.2, 0.3, ..., 1.0 (= exp(-2 IoU^2)).
MEASURED_FACTORS = [0.9231, 0.8353, 0.7261, 0.6065, 0.4868, 0.3753, 0.2780, 0.1979, 0.1353]


@pytest.fixture(params=["compiled", "numpy"])
def v5_kernel(request, monkeypatch):
    """Run a V5 test through the numba kernel (the default) and through its numpy reference."""
    if request.param == "numpy":
        monkeypatch.setattr(nms, "_nms_kernels", lambda: None)
    else:
        assert nms._nms_kernels() is not None, "numba kernel did not load"
    return request.param


BOTH_KERNELS = pytest.mark.usefixtures("v5_kernel")


@pytest.fixture(params=["compiled", "vectorised"])
def np_kernel(request, monkeypatch):
    """Run an nms_np test through the numba loops (the default) and the vectorised torch loop."""
    if request.param == "vectorised":
        monkeypatch.setattr(nms, "_np_kernels_compiled", lambda: None)
    else:
        assert nms._np_kernels_compiled() is not None, "numba kernels did not load"
    return request.param


BOTH_NP_KERNELS = pytest.mark.usefixtures("np_kernel")


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def _scores(*values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("tenths, factor", list(zip(range(2, 11), MEASURED_FACTORS)))
@BOTH_KERNELS
def test_soft_factor_at_every_iou(tenths, factor):
    # A 10x10 box and one sharing a corner, width `tenths`: plain IoU = tenths / 10.
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, tenths])
    indices, scores = non_max_suppression_v5(boxes, _scores(0.9, 0.8), 100, **SOFT)
    assert indices.tolist() == [0, 1]                       # kept at any IoU, even a duplicate
    assert scores[0] == np.float32(0.9)
    torch.testing.assert_close(scores[1] / np.float32(0.8), torch.tensor(factor), rtol=0, atol=5e-5)


@BOTH_KERNELS
def test_soft_ignores_iou_threshold():
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 3], [20, 20, 30, 30])
    scores = _scores(0.9, 0.8, 0.7, 0.6)
    reference = non_max_suppression_v5(boxes, scores, 100, **SOFT)
    for iou_threshold in (0.1, 0.3, 1.0):
        result = non_max_suppression_v5(boxes, scores, 100, iou_threshold, 0.001, 0.25)
        for a, b in zip(result, reference):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@BOTH_KERNELS
def test_decay_compounds_over_selected_boxes():
    # A1 and A2 touch (IoU 0); C overlaps each with IoU 1/3.
    boxes = _boxes([0, 0, 10, 10], [0, 10, 10, 20], [0, 5, 10, 15])
    indices, scores = non_max_suppression_v5(boxes, _scores(0.9, 0.85, 0.8), 100, **SOFT)
    assert indices.tolist() == [0, 1, 2]
    torch.testing.assert_close(scores[2], torch.tensor(0.512944), rtol=0, atol=1e-6)
    torch.testing.assert_close(scores[2], torch.tensor(0.8 * math.exp(-2 / 9) ** 2), rtol=0, atol=1e-6)


@BOTH_KERNELS
def test_greedy_on_decayed_scores():
    # README: A 0.9, D 0.8 (IoU 0.9 with A), E 0.6 (disjoint) -> A, E, D with 0.9, 0.6, 0.1583.
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60])
    indices, scores = non_max_suppression_v5(boxes, _scores(0.9, 0.8, 0.6), 100, **SOFT)
    assert indices.tolist() == [0, 2, 1]
    torch.testing.assert_close(scores, _scores(0.9, 0.6, 0.1583), rtol=0, atol=5e-5)
    assert bool((scores[:-1] >= scores[1:]).all())


@BOTH_KERNELS
def test_score_threshold_is_strict_for_candidates():
    boxes = _boxes([0, 0, 10, 10], [20, 20, 30, 30])
    indices, _ = non_max_suppression_v5(boxes, _scores(0.001, 0.0011), 100, **SOFT)
    assert indices.tolist() == [1]


@pytest.mark.parametrize("decayed, kept", [(0.000999, False), (0.00101, True)])
@BOTH_KERNELS
def test_decayed_score_at_threshold_is_dropped(decayed, kept):
    # An exact duplicate decays by exp(-2) = 0.135335.
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 10])
    initial = decayed / math.exp(-2)
    indices, scores = non_max_suppression_v5(boxes, _scores(0.9, initial), 100, **SOFT)
    assert indices.tolist() == ([0, 1] if kept else [0])
    if kept:
        torch.testing.assert_close(scores[1], torch.tensor(decayed), rtol=1e-5, atol=0)


@BOTH_KERNELS
def test_iou_is_plain_and_corner_order_free():
    a = _boxes([0, 0, 10, 10])
    b = _boxes([0, 0, 10, 6])
    assert iou_tf(a, b).item() == pytest.approx(0.6)
    # Swapped corners and xyxy vs yxyx give the same IoU; degenerate boxes give 0.
    assert iou_tf(_boxes([10, 10, 0, 0]), _boxes([10, 6, 0, 0])).item() == pytest.approx(0.6)
    assert iou_tf(a, _boxes([5, 5, 5, 9])).item() == 0.0


@BOTH_KERNELS
def test_max_output_size_caps_selection():
    boxes = torch.tensor([[i * 20, 0, i * 20 + 10, 10] for i in range(10)], dtype=torch.float32)
    scores = torch.linspace(0.9, 0.1, 10)
    indices, _ = non_max_suppression_v5(boxes, scores, 4, **SOFT)
    assert indices.tolist() == [0, 1, 2, 3]


@BOTH_KERNELS
def test_ties_go_to_the_lower_index():
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 10], [30, 30, 40, 40])
    indices, _ = non_max_suppression_v5(boxes, _scores(0.5, 0.5, 0.5), 100, **SOFT)
    assert indices.tolist() == [0, 2, 1]


@pytest.mark.parametrize("iou_threshold, kept", [(0.5, [0, 1, 2]), (0.49, [0, 2])])
@BOTH_KERNELS
def test_hard_nms_suppresses_above_threshold(iou_threshold, kept):
    # IoU(0, 1) = 0.5 exactly: kept at threshold 0.5 (suppression needs IoU > threshold).
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 5], [40, 40, 50, 50])
    scores = _scores(0.9, 0.8, 0.3)
    indices, out_scores = non_max_suppression_v5(boxes, scores, 100, iou_threshold, -math.inf, 0.0)
    assert indices.tolist() == kept
    torch.testing.assert_close(out_scores, scores[kept], rtol=0, atol=0)   # hard: undecayed


@BOTH_KERNELS
def test_batched_groups_are_independent_and_padded_like_tf():
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10])
    scores = _scores(0.9, 0.8, 0.7)
    groups = torch.tensor([0, 1, 1])
    indices, out_scores, valid = batched_non_max_suppression_v5(boxes, scores, groups, 3, 3, **SOFT)
    assert valid.tolist() == [1, 2, 0]
    # Row 0: box 0 undisturbed by the identical box of group 1; padding is index 0, score 0.
    assert indices.tolist() == [[0, 0, 0], [1, 2, 0], [0, 0, 0]]
    torch.testing.assert_close(out_scores[0], _scores(0.9, 0, 0), rtol=0, atol=0)
    torch.testing.assert_close(out_scores[1], _scores(0.8, 0.7 * math.exp(-2), 0), rtol=1e-6, atol=0)


@BOTH_KERNELS
def test_large_input_window_growth_is_exact():
    # The 2000 best boxes sit on one spot; once one is selected the others decay below boxes
    # outside the initial search window (2048 rows), which must then join with every decay
    # applied so far. The answer must equal a brute-force greedy over all boxes.
    rng = np.random.default_rng(0)
    n = 3000
    centre = rng.uniform(0, 300, (n, 2))
    centre[:2000] = 100.0
    boxes = torch.from_numpy(np.concatenate([centre, centre + 40], 1).astype(np.float32))
    scores = torch.from_numpy(np.sort(rng.uniform(0.05, 0.95, n))[::-1].astype(np.float32).copy())
    indices, out_scores = non_max_suppression_v5(boxes, scores, 100, **SOFT)
    assert indices.numel() == 100
    # Brute force: eager greedy over everything.
    current, alive, expected = scores.clone(), torch.ones(n, dtype=torch.bool), []
    for _ in range(100):
        best = int(torch.where(alive, current, torch.tensor(-1.0)).argmax())
        expected.append(best)
        alive[best] = False
        weight = torch.exp((-2.0 * iou_tf(boxes, boxes[best]) ** 2).double()).float()
        current = torch.where(alive, current * weight, current)
        alive &= current > np.float32(0.001)
    assert indices.tolist() == expected


# ----------------------------------------------------------------------------------- nms_np


@BOTH_NP_KERNELS
def test_np_plus_one_convention_on_small_boxes():
    # Plain IoU 0.6 -> +1 IoU 77/121 = 0.6364 -> factor exp(-0.6364^2 / 0.5) = 0.4449 (TF: 0.4868).
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 6])                       # x1, y1, x2, y2
    indices, scores = nms_np(boxes, _scores(0.9, 0.8), "gaussian")
    assert indices.tolist() == [0, 1]
    torch.testing.assert_close(scores[1] / np.float32(0.8), torch.tensor(0.4449), rtol=0, atol=5e-5)
    _, tf_scores = non_max_suppression_v5(boxes, _scores(0.9, 0.8), 100, **SOFT)
    torch.testing.assert_close(tf_scores[1] / np.float32(0.8), torch.tensor(0.4868), rtol=0, atol=5e-5)


@BOTH_NP_KERNELS
def test_np_keeps_scores_at_threshold():
    boxes = _boxes([0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50])
    indices, _ = nms_np(boxes, _scores(0.5, 0.001, 0.0009), "gaussian")
    assert indices.tolist() == [0, 1]                                   # >= 0.001 stays, below goes


@BOTH_NP_KERNELS
def test_np_first_box_is_kept_below_threshold():
    indices, scores = nms_np(_boxes([0, 0, 10, 10]), _scores(0.0005), "gaussian")
    assert indices.tolist() == [0] and scores.tolist() == [np.float32(0.0005)]


@BOTH_NP_KERNELS
def test_np_row_swapping_decides_ties():
    # numpy swaps the max into row 0: [b0, b1, b2] -> [b2, b1, b0], so the 0.5 tie goes to b1.
    boxes = _boxes([0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50])
    indices, _ = nms_np(boxes, _scores(0.5, 0.5, 0.9), "gaussian")
    assert indices.tolist() == [2, 1, 0]
    tf_indices, _ = non_max_suppression_v5(boxes, _scores(0.5, 0.5, 0.9), 100, **SOFT)
    assert tf_indices.tolist() == [2, 0, 1]


@BOTH_NP_KERNELS
def test_np_linear_decays_only_above_iou_thresh():
    # +1 IoUs with box 0: 77/121 = 0.636 (decayed by 1 - IoU) and 22/220 = 0.1 (< default 0.3).
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 6], [0, 9, 10, 19])
    indices, scores = nms_np(boxes, _scores(0.9, 0.8, 0.7), "linear")
    assert indices.tolist() == [0, 2, 1]
    torch.testing.assert_close(scores, _scores(0.9, 0.7, 0.8 * (1 - 77 / 121)), rtol=1e-6, atol=0)


@BOTH_NP_KERNELS
def test_np_hard_and_diou():
    # +1 IoU 70/130 = 0.538 > 0.5: hard removes box 1; diou subtracts 9/225 -> 0.498 and keeps it.
    boxes = _boxes([0, 0, 9, 9], [3, 0, 12, 9])
    scores = _scores(0.9, 0.8)
    assert nms_np(boxes, scores, "hard")[0].tolist() == [0]
    assert nms_np(boxes, scores, None)[0].tolist() == [0]               # '' / None mean hard
    assert nms_np(boxes, scores, "diou")[0].tolist() == [0, 1]
    assert nms_np(boxes, scores, "hard", iou_thresh=0.6)[0].tolist() == [0, 1]
    # hard: no score threshold and undecayed scores.
    kept, kept_scores = nms_np(_boxes([0, 0, 9, 9], [20, 20, 29, 29]), _scores(0.5, 1e-6), "hard")
    assert kept.tolist() == [0, 1] and kept_scores.tolist() == _scores(0.5, 1e-6).tolist()


@BOTH_NP_KERNELS
def test_np_hard_order_is_numpys_argsort():
    scores = np.array([0.3, 0.7, 0.3, 0.7, 0.5] * 6, dtype=np.float32)
    boxes = torch.tensor([[i * 20, 0, i * 20 + 9, 9] for i in range(30)], dtype=torch.float32)
    indices, _ = nms_np(boxes, torch.from_numpy(scores), "hard")
    assert indices.tolist() == np.argsort(scores)[::-1].tolist()


@BOTH_NP_KERNELS
def test_np_batched_groups_in_group_order():
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10])
    groups = torch.tensor([2, 0, 2])
    indices, scores = batched_nms_np(boxes, _scores(0.6, 0.5, 0.9), groups, 3, "gaussian")
    assert indices.tolist() == [1, 2, 0]
    assert scores[:2].tolist() == _scores(0.5, 0.9).tolist()


@BOTH_NP_KERNELS
def test_np_rejects_unknown_method():
    with pytest.raises(ValueError):
        nms_np(_boxes([0, 0, 1, 1]), _scores(0.5), "softer")


# --------------------------------------------------------------------- against TensorFlow


def _clustered(rng, n):
    centres = rng.uniform(0, 500, (25, 2))
    sizes = rng.uniform(10, 150, (25, 2))
    k = rng.integers(0, 25, n)
    ctr = centres[k] + rng.normal(0, 1, (n, 2)) * sizes[k] * 0.15
    half = sizes[k] * np.exp(rng.normal(0, 0.2, (n, 2))) / 2
    boxes = np.concatenate([ctr - half, ctr + half], 1).astype(np.float32)
    scores = (1 / (1 + np.exp(-rng.normal(-3, 2, n)))).astype(np.float32)
    return boxes, scores


@pytest.mark.needs_tf
@pytest.mark.parametrize("sigma, iou_threshold, score_threshold", [
    (0.25, 0.5, 0.001), (0.05, 0.5, 0.001), (0.0, 0.5, -math.inf), (0.0, 0.3, 0.05)])
@BOTH_KERNELS
def test_matches_tensorflow_non_max_suppression_v5(sigma, iou_threshold, score_threshold):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(7)
    for n in (40, 700, 3000):
        boxes, scores = _clustered(rng, n)
        expected_idx, expected_scores, _ = tf.raw_ops.NonMaxSuppressionV5(
            boxes=boxes, scores=scores, max_output_size=100, iou_threshold=iou_threshold,
            score_threshold=score_threshold, soft_nms_sigma=sigma, pad_to_max_output_size=False)
        indices, out_scores = non_max_suppression_v5(
            torch.from_numpy(boxes), torch.from_numpy(scores), 100, iou_threshold, score_threshold, sigma)
        assert indices.tolist() == expected_idx.numpy().tolist()
        assert out_scores.numpy().tobytes() == expected_scores.numpy().tobytes()


def _tied_and_saturated(rng, n):
    """Clustered boxes whose scores repeat a few values (many exact ties, some saturated at 1.0),
    with duplicated and degenerate boxes."""
    boxes, _ = _clustered(rng, n)
    boxes[rng.integers(0, n, n // 10)] = boxes[rng.integers(0, n, n // 10)]
    boxes[rng.integers(0, n, n // 50), 2] = boxes[rng.integers(0, n, n // 50), 0]    # zero height
    levels = np.array([1.0, 1.0, 0.75, 0.5, 0.5, 0.25, 0.0625, 0.001], dtype=np.float32)
    return boxes, levels[rng.integers(0, levels.size, n)]


@pytest.mark.needs_tf
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sigma, iou_threshold, score_threshold", [
    (0.25, 0.5, 0.001), (0.5, 0.5, 0.0), (0.0, 0.5, -math.inf), (0.0, 0.6, 0.3)])
@BOTH_KERNELS
def test_bit_identical_to_tensorflow_on_random_tied_and_saturated_inputs(
        seed, sigma, iou_threshold, score_threshold):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(seed)
    # 20,000 boxes: more than the compiled kernel's first heap (it refills from its reserve).
    for make, n, max_output in ((_clustered, 5000, 100), (_tied_and_saturated, 2000, 300),
                                (_tied_and_saturated, 20000, 100)):
        boxes, scores = make(rng, n)
        expected_idx, expected_scores, _ = tf.raw_ops.NonMaxSuppressionV5(
            boxes=boxes, scores=scores, max_output_size=max_output, iou_threshold=iou_threshold,
            score_threshold=score_threshold, soft_nms_sigma=sigma, pad_to_max_output_size=False)
        indices, out_scores = non_max_suppression_v5(
            torch.from_numpy(boxes), torch.from_numpy(scores), max_output, iou_threshold,
            score_threshold, sigma)
        assert indices.tolist() == expected_idx.numpy().tolist()
        assert out_scores.numpy().tobytes() == expected_scores.numpy().tobytes()


def test_expf_is_the_c_librarys():
    # TF's kernel calls C's expf; the vectorised float64-then-round shortcut must hand every
    # argument near a float32 rounding boundary to it (glibc differs from correctly rounded there).
    import ctypes
    import ctypes.util

    from model.nms import _expf
    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    x = -np.random.default_rng(0).uniform(0, 2, 20000).astype(np.float32)
    expected = np.array([libm.expf(v) for v in x.tolist()], dtype=np.float32)
    assert _expf(x).tobytes() == expected.tobytes()


# ------------------------------------------------------- numba kernel against its numpy twin


def _run_v5(select, boxes, scores, groups, num_groups, max_output, *args, **options):
    picks = np.zeros((num_groups, max_output), dtype=np.int64)
    picked_scores = np.zeros((num_groups, max_output), dtype=np.float32)
    valid = np.zeros(num_groups, dtype=np.int64)
    select(boxes, scores, groups, num_groups, max_output,
           *nms.v5_parameters(*args), picks, picked_scores, valid, **options)
    return picks, picked_scores, valid


def _hostile_boxes(rng, n):
    """Tied/saturated clustered boxes plus exact duplicates, corner-swapped, NaN and
    zero-area rows."""
    boxes, scores = _tied_and_saturated(rng, n)
    boxes[rng.integers(0, n, n // 20)] = boxes[rng.integers(0, n, n // 20)][:, [2, 3, 0, 1]]
    boxes[rng.integers(0, n, n // 100), rng.integers(0, 4)] = np.nan
    boxes[rng.integers(0, n, n // 100)] = 0
    return boxes, scores


@pytest.mark.parametrize("sigma, iou_threshold, score_threshold", [
    (0.25, 0.5, 0.001), (0.05, 0.5, 0.0), (0.5, 0.3, 0.2), (0.0, 0.5, -math.inf), (0.0, 0.6, 0.3)])
def test_compiled_kernel_is_bit_identical_to_numpy_reference(sigma, iou_threshold, score_threshold):
    compiled = nms._nms_kernels().select_groups
    assert compiled is not None
    rng = np.random.default_rng(11)
    for case in range(12):
        n = int(rng.integers(1, 4000))
        make = (_clustered, _tied_and_saturated, _hostile_boxes)[case % 3]
        boxes, scores = make(rng, n)
        num_groups = int(rng.integers(1, 6))
        groups = rng.integers(0, num_groups, n).astype(np.int64)
        max_output = int(rng.integers(1, 400))
        args = (boxes, scores, groups, num_groups, max_output, iou_threshold, score_threshold,
                sigma)
        want = _run_v5(nms.select_groups_python, *args)
        assert want[2].sum() > 0
        # The default heap, and a small first chunk so that large groups refill from the reserve.
        for first_chunk in (4096, int(rng.integers(1, 40))):
            got = _run_v5(compiled, *args, first_chunk=first_chunk)
            for expected, actual in zip(want, got):
                assert actual.tobytes() == expected.tobytes(), f"case {case}, {first_chunk}"


def test_compiled_decay_is_float32_with_c_expf():
    """One selected box per group decays its neighbour: ``score * expf(scale * iou * iou)`` with
    every step in float32 and C's expf (a float64 step or another exp changes some results)."""
    import ctypes
    import ctypes.util
    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    rng = np.random.default_rng(3)
    pairs = 3000
    first = rng.uniform(0, 50, (pairs, 2)).astype(np.float32)
    second = first + rng.uniform(-20, 20, (pairs, 2)).astype(np.float32)
    size = rng.uniform(5, 40, (pairs, 2)).astype(np.float32)
    boxes = np.stack([np.concatenate([first, first + size], 1),
                      np.concatenate([second, second + size], 1)], 1).reshape(-1, 4)
    scores = np.tile(np.array([0.99, 0.9], dtype=np.float32), pairs)
    groups = np.repeat(np.arange(pairs), 2)
    picks, picked_scores, valid = _run_v5(nms._nms_kernels().select_groups, boxes, scores, groups,
                                          pairs, 2, 0.5, 0.0, 0.25)
    lo, hi = boxes[1::2, :2], boxes[1::2, 2:]                # the decayed box, then the selected
    lo_selected, hi_selected = boxes[::2, :2], boxes[::2, 2:]
    extent = np.maximum(np.minimum(hi, hi_selected) - np.maximum(lo, lo_selected), np.float32(0))
    intersection = extent[:, 0] * extent[:, 1]
    area = (hi[:, 0] - lo[:, 0]) * (hi[:, 1] - lo[:, 1])
    area_selected = (hi_selected[:, 0] - lo_selected[:, 0]) * (hi_selected[:, 1] - lo_selected[:, 1])
    iou = intersection / (area + area_selected - intersection)
    argument = np.float32(-2.0) * iou * iou
    weight = np.array([libm.expf(v) for v in argument.tolist()], dtype=np.float32)
    assert valid.tolist() == [2] * pairs and (iou > 0).sum() > pairs // 2
    assert picked_scores[:, 1].tobytes() == (np.float32(0.9) * weight).tobytes()


@pytest.mark.parametrize("method", ["gaussian", "linear", "hard", "diou"])
def test_compiled_nms_np_is_bit_identical_to_vectorised(method, monkeypatch):
    rng = np.random.default_rng(["gaussian", "linear", "hard", "diou"].index(method))
    for case in range(6):
        n = int(rng.integers(1, 700))
        boxes, scores = (_clustered, _tied_and_saturated)[case % 2](rng, n)
        boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]),
                                np.maximum(boxes[:, :2], boxes[:, 2:])], 1)    # x1 <= x2
        num_groups = int(rng.integers(1, 8))
        args = (torch.from_numpy(boxes), torch.from_numpy(scores),
                torch.from_numpy(rng.integers(0, num_groups, n)), num_groups, method,
                float(rng.choice([0, 0.3, 0.6])), float(rng.choice([0, 0.1, 0.5])),
                float(rng.choice([0, 0.01, 0.3])))
        indices, kept_scores = batched_nms_np(*args)
        with monkeypatch.context() as patch:
            patch.setattr(nms, "_np_kernels_compiled", lambda: None)
            want_indices, want_scores = batched_nms_np(*args)
        assert indices.numel() > 0
        assert indices.tolist() == want_indices.tolist(), f"case {case}"
        assert kept_scores.numpy().tobytes() == want_scores.numpy().tobytes(), f"case {case}"


def test_compiled_nms_np_batches_large_groups(monkeypatch):
    # Groups whose [pick, row] matrices exceed one batch go in several kernel calls.
    monkeypatch.setattr(nms, "_NP_PAIRS_PER_BATCH", 100_000)
    monkeypatch.setattr(nms, "_NP_PICKS_PER_BLOCK", 100)
    rng = np.random.default_rng(9)
    boxes, scores = _tied_and_saturated(rng, 1600)
    boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]),
                            np.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    groups = torch.from_numpy(rng.integers(0, 4, 1600))
    indices, kept_scores = batched_nms_np(torch.from_numpy(boxes), torch.from_numpy(scores),
                                          groups, 4)
    monkeypatch.setattr(nms, "_np_kernels_compiled", lambda: None)
    want_indices, want_scores = batched_nms_np(torch.from_numpy(boxes), torch.from_numpy(scores),
                                               groups, 4)
    assert indices.tolist() == want_indices.tolist()
    assert kept_scores.numpy().tobytes() == want_scores.numpy().tobytes()


@pytest.mark.parametrize("sigma, iou_threshold, score_threshold", [
    (0.25, 0.5, 0.001), (0.0, 0.5, -math.inf), (0.0, 0.6, 0.3)])
@BOTH_KERNELS
def test_encoded_boxes_select_what_their_decoded_boxes_select(sigma, iou_threshold,
                                                               score_threshold):
    """The global path's lazy decoding (only popped rows) gives the result of decoding every box
    first, bit for bit: several images over shared anchors, with clustered, overflowing and NaN
    regressions and tied scores."""
    generator = torch.Generator().manual_seed(9)
    num_anchors, images = 3000, 3
    corner = torch.rand(num_anchors, 2, generator=generator) * 400
    anchors = torch.cat([corner, corner + 16 + torch.rand(num_anchors, 2, generator=generator)
                         * 64], 1)
    deltas = torch.randn(images * num_anchors, 4, generator=generator) * 0.4
    deltas[::89] = torch.tensor([0.1, 0.1, 95.0, -110.0])
    deltas[5::173, 2] = math.nan
    scores = torch.rand(images * num_anchors, generator=generator)
    scores[::7] = 0.75
    groups = torch.arange(images).repeat_interleave(num_anchors)
    encoded = nms.EncodedBoxes(deltas, anchors)
    args = (scores, groups, images, 100, iou_threshold, score_threshold, sigma)
    got = batched_non_max_suppression_v5(encoded, *args)
    want = batched_non_max_suppression_v5(encoded.decode(), *args)
    assert got[2].min() > 0
    for actual, expected in zip(got, want):
        assert actual.numpy().tobytes() == expected.numpy().tobytes()


def test_encoded_boxes_reject_mismatched_shapes():
    scores, groups = torch.zeros(10), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="anchors must be"):
        batched_non_max_suppression_v5(nms.EncodedBoxes(torch.zeros(10, 4), torch.zeros(5, 3)),
                                       scores, groups, 1, 5)
    with pytest.raises(ValueError, match="deltas must be"):
        batched_non_max_suppression_v5(nms.EncodedBoxes(torch.zeros(10, 4), torch.zeros(3, 4)),
                                       scores, groups, 1, 5)


def test_no_groups_is_one_group():
    rng = np.random.default_rng(4)
    boxes, scores = (torch.from_numpy(a) for a in _clustered(rng, 500))
    one = batched_non_max_suppression_v5(boxes, scores, None, 1, 50, **SOFT)
    zeros = batched_non_max_suppression_v5(boxes, scores, torch.zeros(500, dtype=torch.long), 1,
                                           50, **SOFT)
    assert all(torch.equal(a, b) for a, b in zip(one, zeros)) and one[2].item() == 50
    with pytest.raises(ValueError, match="one group"):
        batched_non_max_suppression_v5(boxes, scores, None, 2, 50, **SOFT)
