"""Clustered synthetic unit vectors for benchmarks: the stand-in for a large embedding collection.

Uniform random vectors make ANN meaningless (every point is about equally far from every other),
so benchmarks use a mixture of Gaussian clusters whose spectrum decays like a real embedding's:
centres and within-cluster noise are both drawn with per-dimension scales ∝ (i+1)^-½ in a random
orthonormal basis, then L2-normalised. Deterministic in ``seed``; rows ``[start, stop)`` can be
made without making the rows before them, so a benchmark can stream 1M vectors in chunks.
"""

from __future__ import annotations

import numpy as np


class ClusteredVectors:
    """``clusters`` Gaussian blobs on the unit sphere in ``dim`` dimensions."""

    def __init__(self, dim: int = 384, clusters: int = 4096, spread: float = 0.6, seed: int = 0):
        if dim < 2 or clusters < 1 or spread <= 0:
            raise ValueError("dim ≥ 2, clusters ≥ 1 and spread > 0 are required")
        rng = np.random.default_rng(seed)
        self.dim, self.clusters, self.spread, self.seed = dim, clusters, spread, seed
        self.scales = (np.arange(dim) + 1.0) ** -0.5
        self.scales /= np.sqrt((self.scales ** 2).sum())
        self.basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        self.centres = (rng.normal(size=(clusters, dim)) * self.scales) @ self.basis.T

    def rows(self, start: int, stop: int, chunk: int = 65_536, stream: int = 0) -> np.ndarray:
        """Vectors ``start … stop-1`` as float32 ``[stop-start, dim]``; row i depends only on i."""
        out = np.empty((stop - start, self.dim), np.float32)
        for first in range(start - start % chunk, stop, chunk):
            block = self._chunk(first // chunk, chunk, stream)
            lo, hi = max(first, start), min(first + chunk, stop)
            out[lo - start:hi - start] = block[lo - first:hi - first]
        return out

    def _chunk(self, number: int, chunk: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, number])
        members = rng.integers(0, self.clusters, chunk)
        noise = (rng.standard_normal((chunk, self.dim), dtype=np.float32) * self.scales.astype(np.float32)) \
            @ self.basis.T.astype(np.float32)
        x = self.centres[members].astype(np.float32) + self.spread * noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def queries(self, n: int) -> np.ndarray:
        """``n`` held-out vectors from the same clusters (another random stream than ``rows``)."""
        return self.rows(0, n, stream=1)
