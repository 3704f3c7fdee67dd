"""Exact (brute-force) nearest-neighbour search: the one home of the ground truth that kNN
evaluation, the build's recall calibration and ``vismem index tune`` all measure against.

``exact_search`` is FAISS's ``faiss.knn`` by inner product (cosine on unit vectors), no index built;
where FAISS is not installed it is the same search in torch (``torch_exact_search``, on the GPU when
there is one), so the evaluation runs on machines that have torch alone. ``exact_topk`` is one block
of a search merged block by block (one file, one shard part): its rows carry the block's own ids and
are padded with −inf/−1 past the block's size.

This module imports without FAISS and without torch (torch is imported only when the fallback runs).
"""

from __future__ import annotations

import numpy as np

try:
    import faiss
except ImportError:                     # torch_exact_search stands in (see the module docstring)
    faiss = None


def exact_search(memory: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and ids of each query's ``k`` nearest memory vectors (unit vectors),
    best first: FAISS's brute-force ``faiss.knn`` by inner product, no index built (torch's
    ``torch_exact_search`` where FAISS is not installed)."""
    if memory.shape[1] != queries.shape[1]:
        raise ValueError(f"memory vectors have dimension {memory.shape[1]} but queries {queries.shape[1]}")
    if faiss is None:
        return torch_exact_search(memory, queries, k)
    return faiss.knn(queries, memory, min(k, len(memory)), metric=faiss.METRIC_INNER_PRODUCT)


def torch_exact_search(memory: np.ndarray, queries: np.ndarray, k: int,
                       device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``exact_search`` as a matrix product and ``topk`` in torch, on ``device`` (default: the GPU
    when there is one), queries in chunks so the score matrix stays under ~1 GB."""
    import torch                        # here: index must import without torch (listing, building, serving)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    k = min(k, len(memory))
    base = torch.from_numpy(np.ascontiguousarray(memory, dtype=np.float32)).to(device)
    chunk = max(1, 2 ** 28 // max(1, len(memory)))
    sims, ids = [], []
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk], dtype=np.float32)).to(device)
        top = (q @ base.T).topk(k, dim=1)
        sims.append(top.values.cpu().numpy())
        ids.append(top.indices.cpu().numpy().astype(np.int64))
    if not sims:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(sims), np.concatenate(ids)


def exact_topk(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) ``[nq, k]`` of the exact nearest of ``vectors`` (labelled ``ids``) by
    inner product, −inf/−1 past their number: one block of a search merged block by block."""
    sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    found = np.full((len(queries), k), -1, dtype=np.int64)
    if len(queries) and len(vectors):
        kk = min(k, len(vectors))
        sims[:, :kk], rows = exact_search(vectors, queries, kk)
        found[:, :kk] = ids[rows]
    return sims, found
