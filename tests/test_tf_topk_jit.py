"""The numba heap of ``tf.math.top_k(sorted=False)`` against the Python heap it compiles, index for
index (tests/test_tf_topk.py compares both with TensorFlow)."""
from __future__ import annotations

import numpy as np
import pytest

from model import tf_topk
from model.tf_topk import tf_top_k_unsorted


def _python_heap(values: np.ndarray, k: int) -> np.ndarray:
    return tf_topk._BoundedHeap(values, k).run()


def test_compiled_heap_loads():
    assert tf_topk._bounded_heap_compiled() is not None


@pytest.mark.parametrize("kind", ["distinct", "ties", "saturated"])
def test_compiled_heap_is_the_python_heap_index_for_index(kind):
    rng = np.random.default_rng(["distinct", "ties", "saturated"].index(kind))
    for _ in range(200):
        n = int(rng.integers(3, 5000))
        k = int(rng.integers(2, n))
        if kind == "distinct":
            values = rng.standard_normal(n)
        elif kind == "ties":
            values = rng.integers(0, 6, n)
        else:    # logits whose sigmoid saturates, plus runs of one repeated logit
            values = rng.normal(-2, 3, n)
            values[rng.random(n) < 0.3] = 20.0
            values[rng.random(n) < 0.2] = rng.uniform(17, 30)
        values = values.astype(np.float32)
        np.testing.assert_array_equal(tf_top_k_unsorted(values, k), _python_heap(values, k))


def test_compiled_heap_on_a_d0_sized_row():
    # automl's eval top-k: 5,000 of 49,104 anchors x 90 classes (here a tenth of the classes).
    rng = np.random.default_rng(4)
    values = rng.normal(-4, 2, 49104 * 9).astype(np.float32)
    values[rng.random(values.size) < 0.01] = 18.0
    np.testing.assert_array_equal(tf_top_k_unsorted(values, 5000), _python_heap(values, 5000))
