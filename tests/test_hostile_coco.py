"""verify coco partial results: keyed by the annotation file and the image list, validated line
by line, and locked so two runs sharing --results do not corrupt each other."""
from __future__ import annotations

import json
import threading

import pytest

from test_coco_eval import FakePredictor, dataset, plan_detections  # noqa: F401 - fixture
from verify import coco as coco_lib


def _crash_after_one_batch(dataset, results_path, **kwargs) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        coco_lib.run_inference(FakePredictor(plan_detections(), fail_on_call=2), dataset.images,
                               dataset.annotations, batch_size=1, results_path=results_path,
                               progress=False, **kwargs)
    assert coco_lib.partial_path_for(results_path).exists()


def _run(dataset, results_path, annotations=None, **kwargs):
    return coco_lib.run_inference(FakePredictor(plan_detections()), dataset.images,
                                  annotations or dataset.annotations, batch_size=1,
                                  results_path=results_path, progress=False, **kwargs)


def test_partial_of_other_annotations_is_refused(dataset):
    results_path = dataset.root / "r.json"
    _crash_after_one_batch(dataset, results_path)
    other = json.loads(dataset.annotations.read_text())
    other["annotations"][0]["bbox"] = [0, 0, 1, 1]  # same images, other ground truth
    changed = dataset.root / "other.json"
    changed.write_text(json.dumps(other))
    with pytest.raises(coco_lib.ResumeError, match="differs in: annotations_sha256"):
        _run(dataset, results_path, changed)


def test_partial_of_another_image_list_is_refused(dataset):
    results_path = dataset.root / "r.json"
    _crash_after_one_batch(dataset, results_path, max_images=3)
    with pytest.raises(coco_lib.ResumeError, match="differs in: images_sha256"):
        _run(dataset, results_path)
    assert _run(dataset, results_path, max_images=3).num_resumed == 1  # the same list resumes


@pytest.mark.parametrize("line", [
    '{"image_id": "7", "dets": []}',
    '{"image_id": 7, "dets": [[1, 2, 3]]}',
    '{"image_id": 7, "dets": [["1", 2, 3, 4, 5, 0.5]]}',
    '{"image_id": 7, "dets": [[1, 2, 3, 4, 5, NaN]]}',
    '[7]',
    'null',
])
def test_malformed_partial_lines_are_refused(dataset, line):
    results_path = dataset.root / "r.json"
    _crash_after_one_batch(dataset, results_path)
    partial = coco_lib.partial_path_for(results_path)
    lines = partial.read_text().splitlines(keepends=True)
    partial.write_text(lines[0] + line + "\n" + "".join(lines[1:]))
    with pytest.raises(coco_lib.ResumeError, match="line 2 is corrupt"):
        _run(dataset, results_path)


def test_partial_that_is_not_text_is_refused(dataset):
    results_path = dataset.root / "r.json"
    coco_lib.partial_path_for(results_path).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(coco_lib.ResumeError, match="cannot read"):
        _run(dataset, results_path)


def test_two_runs_sharing_results_do_not_corrupt_each_other(dataset):
    results_path = dataset.root / "r.json"
    started, release = threading.Event(), threading.Event()

    class Slow(FakePredictor):
        def __call__(self, images):
            started.set()
            release.wait(30)
            return super().__call__(images)

    outcome: list[object] = []
    first = threading.Thread(target=lambda: outcome.append(coco_lib.run_inference(
        Slow(plan_detections()), dataset.images, dataset.annotations, batch_size=1,
        results_path=results_path, progress=False)))
    first.start()
    assert started.wait(30)
    with pytest.raises(coco_lib.ResumeError, match="another run is writing"):
        _run(dataset, results_path)
    release.set()
    first.join(30)
    assert len(outcome) == 1 and outcome[0].num_detections == sum(
        len(rows) for rows in plan_detections().values())
    assert coco_lib.evaluate(dataset.annotations, results_path)["AP"] == pytest.approx(1.0)
    assert not list(dataset.root.glob("*.lock"))


@pytest.mark.parametrize("results", ["/proc/self/r.json", "x" * 300 + ".json"])
def test_cli_checks_the_results_destination_first(dataset, results):
    from hostile_helpers import assert_refused, invoke
    from verify.cli import main

    weights = dataset.root / "w.pth"
    weights.write_bytes(b"not loaded: the destination is refused first")
    target = results if results.startswith("/") else dataset.root / results
    result = invoke(main, "coco", "--weights", weights, "--images", dataset.images,
                    "--annotations", dataset.annotations, "--results", target)
    assert_refused(result, 3)
