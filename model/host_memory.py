"""Keeping freed host memory in the process, for repeated CPU inference.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
unmaps it on free, so each forward of a large model page-faults all its activations in again
(zero-filled by the kernel): about a quarter of d4's CPU time at 1024x1024. TF's allocator keeps
such memory; this makes glibc do the same (``mallopt``: no mmap, no trimming), process-wide.
The cost is that the process keeps its peak heap after the tensors are freed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Applies the settings once; ``False`` where the C library is not glibc (nothing done)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM))
