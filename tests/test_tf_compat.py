"""TF numerics in PyTorch (model/tf_compat.py): 'SAME' padding, max-pool padding, BN constants,
separable convs, drop-connect. Expected values are hand-computed; TF itself is the second
opinion where it is installed."""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.tf_compat import (BN_EPS, BN_MOMENTUM, FUSE_EPS, Conv2dSame, max_pool_same,
                             SeparableConv2d, batch_norm, create_act, create_conv2d, drop_connect,
                             pad_same, same_padding)

pytestmark = pytest.mark.usefixtures("single_thread")

# (size, kernel, stride) -> (before, after), worked out by hand from TF's rule
# out = ceil(size / stride), total = max((out - 1) * stride + kernel - size, 0), odd pixel after.
SAME_PADDING = {
    (5, 1, 1): (0, 0), (6, 1, 1): (0, 0), (5, 1, 2): (0, 0), (6, 1, 2): (0, 0),
    (5, 3, 1): (1, 1), (6, 3, 1): (1, 1), (7, 5, 1): (2, 2), (8, 5, 1): (2, 2),
    (7, 1, 2): (0, 0), (8, 1, 2): (0, 0),   # 1x1 stride 2 never pads (total <= 0)
    (5, 3, 2): (1, 1),   # out 3: 2*2 + 3 - 5 = 2
    (6, 3, 2): (0, 1),   # out 3: 2*2 + 3 - 6 = 1 -> the extra row goes to the bottom
    (7, 3, 2): (1, 1),   # out 4: 3*2 + 3 - 7 = 2
    (8, 3, 2): (0, 1),   # out 4: 3*2 + 3 - 8 = 1
    (5, 5, 2): (2, 2),   # out 3: 2*2 + 5 - 5 = 4
    (6, 5, 2): (1, 2),   # out 3: 2*2 + 5 - 6 = 3
    (7, 5, 2): (2, 2),   # out 4: 3*2 + 5 - 7 = 4
    (8, 5, 2): (1, 2),   # out 4: 3*2 + 5 - 8 = 3
    (4, 5, 2): (1, 2),   # out 2: 1*2 + 5 - 4 = 3
    (1, 3, 2): (1, 1),   # out 1: 0 + 3 - 1 = 2
    (2, 3, 2): (0, 1),   # out 1: 0 + 3 - 2 = 1
    (3, 3, 2): (1, 1),   # out 2: 2 + 3 - 3 = 2 (lite0 P7: 5 -> 3 pools with this)
    (5, 2, 1): (0, 1),   # even kernel, stride 1: out 5: 4 + 2 - 5 = 1
}
SIZES = (5, 6, 7, 8)
KERNELS = (1, 3, 5)
STRIDES = (1, 2)




@pytest.mark.parametrize("size,kernel,stride", sorted(SAME_PADDING))
def test_same_padding_hand_computed(size, kernel, stride):
    assert same_padding(size, kernel, stride) == SAME_PADDING[(size, kernel, stride)]


def test_same_padding_covers_the_grid():
    """The table above covers every (even/odd size, kernel 1/3/5, stride 1/2) used below."""
    missing = [(s, k, st) for s in SIZES for k in KERNELS for st in STRIDES
               if (s, k, st) not in SAME_PADDING]
    # Stride 1 with an odd kernel is symmetric, (k - 1) / 2 on each side, at every size.
    for s, k, st in missing:
        assert st == 1 and same_padding(s, k, st) == ((k - 1) // 2, (k - 1) // 2)


def _hand_padded_conv(x: torch.Tensor, conv: nn.Conv2d, pads_h, pads_w) -> torch.Tensor:
    padded = F.pad(x, (pads_w[0], pads_w[1], pads_h[0], pads_h[1]))
    return F.conv2d(padded, conv.weight, conv.bias, conv.stride, 0, 1, conv.groups)


def _pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    if (size, kernel, stride) in SAME_PADDING:
        return SAME_PADDING[(size, kernel, stride)]
    assert stride == 1 and kernel % 2 == 1
    return (kernel - 1) // 2, (kernel - 1) // 2


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("depthwise", [False, True], ids=["conv", "depthwise"])
def test_conv2d_same_size_and_values(kernel, stride, depthwise):
    torch.manual_seed(kernel * 10 + stride)
    channels = 4
    conv = create_conv2d(channels, channels if depthwise else 6, kernel, stride,
                         depthwise=depthwise, bias=True)
    assert isinstance(conv, Conv2dSame)
    for height, width in [(5, 6), (7, 8), (6, 5), (8, 7)]:
        x = torch.randn(2, channels, height, width)
        out = conv(x)
        assert out.shape[-2:] == (math.ceil(height / stride), math.ceil(width / stride))
        expected = _hand_padded_conv(x, conv, _pads(height, kernel, stride),
                                     _pads(width, kernel, stride))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_conv2d_same_static_only_for_stride_one_odd_kernel():
    assert create_conv2d(3, 3, 3, 1).static_same and create_conv2d(3, 3, 3, 1).padding == (1, 1)
    assert create_conv2d(3, 3, 5, 1).padding == (2, 2)
    strided = create_conv2d(3, 3, 3, 2)
    assert not strided.static_same and strided.padding == (0, 0)
    with pytest.raises(ValueError):
        create_conv2d(3, 6, 3, depthwise=True)


def test_stride2_pads_bottom_right_only_for_even_sizes():
    """A 1-channel 3x3 stride-2 'SAME' conv on a 6x6 input: the window of output (0, 0) covers
    input rows/cols 0..2 (no top/left pad), the last window rows/cols 4..6 (6 is padding)."""
    conv = create_conv2d(1, 1, 3, 2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0   # picks the top-left cell of each window
    x = torch.arange(36.0).reshape(1, 1, 6, 6) + 1
    out = conv(x)
    assert out.shape == (1, 1, 3, 3)
    # Top-left tap of window (i, j) is input (2i, 2j): no padding before.
    torch.testing.assert_close(out[0, 0], x[0, 0, ::2, ::2], rtol=0, atol=0)


def test_max_pool_same_pads_with_minus_infinity():
    """All-negative input: the border outputs are maxima over real cells only; zero padding
    would give 0 there."""
    x = -(torch.arange(25.0).reshape(1, 1, 5, 5) + 1.0)         # -1 .. -25, max at top-left
    pool = functools.partial(max_pool_same, kernel=(3, 3), stride=(2, 2))
    out = pool(x)
    assert out.shape == (1, 1, 3, 3)
    # 5, k3, s2 pads (1, 1): window of output i covers rows 2i-1 .. 2i+1 clipped to 0..4.
    expected = torch.empty(3, 3)
    for i in range(3):
        for j in range(3):
            rows = slice(max(2 * i - 1, 0), min(2 * i + 2, 5))
            cols = slice(max(2 * j - 1, 0), min(2 * j + 2, 5))
            expected[i, j] = x[0, 0, rows, cols].max()
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=0)
    assert out[0, 0, 0, 0] == -1.0 and out[0, 0, 2, 2] == -19.0
    zero_padded = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=0.0), 3, 2)
    assert (zero_padded[0, 0, 0] == 0).all() and not torch.equal(out, zero_padded)
    assert torch.isfinite(out).all()


def test_max_pool_same_equals_explicit_minus_infinity_padding_at_every_size():
    """The ceil_mode/implicit-padding shortcut equals padding with -inf then a VALID pool,
    exactly, for every size, kernel and stride (also mixed per axis)."""
    generator = torch.Generator().manual_seed(0)
    for height, width in itertools.product(range(1, 14), range(1, 14)):
        x = -torch.rand(1, 2, height, width, generator=generator) - 1.0
        for kernel, stride in [((3, 3), (2, 2)), ((2, 2), (1, 1)), ((5, 5), (4, 4)),
                               ((3, 4), (2, 3)), ((4, 4), (2, 2)), ((1, 1), (2, 2))]:
            padded = pad_same(x, kernel, stride, value=float("-inf"))
            expected = F.max_pool2d(padded, kernel, stride)
            assert torch.equal(max_pool_same(x, kernel, stride), expected), \
                (height, width, kernel, stride)


def test_max_pool_same_even_size_pads_after_only():
    """6 -> 3 with kernel 3 stride 2 pads (0, 1): the last window is rows 4, 5 (+ one pad)."""
    x = -(torch.arange(36.0).reshape(1, 1, 6, 6) + 1.0)
    out = max_pool_same(x, (3, 3), (2, 2))
    expected = torch.tensor([[x[0, 0, r:r + 3, c:c + 3].max() for c in (0, 2, 4)]
                             for r in (0, 2, 4)])
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=0)
    assert out[0, 0, 2, 2] == x[0, 0, 4, 4]      # max of the real 2x2 corner, not the 0 pad


@pytest.mark.needs_tf
@pytest.mark.parametrize("size", SIZES)
def test_same_ops_match_tensorflow(size):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(size)
    x = rng.standard_normal((1, size, size + 1, 3)).astype(np.float32) - 2.0   # mostly negative
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2)
    for kernel in KERNELS:
        for stride in STRIDES:
            w = rng.standard_normal((kernel, kernel, 3, 2)).astype(np.float32)
            expected = tf.nn.conv2d(x, w, stride, "SAME").numpy()
            conv = create_conv2d(3, 2, kernel, stride, bias=False)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(w).permute(3, 2, 0, 1))
            got = conv(x_t).permute(0, 2, 3, 1).detach().numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5,
                                       err_msg=f"conv k{kernel} s{stride}")
        pooled = tf.nn.max_pool2d(x, stride + 1, stride, "SAME").numpy() if stride > 1 else None
        if pooled is not None:
            got = max_pool_same(x_t, (stride + 1,) * 2, (stride,) * 2).permute(0, 2, 3, 1)
            np.testing.assert_array_equal(got.numpy(), pooled)


def test_pad_same_value_and_noop():
    x = torch.zeros(1, 1, 6, 6)
    padded = pad_same(x, (3, 3), (2, 2), value=-5.0)
    assert padded.shape == (1, 1, 7, 7)
    assert (padded[0, 0, 6] == -5).all() and (padded[0, 0, :, 6] == -5).all()
    assert (padded[0, 0, :6, :6] == 0).all()
    assert pad_same(x, (1, 1), (2, 2)) is x


def test_bn_constants():
    assert BN_EPS == 1e-3                       # Keras epsilon, not PyTorch's 1e-5
    assert BN_MOMENTUM == pytest.approx(0.01)   # Keras momentum 0.99 -> PyTorch 1 - 0.99
    assert FUSE_EPS == 1e-4
    bn = batch_norm(7)
    assert isinstance(bn, nn.BatchNorm2d)
    assert bn.eps == 1e-3 and bn.momentum == pytest.approx(0.01) and bn.num_features == 7
    assert bn.affine and bn.track_running_stats


def test_bn_inference_formula_uses_eps_1e3():
    bn = batch_norm(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
        bn.running_mean.copy_(torch.tensor([0.5, -0.5, 0.0]))
        bn.running_var.copy_(torch.tensor([0.004, 1.0, 0.0]))
    x = torch.ones(1, 3, 1, 1)
    gamma, beta = bn.weight.detach(), bn.bias.detach()
    expected = gamma * (1.0 - bn.running_mean) / torch.sqrt(bn.running_var + 1e-3) + beta
    torch.testing.assert_close(bn(x).flatten(), expected, rtol=1e-6, atol=1e-6)
    # Variance 0 would blow up with a tiny eps: 1e-3 gives 1/sqrt(1e-3) * 0.5 - 1.
    assert bn(x).flatten()[2].item() == pytest.approx(0.5 / math.sqrt(1e-3) - 1.0, rel=1e-5)


def test_separable_conv_has_one_bias_after_pointwise():
    sep = SeparableConv2d(8, 5, 3)
    names = dict(sep.named_parameters())
    assert sorted(names) == ["depthwise.weight", "pointwise.bias", "pointwise.weight"]
    assert sep.depthwise.bias is None
    assert [n for n in names if n.endswith("bias")] == ["pointwise.bias"]
    assert names["pointwise.bias"].shape == (5,)
    assert names["depthwise.weight"].shape == (8, 1, 3, 3) and sep.depthwise.groups == 8
    assert names["pointwise.weight"].shape == (5, 8, 1, 1)
    x = torch.randn(2, 8, 7, 6)
    expected = F.conv2d(F.conv2d(F.pad(x, (1, 1, 1, 1)), sep.depthwise.weight, groups=8),
                        sep.pointwise.weight, sep.pointwise.bias)
    torch.testing.assert_close(sep(x), expected, rtol=1e-5, atol=1e-5)


def test_activations():
    assert isinstance(create_act("swish"), nn.SiLU)
    assert isinstance(create_act("relu6"), nn.ReLU6)
    x = torch.tensor([-3.0, 0.5, 7.0])
    torch.testing.assert_close(create_act("swish")(x), x * torch.sigmoid(x))
    torch.testing.assert_close(create_act("relu6")(x), torch.tensor([0.0, 0.5, 6.0]))
    with pytest.raises(ValueError, match="unknown act_type"):
        create_act("gelu_tanh_typo")


def test_drop_connect_only_in_training():
    torch.manual_seed(0)
    x = torch.randn(64, 2, 3, 3) + 5.0
    assert drop_connect(x, 0.5, training=False) is x
    assert drop_connect(x, 1.0, training=True) is x
    assert drop_connect(x, 0.0, training=True) is x          # b0: survival_prob 0 means off
    out = drop_connect(x, 0.5, training=True)
    kept = (out == x / 0.5).flatten(1).all(1)
    dropped = (out == 0).flatten(1).all(1)
    assert (kept | dropped).all()                            # whole samples, scaled by 1/p
    assert 10 < int(kept.sum()) < 54                          # ~Binomial(64, 0.5)
