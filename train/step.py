"""One optimizer step as automl's ``EfficientDetNetTrain.train_step`` takes it.

* weight decay is a loss term, ``weight_decay * sum(v ** 2) / 2`` over the trained variables
  whose TF name ends in ``kernel`` or ``weight`` (``_reg_l2_loss``): conv kernels, not BN
  gamma/beta, biases or BiFPN fusion weights (``WSM``);
* gradients are clipped twice: each to norm ``clip_gradients_norm`` (``tf.clip_by_norm``), then
  all together (``tf.clip_by_global_norm``);
* the update is Keras SGD: ``m = momentum * m - lr * g; w += m`` (the learning rate enters the
  velocity, unlike ``torch.optim.SGD``, which matters while the rate changes);
* frozen variables (``var_freeze_expr``, ``re.match`` on the TF variable name) get no update.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from mappings.table import table_for

# automl tf2/train_lib.py::EfficientDetNetTrain._reg_l2_loss default regex.
DECAY_NAME_REGEX = re.compile(r".*(kernel|weight):0$")


def tf_variable_names(model: nn.Module) -> dict[str, str]:
    """``{parameter name: TF variable name (with ':0')}`` from the variant's mapping table."""
    return {entry.pt_name: entry.tf_name + ":0" for entry in table_for(model.config)}


def select_parameters(model: nn.Module, var_freeze_expr: Optional[str]
                      ) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """``(trained, decayed)`` named parameters: those whose TF name ``var_freeze_expr`` does not
    ``re.match`` (automl ``_freeze_vars``), and the kernels among them that get weight decay."""
    names = tf_variable_names(model)
    freeze = re.compile(var_freeze_expr) if var_freeze_expr else None
    trained, decayed = [], []
    for name, param in model.named_parameters():
        tf_name = names.get(name)
        if tf_name is None:
            raise LookupError(f"parameter {name} has no TF variable name in the mapping table")
        if freeze is not None and freeze.match(tf_name):
            param.requires_grad_(False)
            continue
        trained.append((name, param))
        if DECAY_NAME_REGEX.match(tf_name):
            decayed.append((name, param))
    return trained, decayed


def l2_regularization(params: Iterable[Tensor], weight_decay: float) -> Tensor:
    """``weight_decay * sum(tf.nn.l2_loss(p))`` with ``l2_loss = sum(p ** 2) / 2``."""
    return weight_decay * torch.stack([(p * p).sum() / 2 for p in params]).sum()


@torch.no_grad()
def clip_gradients(grads: Sequence[Tensor], clip_norm: float) -> list[Tensor]:
    """automl's clipping: ``tf.clip_by_norm`` of each gradient, then ``tf.clip_by_global_norm``."""
    clipped = []
    for grad in grads:
        norm = torch.linalg.vector_norm(grad.float())
        clipped.append(grad * clip_norm / torch.maximum(norm, norm.new_tensor(clip_norm)))
    global_norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in clipped]))
    scale = clip_norm * torch.minimum(1.0 / global_norm, global_norm.new_tensor(1.0 / clip_norm))
    return [g * scale.to(g.dtype) for g in clipped]


class KerasSGD(torch.optim.Optimizer):
    """SGD with momentum in Keras' form: ``m = momentum * m - lr * g; p += m``."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.9):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(param)
                velocity = state["momentum"]
                velocity.mul_(group["momentum"]).sub_(param.grad * group["lr"])
                param.add_(velocity)
