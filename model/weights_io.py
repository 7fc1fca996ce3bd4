"""Reading and writing converted weights: ``.pth`` (state_dict + metadata) or ``.safetensors``.

Both carry the same metadata dict (variant, full config, source checkpoint, tool version), so
a model can be rebuilt from the file alone. Writes go through ``atomic_path``: a temp file in
the target folder, then a rename (or an exclusive hard link), so an interrupted write never
leaves a half-written file behind and, without ``overwrite``, a file that appeared meanwhile is
never replaced.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:   # torch is imported on use: the command lines read WEIGHT_SUFFIXES from here
    import torch

from model.temp_files import sweep_stale, temp_file

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
_SAFETENSORS_KEY = "effdet"


def check_suffix(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: unsupported weights extension {suffix!r} "
                         f"(use one of {', '.join(WEIGHT_SUFFIXES)})")
    return suffix


class DestinationError(OSError):
    """The output cannot be written where asked (exists, folder missing or not writable, name
    too long); the message is one line naming the path."""


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_destination(path: str | Path, *, overwrite: bool) -> Path:
    """Check, before any work, that ``path`` can be written: its folder exists and takes a new
    file (not read-only, not ``/proc``, writable), the name fits the file system, and it does
    not exist unless ``overwrite``.

    Raises:
        DestinationError: one of the above fails.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise DestinationError(f"{path}: output folder {folder} does not exist")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(path.name)) > name_max:
        raise DestinationError(f"{path.name[:40]}...: file name longer than {name_max} bytes")
    if path.is_dir():
        raise DestinationError(f"{path} is a folder")
    if path.exists() and not overwrite:
        raise DestinationError(f"{path} exists; pass --force to overwrite")
    try:
        temp_file(folder, path.name).unlink()
    except OSError as error:
        raise DestinationError(f"{path}: cannot write in {folder}: "
                               f"{error.strerror or error}") from None
    return path


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temp file to ``path`` with the mode a new file gets (or, replacing a
    file, that file's mode)."""
    mode = 0o666 & ~_umask()
    if overwrite:
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(os.stat(path).st_mode)
    os.chmod(tmp, mode)
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists, atomically
    except FileExistsError:
        raise DestinationError(f"{path} appeared while it was being written; "
                               "it was kept (pass --force to overwrite)") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        if os.path.lexists(path):  # no hard links here: check, then rename
            raise DestinationError(f"{path} appeared while it was being written; "
                                   "it was kept (pass --force to overwrite)") from None
        os.rename(tmp, path)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True) -> Iterator[str]:
    """Yields a temporary file name beside ``path``; when the block succeeds the file becomes
    ``path``, atomically within one file system. With ``overwrite`` an existing ``path`` is
    replaced (keeping its mode); without, ``path`` is created only if it still does not exist
    (``DestinationError`` otherwise). New files get ``0666 & ~umask``. The temporary file is
    removed when the block fails or is interrupted; those of killed runs are swept first."""
    path = Path(path)
    sweep_stale(path.parent)
    tmp = temp_file(path.parent, path.name)
    try:
        yield str(tmp)
        _publish(tmp, path, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_weights(path: str | Path, state_dict: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, Any], *, overwrite: bool = True) -> Path:
    """Writes ``state_dict`` and JSON-safe ``metadata`` atomically; the format follows the
    suffix. ``overwrite`` as in ``atomic_path``.

    Raises:
        DestinationError: the file cannot be written (disk full, exists without overwrite).
    """
    import torch
    path = Path(path)
    suffix = check_suffix(path)
    tensors = {k: v.detach().cpu() for k, v in state_dict.items()}
    try:
        with atomic_path(path, overwrite=overwrite) as tmp_name:
            if suffix == ".safetensors":
                from safetensors.torch import save_file
                save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_name,
                          metadata={_SAFETENSORS_KEY: json.dumps(metadata)})
            else:
                torch.save({"state_dict": tensors, "metadata": dict(metadata)}, tmp_name)
    except DestinationError:
        raise
    except (OSError, RuntimeError) as error:  # torch's writer reports ENOSPC as RuntimeError
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise DestinationError(f"cannot write {path}: {reason}") from None
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


def __getattr__(name: str) -> Any:
    """``model.weights_io.torch`` is torch, imported on first use like everywhere in this module
    (the command lines import this module for ``--help`` without loading torch)."""
    if name == "torch":
        import torch
        return torch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
