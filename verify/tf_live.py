"""Live TF reference: run google/automl's own EfficientDet on a user's checkpoint.

``verify parity --tf-ckpt DIR --automl-dir PATH`` compares the PyTorch model against TF run here
and now instead of against a golden folder. :func:`tf_reference` produces the same
:class:`~verify.reference.Reference` that :func:`~verify.reference.load_golden` reads, made the way
the goldens are made (``shared/reference/README.md``, "How the golden is made"):

1. automl's ``tf2/efficientdet_keras.EfficientDetModel`` built from an automl config derived from
   our :class:`~model.config.DetConfig` (field names are automl's, so the override is by name),
   ``build((1, H, W, 3))``,
   ``tf2/util_keras.restore_ckpt(model, ckpt, ema_decay, skip_mismatch=False)`` (exactly
   ``tf2/infer_lib.KerasDriver``);
2. automl's inference preprocessing (``EfficientDetModel._preprocessing(..., 'infer')``),
   recorded as the ``input/image`` tap;
3. the sub-layers called in ``EfficientDetNet.call`` order with ``training=False``, each tap kept
   whole (NHWC float32, batch 1): backbone stem and block outputs (the backbone's own
   ``endpoints``), ``backbone/cL``, ``fpn/in_pL`` (``resample_pL``), ``fpn/cell_N/pL``,
   ``head/class_pL`` / ``head/box_pL``;
4. the three post-processing paths from those head outputs: ``postprocess_global`` (global),
   ``generate_detections`` with the config ``tf2/eval.py`` builds (per_class) and the same with
   ``nms_configs.pyfunc=True`` (pyfunc).

Nothing here re-implements EfficientDet: the graph, checkpoint loading, preprocessing and
post-processing are imported from the user's automl checkout (``<automl_dir>/efficientdet`` goes
first on ``sys.path``; its top-level modules ``utils``, ``dataloader``, ``tf2``, ... are then
importable in this process). automl's TF2 code needs Keras 2: with TensorFlow >= 2.16 that is the
``tf_keras`` package (same version as TensorFlow), selected by ``TF_USE_LEGACY_KERAS=1``, which this
module sets before TensorFlow binds ``tf.keras``; automl's ``hparams_config`` also needs ``pyyaml``.

Memory: every tap is kept whole (d4: 390 MiB of activations, d7x: 1.7 GiB).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import logging
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from model.config import DetConfig

from .reference import DetectionsRef, Reference, ReferenceError, TapRef

__all__ = ["LiveTFError", "automl_overrides", "tf_reference"]

logger = logging.getLogger(__name__)

# automl's top-level modules and packages under efficientdet/ that the TF2 model imports; they
# must come from the checkout given, not from another one or an unrelated package of that name.
_AUTOML_MODULES = ("hparams_config", "utils", "dataloader", "nms_np", "tf2", "backbone",
                   "object_detection")
# The tapped head outputs must equal automl's own ``EfficientDetNet.call`` (same ops in the same
# order, so they agree bit for bit in practice); anything beyond this fraction of the output scale
# means the tapping order no longer matches this automl version.
_MODEL_CALL_RTOL = 1e-5
# Image automl ships in its checkout; the default input (same file as shared/reference/img1.jpg).
_AUTOML_TEST_IMAGE = Path("testdata") / "img1.jpg"


class LiveTFError(ReferenceError):
    """The live TF reference cannot be made: automl, TensorFlow/tf_keras or the checkpoint."""


# ---------------------------------------------------------------------------------------------
# DetConfig -> automl config


def _automl_image_size(image_hw: tuple[int, int]) -> int | str:
    """``(H, W)`` -> automl's ``image_size``: an int when square, else the ``'WxH'`` string."""
    height, width = image_hw
    return int(height) if height == width else f"{int(width)}x{int(height)}"


def _automl_value(name: str, value: Any) -> Any:
    if name == "image_size":
        return _automl_image_size(value)
    if isinstance(value, tuple):
        return [list(v) if isinstance(v, tuple) else v for v in value]
    if isinstance(value, dict):
        return dict(value)
    return value


def automl_overrides(config: DetConfig) -> dict[str, Any]:
    """The automl hparams that reproduce ``config``: every DetConfig field but ``name``, by name.

    ``image_size`` becomes an int or ``'WxH'``; tuples become lists (as in ``hparams_config``).
    Apply with ``hparams_config.get_efficientdet_config(config.name).override(...)``.
    """
    return {f.name: _automl_value(f.name, getattr(config, f.name))
            for f in dataclasses.fields(config) if f.name != "name"}


def _automl_config(automl: SimpleNamespace, config: DetConfig) -> Any:
    """automl's ``Config`` for ``config.name`` with every DetConfig field applied."""
    try:
        tf_config = automl.hparams_config.get_efficientdet_config(config.name)
    except (KeyError, ValueError) as error:
        raise LiveTFError(f"automl has no model named {config.name!r} ({error})") from None
    overrides = automl_overrides(config)
    known = set(tf_config.keys())
    nms_known = set(tf_config.nms_configs.keys()) if "nms_configs" in known else set()
    defaults = {f.name: f.default for f in dataclasses.fields(DetConfig)
                if f.default is not dataclasses.MISSING}
    unsupported = []
    for name in sorted(set(overrides) - known):
        # An older automl without the field can only reproduce the default behaviour.
        if name not in defaults or getattr(config, name) != defaults[name]:
            unsupported.append(name)
        del overrides[name]
    if "nms_configs" in overrides:
        extra = sorted(set(overrides["nms_configs"]) - nms_known)
        unsupported += [f"nms_configs.{k}" for k in extra]
        overrides["nms_configs"] = {k: v for k, v in overrides["nms_configs"].items()
                                    if k in nms_known}
    if unsupported:
        raise LiveTFError(f"this automl checkout has no hparams {', '.join(unsupported)}; "
                          f"update automl or use the default values")
    tf_config.override(overrides)
    return tf_config


def _eval_config(automl: SimpleNamespace, tf_config: Any, pyfunc: bool) -> Any:
    """The config tf2/eval.py hands to ``generate_detections`` (top-5000 pairs, parsed size)."""
    eval_config = copy.deepcopy(tf_config)
    eval_config.nms_configs.max_nms_inputs = automl.anchors.MAX_DETECTION_POINTS
    eval_config.nms_configs.pyfunc = pyfunc
    eval_config.image_size = automl.utils.parse_image_size(eval_config["image_size"])
    return eval_config


# ---------------------------------------------------------------------------------------------
# Environment: automl checkout, TensorFlow with Keras 2


def _efficientdet_dir(automl_dir: Path) -> Path:
    """``<automl_dir>/efficientdet`` (or ``automl_dir`` itself if it is that folder)."""
    automl_dir = Path(automl_dir).expanduser()
    if not automl_dir.is_dir():
        raise LiveTFError(f"automl checkout {automl_dir} not found (--automl-dir must be a "
                          f"google/automl clone)")
    for candidate in (automl_dir / "efficientdet", automl_dir):
        if not (candidate / "hparams_config.py").is_file():
            continue
        if (candidate / "tf2" / "efficientdet_keras.py").is_file():
            return candidate.resolve()
        if (candidate / "keras" / "efficientdet_keras.py").is_file():
            raise LiveTFError(f"{candidate}: automl checkout predates the keras/ -> tf2/ rename "
                              f"(2021-08); update it to a newer google/automl")
    raise LiveTFError(f"{automl_dir}: not a google/automl checkout "
                      f"(no efficientdet/tf2/efficientdet_keras.py)")


def _import_tensorflow() -> Any:
    """TensorFlow with ``tf.keras`` bound to Keras 2 (tf_keras on TF >= 2.16)."""
    has_tf_keras = importlib.util.find_spec("tf_keras") is not None
    if has_tf_keras:
        # Read by TF's lazy ``tf.keras`` loader on first access, not at ``import tensorflow``.
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    from converter.tf_quiet import import_tensorflow_quietly
    try:
        tf = import_tensorflow_quietly()
    except ImportError as error:
        raise LiveTFError(f"live TF mode needs TensorFlow (pip install tensorflow-cpu): "
                          f"{error}") from None
    keras_root = tf.keras.layers.Layer.__module__.split(".")[0]
    if keras_root == "keras":
        import keras
        if str(keras.__version__).startswith("3"):
            if not has_tf_keras:
                raise LiveTFError(f"automl's TF2 code needs Keras 2 but TensorFlow "
                                  f"{tf.__version__} uses Keras 3: pip install "
                                  f"tf_keras=={tf.__version__}")
            raise LiveTFError("tf.keras was bound to Keras 3 before live TF mode started; set "
                              "TF_USE_LEGACY_KERAS=1 in the environment before running")
    return tf


def _module_origin(module: Any) -> Path | None:
    location = getattr(module, "__file__", None) or \
        next(iter(getattr(module, "__path__", [])), None)
    return Path(location).resolve() if location else None


def _import_automl(effdet_dir: Path) -> SimpleNamespace:
    """automl's modules imported from ``effdet_dir`` (put first on ``sys.path``)."""
    for name in _AUTOML_MODULES:
        module = sys.modules.get(name)
        origin = _module_origin(module) if module is not None else None
        if origin is not None and not origin.is_relative_to(effdet_dir):
            raise LiveTFError(f"a module {name!r} is already imported from {origin}; automl at "
                              f"{effdet_dir} needs that name (use a fresh process)")
    if str(effdet_dir) not in sys.path:
        sys.path.insert(0, str(effdet_dir))
    names = {"hparams_config": "hparams_config", "utils": "utils",
             "efficientdet_keras": "tf2.efficientdet_keras", "util_keras": "tf2.util_keras",
             "postprocess": "tf2.postprocess", "anchors": "tf2.anchors"}
    modules = {}
    for key, name in names.items():
        try:
            modules[key] = importlib.import_module(name)
        except ImportError as error:
            raise LiveTFError(f"cannot import automl's {name} from {effdet_dir}: {error}") from None
    return SimpleNamespace(**modules)


def _automl_commit(effdet_dir: Path) -> str | None:
    """The checkout's commit from ``.git`` (plain files only), if there is one."""
    git_dir = effdet_dir.parent / ".git"
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            ref_file = git_dir / ref
            if ref_file.is_file():
                return ref_file.read_text().strip()
            packed = git_dir / "packed-refs"
            for line in packed.read_text().splitlines() if packed.is_file() else []:
                if line.endswith(" " + ref):
                    return line.split()[0]
            return None
        return head
    except OSError:
        return None


def _checkpoint_prefix(tf: Any, tf_ckpt: Path) -> str:
    """A checkpoint folder (``checkpoint`` state file or a single ``*.index``) or prefix."""
    tf_ckpt = Path(tf_ckpt).expanduser()
    if tf_ckpt.is_dir():
        latest = tf.train.latest_checkpoint(str(tf_ckpt))
        if latest and Path(latest + ".index").is_file():
            return latest
        indexes = sorted(tf_ckpt.glob("*.index"))
        if len(indexes) == 1:
            return str(indexes[0])[:-len(".index")]
        what = ("no *.index" if not indexes else
                f"{len(indexes)} *.index files and no usable checkpoint state")
        raise LiveTFError(f"{tf_ckpt}: {what} (give the checkpoint prefix, e.g. DIR/model.ckpt)")
    if Path(str(tf_ckpt) + ".index").is_file():
        return str(tf_ckpt)
    if tf_ckpt.suffix == ".index" and tf_ckpt.is_file():
        return str(tf_ckpt)[:-len(".index")]
    raise LiveTFError(f"TF checkpoint {tf_ckpt} not found (expected a folder or a prefix with "
                      f"a .index file)")


def _restore(automl: SimpleNamespace, model: Any, prefix: str, ema_decay: float) -> None:
    """``util_keras.restore_ckpt`` as KerasDriver calls it; its errors become one line."""
    try:
        automl.util_keras.restore_ckpt(model, prefix, ema_decay=ema_decay, skip_mismatch=False)
    except (KeyError, ValueError) as error:
        message = str(error.args[0] if error.args else error).splitlines()[0]
        hint = ""
        if "ExponentialMovingAverage" in message:
            hint = " (checkpoint has no EMA shadows: use moving_average_decay=0 / --no-ema)"
        raise LiveTFError(f"automl could not restore {prefix}: {message}{hint}") from None


# ---------------------------------------------------------------------------------------------
# The tapped forward pass


def _numpy(tensor: Any) -> np.ndarray:
    return np.asarray(tensor.numpy(), dtype=np.float32)


def _tap(name: str, tensor: Any) -> TapRef:
    values = _numpy(tensor)
    return TapRef(name, tuple(values.shape), values)


def _backbone_taps(backbone: Any) -> list[TapRef]:
    """Stem and every block output from the backbone's ``endpoints`` (efficientnet_model.py)."""
    endpoints = backbone.endpoints
    blocks = sorted(int(key[len("block_"):]) for key in endpoints
                    if key.startswith("block_") and key[len("block_"):].isdigit())
    if "stem" not in endpoints or not blocks:
        raise LiveTFError("automl's backbone recorded no stem/block endpoints; unsupported "
                          "backbone or automl version")
    return [_tap("backbone/stem", endpoints["stem"])] + \
        [_tap(f"backbone/block_{i:02d}", endpoints[f"block_{i}"]) for i in blocks]


# Mirrors automl efficientdet/tf2/efficientdet_keras.py::FPNCells.call @ 6a54c87 (per-cell taps).
def _cell_outputs(nodes: list[dict], cell_feats: list[Any], levels: range) -> list[Any]:
    """A BiFPN cell's output per level: the last node built at that level (FPNCells.call)."""
    new = cell_feats[len(cell_feats) - len(nodes):]
    last = {}
    for node, tensor in zip(nodes, new):
        last[node["feat_level"]] = tensor
    missing = [level for level in levels if level not in last]
    if missing:
        raise LiveTFError(f"BiFPN config has no node at levels {missing}")
    return [last[level] for level in levels]


# Mirrors automl efficientdet/tf2/efficientdet_keras.py::EfficientDetNet.call @ 6a54c87.
def _tapped_forward(net: Any, images: Any, tf_config: Any) -> tuple[list[TapRef], list, list]:
    """Sub-layers in ``EfficientDetNet.call`` order, ``training=False``; taps + head outputs."""
    min_level, max_level = tf_config.min_level, tf_config.max_level
    levels = range(min_level, max_level + 1)
    all_feats = net.backbone(images, training=False, features_only=True)
    taps = _backbone_taps(net.backbone)
    feats = list(all_feats[min_level:max_level + 1])
    taps += [_tap(f"backbone/c{min_level + i}", feat) for i, feat in enumerate(feats)]
    for layer in net.resample_layers:
        feats.append(layer(feats[-1], False, None))
        taps.append(_tap(f"fpn/in_p{min_level + len(feats) - 1}", feats[-1]))
    if len(feats) != len(levels):
        raise LiveTFError(f"backbone + resample layers give {len(feats)} levels, "
                          f"expected P{min_level}-P{max_level}")
    nodes = list(net.fpn_cells.fpn_config.nodes)
    for n, cell in enumerate(net.fpn_cells.cells):
        feats = _cell_outputs(nodes, cell(feats, False), levels)
        taps += [_tap(f"fpn/cell_{n}/p{level}", feat) for level, feat in zip(levels, feats)]
    class_outputs = net.class_net(feats, False)
    box_outputs = net.box_net(feats, False)
    for level, class_out, box_out in zip(levels, class_outputs, box_outputs):
        taps += [_tap(f"head/class_p{level}", class_out), _tap(f"head/box_p{level}", box_out)]
    return taps, list(class_outputs), list(box_outputs)


def _check_model_call(model: Any, images: Any, class_outputs: list, box_outputs: list) -> float:
    """Max |tapped - model call| over the head outputs, relative to their scale."""
    call_class, call_box = model(images, training=False, pre_mode=None, post_mode=None)[:2]
    worst = 0.0
    for tapped, called in zip([*class_outputs, *box_outputs], [*call_class, *call_box]):
        want, got = _numpy(called), _numpy(tapped)
        scale = max(float(np.abs(want).max()), 1e-12)
        worst = max(worst, float(np.abs(got - want).max()) / scale)
    if not math.isfinite(worst) or worst > _MODEL_CALL_RTOL:
        raise LiveTFError(f"tapped forward differs from automl's EfficientDetNet.call by "
                          f"{worst:.2e} of scale; this automl version is not supported")
    return worst


# ---------------------------------------------------------------------------------------------
# Post-processing


def _global_detections(automl: SimpleNamespace, tf_config: Any, class_outputs: list,
                       box_outputs: list, scales: Any) -> DetectionsRef:
    """``postprocess_global`` (automl inference default): yxyx original pixels, clipped."""
    boxes, scores, classes, valid = automl.postprocess.postprocess_global(
        tf_config.as_dict(), class_outputs, box_outputs, scales)
    count = int(np.asarray(valid).reshape(-1)[0])
    return DetectionsRef(_numpy(boxes)[0, :count].reshape(-1, 4), _numpy(scores)[0, :count],
                         _numpy(classes)[0, :count])


def _eval_detections(tf: Any, automl: SimpleNamespace, eval_config: Any, class_outputs: list,
                     box_outputs: list, scales: Any) -> DetectionsRef:
    """``generate_detections`` rows ``[id, x1, y1, x2, y2, score, class]`` -> yxyx, valid rows.

    Padding rows (per_class: zeros; pyfunc: score -1e5) have class 0; real classes are >= 1.
    """
    rows = _numpy(automl.postprocess.generate_detections(
        eval_config, class_outputs, box_outputs, scales, tf.constant([0], tf.int32)))[0]
    rows = rows[rows[:, 6] > 0]
    return DetectionsRef(rows[:, [2, 1, 4, 3]], rows[:, 5], rows[:, 6])


# ---------------------------------------------------------------------------------------------


def tf_reference(automl_dir: Path, tf_ckpt: Path, config: DetConfig,
                 image: np.ndarray | None = None, *, check_model_call: bool = True) -> Reference:
    """Runs automl's TF EfficientDet on ``image`` and returns what a golden folder would hold.

    Args:
        automl_dir: a google/automl checkout (the repository root or its ``efficientdet/``).
        tf_ckpt: TF checkpoint folder or prefix (TF1 name-based like the released ones, or a
            TF2 object-based one; whatever ``util_keras.restore_ckpt`` reads).
        config: the model; its ``name`` picks automl's variant and every other field overrides
            automl's hparams of the same name. ``moving_average_decay`` > 0 loads the EMA shadows
            (which must then exist), 0 the raw values.
        image: ``[H, W, 3]`` RGB ``uint8``; default automl's ``testdata/img1.jpg`` decoded with PIL.
        check_model_call: also run automl's ``EfficientDetNet.call`` and require the tapped head
            outputs to equal it (one more forward pass).

    Returns:
        A :class:`Reference` with every tap whole (NHWC float32, batch 1) in graph order, the
        network input as ``input`` (``input/image``), ``image_scale_to_original`` from automl's
        preprocessing, and detections ``global`` / ``per_class`` / ``pyfunc`` (valid rows only,
        ``boxes_yxyx`` in original-image pixels, classes 1-based).

    Raises:
        LiveTFError: automl checkout, TensorFlow/tf_keras or the checkpoint is missing or unusable.
        ValueError: ``image`` is not an ``[H, W, 3]`` array.
    """
    effdet_dir = _efficientdet_dir(automl_dir)
    image_file = None
    if image is None:
        image_file = effdet_dir / _AUTOML_TEST_IMAGE
        if not image_file.is_file():
            raise LiveTFError(f"no image given and {image_file} not found")
        from model.preprocess import load_image
        image = load_image(image_file)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    tf = _import_tensorflow()
    automl = _import_automl(effdet_dir)
    tf_config = _automl_config(automl, config)
    prefix = _checkpoint_prefix(tf, tf_ckpt)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    # Keras 2 makes layer names unique per session ('stem' -> 'stem_1' for a second model), and
    # the checkpoint keys are those names: every model here must be the session's first.
    tf.keras.backend.clear_session()
    model = automl.efficientdet_keras.EfficientDetModel(config=tf_config)
    height, width = automl.utils.parse_image_size(tf_config.image_size)
    model.build((1, height, width, 3))
    _restore(automl, model, prefix, float(config.moving_average_decay))
    timings["build_restore_s"] = time.perf_counter() - start
    logger.info("automl %s built and restored from %s", config.name, prefix)

    start = time.perf_counter()
    raw = tf.convert_to_tensor(image[np.newaxis], dtype=tf.uint8)
    if not hasattr(model, "_preprocessing"):
        raise LiveTFError("this automl's EfficientDetModel has no _preprocessing; unsupported "
                          "automl version")
    images, scales = model._preprocessing(raw, tf_config.image_size, tf_config.mean_rgb,
                                          tf_config.stddev_rgb, "infer")
    taps, class_outputs, box_outputs = _tapped_forward(model, images, tf_config)
    timings["tapped_forward_s"] = time.perf_counter() - start
    info: dict[str, Any] = {}
    if check_model_call:
        info["model_call_rel_diff"] = _check_model_call(model, images, class_outputs, box_outputs)

    start = time.perf_counter()
    detections = {
        "global": _global_detections(automl, tf_config, class_outputs, box_outputs, scales),
        "per_class": _eval_detections(tf, automl, _eval_config(automl, tf_config, False),
                                      class_outputs, box_outputs, scales),
        "pyfunc": _eval_detections(tf, automl, _eval_config(automl, tf_config, True),
                                   class_outputs, box_outputs, scales),
    }
    timings["postprocess_s"] = time.perf_counter() - start

    info.update(
        source="live TF", automl_dir=str(effdet_dir), automl_commit=_automl_commit(effdet_dir),
        tf_version=tf.__version__, checkpoint=prefix, ema=config.moving_average_decay > 0,
        restore=f"tf2/util_keras.restore_ckpt(model, ckpt, "
                f"ema_decay={config.moving_average_decay}, skip_mismatch=False)",
        image_size=tf_config.image_size, timings_s=timings)
    return Reference(
        variant=config.name, num_classes=int(tf_config.num_classes), image_hw=(height, width),
        image_scale_to_original=float(_numpy(scales).reshape(-1)[0]), taps=taps,
        detections=detections, input=_tap("input/image", images), image_file=image_file,
        info=info)
