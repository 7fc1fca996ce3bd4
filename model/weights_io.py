"""Reading and writing converted weights: ``.pth`` (state_dict + metadata) or ``.safetensors``.

Both carry the same metadata dict (variant, full config, source checkpoint, tool version), so
a model can be rebuilt from the file alone. Writes are atomic: a temp file in the target
folder, then a rename, so an interrupted write never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:   # torch is imported on use: the command lines read WEIGHT_SUFFIXES from here
    import torch

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
_SAFETENSORS_KEY = "effdet"


def check_suffix(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: unsupported weights extension {suffix!r} "
                         f"(use one of {', '.join(WEIGHT_SUFFIXES)})")
    return suffix


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yields a temporary file name beside ``path``; renames it over ``path`` when the block
    succeeds (atomic within one file system) and removes it when the block fails."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp_name
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_weights(path: str | Path, state_dict: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, Any]) -> Path:
    """Writes ``state_dict`` and JSON-safe ``metadata`` atomically; the format follows the suffix."""
    import torch
    path = Path(path)
    suffix = check_suffix(path)
    tensors = {k: v.detach().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp_name:
        if suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_name,
                      metadata={_SAFETENSORS_KEY: json.dumps(metadata)})
        else:
            torch.save({"state_dict": tensors, "metadata": dict(metadata)}, tmp_name)
    return path


def load_weights(path: str | Path, map_location: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Returns ``(state_dict, metadata)`` from a file written by ``save_weights``."""
    import torch
    path = Path(path)
    suffix = check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt", device=str(map_location)) as f:
                metadata = json.loads((f.metadata() or {}).get(_SAFETENSORS_KEY, "{}"))
                state_dict = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as error:  # safetensors' own error types, JSON errors
            raise ValueError(f"{path}: not a readable weights file "
                             f"({type(error).__name__}: {error})") from None
        return state_dict, metadata
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise ValueError(f"{path}: not a readable weights file "
                         f"({type(error).__name__}: {error})") from None
    if isinstance(payload, dict) and payload and "state_dict" not in payload and \
            all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ValueError(f"{path}: a bare state_dict without config (torch.save); save models "
                         f"with model.save_pretrained(path) to reload them with from_pretrained")
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ValueError(f"{path}: not a weights file written by this toolkit")
    return payload["state_dict"], payload.get("metadata", {})


def check_state_dict(state_dict: Mapping[str, Any], source: str) -> None:
    """Raises ``ValueError`` unless every entry is a tensor, floating ones all finite."""
    import torch
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{source}: state_dict is a {type(state_dict).__name__}, not a mapping")
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{source}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{source}: tensor {key} holds NaN or Inf values")
