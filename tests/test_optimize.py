"""``EfficientDet.optimize()`` returns what the model returns, and leaves the model alone.

Models get random BN statistics (fresh ones are identities, which would fold to nothing).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import EfficientDet
from model.fused_ops import FusedConv2d, pad_zeros
from model.optimize import OptimizedEfficientDet, fold_bn

pytestmark = pytest.mark.usefixtures("single_thread")

# Folding reorders float32 arithmetic: measured ~1e-6 of each output's scale (d0, lite0).
OUTPUT_RTOL = 1e-5
# A size whose levels go odd (200 -> 100 -> 50 -> 25 -> 13): symmetric and asymmetric SAME pads.
NON_SQUARE = (200, 264)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(count, generator=generator) * 1.5 + 0.3)
            module.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(count, generator=generator) * 0.1)
    return model


@functools.lru_cache(maxsize=None)
def _model(variant: str, image_size: tuple[int, int] | None) -> EfficientDet:
    torch.manual_seed(0)
    overrides = {} if image_size is None else {"image_size": image_size}
    return randomize_bn(EfficientDet.from_config(variant, **overrides)).eval()


def _max_rel_error(actual, expected) -> float:
    return max(((a - e).abs().max() / e.abs().max()).item()
               for a, e in zip(actual[0] + actual[1], expected[0] + expected[1]))


@pytest.mark.parametrize("variant", ["efficientdet-d0", "efficientdet-lite0"])
@pytest.mark.parametrize("image_size", [None, NON_SQUARE], ids=["default", "non_square"])
def test_optimized_outputs_equal_the_model(variant, image_size):
    model = _model(variant, image_size)
    height, width = model.config.image_size
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    optimized = model.optimize()
    for batch in (images[:1], images):   # batch 1 folds the SE gates into the weights
        with torch.no_grad():
            expected, actual = model(batch), optimized(batch)
        assert [t.shape for t in actual[0] + actual[1]] == \
            [t.shape for t in expected[0] + expected[1]]
        assert _max_rel_error(actual, expected) < OUTPUT_RTOL


@pytest.mark.parametrize("overrides", [
    {"fpn_weight_method": "attn"}, {"fpn_weight_method": "channel_attn"},
    {"fpn_weight_method": "channel_fastattn"}, {"fpn_weight_method": "sum"},
    {"conv_bn_act_pattern": True}, {"separable_conv": False}, {"act_type": "relu"},
], ids=lambda overrides: "-".join(f"{k}={v}" for k, v in overrides.items()))
def test_optimized_outputs_equal_the_model_for_every_config_form(overrides):
    """The config switches no shared golden exercises: every fusion method, conv-BN-act order,
    plain 3x3 convs, another activation (random fusion weights, so the factors matter)."""
    torch.manual_seed(0)
    model = randomize_bn(EfficientDet.from_config("efficientdet-d0", image_size=(96, 128),
                                                  **overrides)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "WSM" in name:
                parameter.uniform_(-0.5, 2.0)
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    optimized = model.optimize()
    for batch in (images[:1], images):
        with torch.no_grad():
            assert _max_rel_error(optimized(batch), model(batch)) < OUTPUT_RTOL


def test_optimized_net_has_no_bn_and_static_padding():
    model = _model("efficientdet-lite0", NON_SQUARE)
    for onednn in (True, False):
        modules = list(model.optimize(onednn=onednn).modules())
        assert not any(isinstance(m, (nn.BatchNorm2d, nn.Conv2d)) for m in modules)
        fused = [m for m in modules if isinstance(m, FusedConv2d)]
        zero_extended = [m for m in fused if m.weight.shape[-1] % 2 == 0]
        if onednn:   # every depthwise conv's asymmetric 'SAME' pad is in a zero-extended kernel
            assert zero_extended and all(m.groups > 1 for m in zero_extended)
            assert all(m.groups == 1 for m in fused if m.pad is not None)
        else:        # both kinds of pad, kernels as trained (an export's Pad + Conv)
            assert not zero_extended and {m.pad is None for m in fused} == {True, False}


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "aten"])
@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU, nn.ReLU6, None])
def test_fused_conv_equals_conv_act_residual(onednn, act):
    """Both kernels of FusedConv2d: TF 'SAME' pads (asymmetric too), activation, residual."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 6, 9, 12, generator=generator) * 4
    weight, bias = torch.randn(6, 1, 3, 3, generator=generator), torch.randn(6, generator=generator)
    for stride, padding in [(1, (1, 1, 1, 1)), (2, (1, 1, 0, 1)), (2, (0, 1, 0, 1)),
                            (2, (1, 2, 0, 1))]:
        fused = FusedConv2d(weight, bias, stride, padding, groups=6,
                            act=None if act is None else act(), onednn=onednn)
        top, bottom, left, right = padding
        expected = F.conv2d(F.pad(images, (left, right, top, bottom)), weight, bias, stride,
                            groups=6)
        residual = torch.randn(expected.shape, generator=generator)
        activate = act() if act is not None else nn.Identity()
        for x in (images, images.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(fused(x), activate(expected), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fused(x, residual), activate(expected + residual),
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused(images, weight=fused.weight * 0.5),
                                   activate(F.conv2d(F.pad(images, (left, right, top, bottom)),
                                                     weight * 0.5, bias, stride, groups=6)),
                                   rtol=1e-5, atol=1e-5)


def test_pad_zeros_equals_f_pad():
    images = torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    padded = pad_zeros(images, (0, 1, 2, 1))
    assert torch.equal(padded, F.pad(images, (0, 1, 2, 1)))
    assert padded.is_contiguous(memory_format=torch.channels_last)


def test_optimize_leaves_the_model_untouched():
    model = _model("efficientdet-lite0", NON_SQUARE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    model.optimize(channels_last=True)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == modules_before
    assert all(p.is_contiguous() for p in model.parameters())


def test_taps_through_optimized_model_match():
    model = _model("efficientdet-lite0", NON_SQUARE)
    images = torch.randn(1, 3, *NON_SQUARE)
    with torch.no_grad():
        _, expected = model.forward_with_taps(images)
        _, actual = model.optimize().forward_with_taps(images)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (actual[name] - tensor).abs().max() <= OUTPUT_RTOL * tensor.abs().max(), name


def test_optimized_model_rejects_another_size():
    optimized = _model("efficientdet-lite0", NON_SQUARE).optimize()
    with pytest.raises(ValueError, match="200x264"):
        optimized(torch.zeros(1, 3, 256, 256))


def test_fold_bn_breaks_when_eps_is_wrong():
    """The fold must use the BN's own eps: a Keras 1e-3 vs PyTorch 1e-5 mix-up is caught."""
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(4, eps=1e-3)))[0].eval()
    bn.running_var.fill_(1e-3)    # small variances make eps matter
    images = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = bn(conv(images))
        weight, bias = fold_bn(conv.weight, conv.bias, bn)
        assert torch.allclose(F.conv2d(images, weight, bias, padding=1), expected,
                              rtol=1e-5, atol=1e-5)
        bn.eps = 1e-5
        weight, bias = fold_bn(conv.weight, conv.bias, bn)
        assert not torch.allclose(F.conv2d(images, weight, bias, padding=1), expected,
                                  rtol=1e-2, atol=1e-2)


def test_predict_fast_matches_predict_and_caches():
    model = _model("efficientdet-lite0", NON_SQUARE)
    image = np.random.default_rng(0).integers(0, 255, (150, 230, 3), dtype=np.uint8)
    slow = model.predict(image)
    fast = model.predict(image, fast=True)
    assert torch.equal(fast.valid, slow.valid)
    assert torch.allclose(fast.boxes_yxyx, slow.boxes_yxyx, atol=1e-3)
    assert torch.allclose(fast.scores, slow.scores, atol=1e-5)
    first = model._fast_forward()
    assert isinstance(first, OptimizedEfficientDet) and model._fast_forward() is first
    with torch.no_grad():
        model.box_net.box_predict.pointwise.bias.add_(1.0)
    try:
        assert model._fast_forward() is not first     # weights changed: rebuilt
    finally:
        with torch.no_grad():
            model.box_net.box_predict.pointwise.bias.sub_(1.0)
