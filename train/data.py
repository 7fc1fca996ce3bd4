"""COCO-format training data through automl's training input pipeline.

Per image, in automl's order (``dataloader.py::InputReader.dataset_parser`` @ 6a54c87, training):
drop crowd boxes (``skip_crowd_during_training``) -> normalise ``(x - mean_rgb) / stddev_rgb`` ->
horizontal flip with probability 1/2 -> resize by a random factor in ``[jitter_min, jitter_max]``
of the output size (keeping aspect, TF bilinear) -> random crop to the output size, zero padding
at the bottom/right -> boxes scaled, shifted, clipped to ``[0, size - 1]``, empty ones dropped ->
:class:`~model.anchor_labeler.AnchorLabeler` targets.

Classes are the annotations' ``category_id`` as automl's ``create_coco_tfrecord.py`` writes them
(1-based class numbers; class ``c`` is channel ``c - 1`` of the class head). The random draws of
an image depend only on ``(seed, epoch, index)``, so a resumed or multi-process run sees the same
augmentations as an uninterrupted single-process one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model.anchor_labeler import AnchorLabeler
from model.anchors import anchor_boxes_yxyx
from model.config import DetConfig
from model.preprocess import load_image, normalize, resize_bilinear_tf
from verify.coco.data import load_annotations
from verify.coco.errors import AnnotationsError

from .config import TrainConfig
from .errors import TrainInputError


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    boxes_yxyx: np.ndarray    # [N, 4] float32 in image pixels
    classes: np.ndarray       # [N] float32, 1-based


def read_records(annotations: Path, image_dir: Path, num_classes: int,
                 skip_crowd: bool = True) -> list[ImageRecord]:
    """The training images of a COCO instances file, sorted by image id."""
    coco = load_annotations(annotations)
    records = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        anns = [a for a in coco.imgToAnns.get(image_id, []) if not (skip_crowd and a["iscrowd"])]
        boxes = np.array([[y, x, y + h, x + w] for x, y, w, h in (a["bbox"] for a in anns)],
                         dtype=np.float32).reshape(-1, 4)
        classes = np.array([a["category_id"] for a in anns], dtype=np.float32)
        bad = classes[(classes < 1) | (classes > num_classes)]
        if bad.size:
            raise AnnotationsError(f"{annotations}: category_id {int(bad[0])} outside 1..{num_classes} "
                                   f"(num_classes of the model; set --num-classes)")
        path = image_dir / info["file_name"]
        if not path.is_file():
            raise TrainInputError(f"image {path} (id {image_id}) not found")
        records.append(ImageRecord(path, boxes, classes))
    if not records:
        raise AnnotationsError(f"{annotations}: no images")
    return records


# Port of automl efficientdet/dataloader.py::InputProcessor.set_training_random_scale_factors,
# resize_and_crop_image and DetectionInputProcessor.resize_and_crop_boxes @ 6a54c87
def jitter_resize_crop(image: Tensor, boxes_norm: np.ndarray, output_hw: tuple[int, int],
                       scale_factor: float, offset_draws: tuple[float, float]
                       ) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """Scale ``image [3, h, w]`` so it fits ``scale_factor * output_hw``, crop a window of
    ``output_hw`` at ``offset_draws`` (uniform [0, 1) fractions of the slack) and zero-pad.

    Returns the image, the boxes ``[N, 4]`` in output pixels (clipped, empty ones dropped) and the
    indices of the boxes kept.
    """
    out_h, out_w = output_hw
    factor = np.float32(scale_factor)
    scaled_y, scaled_x = int(factor * np.float32(out_h)), int(factor * np.float32(out_w))
    height, width = np.float32(image.shape[1]), np.float32(image.shape[2])
    image_scale = min(np.float32(scaled_y) / height, np.float32(scaled_x) / width)
    scaled_h, scaled_w = max(int(height * image_scale), 1), max(int(width * image_scale), 1)
    offset_y = int(np.float32(max(0, scaled_h - out_h)) * np.float32(offset_draws[0]))
    offset_x = int(np.float32(max(0, scaled_w - out_w)) * np.float32(offset_draws[1]))
    resized = resize_bilinear_tf(image, (scaled_h, scaled_w))
    crop = resized[:, offset_y:offset_y + out_h, offset_x:offset_x + out_w]
    out = image.new_zeros((image.shape[0], out_h, out_w))
    out[:, :crop.shape[1], :crop.shape[2]] = crop
    scale = np.array([scaled_h, scaled_w, scaled_h, scaled_w], dtype=np.float32)
    offset = np.array([offset_y, offset_x, offset_y, offset_x], dtype=np.float32)
    boxes = boxes_norm * scale - offset
    limit = np.array([out_h - 1, out_w - 1, out_h - 1, out_w - 1], dtype=np.float32)
    boxes = np.clip(boxes, 0, limit)
    keep = np.nonzero((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) != 0)[0]
    return out, boxes[keep], keep


class CocoTrainSet(torch.utils.data.Dataset):
    """Training samples ``(image [3, H, W], cls_targets [A], box_targets [A, 4], num_positives)``."""

    def __init__(self, records: list[ImageRecord], det_config: DetConfig,
                 train_config: TrainConfig, seed: int = 0):
        self.records = records
        self.det_config = det_config
        self.train_config = train_config
        self.seed = seed
        self.epoch = 0
        self.labeler = AnchorLabeler(torch.from_numpy(anchor_boxes_yxyx(det_config)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        record = self.records[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        try:
            pixels = load_image(record.path)
        except OSError as error:   # includes PIL's UnidentifiedImageError
            raise TrainInputError(f"cannot read image {record.path}: {error}") from None
        height, width = pixels.shape[:2]
        boxes = record.boxes_yxyx / np.array([height, width, height, width], dtype=np.float32)
        image = torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32)
        image = normalize(image, self.det_config.mean_rgb, self.det_config.stddev_rgb)
        config = self.train_config
        if config.input_rand_hflip and rng.uniform() > 0.5:
            image = image.flip(-1)
            boxes = np.stack([boxes[:, 0], 1 - boxes[:, 3], boxes[:, 2], 1 - boxes[:, 1]], 1)
        image, boxes, keep = jitter_resize_crop(
            image, boxes, self.det_config.image_size,
            rng.uniform(config.jitter_min, config.jitter_max), (rng.uniform(), rng.uniform()))
        targets = self.labeler.label_anchors(torch.from_numpy(boxes),
                                             torch.from_numpy(record.classes[keep]))
        return image, targets.cls_targets, targets.box_targets, targets.num_positives
