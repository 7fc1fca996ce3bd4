"""The PyTorch EfficientDet against automl's own facts: the reference manifests (every variable
name and shape), hparams (config, BiFPN nodes, backbone blocks) and golden.json tap shapes; plus
hand-computed fusion weights, anchors, resampling, BN/drop-connect training behaviour,
``reset_head`` and the weight files.

Whole-variant checks run on the meta device (shapes only, no memory, no arithmetic); value checks
use small inputs on CPU.
"""
from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from helpers import REFERENCE_DIR, cached_manifest
from mappings import mapping_table
from model import fpn_config
from model.anchors import Anchors, anchor_boxes_yxyx
from model.bifpn import FNode, ResampleFeatureMap
from model.config import DetConfig, get_config, parse_image_size
from model.efficientdet import EfficientDet
from model.efficientnet_config import BACKBONES, build_blocks, stem_filters
from model.fpn_config import FpnNode, feat_sizes
from model.head import class_prior_bias
from model.weights_io import load_weights, save_weights

pytestmark = pytest.mark.usefixtures("single_thread")

MANIFEST_DIRS = sorted(p.parent.name for p in REFERENCE_DIR.glob("*/manifest.json"))
GOLDEN_DIRS = sorted(p.parent.name for p in REFERENCE_DIR.glob("*/golden.json"))




@functools.lru_cache(maxsize=None)
def _meta_model(dir_name: str) -> EfficientDet:
    """The model of a manifest, built as the brief says: name + num_classes + image_hw."""
    manifest = cached_manifest(dir_name)
    hparams = manifest["hparams"]
    with torch.device("meta"):
        model = EfficientDet.from_config(hparams["name"], num_classes=manifest["num_classes"],
                                         image_size=hparams["image_hw"])
    return model.eval()


def _model_vars(manifest: dict) -> list[dict]:
    return [v for v in manifest["variables"] if v["role"] == "model"]


def _persistent_state(model: EfficientDet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def _nchw(nhwc_shape) -> tuple[int, ...]:
    n, h, w, c = nhwc_shape
    return (n, c, h, w)


# ------------------------------------------------------------------------ manifests: structure

@pytest.mark.parametrize("dir_name", MANIFEST_DIRS)
def test_parameter_count_and_size_match_manifest(dir_name):
    manifest = cached_manifest(dir_name)
    model = _meta_model(dir_name)
    expected = _model_vars(manifest)
    state = _persistent_state(model)
    params = dict(model.named_parameters())
    bn_buffers = {k: v for k, v in model.named_buffers()
                  if k.endswith(("running_mean", "running_var"))}
    # Parameters + BN statistics are exactly the persistent state (nothing else is saved).
    assert set(state) == set(params) | set(bn_buffers)
    assert len(state) == len(expected) == manifest["counts"]["model"]
    total = sum(v.numel() for v in state.values())
    assert total == sum(math.prod(v["shape"]) for v in expected) == manifest["num_model_params"]


@pytest.mark.parametrize("dir_name", MANIFEST_DIRS)
def test_mapping_table_names_and_shapes_equal_manifest(dir_name):
    """automl's test_model_variables, across frameworks: the TF names + shapes our model maps to
    are exactly the checkpoint's model variables, and each PT shape is the state_dict's."""
    manifest = cached_manifest(dir_name)
    model = _meta_model(dir_name)
    table = mapping_table(model.config)
    tf_side = {e.tf_name: tuple(e.tf_shape) for e in table}
    expected = {v["name"]: tuple(v["shape"]) for v in _model_vars(manifest)}
    assert len(tf_side) == len(table)
    missing, extra = sorted(set(expected) - set(tf_side)), sorted(set(tf_side) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    wrong = {n: (tf_side[n], s) for n, s in expected.items() if tf_side[n] != s}
    assert not wrong
    state = _persistent_state(model)
    assert sorted(e.pt_name for e in table) == sorted(state)
    assert all(tuple(state[e.pt_name].shape) == tuple(e.pt_shape) for e in table)


HPARAM_TO_CONFIG = {   # automl summary field -> DetConfig field (same name unless noted)
    "name": "name",
    "backbone_name": "backbone_name",
    "fpn_num_filters": "fpn_num_filters",
    "fpn_cell_repeats": "fpn_cell_repeats",
    "box_class_repeats": "box_class_repeats",
    "min_level": "min_level",
    "max_level": "max_level",
    "num_scales": "num_scales",
    "anchor_scale": "anchor_scale",
    "act_type": "act_type",
    "separable_conv": "separable_conv",
    "conv_bn_act_pattern": "conv_bn_act_pattern",
    "apply_bn_for_resampling": "apply_bn_for_resampling",
    "conv_after_downsample": "conv_after_downsample",
    "num_classes": "num_classes",
    "survival_prob": "survival_prob",
    "moving_average_decay": "moving_average_decay",
    "nms_configs": "nms_configs",
    "fpn_weight_method_effective": "fpn_weight_method",  # automl leaves None = fastattn
    "fpn_name_effective": "fpn_name",
}


@pytest.mark.parametrize("dir_name", MANIFEST_DIRS)
def test_config_fields_equal_hparams(dir_name):
    manifest = cached_manifest(dir_name)
    hparams = manifest["hparams"]
    config = _meta_model(dir_name).config
    for hp_name, field in HPARAM_TO_CONFIG.items():
        assert getattr(config, field) == hparams[hp_name], hp_name
    assert config.image_size == tuple(hparams["image_hw"])
    assert parse_image_size(hparams["image_size"]) == tuple(hparams["image_hw"])
    assert list(config.aspect_ratios) == pytest.approx(hparams["aspect_ratios"])
    for name in ("mean_rgb", "stddev_rgb"):
        ours, theirs = getattr(config, name), hparams[name]
        assert np.asarray(ours, dtype=float) == pytest.approx(np.asarray(theirs, dtype=float))
    assert config.num_anchors == hparams["num_anchors_per_location"]
    # Every DetConfig field automl also names was compared above.
    config_fields = {f for f in DetConfig.__dataclass_fields__}
    compared = set(HPARAM_TO_CONFIG.values()) | {"image_size", "aspect_ratios", "mean_rgb",
                                                 "stddev_rgb"}
    assert (config_fields & set(hparams)) <= compared
    # The variant table alone (no overrides) gives automl's config, except what the manifest
    # overrides on purpose (odd image sizes, num_classes).
    plain = get_config(manifest["variant"])
    if "image_size_override" not in manifest:
        assert plain.image_size == tuple(hparams["image_hw"])
    else:
        assert plain.image_size != tuple(hparams["image_hw"])
    assert plain.num_classes == 90
    assert plain.replace(image_size=tuple(hparams["image_hw"]),
                         num_classes=manifest["num_classes"]) == config


@pytest.mark.parametrize("dir_name", MANIFEST_DIRS)
def test_bifpn_nodes_equal_hparams(dir_name):
    hparams = cached_manifest(dir_name)["hparams"]
    config = _meta_model(dir_name).config
    nodes = fpn_config.bifpn_nodes(config.min_level, config.max_level)
    assert [(n.feat_level, list(n.inputs_offsets)) for n in nodes] == \
        [(d["feat_level"], d["inputs_offsets"]) for d in hparams["fpn_nodes"]]
    cell = _meta_model(dir_name).fpn_cells.cell_0
    assert [cell.get_submodule(f"fnode{i}").inputs_offsets for i in range(len(nodes))] == \
        [n.inputs_offsets for n in nodes]


@pytest.mark.parametrize("dir_name", MANIFEST_DIRS)
def test_backbone_blocks_equal_hparams(dir_name):
    hparams = cached_manifest(dir_name)["hparams"]
    config = _meta_model(dir_name).config
    blocks = build_blocks(BACKBONES[config.backbone_name])
    built = hparams["backbone_blocks_built"]
    assert len(blocks) == len(built)
    assert [(b.kernel_size, b.input_filters, b.output_filters, b.expand_ratio, b.stride,
             b.se_ratio, b.id_skip) for b in blocks] == \
        [(r["kernel_size"], r["input_filters"], r["output_filters"], r["expand_ratio"],
          r["strides"][0], r["se_ratio"], r["id_skip"]) for r in built]
    assert all(r["strides"][0] == r["strides"][1] for r in built)
    assert len(_meta_model(dir_name).backbone.blocks) == len(built)


@pytest.mark.parametrize("dir_name", [d for d in MANIFEST_DIRS
                                      if d in ("efficientdet-lite3", "efficientdet-lite4")])
def test_keras_channel_quirk_of_lite3_lite4_blocks_0(dir_name):
    """The block args of blocks_0 say 40 / 48 input filters, but fix_head_stem keeps the stem at
    32 and Keras sizes layers from the incoming tensor: the checkpoint (and our model) use 32."""
    manifest = cached_manifest(dir_name)
    model = _meta_model(dir_name)
    args = build_blocks(BACKBONES[model.config.backbone_name])[0]
    stem = stem_filters(BACKBONES[model.config.backbone_name])
    assert stem == 32 and args.input_filters in (40, 48)
    shapes = {v["name"]: v["shape"] for v in _model_vars(manifest)}
    backbone = model.config.backbone_name
    assert shapes[f"{backbone}/blocks_0/depthwise_conv2d/depthwise_kernel"] == [3, 3, 32, 1]
    assert model.backbone.blocks[0].depthwise_conv2d.weight.shape == (32, 1, 3, 3)
    assert model.backbone.blocks[0].conv2d.weight.shape == (args.output_filters, 32, 1, 1)


@pytest.mark.parametrize("dir_name", GOLDEN_DIRS)
def test_reduction_endpoints_equal_golden(dir_name):
    golden = json.loads((REFERENCE_DIR / dir_name / "golden.json").read_text(encoding="utf-8"))
    endpoints = _meta_model(dir_name).backbone.endpoints
    assert len(endpoints) == 5
    assert {f"c{level}": endpoints[level - 1] for level in (3, 4, 5)} == \
        {name: e["block"] for name, e in golden["backbone_endpoints"].items()}


@pytest.mark.parametrize("dir_name", GOLDEN_DIRS)
def test_taps_have_golden_names_and_shapes(dir_name):
    """Every golden tap exists with the golden's shape (golden NHWC, ours NCHW)."""
    golden = json.loads((REFERENCE_DIR / dir_name / "golden.json").read_text(encoding="utf-8"))
    model = _meta_model(dir_name)
    assert list(model.config.image_size) == golden["image_hw"]
    images = torch.empty(1, 3, *golden["image_hw"], device="meta")
    (class_outputs, box_outputs), taps = model.forward_with_taps(images)
    missing = [t["name"] for t in golden["taps"] if t["name"] not in taps]
    assert not missing
    wrong = {t["name"]: (tuple(taps[t["name"]].shape), _nchw(t["shape"]))
             for t in golden["taps"] if tuple(taps[t["name"]].shape) != _nchw(t["shape"])}
    assert not wrong
    levels = range(model.config.min_level, model.config.max_level + 1)
    assert [tuple(c.shape) for c in class_outputs] == \
        [tuple(taps[f"head/class_p{level}"].shape) for level in levels]
    assert [tuple(b.shape) for b in box_outputs] == \
        [tuple(taps[f"head/box_p{level}"].shape) for level in levels]


# ------------------------------------------------------------------------ forward shapes

@pytest.mark.parametrize("variant,image_size,sizes", [
    ("efficientdet-lite0", 320, [(40, 40), (20, 20), (10, 10), (5, 5), (3, 3)]),
    ("efficientdet-d0", "600x420", [(53, 75), (27, 38), (14, 19), (7, 10), (4, 5)]),
    ("efficientdet-lite1", "500x340", [(43, 63), (22, 32), (11, 16), (6, 8), (3, 4)]),
    ("efficientdet-d7x", 1536, [(192, 192), (96, 96), (48, 48), (24, 24), (12, 12), (6, 6)]),
])
def test_forward_returns_per_level_shapes(variant, image_size, sizes):
    with torch.device("meta"):
        model = EfficientDet.from_config(variant, image_size=image_size).eval()
    height, width = model.config.image_size
    class_outputs, box_outputs = model(torch.empty(2, 3, height, width, device="meta"))
    anchors = model.config.num_anchors
    assert [tuple(c.shape) for c in class_outputs] == [(2, anchors * 90, h, w) for h, w in sizes]
    assert [tuple(b.shape) for b in box_outputs] == [(2, anchors * 4, h, w) for h, w in sizes]
    levels = feat_sizes(model.config.image_size, model.config.max_level)
    assert levels[model.config.min_level:] == sizes


def test_feature_sizes_ceil_halve():
    assert feat_sizes((320, 320), 7)[3:] == [(40, 40), (20, 20), (10, 10), (5, 5), (3, 3)]
    assert feat_sizes((420, 600), 7)[3] == (53, 75)
    assert feat_sizes((5, 7), 2) == [(5, 7), (3, 4), (2, 2)]


def test_forward_on_cpu_taps_do_not_change_outputs():
    torch.manual_seed(0)
    model = EfficientDet.from_config("efficientdet-lite0", image_size=128).eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        plain_cls, plain_box = model(images, taps=None)
        (tap_cls, tap_box), taps = model.forward_with_taps(images)
    assert [tuple(c.shape) for c in plain_cls] == [(2, 810, s, s) for s in (16, 8, 4, 2, 1)]
    assert [tuple(b.shape) for b in plain_box] == [(2, 36, s, s) for s in (16, 8, 4, 2, 1)]
    for a, b in zip(plain_cls + plain_box, tap_cls + tap_box):
        assert torch.equal(a, b)
    assert torch.equal(taps["head/class_p3"], plain_cls[0])
    assert torch.equal(taps["head/box_p7"], plain_box[-1])
    assert taps["backbone/stem"].shape == (2, 32, 64, 64)
    assert all(torch.isfinite(t).all() for t in plain_cls + plain_box)


# ------------------------------------------------------------------------ fusion, anchors, resample

def _fnode(method: str) -> tuple[FNode, list[torch.Tensor]]:
    config = get_config("efficientdet-d0", fpn_weight_method=method)
    channels = config.fpn_num_filters
    node = FNode(FpnNode(4, (1, 7, 8)), [channels] * 9, config)
    torch.manual_seed(1)
    inputs = [torch.randn(1, channels, 4, 4) for _ in range(3)]
    return node, inputs


def test_fuse_fastattn_relu_normalised_with_negative_weight():
    node, (x0, x1, x2) = _fnode("fastattn")
    assert node.weight_names == ["WSM", "WSM_1", "WSM_2"]
    with torch.no_grad():
        node.WSM.fill_(2.0)
        node.WSM_1.fill_(-1.0)     # relu -> 0: this input is dropped
        node.WSM_2.fill_(0.5)
    expected = (2.0 * x0 + 0.0 * x1 + 0.5 * x2) / (2.0 + 0.0 + 0.5 + 1e-4)
    torch.testing.assert_close(node.fuse([x0, x1, x2]), expected, rtol=1e-6, atol=1e-6)
    # Without the relu the negative weight would leak in:
    wrong = (2.0 * x0 - 1.0 * x1 + 0.5 * x2) / (1.5 + 1e-4)
    assert not torch.allclose(node.fuse([x0, x1, x2]), wrong)


def test_fuse_attn_is_softmax():
    node, (x0, x1, x2) = _fnode("attn")
    with torch.no_grad():
        node.WSM.fill_(2.0)
        node.WSM_1.fill_(-1.0)
        node.WSM_2.fill_(0.5)
    e = [math.exp(2.0), math.exp(-1.0), math.exp(0.5)]
    w = [v / sum(e) for v in e]
    expected = w[0] * x0 + w[1] * x1 + w[2] * x2
    torch.testing.assert_close(node.fuse([x0, x1, x2]), expected, rtol=1e-5, atol=1e-6)


def test_fuse_sum_has_no_weights():
    node, (x0, x1, x2) = _fnode("sum")
    assert node.weight_names == [] and not any("WSM" in n for n, _ in node.named_parameters())
    torch.testing.assert_close(node.fuse([x0, x1, x2]), x0 + x1 + x2, rtol=0, atol=0)


def test_anchors_tiny_config_hand_computed():
    """64x64, P3-P4, one scale, aspect 1, anchor_scale 4: P3 stride 8 (8x8 grid), box side
    4 * 8 = 32; P4 stride 16 (4x4 grid), side 64. Order: level, row (y), column (x)."""
    config = get_config("efficientdet-d0", image_size=64, min_level=3, max_level=4, num_scales=1,
                        aspect_ratios=(1.0,), anchor_scale=4.0)
    boxes = anchor_boxes_yxyx(config)
    assert boxes.shape == (8 * 8 + 4 * 4, 4)
    np.testing.assert_allclose(boxes[0], [4 - 16, 4 - 16, 4 + 16, 4 + 16])      # (y, x) = (4, 4)
    np.testing.assert_allclose(boxes[1], [4 - 16, 12 - 16, 4 + 16, 12 + 16])    # next column
    np.testing.assert_allclose(boxes[8], [12 - 16, 4 - 16, 12 + 16, 4 + 16])    # next row
    np.testing.assert_allclose(boxes[63], [60 - 16, 60 - 16, 60 + 16, 60 + 16])
    np.testing.assert_allclose(boxes[64], [8 - 32, 8 - 32, 8 + 32, 8 + 32])     # first P4 box
    np.testing.assert_allclose(boxes[-1], [56 - 32, 56 - 32, 56 + 32, 56 + 32])
    buffer = Anchors(config).boxes_yxyx
    assert buffer.dtype == torch.float32 and buffer.shape == (80, 4)
    np.testing.assert_allclose(buffer.numpy(), boxes.astype(np.float32))
    with torch.device("meta"):
        assert "anchors.boxes_yxyx" not in EfficientDet(config).state_dict()   # not persistent


def test_anchors_scales_and_aspects_hand_computed():
    """Two octaves, aspect 2: per location (octave 0, aspect 1), (0, 2), (1, 1), (1, 2);
    aspect a gives width * sqrt(a), height / sqrt(a)."""
    config = get_config("efficientdet-d0", image_size=64, min_level=3, max_level=3, num_scales=2,
                        aspect_ratios=(1.0, 2.0), anchor_scale=4.0)
    boxes = anchor_boxes_yxyx(config)
    assert boxes.shape == (64 * 4, 4)
    half = 16.0
    s, r = 2 ** 0.5, 2 ** 0.5      # octave 1 of 2 -> 2^(1/2); sqrt(aspect 2)
    expected = [[half, half], [half / r, half * r], [half * s, half * s],
                [half * s / r, half * s * r]]
    for box, (hy, hx) in zip(boxes[:4], expected):
        np.testing.assert_allclose(box, [4 - hy, 4 - hx, 4 + hy, 4 + hx], rtol=1e-12)


def test_anchors_non_square_odd_size():
    """d0 at '600x420' (H 420, W 600): P3 is 53x75, stride 420/53 in y and 8.0 in x."""
    config = get_config("efficientdet-d0", image_size="600x420")
    assert config.image_size == (420, 600)
    boxes = anchor_boxes_yxyx(config)
    sizes = [(53, 75), (27, 38), (14, 19), (7, 10), (4, 5)]
    assert boxes.shape == (9 * sum(h * w for h, w in sizes), 4)
    sy, sx = 420 / 53, 8.0
    # First box: centre (sy/2, sx/2), octave 0, aspect 1 -> half size 4 * stride / 2 per axis.
    np.testing.assert_allclose(boxes[0], [sy / 2 - 2 * sy, sx / 2 - 2 * sx,
                                          sy / 2 + 2 * sy, sx / 2 + 2 * sx], rtol=1e-12)
    np.testing.assert_allclose(boxes[0], [-1.5 * 420 / 53, -12.0, 2.5 * 420 / 53, 20.0])
    # Last box: P7 (4x5, stride 105 x 120), last cell, octave 2, aspect 0.5.
    cy, cx = 105 / 2 + 3 * 105, 120 / 2 + 4 * 120
    hy = 4 * 105 * 2 ** (2 / 3) / 2 * math.sqrt(2)
    hx = 4 * 120 * 2 ** (2 / 3) / 2 / math.sqrt(2)
    np.testing.assert_allclose(boxes[-1], [cy - hy, cx - hx, cy + hy, cx + hx], rtol=1e-12)


def test_nearest_upsample_3_to_5_uses_floor_index():
    resample = ResampleFeatureMap(4, 4)       # same channels: no conv, just resize
    assert resample.conv2d is None
    x = torch.arange(4 * 3 * 3, dtype=torch.float32).reshape(1, 4, 3, 3)
    out = resample(x, (5, 5))
    index = [math.floor(i * 3 / 5) for i in range(5)]
    assert index == [0, 0, 1, 1, 2]
    assert torch.equal(out, x[:, :, index][:, :, :, index])
    y = torch.arange(3 * 4, dtype=torch.float32).reshape(1, 1, 3, 4)
    out = ResampleFeatureMap(1, 1)(y, (5, 7))
    rows, cols = [i * 3 // 5 for i in range(5)], [j * 4 // 7 for j in range(7)]
    assert torch.equal(out, y[:, :, rows][:, :, :, cols])


@pytest.mark.needs_tf
def test_nearest_upsample_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    for (h, w), target in [((3, 3), (5, 5)), ((3, 4), (5, 7)), ((4, 4), (8, 8)), ((2, 5), (3, 9))]:
        x = rng.standard_normal((1, h, w, 2)).astype(np.float32)
        expected = tf.compat.v1.image.resize_nearest_neighbor(x, target).numpy()
        got = ResampleFeatureMap(2, 2)(torch.from_numpy(x).permute(0, 3, 1, 2), target)
        np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), expected)


def test_downsample_is_max_pool_kernel3_stride2_same():
    resample = ResampleFeatureMap(1, 1)
    x = -(torch.arange(25.0).reshape(1, 1, 5, 5) + 1)
    out = resample(x, (3, 3))
    expected = torch.tensor([[x[0, 0, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].max()
                              for c in (0, 2, 4)] for r in (0, 2, 4)])
    assert torch.equal(out[0, 0], expected)


# ------------------------------------------------------------------------ training behaviour

def test_bn_momentum_updates_running_stats_by_one_percent():
    torch.manual_seed(0)
    model = EfficientDet.from_config("efficientdet-lite0", image_size=64).train()
    bn = model.backbone.stem.tpu_batch_normalization
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    captured = {}
    hook = model.backbone.stem.conv2d.register_forward_hook(
        lambda module, args, out: captured.setdefault("x", out.detach().clone()))
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    hook.remove()
    x = captured["x"]
    batch_mean = x.mean((0, 2, 3))
    batch_var = x.var((0, 2, 3), unbiased=True)   # PyTorch (like TF's fused BN) updates with n/(n-1)
    torch.testing.assert_close(bn.running_mean, 0.99 * 0.5 + 0.01 * batch_mean,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, 0.99 * 2.0 + 0.01 * batch_var,
                               rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1
    before = bn.running_mean.clone()
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    assert torch.equal(bn.running_mean, before)          # eval never updates


def test_drop_connect_only_in_training():
    torch.manual_seed(0)
    model = EfficientDet.from_config("efficientdet-d1", image_size=64)
    blocks = model.backbone.blocks
    # b1 survival 0.8, decaying linearly with the block index (efficientnet_model.Model.call).
    assert [b.survival_prob for b in blocks] == \
        pytest.approx([1.0 - 0.2 * i / len(blocks) for i in range(len(blocks))])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.eval()
        first, second = model(images), model(images)
        assert all(torch.equal(a, b) for a, b in zip(first[0] + first[1], second[0] + second[1]))
        model.train()
        torch.manual_seed(1)
        train_a = model(images)[0]
        torch.manual_seed(2)
        train_b = model(images)[0]
    assert not all(torch.equal(a, b) for a, b in zip(train_a, train_b))


def test_b0_has_no_drop_connect_even_in_training():
    torch.manual_seed(0)
    model = EfficientDet.from_config("efficientdet-d0", image_size=64).train()
    assert all(not b.survival_prob for b in model.backbone.blocks)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(images)[0]
        torch.manual_seed(2)
        b = model(images)[0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------ reset_head, weights

def test_reset_head_changes_only_class_predict():
    torch.manual_seed(0)
    model = EfficientDet.from_config("efficientdet-d0", image_size=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_head(20)
    after = model.state_dict()
    assert set(after) == set(before)
    changed = sorted(k for k in after if after[k].shape != before[k].shape)
    assert changed == ["class_net.class_predict.pointwise.bias",
                       "class_net.class_predict.pointwise.weight"]
    assert after["class_net.class_predict.pointwise.weight"].shape == (9 * 20, 64, 1, 1)
    assert torch.all(after["class_net.class_predict.pointwise.bias"] == class_prior_bias())
    for key in after:
        if not key.startswith("class_net.class_predict."):
            assert torch.equal(after[key], before[key]), key
    assert model.config.num_classes == 20
    with torch.no_grad():
        class_outputs, _ = model.eval()(torch.randn(1, 3, 128, 128))
    assert class_outputs[0].shape == (1, 180, 16, 16)
    if (REFERENCE_DIR / "efficientdet-d0-nc20" / "manifest.json").is_file():
        nc20 = {v["name"]: tuple(v["shape"]) for v in _model_vars(cached_manifest("efficientdet-d0-nc20"))}
        assert {e.tf_name: tuple(e.tf_shape) for e in mapping_table(model.config)} == nc20


def _metadata(model: EfficientDet) -> dict:
    return {"variant": model.config.name, "config": model.config.to_dict(),
            "source": {"path": "/x/model.ckpt", "format": "tf1", "ema": "shadows"},
            "tool": {"name": "effdet-tf-port", "version": "test"}}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    model = EfficientDet.from_config("efficientdet-lite0", image_size=128, num_classes=7).eval()
    state = model.state_dict()
    path = save_weights(tmp_path / f"w{suffix}", state, _metadata(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"w{suffix}"]   # no temp file left
    loaded, metadata = load_weights(path)
    assert metadata == _metadata(model)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    restored = EfficientDet.from_pretrained(path)
    assert not restored.training and restored.config == model.config
    assert restored.metadata == metadata
    assert all(torch.equal(v, state[k]) for k, v in restored.state_dict().items())
    # Input-side overrides rebuild the anchors, not the weights.
    bigger = EfficientDet.from_pretrained(path, image_size=256)
    assert bigger.config.image_size == (256, 256) and bigger.anchors.boxes_yxyx.shape[0] > \
        restored.anchors.boxes_yxyx.shape[0]


def test_from_pretrained_is_strict(tmp_path):
    model = EfficientDet.from_config("efficientdet-lite0", image_size=128)
    state = dict(model.state_dict())
    state.pop("box_net.box_predict.pointwise.bias")
    save_weights(tmp_path / "partial.pth", state, _metadata(model))
    with pytest.raises(RuntimeError, match="box_net.box_predict.pointwise.bias"):
        EfficientDet.from_pretrained(tmp_path / "partial.pth")
    save_weights(tmp_path / "nometa.safetensors", model.state_dict(), {})
    with pytest.raises(ValueError, match="no config metadata"):
        EfficientDet.from_pretrained(tmp_path / "nometa.safetensors")


def test_weights_wrong_suffix_raises(tmp_path):
    model = EfficientDet.from_config("efficientdet-lite0", image_size=128)
    with pytest.raises(ValueError, match="unsupported weights extension"):
        save_weights(tmp_path / "w.bin", model.state_dict(), _metadata(model))
    assert not list(tmp_path.iterdir())
    (tmp_path / "w.ckpt").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="unsupported weights extension"):
        load_weights(tmp_path / "w.ckpt")
    with pytest.raises(ValueError, match="unsupported weights extension"):
        EfficientDet.from_pretrained(tmp_path / "w.ckpt")



@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_damaged_weights_file_is_a_value_error(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    path.write_bytes(b"not weights at all")
    with pytest.raises(ValueError, match="not a readable weights file"):
        load_weights(path)


@pytest.mark.parametrize("path", ["global", "per_class", "pyfunc"])
def test_predict_honours_max_nms_inputs_on_every_path(path, single_thread):
    torch.manual_seed(0)
    model = EfficientDet.from_config("efficientdet-lite0", image_size="128x128").eval()
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    assert int(model.predict(image, postprocess=path).valid[0]) == 100
    assert int(model.predict(image, postprocess=path, max_nms_inputs=3).valid[0]) <= 3
