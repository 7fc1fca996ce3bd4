"""The TF -> PyTorch mapping rules (mappings/): rule precedence on every manifest name, the
STYLE.md §2 normalisation examples, the ignore list, layout transforms checked by running the
convolutions, and the committed tables."""
from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import REFERENCE_DIR, cached_manifest
from mappings import IGNORED_TF, Layout, mapping_table, tf_to_pt
from mappings.layouts import pt_shape, tf_shape, to_torch
from mappings.rules import RULES
from model.config import get_config
from model.tf_compat import SeparableConv2d

MANIFEST_DIRS = sorted(p.parent.name for p in REFERENCE_DIR.glob("*/manifest.json"))

# Pairs of rules (by index in RULES) that both match some TF name; the earlier one wins on
# purpose. Any other overlap is an accident of the regexes.
INTENDED_OVERLAPS = {
    # MBConv 'depthwise_conv2d/depthwise_kernel' is a plain depthwise conv (weight), not the
    # depthwise half of a Keras SeparableConv2D (depthwise.weight).
    (("{scope}/depthwise_kernel", "{scope}.weight"),
     ("{scope}/depthwise_kernel", "{scope}.depthwise.weight")),
    # A SeparableConv2D's one bias is added after the pointwise conv (pointwise.bias).
    (("{scope}/bias", "{scope}.pointwise.bias"), ("{scope}/bias", "{scope}.bias")),
}


@functools.lru_cache(maxsize=None)
def _table(dir_name: str) -> tuple:
    """(config, {tf_name: MappingEntry}) of a manifest's variant, classes and image size."""
    manifest = cached_manifest(dir_name)
    hparams = manifest["hparams"]
    config = get_config(hparams["name"], num_classes=manifest["num_classes"],
                        image_size=hparams["image_hw"])
    return config, {e.tf_name: e for e in mapping_table(config)}


def _matching_rules(name: str, separable: bool) -> list[int]:
    hits = []
    for index, rule in enumerate(RULES):
        if rule.separable_only and not separable:
            continue
        match = rule.tf_regex.match(name)
        if match and rule.scope_ok(match["scope"]):
            hits.append(index)
    return hits


def _apply_rule(rule, name: str) -> str:
    """The key one rule alone would give (the test's own, simple scope normalisation)."""
    fields = rule.tf_regex.match(name).groupdict()
    scope = re.sub(r"^efficientnet-(?:b\d+|lite\d+)/", "backbone/", fields["scope"])
    fields["scope"] = re.sub(r"blocks_(\d+)", r"blocks/\1", scope).replace("/", ".").replace("-", "_")
    return rule.pt.format(**fields)


@pytest.mark.parametrize("dir_name", MANIFEST_DIRS)
def test_rules_resolve_every_manifest_name_once(dir_name):
    """Each model variable has one winning rule; where two rules match with different keys,
    the overlap is one of the intended ones and the earlier rule's key is the table's."""
    manifest = cached_manifest(dir_name)
    config, table = _table(dir_name)
    overlaps = set()
    for var in manifest["variables"]:
        if var["role"] != "model":
            continue
        name = var["name"]
        hits = _matching_rules(name, config.separable_conv)
        assert hits, f"no rule matches {name}"
        results = {(_apply_rule(RULES[i], name), RULES[i].layout) for i in hits}
        if len(results) > 1:
            overlaps.add(tuple((RULES[i].tf, RULES[i].pt) for i in hits))
        entry = table[name]
        assert tf_to_pt(name, config.separable_conv) == (entry.pt_name, entry.layout)
        first = RULES[hits[0]]
        assert (_apply_rule(first, name), first.layout) == (entry.pt_name, entry.layout)
    assert overlaps <= INTENDED_OVERLAPS


@pytest.mark.parametrize("dir_name", MANIFEST_DIRS)
def test_ignore_list_covers_exactly_the_non_model_variables(dir_name):
    for var in cached_manifest(dir_name)["variables"]:
        ignored = [p for p in IGNORED_TF if re.search(p, var["name"])]
        if var["role"] in ("optimizer_slot", "step"):
            assert ignored, var["name"]
        else:
            assert not ignored, (var["name"], ignored)
            if var["role"] == "model":
                assert tf_to_pt(var["name"]) is not None
            else:   # EMA shadows are found by suffix, never by a rule
                assert tf_to_pt(var["name"]) is None


@pytest.mark.parametrize("tf_name,pt_name,layout", [
    ("efficientnet-b0/blocks_0/depthwise_conv2d/depthwise_kernel",
     "backbone.blocks.0.depthwise_conv2d.weight", Layout.DEPTHWISE_HWCM_TO_OIHW),
    ("efficientnet-b3/stem/conv2d/kernel", "backbone.stem.conv2d.weight",
     Layout.CONV2D_HWIO_TO_OIHW),
    ("efficientnet-lite0/blocks_12/tpu_batch_normalization_2/moving_variance",
     "backbone.blocks.12.tpu_batch_normalization_2.running_var", Layout.IDENTITY),
    ("efficientnet-b0/blocks_3/se/conv2d_1/bias", "backbone.blocks.3.se.conv2d_1.bias",
     Layout.IDENTITY),
    ("class_net/class-0-bn-3/gamma", "class_net.class_0_bn_3.weight", Layout.IDENTITY),
    ("box_net/box-2-bn-7/beta", "box_net.box_2_bn_7.bias", Layout.IDENTITY),
    ("box_net/box-1-bn-5/moving_mean", "box_net.box_1_bn_5.running_mean", Layout.IDENTITY),
    ("class_net/class-predict/depthwise_kernel", "class_net.class_predict.depthwise.weight",
     Layout.DEPTHWISE_HWCM_TO_OIHW),
    ("class_net/class-predict/pointwise_kernel", "class_net.class_predict.pointwise.weight",
     Layout.CONV2D_HWIO_TO_OIHW),
    ("class_net/class-predict/bias", "class_net.class_predict.pointwise.bias", Layout.IDENTITY),
    ("box_net/box-0/bias", "box_net.box_0.pointwise.bias", Layout.IDENTITY),
    ("fpn_cells/cell_0/fnode1/resample_0_2_6/conv2d/kernel",
     "fpn_cells.cell_0.fnode1.resample_0_2_6.conv2d.weight", Layout.CONV2D_HWIO_TO_OIHW),
    ("fpn_cells/cell_0/fnode1/resample_0_2_6/conv2d/bias",
     "fpn_cells.cell_0.fnode1.resample_0_2_6.conv2d.bias", Layout.IDENTITY),
    ("fpn_cells/cell_0/fnode5/op_after_combine10/conv/bias",
     "fpn_cells.cell_0.fnode5.op_after_combine10.conv.pointwise.bias", Layout.IDENTITY),
    ("fpn_cells/cell_2/fnode0/op_after_combine5/conv/bias",
     "fpn_cells.cell_2.fnode0.op_after_combine5.conv.pointwise.bias", Layout.IDENTITY),
    ("fpn_cells/cell_1/fnode3/op_after_combine8/bn/moving_variance",
     "fpn_cells.cell_1.fnode3.op_after_combine8.bn.running_var", Layout.IDENTITY),
    ("fpn_cells/cell_0/fnode1/WSM", "fpn_cells.cell_0.fnode1.WSM", Layout.SCALAR),
    ("fpn_cells/cell_0/fnode1/WSM_1", "fpn_cells.cell_0.fnode1.WSM_1", Layout.SCALAR),
    ("resample_p6/conv2d/kernel", "resample_p6.conv2d.weight", Layout.CONV2D_HWIO_TO_OIHW),
    ("resample_p6/bn/gamma", "resample_p6.bn.weight", Layout.IDENTITY),
])
def test_normalize_examples(tf_name, pt_name, layout):
    assert tf_to_pt(tf_name) == (pt_name, layout)


def test_non_separable_heads_keep_plain_conv_names():
    assert tf_to_pt("class_net/class-0/bias", separable_conv=False) == \
        ("class_net.class_0.bias", Layout.IDENTITY)
    assert tf_to_pt("class_net/class-0/kernel", separable_conv=False) == \
        ("class_net.class_0.weight", Layout.CONV2D_HWIO_TO_OIHW)
    assert tf_to_pt("class_net/class-0/pointwise_kernel", separable_conv=False) is None


@pytest.mark.parametrize("name", ["global_step", "efficientnet-b0/stem/conv2d/kernel/Momentum",
                                  "box_net/box-0-bn-3/beta/ExponentialMovingAverage",
                                  "fpn_cells/cell_0/fnode0/WSMx", "kernel"])
def test_names_no_rule_maps(name):
    assert tf_to_pt(name) is None


def _plain_normalize(tf_name: str, separable_scopes: set[str]) -> str:
    """STYLE.md §2 read literally: backbone prefix, blocks_N -> blocks.N, '/' -> '.', '-' -> '_',
    and the leaf renames, where a separable conv's bias becomes pointwise.bias (a scope is a
    separable conv when the checkpoint has a pointwise_kernel there). Nothing else."""
    scope, _, leaf = tf_name.rpartition("/")
    leaf = {"kernel": "weight", "gamma": "weight", "beta": "bias",
            "moving_mean": "running_mean", "moving_variance": "running_var",
            "depthwise_kernel": "depthwise.weight", "pointwise_kernel": "pointwise.weight",
            "bias": "pointwise.bias" if scope in separable_scopes else "bias",
            }.get(leaf, leaf)
    scope = re.sub(r"^efficientnet-(?:b\d+|lite\d+)/", "backbone/", scope)
    scope = re.sub(r"blocks_(\d+)", r"blocks/\1", scope)
    return (scope + "/" + leaf).replace("/", ".").replace("-", "_")


@pytest.mark.parametrize("dir_name", MANIFEST_DIRS)
def test_key_map_is_plain_normalization_for_95_percent(dir_name):
    _, table = _table(dir_name)
    separable = {n.rpartition("/")[0] for n in table if n.endswith("/pointwise_kernel")}
    exceptions = [n for n, e in table.items() if _plain_normalize(n, separable) != e.pt_name]
    assert 1 - len(exceptions) / len(table) >= 0.95, f"{len(exceptions)}/{len(table)}"
    # The only exception: an MBConv depthwise kernel is a plain DepthwiseConv2D (the module
    # has no '.depthwise.' level), one per backbone block.
    assert all(n.endswith("/depthwise_conv2d/depthwise_kernel") for n in exceptions), exceptions
    blocks = {n.split("/")[1] for n in table if n.split("/")[1].startswith("blocks_")}
    assert len(exceptions) == len(blocks)


# ------------------------------------------------------------------------ layout transforms

def _numpy_conv_nhwc(x: np.ndarray, kernel_hwio: np.ndarray) -> np.ndarray:
    """VALID cross-correlation, NHWC input, HWIO kernel (TF's definition), float64."""
    kh, kw, _, _ = kernel_hwio.shape
    n, h, w, _ = x.shape
    out = np.zeros((n, h - kh + 1, w - kw + 1, kernel_hwio.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", x[:, i:i + out.shape[1], j:j + out.shape[2]],
                             kernel_hwio[i, j])
    return out


def _numpy_depthwise_nhwc(x: np.ndarray, kernel_hwc1: np.ndarray) -> np.ndarray:
    kh, kw, _, _ = kernel_hwc1.shape
    n, h, w, c = x.shape
    out = np.zeros((n, h - kh + 1, w - kw + 1, c))
    for i in range(kh):
        for j in range(kw):
            out += x[:, i:i + out.shape[1], j:j + out.shape[2]] * kernel_hwc1[i, j, :, 0]
    return out


def _torch_nhwc(fn, x: np.ndarray, *args, **kwargs) -> np.ndarray:
    out = fn(torch.from_numpy(x).permute(0, 3, 1, 2), *args, **kwargs)
    return out.permute(0, 2, 3, 1).detach().numpy()


def test_conv2d_layout_against_numpy_conv():
    """Non-square kernel and in != out: a wrong axis order cannot pass by symmetry."""
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)     # kh, kw, in, out
    x = rng.standard_normal((2, 7, 6, 4)).astype(np.float32)
    weight = to_torch(kernel, Layout.CONV2D_HWIO_TO_OIHW)
    assert tuple(weight.shape) == (5, 4, 2, 3) == pt_shape(kernel.shape, Layout.CONV2D_HWIO_TO_OIHW)
    np.testing.assert_allclose(_torch_nhwc(F.conv2d, x, weight), _numpy_conv_nhwc(x, kernel),
                               rtol=1e-5, atol=1e-5)
    assert tf_shape(tuple(weight.shape), Layout.CONV2D_HWIO_TO_OIHW) == kernel.shape


def test_depthwise_layout_against_numpy_conv():
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((3, 2, 6, 1)).astype(np.float32)     # kh, kw, C, multiplier
    x = rng.standard_normal((2, 5, 7, 6)).astype(np.float32)
    weight = to_torch(kernel, Layout.DEPTHWISE_HWCM_TO_OIHW)
    assert tuple(weight.shape) == (6, 1, 3, 2) == pt_shape(kernel.shape,
                                                           Layout.DEPTHWISE_HWCM_TO_OIHW)
    got = _torch_nhwc(F.conv2d, x, weight, groups=6)
    np.testing.assert_allclose(got, _numpy_depthwise_nhwc(x, kernel), rtol=1e-5, atol=1e-5)
    assert tf_shape(tuple(weight.shape), Layout.DEPTHWISE_HWCM_TO_OIHW) == kernel.shape


def test_identity_and_scalar_layouts_keep_values():
    vector = np.arange(5, dtype=np.float32)
    assert torch.equal(to_torch(vector, Layout.IDENTITY), torch.arange(5.0))
    scalar = np.asarray(0.75, dtype=np.float32)
    out = to_torch(scalar, Layout.SCALAR)
    assert out.shape == () and out.item() == 0.75
    assert pt_shape((), Layout.SCALAR) == () and pt_shape((64,), Layout.IDENTITY) == (64,)


@pytest.mark.needs_tf
def test_layouts_against_tensorflow_ops():
    """TF-layout kernels run by TF equal the PyTorch modules loaded through the transforms."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 9, 8, 6)).astype(np.float32)
    kernel = rng.standard_normal((3, 2, 6, 4)).astype(np.float32)
    expected = tf.nn.conv2d(x, kernel, 1, "VALID").numpy()
    got = _torch_nhwc(F.conv2d, x, to_torch(kernel, Layout.CONV2D_HWIO_TO_OIHW))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    depthwise = rng.standard_normal((3, 3, 6, 1)).astype(np.float32)
    pointwise = rng.standard_normal((1, 1, 6, 5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    expected = tf.nn.separable_conv2d(x, depthwise, pointwise, [1, 1, 1, 1], "SAME").numpy() + bias
    sep = SeparableConv2d(6, 5, 3)
    with torch.no_grad():
        sep.depthwise.weight.copy_(to_torch(depthwise, Layout.DEPTHWISE_HWCM_TO_OIHW))
        sep.pointwise.weight.copy_(to_torch(pointwise, Layout.CONV2D_HWIO_TO_OIHW))
        sep.pointwise.bias.copy_(to_torch(bias, Layout.IDENTITY))
    np.testing.assert_allclose(_torch_nhwc(sep, x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ committed tables

def test_tables_up_to_date():
    if importlib.util.find_spec("mappings.generate") is None:
        pytest.skip("mappings/generate.py does not exist yet")
    from click.testing import CliRunner

    from mappings import generate
    from model.registry import VARIANTS
    result = CliRunner().invoke(generate.main, ["--check"])
    assert result.exit_code == 0, result.output + result.stderr
    assert f"{len(VARIANTS)} up to date, 0 stale" in result.output


@pytest.mark.parametrize("dir_name", [d for d in MANIFEST_DIRS
                                      if cached_manifest(d)["num_classes"] == 90
                                      and "image_size_override" not in cached_manifest(d)])
def test_committed_table_names_equal_manifest(dir_name):
    import mappings
    path = Path(mappings.__file__).parent / f"{cached_manifest(dir_name)['variant']}.tsv"
    if not path.is_file():
        pytest.skip(f"{path.name} not generated yet")
    rows = [line.split("\t") for line in path.read_text().splitlines()
            if line and not line.startswith("#")]
    expected = {v["name"]: v["shape"] for v in cached_manifest(dir_name)["variables"]
                if v["role"] == "model"}
    assert {r[0] for r in rows} == set(expected)
    assert all(r[3] == "[" + ",".join(map(str, expected[r[0]])) + "]" for r in rows)


@pytest.mark.parametrize("overrides", [{}, {"num_classes": 20}, {"image_size": "600x420"}])
def test_table_for_equals_the_rules(overrides):
    """The converter reads committed tables for released variants (any input size) and
    generates the rest; both must be what the rules give."""
    from mappings import table_for
    for variant in ("efficientdet-d0", "efficientdet-lite3"):
        config = get_config(variant, **overrides)
        assert table_for(config) == mapping_table(config)
