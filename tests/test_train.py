"""The training entry point on a tiny synthetic dataset (coloured rectangles), lite0 at 64 px."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from model import EfficientDet
from model.config import get_config
from model.preprocess import resize_and_pad
from model.weights_io import load_weights, save_weights
from train.cli import main
from train.config import TrainConfig
from train.data import jitter_resize_crop
from train.evaluate import coco_ap
from train.loop import build_model, fine_tune
from train.step import select_parameters

COLOURS = {1: (220, 30, 30), 2: (30, 200, 30), 3: (30, 30, 220)}
VARIANT = "efficientdet-lite0"


def write_coco(folder: Path, pictures: list, categories: list[int]) -> Path:
    """Saves each picture ``(pixels [H, W, 3] uint8, boxes [(class, x, y, w, h)])`` as
    ``folder/images/<index>.png`` with its boxes painted in their class colours, and their COCO
    annotation file; returns the file."""
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for index, (pixels, boxes) in enumerate(pictures):
        for cls, x, y, box_w, box_h in boxes:
            pixels[y:y + box_h, x:x + box_w] = COLOURS[cls]
            annotations.append(dict(id=len(annotations) + 1, image_id=index + 1, category_id=cls,
                                    bbox=[x, y, box_w, box_h], area=box_w * box_h, iscrowd=0))
        Image.fromarray(pixels).save(folder / "images" / f"{index}.png")
        height, width = pixels.shape[:2]
        images.append(dict(id=index + 1, file_name=f"{index}.png", height=height, width=width))
    path = folder / "annotations.json"
    path.write_text(json.dumps(dict(images=images, annotations=annotations,
                                    categories=[dict(id=c, name=str(c)) for c in categories])))
    return path


def make_dataset(folder: Path, count: int, seed: int = 0, size_hw=(48, 64)) -> Path:
    """``count`` noisy grey images with one or two rectangles of a class colour; returns the
    COCO annotation file (images under ``folder/images``)."""
    rng = np.random.default_rng(seed)
    height, width = size_hw
    pictures = []
    for _ in range(count):
        pixels = (110 + rng.integers(0, 20, (height, width, 3))).astype(np.uint8)
        boxes = []
        for _ in range(rng.integers(1, 3)):
            cls = int(rng.integers(1, 4))
            box_h, box_w = rng.integers(height // 4, height // 2), rng.integers(width // 4, width // 2)
            y, x = rng.integers(0, height - box_h), rng.integers(0, width - box_w)
            boxes.append((cls, int(x), int(y), int(box_w), int(box_h)))
        pictures.append((pixels, boxes))
    return write_coco(folder, pictures, list(COLOURS))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synthetic"), 8)


def test_jitter_at_scale_one_is_the_inference_resize():
    image = torch.rand(3, 30, 50) * 255
    boxes = np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 0.0, 0.3]], dtype=np.float32)
    out, kept, keep = jitter_resize_crop(image, boxes, (64, 64), 1.0, (0.7, 0.7))
    expected, _ = resize_and_pad(image, (64, 64), 0.0, 1.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # 50 -> 64 wide, 30 -> 38 high; the empty second box is dropped.
    assert keep.tolist() == [0]
    np.testing.assert_allclose(kept, [[3.8, 12.8, 19.0, 38.4]], rtol=1e-6)


def test_jitter_crops_at_the_drawn_offset_and_clips_boxes():
    image = torch.arange(20 * 20, dtype=torch.float32).reshape(1, 20, 20)
    boxes = np.array([[0.5, 0.5, 0.9, 0.9], [0.0, 0.0, 0.1, 0.1]], dtype=np.float32)
    # Factor 2 of a 10x10 output: the image stays 20x20; slack 10, drawn 0.55 -> offset 5.
    out, kept, keep = jitter_resize_crop(image, boxes, (10, 10), 2.0, (0.55, 0.0))
    torch.testing.assert_close(out, image[:, 5:15, 0:10])
    # Box 1: y 10..18 -> 5..13 clipped to 9; x 10..18 clipped to 9: zero width, dropped.
    # Box 2: y 0..2 -> -5..-3 clipped to 0: zero height, dropped.
    assert keep.tolist() == [] and kept.shape == (0, 4)


def test_freezing_matches_tf_names_and_decay_takes_kernels_only():
    model = EfficientDet(get_config("efficientdet-d0", image_size=64, num_classes=3))
    trained, decayed = select_parameters(model, r"(efficientnet|fpn_cells)")
    trained_names = {name for name, _ in trained}
    assert trained_names and not any(n.startswith(("backbone.", "fpn_cells.")) for n in trained_names)
    assert any(n.startswith("class_net.") for n in trained_names)
    assert not model.backbone.stem.conv2d.weight.requires_grad
    decayed_names = {name for name, _ in decayed}
    assert decayed_names <= trained_names
    # Conv kernels only: no BN gamma/beta, no biases, no fusion weights.
    assert all(p.ndim == 4 for _, p in decayed)
    assert "class_net.class_predict.pointwise.bias" not in decayed_names
    all_trained, all_decayed = select_parameters(model, None)
    assert any(".WSM" in n for n, _ in all_trained)
    assert not any(".WSM" in n for n, _ in all_decayed)


def _run(out: Path, dataset: Path, config: TrainConfig, **kwargs):
    return fine_tune(dataset, dataset.parent / "images", out, variant=VARIANT, num_classes=3,
                     image_size=64, config=config, log_every=100, **kwargs)


def make_block_dataset(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` plain grey ``size`` x ``size`` images, each with one large solid rectangle of
    class 1 and 2 in turn: a set small enough to learn by heart. Returns the annotation file."""
    rng = np.random.default_rng(seed)
    pictures = []
    for index in range(count):
        box_h, box_w = rng.integers(size // 3, 2 * size // 3, 2)
        y, x = rng.integers(0, size - box_h), rng.integers(0, size - box_w)
        pictures.append((np.full((size, size, 3), 128, dtype=np.uint8),
                         [(1 + index % 2, int(x), int(y), int(box_w), int(box_h))]))
    return write_coco(folder, pictures, [1, 2])


@pytest.mark.slow
def test_short_fine_tune_lowers_the_loss_and_raises_coco_ap(tmp_path, single_thread):
    """150 steps from random weights overfit four images: COCO AP on them goes from ~0 to > 0.3.

    The steps are many for so few images because BN's moving statistics (Keras momentum 0.99,
    as automl) must catch up with the trained weights before the eval-mode model detects well:
    the loss is flat from about step 80 on while AP still climbs (0.49 at step 150 here; 0.40 to
    0.57 for other seeds and colours).
    """
    annotations = make_block_dataset(tmp_path / "data", 4, 64)
    images = annotations.parent / "images"
    torch.manual_seed(0)
    start = build_model(None, VARIANT, 2, 64)
    start_weights = save_weights(tmp_path / "start.pth", start.state_dict(),
                                 {"variant": VARIANT, "config": start.config.to_dict()})
    ap_before = coco_ap(start, annotations, images)
    config = TrainConfig(batch_size=2, num_epochs=75, learning_rate=4.0, jitter_min=1.0,
                         jitter_max=1.0, input_rand_hflip=False, map_freq=75)
    result = fine_tune(annotations, images, tmp_path / "run", weights=start_weights,
                       config=config, val_annotations=annotations, log_every=1000)
    losses = [record.loss for record in result.history]
    assert len(losses) == 75 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5]), losses
    ap_after = result.history[-1].ap
    assert ap_before < 0.05 and ap_after > 0.3, (ap_before, ap_after)
    # model.pth is the model that was evaluated.
    tuned = EfficientDet.from_pretrained(result.weights)
    assert tuned.config.num_classes == 2 and tuned.config.image_size == (64, 64)
    assert coco_ap(tuned, annotations, images) == pytest.approx(ap_after, abs=1e-9)


@pytest.mark.slow
def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(tmp_path, dataset,
                                                                       single_thread):
    config = TrainConfig(batch_size=4, num_epochs=3, learning_rate=1.0)
    whole = _run(tmp_path / "whole", dataset, config)
    first = _run(tmp_path / "split", dataset, config, stop_after_epochs=1)
    assert [r.epoch for r in first.history] == [1]
    resumed = _run(tmp_path / "split", dataset, config)
    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    expected, _ = load_weights(whole.weights)
    actual, metadata = load_weights(resumed.weights)
    assert metadata["source"]["step"] == 6
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=0, msg=key)
    # Another config in the same folder is refused rather than mixed in.
    with pytest.raises(Exception, match="other training settings.*learning_rate"):
        _run(tmp_path / "split", dataset, config.replace(learning_rate=0.5))


def test_cli_rejects_bad_usage_and_foreign_classes(tmp_path, dataset):
    runner = CliRunner()
    base = ["--train-annotations", str(dataset), "--train-images", str(dataset.parent / "images"),
            "--out", str(tmp_path / "run")]
    both = runner.invoke(main, base + ["--variant", VARIANT, "--weights", str(dataset)])
    assert both.exit_code == 2 and "exactly one of --weights and --variant" in both.output
    bad_set = runner.invoke(main, base + ["--variant", VARIANT, "--set", "nonsense=1"])
    assert bad_set.exit_code == 2 and "NAME=VALUE" in bad_set.output
    bad_regex = runner.invoke(main, base + ["--variant", VARIANT, "--var-freeze-expr", "("])
    assert bad_regex.exit_code == 2 and "var_freeze_expr" in bad_regex.output
    too_few = runner.invoke(main, base + ["--variant", VARIANT, "--num-classes", "2",
                                          "--image-size", "64"])
    assert too_few.exit_code == 3 and "category_id 3 outside 1..2" in too_few.output
    broken = tmp_path / "broken"
    make_dataset(broken, 2)
    (broken / "images" / "1.png").unlink()
    missing = runner.invoke(main, ["--train-annotations", str(broken / "annotations.json"),
                                   "--train-images", str(broken / "images"), "--out",
                                   str(tmp_path / "run"), "--variant", VARIANT, "--image-size",
                                   "64", "--num-classes", "3"])
    assert missing.exit_code == 3 and "1.png (id 2) not found" in missing.output
    assert not (tmp_path / "run").exists()


def test_build_model_replaces_the_head_for_other_classes(tmp_path):
    model = build_model(None, VARIANT, 4, 64)
    assert model.config.num_classes == 4
    with pytest.raises(Exception, match="unknown variant"):
        build_model(None, "efficientdet-d99", 4, 64)


@pytest.mark.slow
def test_two_gloo_processes_under_torchrun(tmp_path, dataset):
    import os
    import subprocess
    import sys
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "train", "--variant", VARIANT, "--num-classes", "3",
               "--image-size", "64", "--train-annotations", str(dataset),
               "--train-images", str(dataset.parent / "images"), "--out", str(out),
               "--batch-size", "4", "--num-epochs", "2", "--device", "cpu", "-q"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [str(out / "model.pth")]        # rank 0 alone prints
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2 and state["step"] == 4             # 8 images / batch 4, 2 epochs
    assert EfficientDet.from_pretrained(out / "model.pth").config.num_classes == 3
