"""TF2 object-based checkpoints and SavedModel variables, exposed under TF1 names.

Keys of these bundles are object paths, e.g.
``backbone/_blocks/3/_depthwise_conv/depthwise_kernel/.ATTRIBUTES/VARIABLE_VALUE``
(``Model.save_weights``) or ``model/variables/17/.ATTRIBUTES/VARIABLE_VALUE``
(``tf.saved_model.save``). List indices and private attribute names make them
impossible to turn into TF1 names by string rules, but the bundle carries its
``TrackableObjectGraph`` under ``_CHECKPOINTABLE_OBJECT_GRAPH``: every
serialized attribute there records its ``checkpoint_key`` and the variable's
``full_name``, which for automl's Keras (tf_keras / Keras 2) models is the TF1
variable name, e.g. ``efficientnet-b0/blocks_3/depthwise_conv2d/depthwise_kernel``
(an optimizer slot's is ``<variable>/average``). The TF1 name of each key is
read from there; nothing is looked up in a table.

Only model variables are exposed. Skipped, with the reasons of the one ignore list
``mappings.IGNORED_TF``: the object graph, optimizer slots (``.OPTIMIZER_SLOT/...``:
SGD momentum, Adam m/v, tfa ``average``), optimizer scalars (``optimizer/...``),
``save_counter``, and the 7 EfficientNet classification-head variables that
automl's SavedModel export creates while tracing its signatures. An unknown
optimizer slot is not skipped: it surfaces as an unmatched tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

from converter.contents import CheckpointContents
from converter.errors import InputError
from converter.formats.tf_bundle import OBJECT_GRAPH_KEY, TensorBundle, import_tensorflow
from mappings import ignore_reason

__all__ = ["read_object_based", "object_graph_names", "HEAD_REASON"]

VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_SLOT_MARK = "/.OPTIMIZER_SLOT/"

# Head variables: object path ``.../_head/...`` (automl efficientnet_model.Head; in the ignore
# list) or, for a SavedModel's flat keys, variable name ``head/...`` (its name scope).
HEAD_REASON = ignore_reason("head/")
_HEAD_NAME_RE = re.compile(r"(^|/)head/")

# Slots of tfa's MovingAverage wrapper: the EMA shadows.
_AVERAGE_SLOT = "average"


def object_graph_names(bundle: TensorBundle) -> dict[str, str]:
    """Checkpoint key -> ``full_name`` (``:0`` stripped) from the object graph.

    Keys whose attribute has an empty ``full_name`` are left out.

    Raises:
        InputError: the object graph tensor is missing or does not parse.
    """
    if OBJECT_GRAPH_KEY not in bundle.shapes:
        raise InputError(f"checkpoint {bundle.prefix} has no {OBJECT_GRAPH_KEY}")
    import_tensorflow()  # the proto module lives in the tensorflow package
    from google.protobuf.message import DecodeError  # noqa: PLC0415
    from tensorflow.core.protobuf.trackable_object_graph_pb2 import (  # noqa: PLC0415
        TrackableObjectGraph,
    )

    raw = bundle.read_raw(OBJECT_GRAPH_KEY)
    graph = TrackableObjectGraph()
    try:
        graph.ParseFromString(bytes(raw))
    except (DecodeError, TypeError, ValueError) as exc:
        raise InputError(
            f"object graph of checkpoint {bundle.prefix} does not parse: {exc}"
        ) from exc
    names: dict[str, str] = {}
    for node in graph.nodes:
        for attribute in node.attributes:
            full_name = attribute.full_name
            if full_name.endswith(":0"):
                full_name = full_name[:-2]
            if full_name:
                names[attribute.checkpoint_key] = full_name
    return names


def _slot_name(key: str) -> str:
    """``.../.OPTIMIZER_SLOT/optimizer/average/.ATTRIBUTES/VARIABLE_VALUE`` -> ``average``."""
    tail = key.split(_SLOT_MARK, 1)[1]
    if tail.endswith(VALUE_SUFFIX):
        tail = tail[: -len(VALUE_SUFFIX)]
    return tail.rsplit("/", 1)[-1]


def _skip_reason(key: str) -> str | None:
    """Why a key is not a model entry (``mappings.IGNORED_TF``), or None if it may be one."""
    reason = ignore_reason(key)
    if reason is None and not key.endswith(VALUE_SUFFIX):
        return "not a variable value"
    return reason


def read_object_based(bundle: TensorBundle, *, format: str = "tf2") -> CheckpointContents:
    """Expose the model variables of an object-based bundle under TF1 names.

    Args:
        bundle: an opened bundle holding ``_CHECKPOINTABLE_OBJECT_GRAPH``.
        format: ``'tf2'`` (``Model.save_weights`` checkpoint) or
            ``'saved_model'`` (a SavedModel's ``variables/variables``).

    Returns:
        Contents whose ``names`` hold model entries only. For ``'tf2'``,
        ``ema_in_model_entries`` is True when the prefix is an ``emackpt-*``
        or tfa ``average`` slots exist (the trainables were swapped for their
        averages before saving); for ``'saved_model'`` it is always True
        (automl exports from the inference model after restoring the EMA).

    Raises:
        InputError: no model variable could be named from the object graph.
    """
    full_names = object_graph_names(bundle)
    key_of: dict[str, str] = {}
    skipped: dict[str, str] = {}
    has_average_slots = False
    for key in sorted(bundle.shapes):
        reason = _skip_reason(key)
        if reason is None:
            name = full_names.get(key)
            if name is None:
                reason = "object graph gives no variable name (full_name) for this key"
            elif _HEAD_NAME_RE.search(name):
                reason = HEAD_REASON
            elif name in key_of:
                reason = f"duplicate TF1 name {name} (already read from {key_of[name]})"
            else:
                key_of[name] = key
                continue
        elif _SLOT_MARK in key and _slot_name(key) == _AVERAGE_SLOT:
            has_average_slots = True
        skipped[key] = reason
    if not key_of:
        raise InputError(
            f"object-based checkpoint {bundle.prefix} names no model variable "
            f"({len(bundle.shapes)} keys, none with a full_name in the object graph)"
        )
    if format == "saved_model":
        ema_in_model_entries = True
    else:
        ema_in_model_entries = Path(bundle.prefix).name.startswith("emackpt") or has_average_slots

    def load(name: str):
        return bundle.read(key_of[name])

    return CheckpointContents(
        format=format,
        source=bundle.prefix,
        names={name: bundle.shapes[key] for name, key in sorted(key_of.items())},
        ema_in_model_entries=ema_in_model_entries,
        skipped=skipped,
        _loader=load,
    )
