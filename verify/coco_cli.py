"""``verify coco``: COCO bbox mAP of converted weights, next to automl's published AP.

Exit codes: 0 done (and within tolerance when compared), 1 AP outside the tolerance of a
comparable run, 2 usage error, 3 missing or corrupt input (annotations, images, weights),
130 interrupted (finished batches are kept; the same command resumes).

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) every rank runs this command: the images
are sharded over the ranks (gloo on CPU, nccl on CUDA), rank 0 gathers the detections, evaluates
and reports; the other ranks print errors only, and all ranks exit with the first failing rank's
code.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from converter.archive import sha256_file
from converter.cache import default_cache_dir
from model.weights_io import DestinationError, check_destination
from verify import coco as coco_lib
from verify.cli_utils import (
    CONTEXT_SETTINGS,
    EXIT_FAILURE,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CliError,
    device_option,
    fail,
    library_errors,
    package_version,
    setup_logging,
)

if TYPE_CHECKING:   # torch and pycocotools load when the command runs, not for --help
    from pycocotools.coco import COCO

    from verify.coco.distributed import RankGroup

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
                   "<results>.partial.jsonl (under torchrun one per rank: "
                   "<results>.rank<R>-of-<W>.partial.jsonl) and the same command resumes "
                   "from it, with any number of processes.")
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
         report_path: Path | None, device: str | None, tolerance: float, as_json: bool,
         quiet: bool) -> None:
    """Run the model over COCO images and report bbox mAP beside automl's published AP.

    Prints the 12 COCO metrics (or the JSON report with --json) on stdout; progress and
    notes go to stderr. Under torchrun (`torchrun --nproc_per_node N -m verify coco ...`) the
    images are split over the processes and rank 0 reports.
    """
    from verify.coco import distributed
    from verify.coco.distributed import DistributedSetupError, RankGroup, RanksFailed

    if device == "auto":   # cuda when available (under torchrun: each rank's cuda:LOCAL_RANK)
        device = None
    try:
        group = RankGroup.from_env(describe=_describe_failure)
    except DistributedSetupError as exc:
        fail(str(exc), EXIT_USAGE)
    setup_logging(quiet or not group.is_root)  # the other ranks print errors only
    try:
        rank_device = distributed.rank_device(group, device)
    except DistributedSetupError as exc:
        fail(f"rank {group.rank}: {exc}", EXIT_USAGE)
    if results_path is None:
        results_path = default_results_path(weights, postprocess)
        results_path.parent.mkdir(parents=True, exist_ok=True)
    with distributed.process_group(group, rank_device):
        try:
            with _library_errors():
                ground_truth, model, weights_sha256, inference = _run_shard(
                    group, weights=weights, images=images, annotations=annotations,
                    postprocess=postprocess, batch_size=batch_size, max_images=max_images,
                    results_path=results_path, report_path=report_path,
                    device=str(rank_device) if group.is_distributed else device,
                    progress=not quiet)
        except RanksFailed as exc:  # every rank gets here; rank 0 says why before any rank leaves
            if group.is_root:
                CliError(str(exc), exc.exit_code).show()
            group.barrier()  # torchrun stops the other ranks as soon as one exits non-zero
            ctx.exit(exc.exit_code)
    if not group.is_root:  # rank 0 evaluates and reports
        return

    with _library_errors():
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


def _run_shard(group: RankGroup, *, weights: Path, images: Path, annotations: Path,
               postprocess: str, batch_size: int, max_images: int | None, results_path: Path,
               report_path: Path | None, device: str | None, progress: bool
               ) -> tuple[COCO, coco_lib.LoadedModel, str, coco_lib.InferenceResult]:
    """This rank's part: check the inputs, load the model, run inference on its shard (rank 0
    also writes the results file). Returns the annotations, model, weights hash and inference."""
    with group.agreed():
        # rank 0 alone writes the report; every rank writes its partial file beside the results
        _check_paths(weights, images, annotations, results_path,
                     report_path if group.is_root else None)
        ground_truth = coco_lib.load_annotations(annotations)
        # looked up on the package at call time, so that tests can monkeypatch it
        model = coco_lib.load_model(weights, postprocess=postprocess, device=device)
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
            model.predict, images, ground_truth, batch_size=batch_size, max_images=max_images,
            results_path=results_path, progress=progress, run_info=run_info, group=group)
    except KeyboardInterrupt:
        fail(f"interrupted; finished batches are kept in "
             f"{coco_lib.partial_path_for(results_path)}; run the same command to resume",
             EXIT_INTERRUPTED)
    return ground_truth, model, weights_sha256, inference


def _check_paths(weights: Path, images: Path, annotations: Path, results_path: Path,
                 report_path: Path | None) -> None:
    if not weights.is_file():
        fail(f"weights file not found: {weights}")
    if not images.is_dir():
        fail(f"image directory not found: {images}")
    if not annotations.is_file():
        fail(f"annotation file not found: {annotations}")
    for target in (results_path, report_path):
        if target is not None and not target.parent.is_dir():
            fail(f"directory does not exist: {target.parent}")
        if target is not None:
            try:  # a read-only folder, /proc or an over-long name fails now, not after the run
                check_destination(target, overwrite=True)
            except DestinationError as error:
                fail(str(error))


# Library errors -> exit codes, most specific first: a PredictionError (model output of the
# wrong layout) is a failure of the model, not of the inputs.
_ERROR_CODES: tuple[tuple[type[Exception], int], ...] = (
    (coco_lib.PredictionError, EXIT_FAILURE),
    (coco_lib.CocoEvalError, EXIT_INPUT),
)


def _library_errors() -> contextlib.ExitStack:
    """Turn the library's typed errors into one-line CLI errors with their exit codes."""
    stack = contextlib.ExitStack()
    for error, code in reversed(_ERROR_CODES):  # the last entered handler sees an error first
        stack.enter_context(library_errors(error, code=code))
    return stack


def _describe_failure(error: BaseException) -> tuple[int, str]:
    """(exit code, message) of a failed rank, as the other ranks and rank 0's error line see it."""
    if isinstance(error, click.ClickException):
        return error.exit_code, error.format_message()
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, ("interrupted; finished batches are kept; run the same command "
                                  "to resume")
    for error_type, code in _ERROR_CODES:
        if isinstance(error, error_type):
            return code, str(error)
    logger.error("unexpected error on this rank", exc_info=error)
    from verify.coco import distributed
    return distributed.describe_failure(error)
