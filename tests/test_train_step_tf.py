"""The optimizer step's pieces against the TensorFlow ops automl's train_step uses (no automl
checkout needed): clipping, L2 loss and Keras SGD with a changing learning rate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.step import KerasSGD, clip_gradients, l2_regularization

pytestmark = [pytest.mark.needs_tf, pytest.mark.slow]   # TensorFlow import: ~10 s


@pytest.fixture(scope="module")
def tf():
    from verify.tf_live import _import_tensorflow
    return _import_tensorflow()


def test_clipping_equals_tf_clip_by_norm_then_global_norm(tf):
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(3, 4, generator=gen) * s for s in (1.0, 30.0, 0.01)]
    theirs = [tf.clip_by_norm(tf.constant(g.numpy()), 10.0) for g in grads]
    theirs, _ = tf.clip_by_global_norm(theirs, 10.0)
    for mine, their in zip(clip_gradients(grads, 10.0), theirs):
        np.testing.assert_allclose(mine.numpy(), their.numpy(), rtol=1e-6, atol=1e-7)


def test_l2_equals_weight_decay_times_tf_l2_loss(tf):
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    expected = 4e-5 * tf.add_n([tf.nn.l2_loss(tf.constant(w.numpy())) for w in weights])
    assert l2_regularization(weights, 4e-5).item() == pytest.approx(float(expected), rel=1e-6)


def test_three_sgd_steps_equal_keras_sgd_with_a_changing_rate(tf):
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(4, 3, generator=gen)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(3)]
    rates = [0.008, 0.02, 0.05]                       # warm-up: the rate changes every step
    variable = tf.Variable(start.numpy())
    # automl passes a schedule evaluated at the optimizer's step count: rates[step] here.
    schedule = tf.keras.optimizers.schedules.PiecewiseConstantDecay([0, 1], rates)
    optimizer = tf.keras.optimizers.SGD(learning_rate=schedule, momentum=0.9)
    param = torch.nn.Parameter(start.clone())
    ours = KerasSGD([param], lr=rates[0], momentum=0.9)
    for lr, grad in zip(rates, grads):
        optimizer.apply_gradients([(tf.constant(grad.numpy()), variable)])
        ours.param_groups[0]["lr"] = lr
        param.grad = grad.clone()
        ours.step()
    np.testing.assert_allclose(param.detach().numpy(), variable.numpy(), rtol=1e-6, atol=1e-7)
    # torch.optim.SGD keeps the rate out of the velocity and ends elsewhere.
    plain = torch.nn.Parameter(start.clone())
    torch_sgd = torch.optim.SGD([plain], lr=rates[0], momentum=0.9)
    for lr, grad in zip(rates, grads):
        torch_sgd.param_groups[0]["lr"] = lr
        plain.grad = grad.clone()
        torch_sgd.step()
    assert not np.allclose(plain.detach().numpy(), variable.numpy(), rtol=1e-6, atol=1e-7)
