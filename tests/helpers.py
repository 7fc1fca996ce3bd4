"""Shared test helpers: where the reference fixtures are, and synthetic checkpoints.

``REFERENCE_DIR`` is ``$EFFDET_REFERENCE`` or ``<repo>/../shared/reference``.
Tests never write there; checkpoints are synthesised into the test's folder.
"""

from __future__ import annotations

import atexit
import importlib.util
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["REFERENCE_DIR", "cached_manifest", "load_manifest", "synth_checkpoint", "synth_module", "synth_tensors",
           "write_checkpoint"]

REPO_DIR = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(
    os.environ.get("EFFDET_REFERENCE", REPO_DIR.parent / "shared" / "reference")
)
SYNTH_SCRIPT = REFERENCE_DIR / "synth_ckpt.py"

# (manifest dir, seed, ema, optimizer) -> prefix of the generated original (private folder).
_SESSION_CACHE: dict[tuple[str, int, bool, bool], Path] = {}
_SESSION_DIR: Path | None = None


def load_manifest(manifest_dir_name: str) -> dict:
    """``REFERENCE_DIR/<manifest_dir_name>/manifest.json`` as a dict."""
    with (REFERENCE_DIR / manifest_dir_name / "manifest.json").open(encoding="utf-8") as f:
        return json.load(f)


#: ``load_manifest`` read once per session; the dict is shared, so callers must not change it.
cached_manifest = functools.lru_cache(maxsize=None)(load_manifest)


_SYNTH_MODULE = None


def synth_module():
    """``REFERENCE_DIR/synth_ckpt.py`` imported by path (numpy only until it writes)."""
    global _SYNTH_MODULE
    if _SYNTH_MODULE is None:
        spec = importlib.util.spec_from_file_location("synth_ckpt", SYNTH_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SYNTH_MODULE = module
    return _SYNTH_MODULE


def synth_tensors(manifest_dir_name: str, seed: int = 0, ema: bool = True,
                  optimizer: bool = True) -> dict:
    """``{checkpoint key: numpy array}`` exactly as ``synth_ckpt.py`` would write them."""
    return synth_module().build_tensors(load_manifest(manifest_dir_name), seed, ema=ema,
                                        optimizer=optimizer)


def write_checkpoint(tensors: dict, prefix: Path) -> Path:
    """Writes ``tensors`` as a TF1 name-based checkpoint at ``prefix`` (``tf.raw_ops.SaveV2``,
    in this process) plus a ``checkpoint`` state file; returns ``prefix``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    synth_module().write_checkpoint(tensors, str(prefix))
    return Path(prefix)


def _bundle_files(prefix: Path) -> list[Path]:
    stem = prefix.name + "."
    return [
        p for p in prefix.parent.iterdir()
        if p.name == stem + "index" or p.name.startswith(stem + "data-")
    ]


def _write_state_file(prefix: Path) -> None:
    text = f'model_checkpoint_path: "{prefix.name}"\nall_model_checkpoint_paths: "{prefix.name}"\n'
    (prefix.parent / "checkpoint").write_text(text, encoding="utf-8")


def _copy_bundle(source: Path, prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for path in _bundle_files(source):
        shutil.copyfile(path, prefix.parent / (prefix.name + path.name[len(source.name):]))
    _write_state_file(prefix)


def _session_dir() -> Path:
    global _SESSION_DIR
    if _SESSION_DIR is None:
        _SESSION_DIR = Path(tempfile.mkdtemp(prefix="effdet-synth-"))
        atexit.register(shutil.rmtree, _SESSION_DIR, True)
    return _SESSION_DIR


def synth_checkpoint(
    manifest_dir_name: str,
    out_dir: Path,
    seed: int = 0,
    ema: bool = True,
    optimizer: bool = True,
    prefix_name: str = "model.ckpt",
    in_process: bool = False,
) -> Path:
    """Write a TF1 name-based checkpoint made by ``synth_ckpt.py``; return its prefix.

    ``out_dir/<prefix_name>.index``, ``.data-00000-of-00001`` and a
    ``checkpoint`` state file are written. The generator (a TF subprocess,
    ~2-4 s) runs once per (manifest, seed, ema, optimizer) and session into a
    private temporary folder; every call copies from there, so tests may damage
    their copy freely. ``in_process=True`` writes the same files from this process
    (``synth_tensors`` + ``write_checkpoint``), saving the subprocess' TensorFlow start-up
    (~3 s) when the caller has imported TensorFlow anyway.
    """
    key = (manifest_dir_name, seed, ema, optimizer)
    source = _SESSION_CACHE.get(key)
    if source is None or not (source.parent / (source.name + ".index")).is_file():
        source = _session_dir() / "-".join(str(k) for k in key) / "model.ckpt"
        if in_process:
            write_checkpoint(synth_tensors(manifest_dir_name, seed, ema, optimizer), source)
        else:
            command = [
                sys.executable, str(SYNTH_SCRIPT),
                "--manifest", str(REFERENCE_DIR / manifest_dir_name / "manifest.json"),
                "--seed", str(seed),
                "--out", str(source),
            ]
            if not ema:
                command.append("--no-ema")
            if not optimizer:
                command.append("--no-optimizer")
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
            subprocess.run(command, check=True, env=env, capture_output=True)
        _SESSION_CACHE[key] = source
    prefix = Path(out_dir) / prefix_name
    _copy_bundle(source, prefix)
    return prefix
