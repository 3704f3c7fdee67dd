"""Recall of a sharded memory against exact search, and the nprobe that reaches a target.

A memory must answer at the recall it claims. The build measures it on the collection itself:
a sample of memory vectors is searched both exactly (``faiss.knn``) and through the shards as a
query would be (each shard, then the exact merge), each vector's own id is dropped from both
lists, and recall@k is the share of the true k neighbours the shards return.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from index.shards import Shard, merge_topk

log = logging.getLogger("vismem.index.recall")


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` (ids ``[n, k]``) that appears in the same row of ``found``."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth)]))


def drop_self(neighbour_ids: np.ndarray, own_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row without the query's own id (the last column where the row does not hold it), cut to k."""
    out = np.empty((len(own_ids), k), dtype=neighbour_ids.dtype)
    for row, (ids, own) in enumerate(zip(neighbour_ids, own_ids)):
        hit = np.flatnonzero(ids == own)
        out[row] = np.delete(ids, hit[0] if len(hit) else len(ids) - 1)[:k]
    return out


def sharded_search(shards: list[Shard], queries: np.ndarray, k: int, nprobe: int | None) -> np.ndarray:
    return merge_topk([s.query(queries, k, nprobe) for s in shards], k)["ids"]


def calibrate_nprobe(shards: list[Shard], vectors: np.ndarray, ids: np.ndarray, target: float = 0.95,
                     nprobe: int | None = None, k: int = 10, queries: int = 1000, seed: int = 0) -> dict:
    """Measure recall@k of ``shards`` on ``queries`` memory vectors; with ``nprobe`` None, at
    nprobe = 1, 2, 4, … up to the first that reaches ``target`` (or until recall stops rising).

    Returns ``{"k", "recall", "nprobe", "target", "queries", "by_nprobe"}``.
    """
    rows = np.random.default_rng(seed).choice(len(vectors), size=min(queries, len(vectors)), replace=False)
    sample, own = np.ascontiguousarray(vectors[rows]), ids[rows]
    k = min(k, len(vectors) - 1)
    _, exact = faiss.knn(sample, vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    truth = drop_self(ids[exact], own, k)
    nlist = faiss.try_extract_index_ivf(shards[0].index).nlist
    candidates = [nprobe] if nprobe else [2 ** i for i in range(int(np.log2(nlist)) + 1)]
    by_nprobe: dict[int, float] = {}
    for n in candidates:
        by_nprobe[n] = recall_at_k(drop_self(sharded_search(shards, sample, k + 1, n), own, k), truth)
        log.info("recall@%d at nprobe %d: %.3f", k, n, by_nprobe[n])
        if by_nprobe[n] >= target or (len(by_nprobe) > 3 and by_nprobe[n] - list(by_nprobe.values())[-3] < 0.002):
            break
    best = next((n for n, r in by_nprobe.items() if r >= target), max(by_nprobe, key=by_nprobe.get))
    return {"k": k, "recall": by_nprobe[best], "nprobe": best, "target": target, "queries": len(rows),
            "by_nprobe": {str(n): round(r, 4) for n, r in by_nprobe.items()}}
