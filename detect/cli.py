"""``detect``: converted weights on images -> pictures with boxes, names and scores + one JSON.

Exit codes: 0 ok, 2 usage, 3 missing or unreadable weights, labels or image, 6 an output
exists (without --force) or cannot be written, 130 interrupted.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from verify.cli_utils import (CONTEXT_SETTINGS, EXIT_INTERRUPTED, device_option,
                              fail, package_version, resolve_device)

from .inputs import expand_inputs, output_names

EXIT_OUTPUT = 6
REPORT_NAME = "detections.json"


def _check_outputs(out: Path, names: list[str], force: bool) -> None:
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a folder", EXIT_OUTPUT)
    existing = [name for name in [*names, REPORT_NAME] if (out / name).exists()]
    if existing and not force:
        fail(f"{out / existing[0]} exists ({len(existing)} outputs in all); pass --force to "
             f"overwrite", EXIT_OUTPUT)


def _label_map(model: Any, labels: Path | None) -> dict[int, str]:
    from model.labels import read_labels
    if labels is None:
        return model.label_map
    try:
        return read_labels(labels, model.config.num_classes)
    except ValueError as error:
        fail(f"--labels: {error}")


def _image_record(path: Path, output: Path | None, pixels: Any, dets: Any, row: int,
                  score: float, label_map: dict[int, str]) -> dict[str, Any]:
    from model.labels import class_name
    count = int(dets.valid[row])
    detections = []
    for box, det_score, class_id in zip(dets.boxes_yxyx[row, :count].tolist(),
                                        dets.scores[row, :count].tolist(),
                                        dets.classes[row, :count].tolist()):
        if det_score < score:
            continue
        ymin, xmin, ymax, xmax = box
        detections.append({"class_id": int(class_id), "class_name": class_name(label_map, class_id),
                           "score": round(det_score, 5),
                           "box_xyxy": [round(v, 2) for v in (xmin, ymin, xmax, ymax)]})
    return {"image": str(path), "output": None if output is None else str(output),
            "height": int(pixels.shape[0]), "width": int(pixels.shape[1]),
            "detections": detections}


def _save_picture(pixels: Any, record: dict[str, Any], path: Path) -> None:
    from model.weights_io import atomic_path
    from .draw import draw_detections
    dets = record["detections"]
    picture = draw_detections(pixels, [d["box_xyxy"] for d in dets], [d["class_id"] for d in dets],
                              [f"{d['class_name']} {d['score']:.2f}" for d in dets])
    with atomic_path(path) as tmp_name:
        fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix[1:].upper()
        picture.save(tmp_name, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--weights", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Converted weights (.pth or .safetensors) from `convert` or save_pretrained.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("detections"),
              help="Folder for the drawn images and detections.json (created if missing).")
@click.option("--score", type=click.FloatRange(0.0, 1.0), default=0.4,
              help="Keep detections scoring at least this.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              show_default="names stored in the weights, else COCO for 90 classes",
              help="Class names: a text file with one name per line (line 1 = class 1), "
                   "'id: name' lines, or a JSON {id: name} / list.")
@click.option("--postprocess", type=click.Choice(["global", "per_class", "pyfunc"]),
              default="global", help="automl's post-processing path (global = its inference).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, help="Images per model call.")
@device_option
@click.option("--no-draw", is_flag=True, help="Write only detections.json, no pictures.")
@click.option("--force", is_flag=True, help="Overwrite outputs that exist in --out.")
@click.option("--json", "as_json", is_flag=True,
              help="Also print the detections JSON on stdout (instead of the output folder).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar on stderr.")
@click.version_option(package_version(), "--version", prog_name="detect")
def main(images: tuple[str, ...], weights: Path, out: Path, score: float, labels: Path | None,
         postprocess: str, batch_size: int, device: str, no_draw: bool, force: bool,
         as_json: bool, quiet: bool) -> None:
    """Detect objects in images with converted weights; draw them and write one JSON.

    IMAGE is a JPEG/PNG/... file (16-bit and alpha PNGs included), a folder (searched
    recursively) or a glob pattern such as 'photos/**/*.jpg'. Each picture is written to
    --out under its own name with boxes, class names and scores drawn; detections.json lists
    every detection: class id and name, score, box [xmin, ymin, xmax, ymax] in image pixels
    (clipped to the image).

    \b
    Examples:
      detect --weights d0.pth photo.jpg
      detect --weights mine.safetensors --labels names.txt --score 0.3 --out out/ 'shots/*.png'

    \b
    Exit codes: 0 ok, 2 usage, 3 missing or unreadable weights, labels or image,
    6 an output exists (without --force) or cannot be written, 130 interrupted.
    """
    try:
        paths = expand_inputs(images)
    except FileNotFoundError as error:
        fail(str(error))
    names = output_names(paths)
    _check_outputs(out, [] if no_draw else names, force)

    from PIL import Image, UnidentifiedImageError
    for path in paths:                       # headers only: a bad file fails before the model
        try:
            with Image.open(path):
                pass
        except (OSError, UnidentifiedImageError) as error:
            fail(f"{path}: not a readable image ({error})")

    import torch
    from model import EfficientDet
    from model.preprocess import load_image
    from model.weights_io import atomic_path
    try:
        model = EfficientDet.from_pretrained(weights).to(resolve_device(device))
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        fail(f"--weights: {error}")
    label_map = _label_map(model, labels)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"cannot create --out {out}: {error.strerror or error}", EXIT_OUTPUT)

    records: list[dict[str, Any]] = []
    try:
        with click.progressbar(length=len(paths), label="detecting", file=sys.stderr,
                               hidden=quiet or len(paths) < 2) as bar:
            for start in range(0, len(paths), batch_size):
                batch = paths[start:start + batch_size]
                try:
                    pixels = [load_image(path) for path in batch]
                except (OSError, ValueError) as error:
                    fail(f"cannot decode image: {error}")
                with torch.inference_mode():
                    dets = model.predict(pixels, postprocess=postprocess, batch_size=batch_size,
                                         clip_boxes=True)
                for row, (path, image) in enumerate(zip(batch, pixels)):
                    target = None if no_draw else out / names[start + row]
                    record = _image_record(path, target, image, dets, row, score, label_map)
                    if target is not None:
                        try:
                            _save_picture(image, record, target)
                        except OSError as error:
                            fail(f"cannot write {target}: {error.strerror or error}", EXIT_OUTPUT)
                    records.append(record)
                bar.update(len(batch))
    except KeyboardInterrupt:
        fail(f"interrupted after {len(records)} of {len(paths)} images; detections.json not "
             f"written", EXIT_INTERRUPTED)
    report = {"weights": str(weights), "variant": model.config.name,
              "num_classes": model.config.num_classes, "score_threshold": score,
              "postprocess": postprocess, "box_format": "xyxy pixels, clipped to the image",
              "images": records}
    text = json.dumps(report, indent=1)
    try:
        with atomic_path(out / REPORT_NAME) as tmp_name:
            Path(tmp_name).write_text(text + "\n", encoding="utf-8")
    except OSError as error:
        fail(f"cannot write {out / REPORT_NAME}: {error.strerror or error}", EXIT_OUTPUT)
    total = sum(len(r["detections"]) for r in records)
    if not quiet:
        click.echo(f"{total} detections in {len(records)} images -> {out}", err=True)
    click.echo(text if as_json else str(out / REPORT_NAME))


if __name__ == "__main__":
    main()
