"""``verify coco``: COCO bbox mAP of converted weights, next to automl's published AP.

Exit codes: 0 done (and within tolerance when compared), 1 AP outside the tolerance of a
comparable run, 2 usage error, 3 missing or corrupt input (annotations, images, weights),
130 interrupted (finished batches are kept; the same command resumes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from converter.archive import sha256_file
from converter.cache import default_cache_dir
from verify import coco as coco_lib
from verify.cli_utils import (
    CONTEXT_SETTINGS,
    EXIT_FAILURE,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    device_option,
    fail,
    library_errors,
    package_version,
    setup_logging,
)

logger = logging.getLogger(__name__)


def default_results_path(weights: Path, postprocess: str) -> Path:
    """``<cache>/coco-results/<weights stem>.<postprocess>.coco_results.json``; the cache is
    ``$EFFDET_CACHE`` or ``~/.cache/effdet-tf-port`` (created on use), never the current folder."""
    return default_cache_dir() / "coco-results" / f"{weights.stem}.{postprocess}.coco_results.json"


@click.command("coco", context_settings=CONTEXT_SETTINGS,
               short_help="COCO bbox mAP of converted weights beside automl's published AP.")
@click.option("--weights", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Converted weights (.pth or .safetensors) written by `convert`.")
@click.option("--images", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory with the images the annotation file names (e.g. val2017/).")
@click.option("--annotations", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="COCO instances JSON (e.g. annotations/instances_val2017.json).")
@click.option("--postprocess", type=click.Choice(coco_lib.POSTPROCESS_MODES), default="per_class",
              help="Detection post-processing: per_class = automl's COCO-eval default (TF "
                   "per-class soft-NMS), global = automl's inference default, pyfunc = automl's "
                   "numpy soft-NMS.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8,
              help="Images per model call.")
@click.option("--max-images", type=click.IntRange(min=1), default=None, show_default="all",
              help="Use only the first N images by id (a subset is not compared with the "
                   "published AP).")
@click.option("--results", "results_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              show_default="$EFFDET_CACHE or ~/.cache/effdet-tf-port, then "
                           "coco-results/<weights stem>.<postprocess>.coco_results.json",
              help="COCO results JSON to write; an interrupted run leaves "
                   "<results>.partial.jsonl and the same command resumes from it.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the JSON report to this file.")
@click.version_option(package_version(), "--version", prog_name="verify coco")
@device_option
@click.option("--tolerance", type=click.FloatRange(min=0.0), default=coco_lib.DEFAULT_TOLERANCE_AP,
              help="Allowed |AP - published AP| in AP points for a full val2017 run.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the JSON report on stdout instead of the table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or info messages on stderr.")
@click.pass_context
def coco(ctx: click.Context, weights: Path, images: Path, annotations: Path, postprocess: str,
         batch_size: int, max_images: int | None, results_path: Path | None,
         report_path: Path | None, device: str, tolerance: float, as_json: bool,
         quiet: bool) -> None:
    """Run the model over COCO images and report bbox mAP beside automl's published AP.

    Prints the 12 COCO metrics (or the JSON report with --json) on stdout; progress and
    notes go to stderr.
    """
    setup_logging(quiet)
    if not weights.is_file():
        fail(f"weights file not found: {weights}")
    if not images.is_dir():
        fail(f"image directory not found: {images}")
    if not annotations.is_file():
        fail(f"annotation file not found: {annotations}")
    if results_path is None:
        results_path = default_results_path(weights, postprocess)
        results_path.parent.mkdir(parents=True, exist_ok=True)
    for target in (results_path, report_path):
        if target is not None and not target.parent.is_dir():
            fail(f"directory does not exist: {target.parent}")

    # Inner handler first: a PredictionError (model output of the wrong layout) is a failure of
    # the model, not of the inputs.
    with library_errors(coco_lib.CocoEvalError, code=EXIT_INPUT), \
            library_errors(coco_lib.PredictionError, code=EXIT_FAILURE):
        ground_truth = coco_lib.load_annotations(annotations)
        # looked up on the package at call time, so that tests can monkeypatch it
        model = coco_lib.load_model(weights, postprocess=postprocess,
                                    device=None if device == "auto" else device)
        logger.info("hashing %s", weights)
        weights_sha256 = sha256_file(weights)
        run_info = {
            "weights_sha256": weights_sha256,
            "variant": model.variant,
            "image_size": list(model.image_size),
            "postprocess": postprocess,
            "nms_configs": dict(model.nms_configs),
        }
        try:
            inference = coco_lib.run_inference(
                model.predict, images, ground_truth, batch_size=batch_size,
                max_images=max_images, results_path=results_path, progress=not quiet,
                run_info=run_info)
        except KeyboardInterrupt:
            fail(f"interrupted; finished batches are kept in "
                 f"{coco_lib.partial_path_for(results_path)}; run the same command to resume",
                 EXIT_INTERRUPTED)
        metrics = coco_lib.evaluate(ground_truth, inference.results_path,
                                    image_ids=inference.image_ids)
        report = coco_lib.build_report(
            metrics, variant=model.variant, weights=weights, weights_sha256=weights_sha256,
            image_size=model.image_size, postprocess=postprocess, nms_configs=model.nms_configs,
            annotations=annotations, results=inference.results_path,
            num_images_in_annotations=len(ground_truth.getImgIds()), tolerance_ap=tolerance)

    if report_path is not None:
        coco_lib.write_report(report_path, report)
        logger.info("wrote report to %s", report_path)
    for note in report.notes:  # problems with the detections warn; comparison remarks inform
        (logger.warning if note in metrics.notes else logger.info)("note: %s", note)
    click.echo(report.to_json() if as_json else coco_lib.format_table(report), nl=False)
    ctx.exit(report.exit_code)
