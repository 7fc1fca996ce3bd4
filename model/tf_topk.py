"""``tf.math.top_k(..., sorted=False)`` on the CPU, index for index, including its order.

automl's pre-NMS selection (``topk_class_boxes``) keeps TF's *unsorted* top-k order, and that order
is what later breaks exact score ties: TF's NMS prefers the earlier candidate, ``tf.where`` /
``np.where`` keep it within a class, and nms_np's ``np.argmax`` takes the first maximum. Saturated
sigmoid scores (distinct logits, every score exactly 1.0) make such ties common, so a port that
sorts the candidates keeps different boxes.

TF's CPU kernel (``TopKFunctor<CPUDevice>``) pushes every column into a bounded heap of the ``k``
best entries (``gtl::TopN`` with "greater" = larger value, ties to the lower index) and returns the
heap's array as it stands. Measured on TensorFlow 2.21 (tests/test_tf_topk.py against
``tf.math.top_k`` on random and tied inputs), the layout is reproduced by libc++'s heap primitives:

* the first ``k + 1`` columns: ``make_heap`` (sift-down from the last parent), then ``pop_heap``
  (Floyd: the hole walks to a leaf through the worse child, the last entry fills it and sifts up);
* every later column that beats the current worst: ``pop_heap`` over the ``k`` kept entries, the
  new column written into the freed last slot, ``push_heap`` (sift-up).

``k == num_cols`` is a full sort (value descending, ties to the lower index); ``k == 1`` the first
maximum. Only columns that beat the running worst touch the heap; they are found chunk-wise with
numpy, so the Python loop runs about ``k * (1 + ln(n / k))`` times. The same heap compiled with
numba (:mod:`model.tf_topk_jit`) runs instead wherever numba imports (d0's 4.4M logits, k = 5000:
milliseconds instead of about 0.3 s).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .jit_kernels import compiled

# Columns screened per numpy comparison against the heap's current worst entry.
_CHUNK = 1 << 16


def tf_top_k_unsorted(values: np.ndarray, k: int) -> np.ndarray:
    """Indices ``tf.math.top_k(values, k, sorted=False)`` returns for a 1-D float array.

    Raises ``ValueError`` when ``k`` is not in ``[1, len(values)]``; NaNs are not supported.
    """
    values = np.asarray(values)
    n = values.shape[0]
    if values.ndim != 1 or not 1 <= k <= n:
        raise ValueError(f"need a 1-D array and 1 <= k <= {n}, got shape {values.shape}, k={k}")
    if k == 1:
        return np.array([int(np.argmax(values))], dtype=np.int64)
    if k == n:
        return np.lexsort((np.arange(n), -values.astype(np.float64))).astype(np.int64)
    compiled = _bounded_heap_compiled()
    if compiled is not None:
        return compiled(np.ascontiguousarray(values), k)
    return _BoundedHeap(values, k).run()


def _bounded_heap_compiled() -> Callable[[np.ndarray, int], np.ndarray] | None:
    """:func:`model.tf_topk_jit.bounded_heap_top_k` (numba), or None where numba cannot be
    imported (then :class:`_BoundedHeap` runs in Python)."""
    return compiled("tf_topk_jit", "bounded_heap_top_k")


class _BoundedHeap:
    """TF's ``gtl::TopN`` over column indices, with libc++'s heap algorithms.

    The heap is a max-heap under ``_better`` read backwards: its front is the *worst* kept entry.
    Entries are ``(value, -index)`` tuples, so "better" is plain tuple ``>``.
    """

    def __init__(self, values: np.ndarray, k: int) -> None:
        self.values = values
        self.k = k
        self.heap: list[tuple[float, int]] = []

    def run(self) -> np.ndarray:
        k, values = self.k, self.values
        first = values[:k + 1].tolist()
        self.heap = [(v, -i) for i, v in enumerate(first)]
        for start in range((k + 1 - 2) // 2, -1, -1):
            self._sift_down(k + 1, start)
        self._pop(k + 1)
        heap = self.heap
        for lo in range(k + 1, values.shape[0], _CHUNK):
            chunk = values[lo:lo + _CHUNK]
            # Later columns never win a tie, so only strictly larger values can enter.
            for offset in np.flatnonzero(chunk > heap[0][0]).tolist():
                entry = (float(chunk[offset]), -(lo + offset))
                if entry > heap[0]:
                    self._pop(k)
                    heap[k - 1] = entry
                    self._sift_up(k)
        return np.array([-index for _, index in heap[:k]], dtype=np.int64)

    # "a sits below b in the heap" = a is the better entry (libc++'s comp(a, b)).
    def _sift_down(self, length: int, start: int) -> None:
        heap = self.heap
        child = 2 * start + 1
        if length < 2 or child >= length:
            return
        if child + 1 < length and heap[child] > heap[child + 1]:
            child += 1
        if heap[child] > heap[start]:
            return
        top = heap[start]
        while True:
            heap[start] = heap[child]
            start = child
            if (length - 2) // 2 < child:
                break
            child = 2 * child + 1
            if child + 1 < length and heap[child] > heap[child + 1]:
                child += 1
            if heap[child] > top:
                break
        heap[start] = top

    def _sift_up(self, length: int) -> None:
        heap = self.heap
        if length < 2:
            return
        last = length - 1
        parent = (length - 2) // 2
        if not heap[parent] > heap[last]:
            return
        entry = heap[last]
        while True:
            heap[last] = heap[parent]
            last = parent
            if parent == 0:
                break
            parent = (parent - 1) // 2
            if not heap[parent] > entry:
                break
        heap[last] = entry

    def _pop(self, length: int) -> None:
        """Move the worst of ``heap[:length]`` to ``heap[length - 1]`` (Floyd's pop_heap)."""
        heap = self.heap
        if length < 2:
            return
        top = heap[0]
        hole = child = 0
        while True:
            child = 2 * child + 1
            if child + 1 < length and heap[child] > heap[child + 1]:
                child += 1
            heap[hole] = heap[child]
            hole = child
            if child > (length - 2) // 2:
                break
        last = length - 1
        if hole == last:
            heap[hole] = top
            return
        heap[hole] = heap[last]
        heap[last] = top
        self._sift_up(hole + 1)
