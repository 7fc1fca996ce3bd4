"""``convert --to FORMAT``: a PyTorch EfficientDet written in another format, through one table.

Every exporter is ``exporter(model, path, **options) -> Path`` (the path written); the CLI
loads the model from ``--ckpt`` weights and passes the format's options.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:   # exporters import torch on use: `convert --help` reads EXPORT_FORMATS only
    from model import EfficientDet

__all__ = ["EXPORT_FORMATS", "export_model"]

Exporter = Callable[..., Path]


def _source_step(metadata: dict) -> int:
    """The ``global_step`` ``convert`` recorded from the TF checkpoint, else 0."""
    source = metadata.get("source")
    step = source.get("global_step") if isinstance(source, dict) else None
    return step if isinstance(step, int) and step >= 0 else 0


def export_tf_ckpt(model: EfficientDet, path: Path, raw_model: EfficientDet | None = None,
                   global_step: int | None = None, force: bool = False) -> Path:
    """automl TF1 name-based checkpoint folder (``converter.to_tf``); ``model``'s weights are
    the EMA shadows, ``raw_model``'s (default: the same) the raw variables. ``global_step``
    defaults to the step the weights were converted from (0 if unknown)."""
    from .to_tf import tf_tensors, write_tf_checkpoint
    if global_step is None:
        global_step = _source_step(getattr(model, "metadata", {}))
    raw = None if raw_model is None else raw_model.state_dict()
    tensors = tf_tensors(model.state_dict(), model.config, raw, global_step)
    return write_tf_checkpoint(tensors, path, force=force)


def export_effdet(model: EfficientDet, path: Path, force: bool = False) -> Path:
    """A state_dict rwightman's effdet loads strictly (``converter.to_effdet``)."""
    from .to_effdet import save_effdet
    return save_effdet(model, path, force=force)


EXPORT_FORMATS: dict[str, Exporter] = {
    "tf-ckpt": export_tf_ckpt,
    "effdet": export_effdet,
}


def export_model(model: EfficientDet, fmt: str, path: str | Path, **options: Any) -> Path:
    """Writes ``model`` as ``fmt`` (a key of ``EXPORT_FORMATS``) to ``path``."""
    try:
        exporter = EXPORT_FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}") \
            from None
    return exporter(model, Path(path), **options)
