"""model.host_memory: after ``keep_freed_memory()`` a freed large tensor stays in the process
(no fresh page faults on the next forward); without it glibc returns it to the OS."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="glibc-specific allocator settings")

# Resident memory (MiB) kept after freeing a 256 MiB tensor that was written once.
_PROBE = """
import sys, torch
from model.host_memory import keep_freed_memory
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()
before = rss_mib()
x = torch.ones(64 * 2**20)
del x
print(rss_mib() - before)
"""


def _kept_mib(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                            check=True, timeout=120)
    return float(result.stdout.split()[-1])


def test_freed_memory_is_kept_only_when_asked():
    assert _kept_mib("default") < 64
    assert _kept_mib("keep") > 192
