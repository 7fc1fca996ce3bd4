"""``detect`` (detect/): inputs, drawn pictures, detections.json, labels and exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from detect.cli import main
from detect.draw import class_colour, draw_detections
from detect.inputs import expand_inputs, output_names
from model.efficientdet import EfficientDet

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = EfficientDet.from_config("efficientdet-lite0", image_size=128, num_classes=3)
    return model.save_pretrained(tmp_path_factory.mktemp("w") / "tiny.safetensors",
                                 labels=["cat", "dog", "bird"])


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a.jpg")
    Image.fromarray(np.concatenate([rgb, np.full((50, 70, 1), 9, np.uint8)], 2), "RGBA") \
        .save(folder / "sub" / "b.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "sub" / "grey16.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_folder_writes_pictures_and_one_json(weights, photos, tmp_path):
    out = tmp_path / "out"
    result = _run("--weights", weights, photos, "--out", out, "--score", "0", "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "b.png", "detections.json",
                                                     "grey16.png"]
    assert json.loads((out / "detections.json").read_text()) == report
    assert [Path(r["image"]).name for r in report["images"]] == ["a.jpg", "b.png", "grey16.png"]
    for record in report["images"]:
        assert (record["height"], record["width"]) == (50, 70)
        assert record["detections"], "score 0 keeps every detection"
        for det in record["detections"]:
            assert det["class_name"] == ["cat", "dog", "bird"][det["class_id"] - 1]
            xmin, ymin, xmax, ymax = det["box_xyxy"]
            assert 0 <= xmin <= xmax <= 70 and 0 <= ymin <= ymax <= 50
        assert Image.open(record["output"]).size == (70, 50)


def test_score_labels_glob_and_no_draw(weights, photos, tmp_path):
    labels = tmp_path / "names.txt"
    labels.write_text("# mine\nred\ngreen\nblue\n")
    out = tmp_path / "out"
    result = _run("--weights", weights, str(photos / "**" / "*.png"), "--out", out,
                  "--score", "0.05", "--labels", labels, "--no-draw", "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["detections.json"]
    dets = [d for r in report["images"] for d in r["detections"]]
    assert all(d["score"] >= 0.05 for d in dets)
    assert {d["class_name"] for d in dets} <= {"red", "green", "blue"}


def test_existing_output_needs_force(weights, photos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.jpg").write_bytes(b"mine")
    result = _run("--weights", weights, photos / "a.jpg", "--out", out)
    assert result.exit_code == 6 and "pass --force" in result.output
    assert (out / "a.jpg").read_bytes() == b"mine" and not (out / "detections.json").exists()
    assert _run("--weights", weights, photos / "a.jpg", "--out", out, "--force", "-q") \
        .exit_code == 0
    assert (out / "a.jpg").read_bytes() != b"mine"


@pytest.mark.parametrize("make_args, code, message", [
    (lambda p, w: ["--weights", w, p / "missing.jpg"], 3, "missing.jpg: no such file"),
    (lambda p, w: ["--weights", w, p / "notes.txt"], 3, "not a readable image"),
    (lambda p, w: ["--weights", p / "a.jpg", p / "a.jpg"], 3, "--weights"),
    (lambda p, w: ["--weights", w, p / "a.jpg", "--score", "2"], 2, "--score"),
    (lambda p, w: ["--weights", w, p / "a.jpg", "--device", "tpu"], 2, "--device"),
])
def test_bad_input_is_one_line_and_an_exit_code(weights, photos, tmp_path, make_args, code,
                                                message):
    out = tmp_path / "out"
    result = _run(*make_args(photos, weights), "--out", out)
    assert result.exit_code == code and message in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_bad_labels_file(weights, photos, tmp_path):
    labels = tmp_path / "names.json"
    labels.write_text('{"7": "x"}')
    result = _run("--weights", weights, photos / "a.jpg", "--labels", labels,
                  "--out", tmp_path / "out")
    assert result.exit_code == 3 and "label id '7' is outside 1..3" in result.output


def test_inputs_expand_once_in_order_and_names_stay_distinct(photos):
    found = expand_inputs([str(photos / "a.jpg"), str(photos)])
    assert [p.name for p in found] == ["a.jpg", "b.png", "grey16.png"]
    assert output_names([Path("x/img.jpg"), Path("y/img.jpg"), Path("z/img.tif")]) == \
        ["img.jpg", "img-2.jpg", "img.png"]


def test_drawing_scales_with_the_image():
    pixels = np.zeros((1080, 1920, 3), np.uint8)
    picture = np.asarray(draw_detections(pixels, [[100, 300, 900, 800]], [1], ["cat 0.90"]))
    colour = class_colour(1)
    assert all(tuple(picture[600, 100 + dx]) == colour for dx in range(6))   # >= 6 px line
    label = picture[300 - 60:300, 100:300]
    assert (label == colour).all(-1).any() and (label == 255).all(-1).any()   # filled, white text
