"""Interrupts: SIGTERM is handled like Ctrl-C, and both end a command with exit code 130.

Raising ``KeyboardInterrupt`` for SIGTERM runs the same ``finally``/``except`` clean-ups
(temporary outputs, downloads, unpack folders) that Ctrl-C runs; without it a ``kill`` would end
the process at once and leave them behind.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["EXIT_INTERRUPTED", "sigterm_as_interrupt"]

#: Exit status of an interrupted command, as shells report SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the block, SIGTERM raises ``KeyboardInterrupt`` in the main thread (elsewhere, where
    handlers cannot be set, nothing changes); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
