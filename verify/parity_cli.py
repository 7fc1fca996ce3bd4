"""``verify parity``: the converted model against a TF reference, tap by tap.

Exit codes: 0 every tap and detection path within tolerance, 1 some tap or detection
differs, 2 usage error, 3 missing or unreadable weights / golden / checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from verify.cli_utils import (CONTEXT_SETTINGS, EXIT_FAILURE, device_option, fail,
                              library_errors, package_version, resolve_device)
from verify.io_utils import atomic_write_text


@click.command("parity", context_settings=CONTEXT_SETTINGS,
               short_help="Compare converted weights with TF, tap by tap and on detections.")
@click.option("--weights", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Converted weights (.pth or .safetensors) written by `convert`.")
@click.option("--golden", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Golden folder made with automl (golden.json + golden.npz), e.g. "
                   "../shared/reference/efficientdet-d0.")
@click.option("--golden-name", default="golden",
              help="File stem inside --golden (golden_noema for the no-EMA d0 golden).")
@click.option("--tf-ckpt", type=click.Path(exists=True, path_type=Path), default=None,
              help="Live TF mode: the TF checkpoint the weights came from (needs --automl-dir).")
@click.option("--automl-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="EFFDET_AUTOML_DIR", show_envvar=True,
              help="Live TF mode: a google/automl checkout (its efficientdet/ is imported).")
@click.option("--image-size", default=None, metavar="SIZE",
              help="Live TF mode: network input size (512 or WxH) if not the one stored in the "
                   "weights; golden mode always uses the golden's.")
@click.option("--image", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Input image for live TF mode, or to rebuild a golden's input "
                                 "when the golden stores only samples of it [default: the "
                                 "golden's img1.jpg found next to it].")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the full comparison as JSON to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Draw every tap's relative error (log scale) to this PNG.")
@click.version_option(package_version(), "--version", prog_name="verify parity")
@device_option
@click.option("--json", "as_json", is_flag=True,
              help="Print the full comparison as JSON on stdout instead of the table.")
@click.option("--optimized", is_flag=True,
              help="Run the network through EfficientDet.optimize() (BN folded, static "
                   "padding, channels_last) instead of the model as loaded.")
@click.option("--onnx", is_flag=True,
              help="Export the model to ONNX (raw outputs, a temporary file) and run it with "
                   "onnxruntime's CPU provider; compares the head taps and the detections, "
                   "and lists the internal taps as not available. Needs the export extra.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line.")
def parity(weights: Path, golden: Path | None, golden_name: str, tf_ckpt: Path | None,
           automl_dir: Path | None, image_size: str | None, image: Path | None,
           report_path: Path | None,
           plot_path: Path | None, device: str, as_json: bool, optimized: bool,
           onnx: bool, quiet: bool) -> None:
    """Compare converted weights with TF at every tap and on the final detections.

    \b
    Golden mode:  verify parity --weights d0.pth --golden ../shared/reference/efficientdet-d0
    Live TF mode: verify parity --weights d4.pth --tf-ckpt DIR --automl-dir PATH

    Prints one row per tap in graph order (max abs error, error relative to the tap's
    scale, status), the matching of each post-processing path's detections, and the first
    diverging tap, which names the layer that is wrong; ``input/image`` is this project's
    preprocessing of the image against the reference's input tensor. The last line is the
    verdict (PASS, or FAIL with the first diverging tap and a hint). Tolerances are listed in
    verify/parity.py: taps within 5e-3 of their scale; detection boxes within 0.05 px + 8e-3
    of the box's extent (of the image side for boxes clipped at the border), scores within 2e-3;
    near-ties accepted only as bounded swaps and cut ties, each counted in the output. On a GPU,
    TF32 is switched off (TF's reference is float32).

    \b
    Exit codes: 0 every tap and detection within tolerance, 1 a tap or detection differs,
    2 usage, 3 missing or unreadable weights, golden or checkpoint.
    """
    import torch

    from converter.cli import parse_size
    from model import EfficientDet
    from verify.parity import format_table, plot_errors, run_parity, verdict
    from verify.reference import ReferenceError, load_golden

    if (golden is None) == (tf_ckpt is None):
        fail("give exactly one of --golden DIR or --tf-ckpt DIR", 2)
    if optimized and onnx:
        fail("give at most one of --optimized and --onnx (the ONNX graph is built from "
             "optimize() already)", 2)
    for path in (report_path, plot_path):
        if path is not None and not path.parent.is_dir():
            fail(f"{path}: folder {path.parent} does not exist")
    overrides = {} if image_size is None else {"image_size": parse_size(image_size)}
    with library_errors(FileNotFoundError, ValueError, RuntimeError, OSError, KeyError):
        model = EfficientDet.from_pretrained(weights, **overrides)
    if golden is not None:
        with library_errors(ReferenceError):
            reference = load_golden(golden, golden_name)
        if image is not None:
            reference.image_file = image
        source = str(golden)
    else:
        if automl_dir is None:
            fail("live TF mode needs --automl-dir (or EFFDET_AUTOML_DIR)", 2)
        from verify.tf_live import LiveTFError, tf_reference
        from model.preprocess import load_image
        with library_errors(LiveTFError):
            reference = tf_reference(automl_dir, tf_ckpt, model.config,
                                     load_image(image) if image else None)
        if image is not None:
            reference.image_file = image          # our preprocessing is compared with TF's
        source = f"live TF: {tf_ckpt}"
    if tuple(reference.image_hw) != tuple(model.config.image_size):
        model = EfficientDet.from_pretrained(weights, image_size=tuple(reference.image_hw))
    if reference.variant != model.config.name:
        fail(f"reference is {reference.variant}, weights are {model.config.name}", EXIT_FAILURE)
    if reference.num_classes != model.config.num_classes:
        fail(f"reference has {reference.num_classes} classes, weights "
             f"{model.config.num_classes}", EXIT_FAILURE)
    device = resolve_device(device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if onnx:
        network = onnx_network(model)
    else:
        network = model.to(device).optimize() if optimized else model
    with library_errors(FileNotFoundError):
        report = run_parity(network, reference, str(weights), source, device)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1, default=str))
    elif not quiet:
        for line in format_table(report):
            click.echo(line)
    if report_path is not None:
        atomic_write_text(report_path, json.dumps(report.to_dict(), indent=1, default=str))
    if plot_path is not None:
        plot_errors(report, plot_path)
    click.echo(verdict(report), err=as_json)
    if not report.ok:
        raise SystemExit(EXIT_FAILURE)


def onnx_network(model):
    """The model exported to ONNX and run by onnxruntime; export failures exit with one line."""
    from converter.errors import ConversionError
    try:
        from verify.onnx_network import OnnxNetwork
        return OnnxNetwork(model)
    except ImportError as error:
        fail(f"--onnx needs {error.name} (pip install 'effdet-tf-port[export]')", 2)
    except ConversionError as error:
        fail(str(error), error.exit_code)
    except RuntimeError as error:          # onnxruntime cannot load the exported graph
        fail(f"onnxruntime: {(str(error).strip().splitlines() or ['failed'])[0]}", EXIT_FAILURE)
