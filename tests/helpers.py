"""Shared test helpers: where the reference fixtures are, and synthetic checkpoints.

``REFERENCE_DIR`` is ``$EFFDET_REFERENCE`` or ``<repo>/../shared/reference``.
Tests never write there; checkpoints are synthesised into the test's folder.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["REFERENCE_DIR", "load_manifest", "synth_checkpoint"]

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
) -> Path:
    """Write a TF1 name-based checkpoint made by ``synth_ckpt.py``; return its prefix.

    ``out_dir/<prefix_name>.index``, ``.data-00000-of-00001`` and a
    ``checkpoint`` state file are written. The generator (a TF subprocess,
    ~2-4 s) runs once per (manifest, seed, ema, optimizer) and session into a
    private temporary folder; every call copies from there, so tests may damage
    their copy freely.
    """
    key = (manifest_dir_name, seed, ema, optimizer)
    source = _SESSION_CACHE.get(key)
    if source is None or not (source.parent / (source.name + ".index")).is_file():
        source = _session_dir() / "-".join(str(k) for k in key) / "model.ckpt"
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
