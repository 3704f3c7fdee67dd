"""Query vectors, checked once for every entry point (Python, CLI, HTTP).

The memory compares unit vectors by inner product (cosine similarity). A query that is ragged,
of the wrong dimension, non-finite (NaN, ±inf, or past float32's range, as 1e308 is) or all
zeros has no cosine similarity to anything, so it is refused with an error naming
its row. A finite, non-zero query that is not unit length is normalised: the direction is what a
cosine search compares, and an encoder that skips the final normalisation should not silently
change the scores (a vector of length 10 would otherwise score 10× higher).
"""

from __future__ import annotations

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)


class QueryError(ValueError):
    """A query vector the memory cannot answer; ``row`` is its position in the request."""

    def __init__(self, message: str, row: int | None = None):
        super().__init__(message)
        self.row = row


def check_vectors(vectors, dim: int, name: str = "vectors") -> np.ndarray:
    """``[n, dim]`` float32 unit vectors from ``vectors`` (an array or a list of lists).

    Raises ``QueryError`` naming the first bad row: ragged, wrong dimension, non-finite, zero.
    """
    if isinstance(vectors, np.ndarray):
        array = vectors[None] if vectors.ndim == 1 else vectors
        if array.ndim != 2:
            raise QueryError(f"{name} must be a list of {dim}-d vectors, got an array of shape {list(vectors.shape)}")
    else:
        rows = list(vectors)
        if rows and not isinstance(rows[0], (list, tuple, np.ndarray)):
            rows = [rows]                                   # one vector given as a flat list
        for row, v in enumerate(rows):
            if not isinstance(v, (list, tuple, np.ndarray)) or len(v) != dim:
                got = f"{len(v)} values" if isinstance(v, (list, tuple, np.ndarray)) else type(v).__name__
                raise QueryError(f"{name}[{row}] has {got}; every vector must have {dim} (the memory's dimension)", row)
        array = np.asarray(rows, dtype=np.float64).reshape(len(rows), dim)
    if array.shape[1] != dim:
        raise QueryError(f"{name} have dimension {array.shape[1]}; the memory holds dimension {dim}")
    if len(array) == 0:
        raise QueryError(f"{name} is empty: give at least one query")
    array = array.astype(np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(array) <= FLOAT32_MAX).all(axis=1)          # NaN compares False
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise QueryError(f"{name}[{row}] has a non-finite value (NaN, inf, or beyond float32's range); "
                         "give finite numbers", row)
    # scaled by its largest value first, so that no finite vector over- or underflows on its way to unit length
    scale = np.abs(array).max(axis=1)
    zero = scale == 0
    if zero.any():
        row = int(np.flatnonzero(zero)[0])
        raise QueryError(f"{name}[{row}] is a zero vector: it has no direction to compare (cosine similarity)", row)
    array /= scale[:, None]
    return np.ascontiguousarray(array / np.linalg.norm(array, axis=1, keepdims=True), dtype=np.float32)
