"""``tf.math.top_k(sorted=False)``'s bounded heap compiled with numba (the fast path of
:func:`model.tf_topk.tf_top_k_unsorted`).

Step for step the algorithm of :class:`model.tf_topk._BoundedHeap` (TF's ``gtl::TopN`` with
libc++'s heap primitives), on two parallel arrays (value, column) instead of tuples; "better" is a
larger value, ties to the lower column. tests/test_tf_topk.py checks it against the Python heap
and against TensorFlow index for index. Compiled on first use and cached on disk
(``cache=True``).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _better(values: np.ndarray, columns: np.ndarray, a: int, b: int) -> bool:
    return values[a] > values[b] or (values[a] == values[b] and columns[a] < columns[b])


@njit(cache=True, inline="always")
def _move(values: np.ndarray, columns: np.ndarray, to: int, source: int) -> None:
    values[to] = values[source]
    columns[to] = columns[source]


@njit(cache=True)
def _sift_down(values: np.ndarray, columns: np.ndarray, length: int, start: int) -> None:
    child = 2 * start + 1
    if length < 2 or child >= length:
        return
    if child + 1 < length and _better(values, columns, child, child + 1):
        child += 1
    if _better(values, columns, child, start):
        return
    top_value, top_column = values[start], columns[start]
    while True:
        _move(values, columns, start, child)
        start = child
        if (length - 2) // 2 < child:
            break
        child = 2 * child + 1
        if child + 1 < length and _better(values, columns, child, child + 1):
            child += 1
        if values[child] > top_value or (values[child] == top_value and columns[child] < top_column):
            break
    values[start], columns[start] = top_value, top_column


@njit(cache=True)
def _sift_up(values: np.ndarray, columns: np.ndarray, length: int) -> None:
    if length < 2:
        return
    last = length - 1
    parent = (length - 2) // 2
    if not _better(values, columns, parent, last):
        return
    value, column = values[last], columns[last]
    while True:
        _move(values, columns, last, parent)
        last = parent
        if parent == 0:
            break
        parent = (parent - 1) // 2
        if not (values[parent] > value or (values[parent] == value and columns[parent] < column)):
            break
    values[last], columns[last] = value, column


@njit(cache=True)
def _pop(values: np.ndarray, columns: np.ndarray, length: int) -> None:
    """Move the worst of the first ``length`` entries to ``length - 1`` (Floyd's pop_heap)."""
    if length < 2:
        return
    top_value, top_column = values[0], columns[0]
    hole = child = 0
    while True:
        child = 2 * child + 1
        if child + 1 < length and _better(values, columns, child, child + 1):
            child += 1
        _move(values, columns, hole, child)
        hole = child
        if child > (length - 2) // 2:
            break
    last = length - 1
    if hole == last:
        values[hole], columns[hole] = top_value, top_column
        return
    _move(values, columns, hole, last)
    values[last], columns[last] = top_value, top_column
    _sift_up(values, columns, hole + 1)


@njit(cache=True)
def bounded_heap_top_k(row: np.ndarray, k: int) -> np.ndarray:
    """The heap's first ``k`` columns after every column of ``row`` went through it
    (``2 <= k < len(row)``, no NaNs)."""
    values = row[:k + 1].copy()
    columns = np.arange(k + 1)
    for start in range((k + 1 - 2) // 2, -1, -1):
        _sift_down(values, columns, k + 1, start)
    _pop(values, columns, k + 1)
    for column in range(k + 1, row.size):
        # A later column never wins a tie, so only a strictly larger value enters.
        if row[column] > values[0]:
            _pop(values, columns, k)
            values[k - 1], columns[k - 1] = row[column], column
            _sift_up(values, columns, k)
    return columns[:k].copy()
