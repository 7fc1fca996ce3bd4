"""Per-epoch COCO AP through the project's COCO evaluation (verify.coco)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from model import EfficientDet
from verify.coco import evaluate, run_inference


def coco_ap(model: EfficientDet, annotations: Path, image_dir: Path, batch_size: int = 8
            ) -> float:
    """COCO AP@[.5:.95] of ``model`` with automl's COCO-evaluation post-processing (per class)."""
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="effdet-train-eval-") as folder:
            results = Path(folder) / "results.json"
            run = run_inference(lambda images: model.predict(images, postprocess="per_class"),
                                image_dir, annotations, batch_size=batch_size,
                                results_path=results, progress=False)
            return evaluate(annotations, results, run.image_ids).stats[0]
    finally:
        model.train(was_training)
