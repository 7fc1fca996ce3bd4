"""``convert``: an automl EfficientDet TF checkpoint -> PyTorch weights (.pth / .safetensors)."""
from __future__ import annotations

import json
import re
import sys
import time
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

# Only light modules at import time: `convert --help` must not load torch or TensorFlow.
from model._version import __version__
from model.config import parse_image_size
from model.registry import RELEASES, VARIANTS
from model.weights_io import WEIGHT_SUFFIXES, DestinationError, check_destination

from .archive import sha256_file
from .download import check_sha256, resolve_release
from .errors import ConversionError, InputError, MappingError, OutputError, VariantError
from .export_formats import EXPORT_SUFFIXES, FORMAT_NAMES, GRAPH_FORMATS, OUTPUT_KINDS
from .interrupts import EXIT_INTERRUPTED, sigterm_as_interrupt

if TYPE_CHECKING:
    from model import EfficientDet
    from model.weights_io import save_weights

    from .convert import MappingReport, convert_checkpoint
    from .detect import detect_config
    from .export import export_model
    from .readers import read_checkpoint

# The conversion machinery (torch, the mapping tables) is imported when a conversion runs, not
# for --help: these names become module globals on first use (PEP 562), so tests can still
# replace them with monkeypatch.
_DEFERRED = {"MappingReport": ".convert", "convert_checkpoint": ".convert",
             "detect_config": ".detect", "export_model": ".export", "read_checkpoint": ".readers",
             "save_weights": "model.weights_io"}


def __getattr__(name: str) -> Any:
    if name not in _DEFERRED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_DEFERRED[name], __package__), name)
    return globals().setdefault(name, value)


def _import_deferred() -> None:
    for name in _DEFERRED:
        if name not in globals():
            __getattr__(name)

_BUNDLE_SUFFIX = re.compile(r"^\.(?:index|data-\d+-of-\d+)$")
CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)


def tool_version() -> str:
    """This project's version (``model/_version.py``)."""
    return __version__


def _identity(source: Path) -> str:
    """sha256 of the checkpoint's index (TF bundles) or of the file itself (H5)."""
    index = Path(str(source) + ".index")
    target = index if index.is_file() else source
    return sha256_file(target) if target.is_file() else ""


def _global_step(contents) -> int | None:
    """The checkpoint's training step (kept so ``--to tf-ckpt`` can write it back)."""
    if "global_step" not in contents.names:
        return None
    step = np.asarray(contents.load("global_step"))
    return int(step.reshape(-1)[0]) if step.size == 1 and step.dtype.kind in "iu" else None


def parse_size(text: str) -> int | str:
    """automl's image_size forms: '512' -> 512, '640x384' -> '640x384' (W x H)."""
    try:
        return int(text)
    except ValueError:
        try:
            parse_image_size(text)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--image-size") from None
        return text


def check_output(out: Path, force: bool) -> None:
    """Everything about ``--out`` that can fail, checked before the conversion starts."""
    if out.suffix.lower() not in WEIGHT_SUFFIXES:
        raise OutputError(f"{out}: output must end in one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        check_destination(out, overwrite=force)
    except DestinationError as error:
        raise OutputError(str(error)) from None


def _variant_name(_ctx: click.Context, _param: click.Parameter, value: str | None
                  ) -> str | None:
    """``--variant``: a variant name, or its short form without ``efficientdet-`` (``d0``)."""
    if value is None:
        return None
    for name in (value, f"efficientdet-{value}"):
        if name.lower() in VARIANTS:
            return name.lower()
    raise click.BadParameter(f"unknown variant {value!r}; known: "
                             f"{', '.join(v.removeprefix('efficientdet-') for v in VARIANTS)} "
                             f"(with or without 'efficientdet-')")


def _is_bundle_prefix(path: Path) -> bool:
    """True for a TF checkpoint prefix (``model.ckpt-123``): not a file itself, but the stem of
    ``model.ckpt-123.index`` / ``model.ckpt-123.data-00000-of-00001``."""
    if not path.parent.is_dir():
        return False
    return any(_BUNDLE_SUFFIX.match(entry.name[len(path.name):])
               for entry in path.parent.iterdir() if entry.name.startswith(path.name + "."))


def resolve_ckpt(ckpt: str, cache_dir: Path | None, base_url: str | None, quiet: bool,
                 sha256: str | None = None) -> tuple[Path, str | None]:
    """``(path, None)`` for a path (file, folder or checkpoint prefix) as given, or
    ``(checkpoint, release name)`` for a release looked up in the cache / downloaded.
    ``sha256`` is the expected digest of the release archive, or of the file given."""
    path = Path(ckpt)
    if path.exists() or _is_bundle_prefix(path):
        if sha256 is not None:
            if not path.is_file():
                raise InputError(f"--sha256 applies to a release name or a single file, "
                                 f"not {ckpt}")
            digest = sha256_file(path)
            if digest != sha256:
                raise InputError(f"sha256 mismatch for {ckpt}: expected {sha256}, got {digest}")
        return path, None
    if ckpt in RELEASES:
        return resolve_release(ckpt, cache_dir=cache_dir, base_url=base_url, sha256=sha256,
                               progress=None if quiet else _download_progress(ckpt)), ckpt
    raise InputError(f"{ckpt}: no such file or directory, and not a release name "
                     f"({', '.join(RELEASES)})")


def _download_progress(name: str, every_s: float = 0.2):
    last = [0.0]

    def report(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] < every_s and done != total:
            return
        last[0] = now
        size = f"/{total / 1e6:.1f}" if total else ""
        click.echo(f"\rdownloading {name}: {done / 1e6:.1f}{size} MB", err=True, nl=False)
    return report


def _parse_sha256(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return None if value is None else check_sha256(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def summary(report: MappingReport, config, source: Path, fmt: str, seconds: float) -> list[str]:
    ignored = ", ".join(f"{n} {reason}" for reason, n in sorted(report.ignored.items())) or "none"
    ema = {"shadows": "yes (ExponentialMovingAverage shadows)",
           "model entries": "yes (already averaged in the model entries)",
           "none": "no (raw values)"}[report.ema_source]
    return [f"variant:   {config.name} ({config.num_classes} classes, "
            f"image {config.image_size[1]}x{config.image_size[0]})",
            f"source:    {source} ({fmt})",
            f"tensors:   {report.converted} converted",
            f"EMA used:  {ema}",
            f"ignored:   {ignored}",
            f"time:      {seconds:.1f} s"]


@click.command(context_settings=CONTEXT)
@click.option("--ckpt", required=True, metavar="PATH|NAME",
              help="TF checkpoint: a TF1 checkpoint folder or prefix (model.ckpt-12345), a TF2 "
                   "object-based checkpoint, a SavedModel folder, a Keras .h5 file, a release "
                   ".tar.gz/.tgz, or a release name (efficientdet-d0 ... d7, d7x, lite0 ... "
                   "lite4, lite3x, d2-640 ... d6-640, d0-advprop ... d5-advprop) taken from the "
                   "cache or downloaded; a release name also records its input size and "
                   "normalisation.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output weights; .pth (state_dict + metadata) or .safetensors (with --to: "
                   "the folder (tf-ckpt) or .pth file (effdet) to write).")
@click.option("--variant", default=None, metavar="NAME", callback=_variant_name,
              help="Variant to build (efficientdet-d0 ... d7, d7x, lite0 ... lite4, lite3x; the "
                   "short form d0 or lite0 works too); by default detected from the checkpoint's "
                   "names and shapes.")
@click.option("--image-size", default=None, metavar="SIZE",
              help="Network input size the checkpoint was trained for, as automl writes it: "
                   "512 or WxH (e.g. 640x384) [default: the variant's]. Checkpoints do not "
                   "record it; it is stored in the output's config.")
@click.option("--to", "to_format", type=click.Choice(list(FORMAT_NAMES)), default=None,
              help="Go the other way: --ckpt is PyTorch weights (.pth/.safetensors) and --out "
                   "gets them as 'tf-ckpt' (an automl TF1 checkpoint folder: variables, "
                   "ExponentialMovingAverage shadows, global_step), 'effdet' (a .pth state_dict "
                   "for rwightman's effdet) or a graph: 'onnx', 'torchscript', 'torch-export' "
                   "[default for graphs: from --out's suffix: "
                   + ", ".join(f"{k} -> {v}" for k, v in EXPORT_SUFFIXES.items()) + "].")
@click.option("--raw-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --to tf-ckpt: weights for the raw variables (e.g. convert --no-ema of "
                   "the same checkpoint) [default: the --ckpt weights, also the EMA shadows].")
@click.option("--global-step", type=click.IntRange(min=0), default=None,
              help="With --to tf-ckpt: the global_step written [default: the step the weights "
                   "were converted from, else 0].")
@click.option("--no-ema", is_flag=True,
              help="Take the raw variables instead of their ExponentialMovingAverage shadows.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where releases are downloaded and archives unpacked "
                   "[default: $EFFDET_CACHE or ~/.cache/effdet-tf-port].")
@click.option("--base-url", default=None, metavar="URL",
              help="Base URL of the release archives [default: $EFFDET_BASE_URL or automl's].")
@click.option("--outputs", type=click.Choice(list(OUTPUT_KINDS)), default="raw",
              show_default=True,
              help="Export: raw head outputs (post-process on the host, any automl path), "
                   "levels (the network's per-level maps, NCHW, as model(x) returns them: the "
                   "fastest graph), decoded boxes + sigmoid scores, or nms (ONNX only: "
                   "automl's global path with hard NMS in the graph).")
@click.option("--dynamic-batch", is_flag=True, help="Export: leave the batch dimension free.")
@click.option("--sha256", default=None, metavar="HEX", callback=_parse_sha256,
              help="Expected sha256 of the release archive (checked after the download and on "
                   "every cached reuse) or of the --ckpt file.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as JSON on stdout instead of the output path.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@click.version_option(tool_version(), "--version", prog_name="convert")
def main(ckpt: str, out: Path, variant: str | None, image_size: str | None,
         to_format: str | None, raw_weights: Path | None, global_step: int | None, no_ema: bool,
         force: bool, cache_dir: Path | None, base_url: str | None, outputs: str,
         dynamic_batch: bool, sha256: str | None, as_json: bool, quiet: bool) -> None:
    """Convert an automl EfficientDet TF checkpoint into PyTorch weights.

    \b
    Examples:
      convert --ckpt efficientdet-d4 --out d4.pth
      convert --ckpt ./my-train-dir --out mine.safetensors --variant efficientdet-d0
      convert --ckpt efficientdet-d0/d0.h5 --out d0.pth
      convert --ckpt d0.pth --to tf-ckpt --out d0-tf      (and back: convert --ckpt d0-tf ...)
      convert --ckpt d0.pth --to effdet --out d0-effdet.pth
      convert --ckpt d0.pth --out d0.onnx --dynamic-batch       (graph export; also --to)

    Every model variable must map to exactly one PyTorch key with the right shape; otherwise
    the unmatched names are listed and nothing is written.

    \b
    Exit codes: 0 ok, 1 mapping failure, 2 usage, 3 missing or corrupt input,
    4 unknown, ambiguous or mismatched variant, 5 NaN/Inf in weights,
    6 output exists or cannot be written, 7 download failed, 130 interrupted
    (Ctrl-C or SIGTERM; nothing is left behind).
    """
    to_format = to_format or EXPORT_SUFFIXES.get(out.suffix.lower())
    with sigterm_as_interrupt():
        try:
            if to_format is not None:
                graph = {"outputs": outputs, "dynamic_batch": dynamic_batch}
                unused = {"--variant": variant, "--no-ema": no_ema, "--sha256": sha256}
                if to_format in GRAPH_FORMATS:
                    if image_size is not None:
                        graph["image_size"] = parse_image_size(parse_size(image_size))
                else:
                    unused.update({"--image-size": image_size, "--outputs": outputs != "raw",
                                   "--dynamic-batch": dynamic_batch})
                    graph = {}
                return _export(Path(ckpt), to_format, out, raw_weights, global_step, force,
                               as_json, unused=unused, graph_options=graph)
            if raw_weights is not None or global_step is not None:
                raise click.UsageError("--raw-weights and --global-step need --to tf-ckpt")
            _convert(ckpt, out, variant, image_size, no_ema, force, cache_dir, base_url,
                     sha256, as_json, quiet)
        except KeyboardInterrupt:
            exception = click.ClickException(f"interrupted; {out} was not written")
            exception.exit_code = EXIT_INTERRUPTED
            raise exception from None


def _convert(ckpt: str, out: Path, variant: str | None, image_size: str | None, no_ema: bool,
             force: bool, cache_dir: Path | None, base_url: str | None, sha256: str | None,
             as_json: bool, quiet: bool) -> None:
    _import_deferred()
    started = time.perf_counter()
    try:
        check_output(out, force)
        path, release_name = resolve_ckpt(ckpt, cache_dir, base_url, quiet, sha256)
        contents = read_checkpoint(path, cache_dir=cache_dir)
        # A release name brings its variant and the input size and normalisation it expects;
        # the checkpoint must hold that variant (a mirror may serve another one).
        release = RELEASES[release_name] if release_name else None
        overrides = dict(release.config) if release else {}
        if image_size is not None:
            overrides["image_size"] = parse_size(image_size)
        config = detect_config(contents.names, variant, source=path, **overrides)
        if release is not None and config.name != release.variant:
            raise VariantError(f"release {release_name} holds a {config.name} checkpoint, not "
                               f"{release.variant}; refused")
        with click.progressbar(length=1, label="converting", file=sys.stderr,
                               hidden=quiet) as bar:
            def progress(items):
                items = list(items)
                bar.length = len(items)
                for item in items:
                    yield item
                    bar.update(1)
            state_dict, report = convert_checkpoint(contents, config, use_ema=not no_ema,
                                                    progress=progress)
        lines = summary(report, config, contents.source, contents.format,
                        time.perf_counter() - started)
        metadata_ = {"variant": config.name, **({"release": release.name} if release else {}),
                     "config": config.to_dict(),
                     "source": {"path": str(contents.source), "format": contents.format,
                                "sha256": _identity(contents.source),
                                "ema": report.ema_source,
                                "global_step": _global_step(contents)},
                     "tool": {"name": "effdet-tf-port", "version": tool_version()}}
        try:
            save_weights(out, state_dict, metadata_, overwrite=force)
        except DestinationError as error:
            raise OutputError(str(error)) from None
    except MappingError as error:
        for line in getattr(error, "report", MappingReport()).problems():
            click.echo(line, err=True)
        raise _exit(error)
    except ConversionError as error:
        raise _exit(error)
    if as_json:
        click.echo(json.dumps({"out": str(out), **metadata_, "converted": report.converted,
                               "ignored": dict(report.ignored)}))
    else:
        if not quiet:
            for line in lines:
                click.echo(line, err=True)
        click.echo(str(out))


def _load_weights(path: Path) -> EfficientDet:
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise InputError(f"{path}: --to needs PyTorch weights ({', '.join(WEIGHT_SUFFIXES)})")
    from model import EfficientDet
    try:
        return EfficientDet.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise InputError(f"{path}: {error}") from None


def _export(ckpt: Path, to_format: str, out: Path, raw_weights: Path | None,
            global_step: int | None, force: bool, as_json: bool, unused: dict,
            graph_options: dict) -> None:
    """``convert --to``: PyTorch weights -> ``to_format`` through ``export_model``."""
    _import_deferred()
    given = [name for name, value in unused.items() if value]
    if given:
        raise click.UsageError(f"{', '.join(given)} do not apply with --to")
    options: dict = {"force": force, **graph_options}
    if to_format == "tf-ckpt":
        options["global_step"] = global_step
    elif raw_weights is not None or global_step is not None:
        raise click.UsageError("--raw-weights and --global-step need --to tf-ckpt")
    try:
        model = _load_weights(ckpt)
        if raw_weights is not None:
            raw_model = _load_weights(raw_weights)
            if raw_model.config != model.config:
                raise VariantError(f"{raw_weights}: --raw-weights are of another model "
                                   f"({raw_model.config.name}) than {ckpt} ({model.config.name})")
            options["raw_model"] = raw_model
        written = export_model(model, to_format, out, **options)
    except MappingError as error:
        for line in getattr(error, "lines", []):
            click.echo(line, err=True)
        raise _exit(error)
    except ConversionError as error:
        raise _exit(error)
    if as_json:
        click.echo(json.dumps({"out": str(out), "format": to_format, "written": str(written),
                               "variant": model.config.name}))
    else:
        click.echo(str(out))


def _exit(error: ConversionError) -> click.ClickException:
    exception = click.ClickException(error.message)
    exception.exit_code = error.exit_code
    return exception
