"""Shared pytest fixtures."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny tensors: intra-op threads only add synchronisation (50x slower on a busy 2-core
    machine), so run single-threaded and restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
