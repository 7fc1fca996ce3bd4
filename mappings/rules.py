"""The rename rules, written once, as data.

A TF variable name is ``<scope>/<leaf>``. The PyTorch key is ``normalize(scope).<leaf'>``
where ``normalize`` turns automl's scope into our module path (``efficientnet-b0/`` ->
``backbone.``, ``blocks_3`` -> ``blocks.3``, ``/`` -> ``.``, ``-`` -> ``_``) and the leaf
rule renames the variable and says how its layout changes. Counters stay as automl wrote
them (``conv2d_1``, ``tpu_batch_normalization_2``, ``resample_0_2_6``, ``WSM_1``).
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Layout(enum.Enum):
    """How a TF tensor becomes its PyTorch counterpart."""

    IDENTITY = "identity"                     # vectors (bias, BN) and anything same-shaped
    CONV2D_HWIO_TO_OIHW = "conv2d_hwio_to_oihw"  # [kh, kw, in, out] -> [out, in, kh, kw]
    DEPTHWISE_HWCM_TO_OIHW = "depthwise_hwcm_to_oihw"  # [kh, kw, C, 1] -> [C, 1, kh, kw]
    SCALAR = "scalar"                         # fusion weights (WSM), 0-d or per channel, as-is


_PLACEHOLDERS = {"scope": r"(?P<scope>.+)", "n": r"(?P<n>\d+)"}


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{%s}" % name), group)
    return re.compile(f"^{pattern}$")


@dataclass(frozen=True)
class Rule:
    """``tf`` and ``pt`` are templates over ``{scope}`` (and ``{n}`` for counters).

    ``module`` tells rules with the same key template apart when inverting (a conv bias and
    a BN beta are both ``.bias``). ``scope``, if set, is a regex the TF scope must match in full; ``separable_only``
    rules exist only when ``config.separable_conv`` (Keras SeparableConv2D layers).
    """

    tf: str
    pt: str
    layout: Layout
    module: str = "conv"           # owning PyTorch module kind: 'conv', 'bn' or 'fnode'
    scope: str | None = None
    separable_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tf_regex", _template_regex(self.tf))
        object.__setattr__(self, "pt_regex", _template_regex(self.pt))

    def scope_ok(self, tf_scope: str) -> bool:
        return self.scope is None or re.fullmatch(self.scope, tf_scope) is not None


_SEPARABLE_SCOPE = (r"(?:(?:class_net/class|box_net/box)-(?:\d+|predict)"
                    r"|fpn_cells/cell_\d+/fnode\d+/op_after_combine\d+/conv)")

# Ordered: the first rule that matches a TF name (and its scope) wins.
RULES: tuple[Rule, ...] = (
    Rule("{scope}/depthwise_kernel", "{scope}.weight", Layout.DEPTHWISE_HWCM_TO_OIHW,
         scope=r".+/depthwise_conv2d"),
    Rule("{scope}/depthwise_kernel", "{scope}.depthwise.weight", Layout.DEPTHWISE_HWCM_TO_OIHW,
         separable_only=True),
    Rule("{scope}/pointwise_kernel", "{scope}.pointwise.weight", Layout.CONV2D_HWIO_TO_OIHW,
         separable_only=True),
    Rule("{scope}/bias", "{scope}.pointwise.bias", Layout.IDENTITY, scope=_SEPARABLE_SCOPE,
         separable_only=True),
    Rule("{scope}/kernel", "{scope}.weight", Layout.CONV2D_HWIO_TO_OIHW),
    Rule("{scope}/bias", "{scope}.bias", Layout.IDENTITY),
    Rule("{scope}/gamma", "{scope}.weight", Layout.IDENTITY, module="bn"),
    Rule("{scope}/beta", "{scope}.bias", Layout.IDENTITY, module="bn"),
    Rule("{scope}/moving_mean", "{scope}.running_mean", Layout.IDENTITY, module="bn"),
    Rule("{scope}/moving_variance", "{scope}.running_var", Layout.IDENTITY, module="bn"),
    Rule("{scope}/WSM", "{scope}.WSM", Layout.SCALAR, module="fnode"),
    Rule("{scope}/WSM_{n}", "{scope}.WSM_{n}", Layout.SCALAR, module="fnode"),
)

# Scope normalisation, TF -> PyTorch, applied in order to the scope part.
SCOPE_TO_PT: tuple[tuple[str, str], ...] = (
    (r"^efficientnet-(?:b\d+|lite\d+)/", "backbone/"),
    (r"/blocks_(\d+)/", r"/blocks/\1/"),
    (r"/blocks_(\d+)$", r"/blocks/\1"),
    ("/", "."),
    ("-", "_"),
)
# The inverse, PyTorch -> TF ({backbone} is the config's backbone_name).
SCOPE_TO_TF: tuple[tuple[str, str], ...] = (
    (r"^backbone\.", "{backbone}."),
    (r"\.blocks\.(\d+)", r".blocks_\1"),
    (r"^(class|box)_net\.(class|box)_(\d+)_bn_(\d+)", r"\1_net.\2-\3-bn-\4"),
    (r"^(class|box)_net\.(class|box)_(\d+|predict)", r"\1_net.\2-\3"),
    (r"\.", "/"),
)

# Checkpoint entries a converter reads past, pattern -> reason; the conversion report counts them
# per reason. Patterns match TF1 variable names (name-based checkpoints) and TF2 object-based
# checkpoint keys (``<object path>/.ATTRIBUTES/VARIABLE_VALUE``) alike. automl trains with
# optimizer 'sgd' or 'adam' (hparams_config.py:213): TF1 tf.train.MomentumOptimizer /
# AdamOptimizer (det_model_fn.py:379-384), TF2 Keras SGD(momentum) / Adam
# (tf2/train_lib.py:176-199), wrapped in tfa MovingAverage ('average' slots, inner optimizer
# 'awg_optimizer') and optionally LossScaleOptimizer ('inner_optimizer', 'loss_scale'). Anything
# else stays a model tensor and must map, so an unknown extra tensor still fails the conversion.
_TF2_SLOT = r"/\.OPTIMIZER_SLOT/optimizer/(?:[^/]+/)*"
IGNORED_TF: dict[str, str] = {
    # TF1 name-based: slots are <variable>/<optimizer name>[_N], accumulators live at the root.
    r"/Momentum$": "optimizer slot (TF1 Momentum)",
    r"/Adam(_1)?$": "optimizer slot (TF1 Adam m, v)",
    r"(^|/)beta[12]_power$": "optimizer accumulator (TF1 Adam beta1_power, beta2_power)",
    r"^global_step$": "training step counter",
    # TF2 object-based: slots are <variable path>/.OPTIMIZER_SLOT/<optimizer path>/<slot>.
    _TF2_SLOT + r"momentum/": "optimizer slot (Keras SGD momentum)",
    _TF2_SLOT + r"(m|v|vhat)/": "optimizer slot (Keras Adam m, v)",
    _TF2_SLOT + r"average/": "optimizer slot (tfa MovingAverage 'average': EMA copy; the model "
                             "entries already hold the averaged weights)",
    r"^optimizer/": "optimizer state (iterations, hyper-parameters, loss scale)",
    r"^save_counter/": "tf.train.Checkpoint save counter",
    r"^_CHECKPOINTABLE_OBJECT_GRAPH$": "TF2 object graph (read to derive TF1 names)",
    # Not optimizer state: the EfficientNet classification head (TF1 scope head/, TF2 key _head/),
    # which automl's SavedModel export creates while tracing its signatures.
    r"(^|/)_?head/": "EfficientNet classification head (not part of the detector)",
}


def ignore_reason(name: str) -> str | None:
    """Why ``name`` (a TF1 variable name or a TF2 checkpoint key) is read past, or None."""
    for pattern, reason in IGNORED_TF.items():
        if re.search(pattern, name):
            return reason
    return None


# PyTorch state_dict entries with no TF counterpart.
PT_ONLY: dict[str, str] = {
    r"num_batches_tracked$": "PyTorch BN counter (unused with momentum set)",
}
EMA_SUFFIX = "/ExponentialMovingAverage"
