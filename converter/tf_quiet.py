"""Importing TensorFlow without its start-up log lines on stderr.

TF >= 2.16 logs through absl before ``absl::InitializeLog()`` runs (oneDNN and CUDA notices,
"All log messages before absl::InitializeLog() ..."); those lines ignore
``TF_CPP_MIN_LOG_LEVEL`` because they are written straight to file descriptor 2 by C++. The
import therefore runs with descriptor 2 pointed at /dev/null; Python exceptions it raises still
propagate normally.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType


@contextlib.contextmanager
def stderr_fd_silenced() -> Iterator[None]:
    """Points file descriptor 2 at /dev/null inside the block (C/C++ writes included)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:          # no descriptor 2 (detached process): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w", encoding="utf-8") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow_quietly() -> ModuleType:
    """``import tensorflow`` with its C++ start-up logs and Python warnings silenced
    (``TF_CPP_MIN_LOG_LEVEL=3`` unless set, which also hides the CUDA probe's error line on
    machines without a GPU; absl's Python logger at ERROR). Failures still reach the caller as
    Python exceptions. Raises ImportError."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with stderr_fd_silenced():
        tf = importlib.import_module("tensorflow")
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    return tf
