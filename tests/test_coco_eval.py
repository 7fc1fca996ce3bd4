"""COCO mAP evaluation (verify/coco/, `verify coco`) on a tiny hand-made COCO dataset.

No model is needed: a fake predictor reads the image id that each generated PNG carries in its
first pixel and returns planned detections in the ``model.postprocess.Detections`` layout.
Expected metric values are derived by hand in the comments from pycocotools' definitions:
AP = mean over categories and IoU thresholds .50:.05:.95 of the precision averaged over the
101 recall points 0, .01, ..., 1 (precision is 0 at recall points that are never reached).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pycocotools.coco import COCO

from verify import coco as coco_lib
from verify.coco import report as coco_report
from verify.cli import main

pytestmark = pytest.mark.needs_coco

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
# image id -> (width, height, [(category_id, [x, y, w, h]), ...]). Boxes of one category never
# overlap inside an image. Areas: small (< 32^2) 400, 192, 256; medium 2880, 1920, 1600;
# large (> 96^2) 11000, 10000, 11000. Per category: person 4 boxes, car 3, dog 2; image 285 has none.
GROUND_TRUTH = {
    42: (240, 180, [(1, [10, 10, 20, 20]), (3, [50, 20, 60, 48]), (18, [120, 40, 110, 100])]),
    7: (240, 180, [(1, [5, 5, 12, 16]), (1, [100, 100, 48, 40]), (3, [30, 60, 100, 100])]),
    139: (240, 180, [(18, [20, 30, 40, 40]), (3, [150, 10, 16, 16]), (1, [60, 70, 110, 100])]),
    285: (200, 150, []),
}
SORTED_IDS = sorted(GROUND_TRUTH)  # [7, 42, 139, 285]
MAX_DETS = 5  # K of the fake Detections; rows past `valid` are filled with decoys


@dataclass(frozen=True)
class Dataset:
    root: Path
    images: Path
    annotations: Path


@pytest.fixture()
def dataset(tmp_path: Path) -> Dataset:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, (width, height, boxes) in GROUND_TRUTH.items():  # deliberately not sorted
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        pixels[0, 0] = (image_id % 256, image_id // 256, 0)  # the fake predictor reads this
        file_name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(images_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for category_id, bbox in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id, "bbox": bbox,
                                "area": bbox[2] * bbox[3], "iscrowd": 0})
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": CATEGORIES}))
    return Dataset(tmp_path, images_dir, path)


# ---------------------------------------------------------------------------------------------
# planned detections and the fake predictor
# ---------------------------------------------------------------------------------------------

def shifted(bbox: list[float], fraction: float) -> list[float]:
    """The box moved right by fraction * width: IoU = (w - d) / (w + d) = (1 - f) / (1 + f)."""
    x, y, w, h = bbox
    return [x + fraction * w, y, w, h]


def plan_detections(shift_by_category: dict[int, float] | None = None,
                    drop: set[tuple[int, int]] = frozenset()) -> dict[int, list[tuple]]:
    """image id -> [(category_id, [x, y, w, h], score)]: the ground truth, optionally moved per
    category and without the (image id, category id) pairs in ``drop``. Scores are distinct."""
    shift_by_category = shift_by_category or {}
    plan, score = {}, 0.99
    for image_id, (_, _, boxes) in GROUND_TRUTH.items():
        rows = []
        for category_id, bbox in boxes:
            if (image_id, category_id) in drop:
                continue
            rows.append((category_id, shifted(bbox, shift_by_category.get(category_id, 0.0)), score))
            score -= 0.01
        plan[image_id] = rows
    return plan


def as_results(plan: dict[int, list[tuple]]) -> list[dict]:
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, rows in plan.items() for c, b, s in rows]


@dataclass
class FakeDetections:
    boxes_yxyx: np.ndarray  # [N, K, 4]
    scores: np.ndarray      # [N, K]
    classes: np.ndarray     # [N, K]
    valid: np.ndarray       # [N]


class FakePredictor:
    """Detections for the planned boxes; raises ``fail_with`` on call number ``fail_on_call``."""

    def __init__(self, plan, fail_on_call: int | None = None, fail_with: type = RuntimeError):
        self.plan, self.fail_on_call, self.fail_with = plan, fail_on_call, fail_with
        self.calls: list[list[int]] = []

    def __call__(self, images: list[np.ndarray]) -> FakeDetections:
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise self.fail_with("simulated crash")
        ids = [int(img[0, 0, 0]) + 256 * int(img[0, 0, 1]) for img in images]
        assert all(img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 for img in images)
        self.calls.append(ids)
        n = len(images)
        # decoy padding: a confident class-1 box that would cost AP if it were not skipped
        boxes = np.tile(np.array([1, 2, 30, 40], np.float32), (n, MAX_DETS, 1))
        scores = np.full((n, MAX_DETS), 0.999, np.float32)
        classes = np.ones((n, MAX_DETS), np.float32)
        valid = np.zeros(n, np.int32)
        for i, image_id in enumerate(ids):
            rows = self.plan[image_id]
            for j, (category_id, (x, y, w, h), score) in enumerate(rows):
                boxes[i, j] = (y, x, y + h, x + w)
                scores[i, j] = score
                classes[i, j] = category_id
            valid[i] = len(rows)
        return FakeDetections(boxes, scores, classes, valid)


# ---------------------------------------------------------------------------------------------
# pure evaluation
# ---------------------------------------------------------------------------------------------

def test_detections_equal_to_ground_truth_give_ap_one(dataset):
    metrics = coco_lib.evaluate(dataset.annotations, as_results(plan_detections()))
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert metrics[name] == pytest.approx(1.0), name
    # AR1 keeps one detection per image and category: person has two boxes in image 7, so its
    # recall is 3/4 while car and dog reach 1 -> (3/4 + 1 + 1) / 3 = 11/12.
    assert metrics["AR1"] == pytest.approx(11 / 12)
    assert metrics.num_images == 4 and metrics.num_detections == 9
    assert list(metrics.as_dict()) == list(coco_lib.METRIC_NAMES)


def test_shifted_boxes_give_hand_computed_ap(dataset):
    # person moved by w/6: IoU = (5/6)/(7/6) = 5/7 = 0.714 -> a match at .50 .55 .60 .65 .70 (5/10)
    # car moved by w/24:  IoU = (23/24)/(25/24) = 23/25 = 0.92 -> a match at .50 ... .90 (9/10)
    # dog not moved:      IoU = 1 -> a match at all 10 thresholds.
    # Within a category every detection has the same IoU, so at each threshold either all are true
    # positives (precision 1 up to recall 1: AP_t = 1) or none are (AP_t = 0).
    # AP = (5 + 9 + 10) / 30 = 0.8; AP50 = 1; AP75 = (0 + 1 + 1) / 3 = 2/3; recall behaves alike.
    plan = plan_detections({1: 1 / 6, 3: 1 / 24})
    metrics = coco_lib.evaluate(dataset.annotations, as_results(plan))
    assert metrics["AP"] == pytest.approx(0.8, abs=1e-6)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["AR100"] == pytest.approx(0.8, abs=1e-6)


def test_dropped_boxes_give_hand_computed_recall_and_ap(dataset):
    # Both person boxes of image 7 (areas 192 small, 1920 medium) are missing; everything else is
    # exact. Person: recall 2/4 at every IoU threshold, precision 1 -> precision 1 at the 51 recall
    # points 0 ... 0.50 and 0 at the other 50: AP = 51/101. Car, dog: AP 1.
    #   AP    = (51/101 + 1 + 1) / 3
    #   AR100 = (1/2 + 1 + 1) / 3 = 5/6
    #   APs   = person small (400 found, 192 missed) 51/101, car small 1, dog has none -> mean of 2
    #   APm   = person medium (1920 missed) 0, car 1, dog 1 -> 2/3
    #   APl   = 1 (every large box is found)
    plan = plan_detections(drop={(7, 1)})
    metrics = coco_lib.evaluate(dataset.annotations, as_results(plan))
    assert metrics["AP"] == pytest.approx((51 / 101 + 2) / 3)
    assert metrics["AR100"] == pytest.approx(5 / 6)
    assert metrics["APs"] == pytest.approx((51 / 101 + 1) / 2)
    assert metrics["APm"] == pytest.approx(2 / 3)
    assert metrics["APl"] == pytest.approx(1.0)
    assert metrics.num_detections == 7


def test_image_ids_restrict_the_evaluation(dataset):
    # Only images 42 and 139 have detections; evaluated on all images, image 7's three boxes are
    # misses, evaluated on {42, 139} the detections are perfect.
    plan = {i: rows for i, rows in plan_detections().items() if i in (42, 139)}
    assert coco_lib.evaluate(dataset.annotations, as_results(plan))["AP"] < 1.0
    metrics = coco_lib.evaluate(dataset.annotations, as_results(plan), image_ids=[42, 139])
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics.num_images == 2


def test_automl_rows_array_is_accepted(dataset):
    # [image_id, x, y, w, h, score, class], the layout of automl's transform_detections
    rows = np.array([[i, *b, s, c] for i, dets in plan_detections().items() for c, b, s in dets])
    assert coco_lib.evaluate(dataset.annotations, rows)["AP"] == pytest.approx(1.0)


def test_empty_results_report_zeros_with_a_note(dataset):
    metrics = coco_lib.evaluate(dataset.annotations, [])
    assert metrics.stats == (0.0,) * 12
    assert metrics.num_detections == 0
    assert any("empty result list" in note for note in metrics.notes)


def test_unknown_categories_are_noted(dataset):
    results = as_results(plan_detections()) + [
        {"image_id": 42, "category_id": 0, "bbox": [0, 0, 5, 5], "score": 0.5}]
    metrics = coco_lib.evaluate(dataset.annotations, results)
    assert metrics["AP"] == pytest.approx(1.0)
    assert any("1 detection(s) have category ids" in note for note in metrics.notes)


def test_results_for_unknown_images_are_rejected(dataset):
    bad = [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(coco_lib.ResultsError, match="999"):
        coco_lib.evaluate(dataset.annotations, bad)
    with pytest.raises(coco_lib.ResultsError, match="lacks score"):
        coco_lib.evaluate(dataset.annotations, [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1]}])


@pytest.mark.parametrize("content, message", [
    ("not json at all", "is not JSON"),
    ("[1, 2, 3]", "top level is not an object"),
    ('{"images": [], "annotations": []}', "no 'categories' list"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1}], '
     '"annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]}', "lacks id, area, iscrowd"),
])
def test_bad_annotation_files_raise_annotations_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(coco_lib.AnnotationsError, match=message):
        coco_lib.load_annotations(path)


# ---------------------------------------------------------------------------------------------
# detections -> results, inference, resume
# ---------------------------------------------------------------------------------------------

def test_detections_to_results_converts_yxyx_and_skips_padding():
    dets = FakeDetections(
        boxes_yxyx=np.array([[[10, 20, 50, 80], [0, 0, 9, 9]], [[1, 2, 3, 4], [5, 6, 7, 8]]], np.float32),
        scores=np.array([[0.9, 0.0], [0.8, 0.7]], np.float32),
        classes=np.array([[3, 0], [1, 18]], np.float32),
        valid=np.array([1, 2]))
    per_image = coco_lib.detections_to_results(dets, [5, 6])
    assert per_image[0] == [[3, 20.0, 10.0, 60.0, 40.0, pytest.approx(0.9)]]
    assert [row[0] for row in per_image[1]] == [1, 18]
    assert per_image[1][1][1:5] == [6.0, 5.0, 2.0, 2.0]
    with pytest.raises(coco_lib.PredictionError, match="expected \\[3, K, 4\\]"):
        coco_lib.detections_to_results(dets, [5, 6, 7])
    dets.scores[1, 0] = np.nan
    with pytest.raises(coco_lib.PredictionError, match="non-finite .* image id 6"):
        coco_lib.detections_to_results(dets, [5, 6])


def test_detections_to_results_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    dets = FakeDetections(torch.tensor([[[10.0, 20.0, 50.0, 80.0]]]), torch.tensor([[0.5]]),
                          torch.tensor([[7.0]]), torch.tensor([1]))
    assert coco_lib.detections_to_results(dets, [1]) == [[[7, 20.0, 10.0, 60.0, 40.0, 0.5]]]


def test_run_inference_writes_results_that_load_in_pycocotools(dataset):
    plan = plan_detections({1: 1 / 6})
    predictor = FakePredictor(plan)
    results_path = dataset.root / "results.json"
    result = coco_lib.run_inference(predictor, dataset.images, dataset.annotations, batch_size=3,
                                    results_path=results_path, progress=False)
    assert predictor.calls == [SORTED_IDS[:3], SORTED_IDS[3:]]  # sorted by id, batches of 3
    assert result.image_ids == tuple(SORTED_IDS) and result.num_detections == 9
    assert not coco_lib.partial_path_for(results_path).exists()

    ground_truth = COCO(str(dataset.annotations))
    loaded = ground_truth.loadRes(str(results_path))  # the round trip through pycocotools
    anns = sorted(loaded.dataset["annotations"], key=lambda a: -a["score"])
    expected = sorted(as_results(plan), key=lambda d: -d["score"])
    assert len(anns) == len(expected) == 9
    for ann, want in zip(anns, expected):
        assert ann["image_id"] == want["image_id"] and ann["category_id"] == want["category_id"]
        assert ann["bbox"] == pytest.approx(want["bbox"], abs=1e-4)
        assert ann["score"] == pytest.approx(want["score"], abs=1e-6)
    assert coco_lib.evaluate(dataset.annotations, results_path)["AP"] == pytest.approx(
        coco_lib.evaluate(dataset.annotations, as_results(plan))["AP"], abs=1e-6)


def test_max_images_takes_the_lowest_ids(dataset):
    predictor = FakePredictor(plan_detections())
    result = coco_lib.run_inference(predictor, dataset.images, dataset.annotations, batch_size=8,
                                    max_images=2, results_path=dataset.root / "r.json", progress=False)
    assert result.image_ids == (7, 42) and predictor.calls == [[7, 42]]


def test_interrupted_run_resumes_and_keeps_every_image_once(dataset):
    plan = plan_detections()
    results_path = dataset.root / "results.json"
    partial = coco_lib.partial_path_for(results_path)
    crashing = FakePredictor(plan, fail_on_call=3)  # two batches of one image finish
    with pytest.raises(RuntimeError, match="simulated crash"):
        coco_lib.run_inference(crashing, dataset.images, dataset.annotations, batch_size=1,
                               results_path=results_path, progress=False, run_info={"w": "abc"})
    assert crashing.calls == [[7], [42]]
    assert partial.exists() and not results_path.exists()
    # a batch killed while being written leaves a torn last line; it must be ignored
    with partial.open("a") as handle:
        handle.write('{"image_id": 139, "dets": [[1, 2')

    resumed = FakePredictor(plan)
    result = coco_lib.run_inference(resumed, dataset.images, dataset.annotations, batch_size=1,
                                    results_path=results_path, progress=False, run_info={"w": "abc"})
    assert resumed.calls == [[139], [285]]  # only the unfinished images
    assert result.num_resumed == 2
    assert not partial.exists()
    detections = json.loads(results_path.read_text())
    per_image = {i: sum(1 for d in detections if d["image_id"] == i) for i in SORTED_IDS}
    assert per_image == {i: len(plan[i]) for i in SORTED_IDS}  # every image exactly once
    assert [d["image_id"] for d in detections] == sorted(d["image_id"] for d in detections)
    assert coco_lib.evaluate(dataset.annotations, results_path)["AP"] == pytest.approx(1.0)


def test_resume_refuses_a_partial_file_of_another_run(dataset):
    results_path = dataset.root / "results.json"
    with pytest.raises(RuntimeError):
        coco_lib.run_inference(FakePredictor(plan_detections(), fail_on_call=2), dataset.images,
                               dataset.annotations, batch_size=1, results_path=results_path,
                               progress=False, run_info={"weights_sha256": "aaa", "postprocess": "global"})
    with pytest.raises(coco_lib.ResumeError, match="differs in: weights_sha256"):
        coco_lib.run_inference(FakePredictor(plan_detections()), dataset.images, dataset.annotations,
                               batch_size=1, results_path=results_path, progress=False,
                               run_info={"weights_sha256": "bbb", "postprocess": "global"})


def test_missing_image_raises_image_error(dataset):
    (dataset.images / f"{42:012d}.png").unlink()
    with pytest.raises(coco_lib.ImageError, match="000000000042.png"):
        coco_lib.run_inference(FakePredictor(plan_detections()), dataset.images, dataset.annotations,
                               batch_size=4, results_path=dataset.root / "r.json", progress=False)


def test_load_image_converts_grayscale_to_rgb(tmp_path):
    path = tmp_path / "gray.jpg"
    Image.fromarray(np.full((6, 8), 128, np.uint8), mode="L").save(path)
    image = coco_lib.load_image(path)
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# published numbers and report
# ---------------------------------------------------------------------------------------------

def test_official_ap_table_covers_every_released_variant():
    expected = {f"efficientdet-d{i}" for i in range(8)} | {"efficientdet-d7x"} | {
        f"efficientdet-lite{i}" for i in range(5)} | {"efficientdet-lite3x"} | {
        f"efficientdet-d{i}-640" for i in range(2, 7)} | {
        f"efficientdet-d{i}-advprop" for i in range(6)}
    assert set(coco_lib.OFFICIAL_AP) == expected
    assert coco_lib.OFFICIAL_AP["efficientdet-d0"].ap == 34.3
    assert coco_lib.OFFICIAL_AP["efficientdet-d7x"].ap == 54.4
    assert coco_lib.OFFICIAL_AP["efficientdet-lite0"].ap == 26.41
    for entry in coco_lib.OFFICIAL_AP.values():
        assert entry.eval_nms in coco_lib.POSTPROCESS_MODES
        assert entry.checkpoint.startswith("https://storage.googleapis.com/cloud-tpu-checkpoints/")


def test_effective_score_thresh_follows_automl_defaults():
    assert coco_lib.effective_score_thresh({"method": "gaussian", "score_thresh": 0.0}) == 0.001
    assert coco_lib.effective_score_thresh({"method": "gaussian", "score_thresh": 0.05}) == 0.05
    assert coco_lib.effective_score_thresh({"method": "hard", "score_thresh": None}) is None


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

NMS_CONFIGS = {"method": "gaussian", "iou_thresh": None, "score_thresh": 0.0, "sigma": None,
               "pyfunc": False, "max_nms_inputs": 0, "max_output_size": 100}


@pytest.fixture()
def fake_model(monkeypatch):
    """Replace the model loader; returns the list of (weights, postprocess, device) it saw."""
    seen = []
    state = {"predictor": FakePredictor(plan_detections())}

    def load_model(weights, *, postprocess, device=None):
        seen.append((Path(weights), postprocess, device))
        return coco_lib.LoadedModel("efficientdet-d0", (512, 512), NMS_CONFIGS, state["predictor"])

    monkeypatch.setattr(coco_lib, "load_model", load_model)
    return state, seen


def _weights(root: Path) -> Path:
    path = root / "d0.safetensors"
    path.write_bytes(b"not really weights")
    return path


def _single_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_help_and_version():
    runner = CliRunner()
    for args in (["--help"], ["-h"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0 and "coco" in result.stdout
    result = runner.invoke(main, ["coco", "-h"])
    assert result.exit_code == 0
    for option in ("--weights", "--images", "--annotations", "--postprocess", "--batch-size",
                   "--max-images", "--results", "--report", "--device", "--quiet"):
        assert option in result.stdout
    assert "[default: per_class]" in " ".join(result.stdout.split())  # help text is wrapped
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("verify, version ")


def test_cli_missing_annotations_is_a_one_line_error(dataset, fake_model):
    results = dataset.root / "out.json"
    result = CliRunner().invoke(main, [
        "coco", "--weights", str(_weights(dataset.root)), "--images", str(dataset.images),
        "--annotations", str(dataset.root / "nope.json"), "--results", str(results)])
    assert result.exit_code == 3
    assert "annotation file not found" in _single_error_line(result)
    assert not results.exists() and not coco_lib.partial_path_for(results).exists()
    assert fake_model[1] == []  # the model was never loaded


def test_cli_annotations_that_are_not_coco_json(dataset, fake_model):
    bad = dataset.root / "bad.json"
    bad.write_text('{"hello": "world"}')
    result = CliRunner().invoke(main, [
        "coco", "--weights", str(_weights(dataset.root)), "--images", str(dataset.images),
        "--annotations", str(bad), "--results", str(dataset.root / "out.json")])
    assert result.exit_code == 3
    assert "not a COCO instances annotation file" in _single_error_line(result)


def test_cli_weights_that_cannot_be_loaded(dataset):
    # the real loader: whether or not the model package is importable yet, garbage bytes end in
    # ModelLoadError -> exit 3 with one line
    result = CliRunner().invoke(main, [
        "coco", "--weights", str(_weights(dataset.root)), "--images", str(dataset.images),
        "--annotations", str(dataset.annotations), "--results", str(dataset.root / "out.json"),
        "--device", "cpu", "--quiet"])
    assert result.exit_code == 3
    assert "cannot" in _single_error_line(result)


def test_cli_full_run_with_a_fake_model(dataset, fake_model):
    weights = _weights(dataset.root)
    results, report = dataset.root / "res.json", dataset.root / "report.json"
    result = CliRunner().invoke(main, [
        "coco", "--weights", str(weights), "--images", str(dataset.images),
        "--annotations", str(dataset.annotations), "--results", str(results),
        "--report", str(report), "--batch-size", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert fake_model[1] == [(weights, "per_class", None)]
    table = result.stdout.splitlines()
    ap_row = next(line for line in table if line.startswith("AP "))
    assert ap_row.split() == ["AP", "100.00", "34.30", "+65.70"]
    assert len([line for line in table if line.split()[0] in coco_lib.METRIC_NAMES]) == 12
    assert "comparison: not compared" in result.stdout

    data = json.loads(report.read_text())
    assert data["variant"] == "efficientdet-d0"
    assert data["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert data["image_size"] == [512, 512]
    assert data["postprocess"] == "per_class" and data["score_thresh"] == 0.001
    assert data["num_images"] == 4 and data["num_detections"] == 9
    assert data["metrics"]["AP"] == pytest.approx(1.0)
    assert list(data["metrics"]) == list(coco_lib.METRIC_NAMES)
    assert data["official"]["ap"] == 34.3 and data["official"]["split"] == "val2017"
    assert data["delta_ap"] == pytest.approx(65.7)
    assert data["comparison"] == "not compared"
    assert json.loads(results.read_text())  # the COCO results file is there


def test_cli_json_output_and_tolerance_verdicts(dataset, fake_model, monkeypatch):
    # pretend the 4-image file is val2017 so that the run is compared with the published AP
    monkeypatch.setattr(coco_report, "VAL2017_NUM_IMAGES", 4)
    fake_model[0]["predictor"] = FakePredictor(plan_detections({1: 1 / 6, 3: 1 / 24}))  # AP 80
    args = ["coco", "--weights", str(_weights(dataset.root)), "--images", str(dataset.images),
            "--annotations", str(dataset.annotations), "--results", str(dataset.root / "r.json"),
            "--json", "--quiet"]
    official = coco_lib.OFFICIAL_AP["efficientdet-d0"]
    monkeypatch.setitem(coco_lib.OFFICIAL_AP, "efficientdet-d0",
                        coco_lib.OfficialAP(**{**official.__dict__, "ap": 80.2}))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["comparison"] == "pass" and data["delta_ap"] == pytest.approx(-0.2)

    result = CliRunner().invoke(main, [*args, "--tolerance", "0.1"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["comparison"] == "fail"


def test_cli_interrupt_keeps_work_and_the_same_command_resumes(dataset, fake_model):
    fake_model[0]["predictor"] = FakePredictor(plan_detections(), fail_on_call=2,
                                               fail_with=KeyboardInterrupt)
    results = dataset.root / "r.json"
    args = ["coco", "--weights", str(_weights(dataset.root)), "--images", str(dataset.images),
            "--annotations", str(dataset.annotations), "--results", str(results),
            "--batch-size", "2", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130
    assert "run the same command to resume" in result.stderr
    assert coco_lib.partial_path_for(results).exists() and not results.exists()

    fake_model[0]["predictor"] = resumed = FakePredictor(plan_detections())
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert resumed.calls == [[139, 285]]
    assert json.loads(results.read_text()) and not coco_lib.partial_path_for(results).exists()


@pytest.mark.slow   # a real d0 over the fixture images + pycocotools: ~18 s under load
def test_cli_full_run_with_the_real_model(dataset):
    """No fake: a randomly initialised lite0 saved as `convert` saves it, run through
    EfficientDet.predict (automl preprocessing + per_class post-processing) and pycocotools."""
    from model import EfficientDet
    from model.weights_io import save_weights

    torch.manual_seed(0)
    model = EfficientDet.from_config("efficientdet-lite0").eval()
    weights = save_weights(dataset.root / "lite0.pth", model.state_dict(),
                           {"config": model.config.to_dict()})
    results = dataset.root / "res.json"
    result = CliRunner().invoke(main, [
        "coco", "--weights", str(weights), "--images", str(dataset.images),
        "--annotations", str(dataset.annotations), "--results", str(results),
        "--batch-size", "2", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = json.loads(results.read_text())
    assert {r["image_id"] for r in rows} == set(GROUND_TRUTH)   # every image, even the empty one
    assert len(rows) == 100 * len(GROUND_TRUTH)                  # random heads: 100 per image
    assert all(1 <= r["category_id"] <= 90 and 0.001 < r["score"] <= 1 for r in rows)
    ap_row = next(line for line in result.stdout.splitlines() if line.startswith("AP "))
    assert 0.0 <= float(ap_row.split()[1]) < 5.0                 # random weights find nothing
