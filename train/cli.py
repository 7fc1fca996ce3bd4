"""``train``: fine-tune an EfficientDet on COCO-format data as automl trains (see train.loop)."""
from __future__ import annotations

import dataclasses
import logging
import os
import typing
from pathlib import Path
from typing import Any, Optional

import click

from converter.interrupts import sigterm_as_interrupt
from verify.cli_utils import EXIT_INTERRUPTED, package_version

from .config import TrainConfig

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)
_DEFAULTS = TrainConfig()


def _field_value(name: str, text: str) -> Any:
    """``--set NAME=VALUE``: the value parsed as the TrainConfig field's type."""
    hints = typing.get_type_hints(TrainConfig)
    kind = hints[name]
    if text.lower() in ("none", "null") and type(None) in typing.get_args(kind):
        return None
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if base is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name} takes true or false, not {text!r}")
        return text.lower() in ("true", "1")
    return base(text)


def _overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in known:
            raise click.BadParameter(f"{pair!r}: expected NAME=VALUE with NAME one of "
                                     f"{', '.join(sorted(known))}", param_hint="--set")
        try:
            values[name] = _field_value(name, text)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--set") from None
    return values


@click.command(context_settings=CONTEXT)
@click.option("--train-annotations", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="COCO instances JSON of the training images (category_id = 1-based class).")
@click.option("--train-images", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of the training images (file_name is relative to it).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoint.pt (resume state) and model.pth (EMA weights).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Start from weights written by `convert` (.pth/.safetensors).")
@click.option("--variant", help="Start from random weights of this variant (e.g. efficientdet-d0).")
@click.option("--num-classes", type=click.IntRange(min=1),
              help="Classes of your data; a different count replaces the class head.")
@click.option("--image-size", help="Training input size: N or WxH [default: the variant's].")
@click.option("--val-annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="COCO JSON for the per-epoch COCO AP of the EMA weights (none: no AP).")
@click.option("--val-images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of the validation images [default: --train-images].")
@click.option("--batch-size", type=click.IntRange(min=1), default=_DEFAULTS.batch_size,
              show_default=True, help="Global batch (split over the torchrun processes).")
@click.option("--num-epochs", type=click.FloatRange(min=0, min_open=True),
              default=_DEFAULTS.num_epochs, show_default=True, help="Epochs (automl's default).")
@click.option("--learning-rate", type=float, default=_DEFAULTS.learning_rate, show_default=True,
              help="Peak rate for a batch of 64 (scaled by batch_size / 64, as automl).")
@click.option("--var-freeze-expr", default=None,
              help="Regex matched (re.match) on TF variable names; matches are not trained, "
                   "e.g. '(efficientnet|fpn_cells|resample_p6)'.")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE",
              help="Any other automl training hparam, e.g. --set jitter_min=0.5 "
                   "--set iou_loss_type=ciou --set moving_average_decay=0.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 [default: cuda:LOCAL_RANK if "
                                             "available, else cpu].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the initialisation, shuffling and augmentation.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Data-loading worker processes per training process.")
@click.option("--mixed-precision", is_flag=True, help="float16 autocast + loss scaling (CUDA).")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Steps between progress lines.")
@click.option("--stop-after-epochs", type=click.IntRange(min=1), default=None,
              help="End this run after that many epochs (re-run to resume).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.version_option(package_version(), "--version", prog_name="train")
def main(train_annotations: Path, train_images: Path, out: Path, weights: Optional[Path],
         variant: Optional[str], num_classes: Optional[int], image_size: Optional[str],
         val_annotations: Optional[Path], val_images: Optional[Path], batch_size: int,
         num_epochs: float, learning_rate: float, var_freeze_expr: Optional[str],
         settings: tuple[str, ...], device: Optional[str], seed: int, workers: int,
         mixed_precision: bool, log_every: int, stop_after_epochs: Optional[int],
         quiet: bool) -> None:
    """Fine-tune EfficientDet on COCO-format data the way automl's tf2/train.py trains.

    \b
    Examples:
      train --weights d0.pth --num-classes 5 --train-annotations train.json \\
            --train-images imgs/ --out run/ --batch-size 16 --num-epochs 50
      torchrun --nproc-per-node 4 -m train --weights d0.pth ...   (several GPUs)

    Re-running with the same --out resumes from its checkpoint. Progress goes to stderr; the
    path of the trained weights (model.pth) is printed on stdout.

    \b
    Exit codes: 0 ok, 1 training failure, 2 usage, 3 missing or unusable input,
    6 output folder unusable, 130 interrupted.
    """
    from converter.cli import parse_size

    from .errors import TrainError
    from .loop import fine_tune

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(message)s")
    if (weights is None) == (variant is None):
        raise click.UsageError("give exactly one of --weights and --variant")
    try:
        config = TrainConfig(**{**dataclasses.asdict(_DEFAULTS), "batch_size": batch_size,
                                "num_epochs": num_epochs, "learning_rate": learning_rate,
                                "var_freeze_expr": var_freeze_expr, **_overrides(settings)})
    except (TypeError, ValueError) as error:
        raise click.UsageError(str(error)) from None
    try:
        with sigterm_as_interrupt():
            result = fine_tune(train_annotations, train_images, out, weights=weights,
                               variant=variant, num_classes=num_classes,
                               image_size=parse_size(image_size) if image_size else None,
                               config=config,
                               val_annotations=val_annotations, val_images=val_images,
                               device=device, seed=seed, num_workers=workers,
                               mixed_precision=mixed_precision, log_every=log_every,
                               stop_after_epochs=stop_after_epochs)
    except TrainError as error:
        exception = click.ClickException(" ".join(str(error).split()))
        exception.exit_code = error.exit_code
        raise exception from None
    except KeyboardInterrupt:
        click.echo("interrupted; the last finished epoch is in the checkpoint", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(str(result.weights))


if __name__ == "__main__":
    main()
