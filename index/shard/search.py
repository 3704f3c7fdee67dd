"""Searching shards: FAISS per-call search parameters, the coarse assignment every shard shares, and
the exact merge of shard answers.

Every part of every shard is a copy of the memory's one trained empty index, so a batch of
queries is assigned to IVF lists once for all shards and parts (``coarse_assignment``) and each
part scans only its lists (``search_preassigned``); per-call parameters (``search_parameters``)
carry the nprobe a request asks for and the deletion selector without mutating a loaded index.
Inner products from different shards are comparable, so merging their top-k (``merge_topk``) is
exact with respect to one index holding every live vector.
"""

from __future__ import annotations

import faiss
import numpy as np


def search_parameters(index: faiss.Index, nprobe: int | None = None, k_factor: int | None = None,
                      sel: faiss.IDSelector | None = None):
    """FAISS per-call search parameters for ``index`` (None when nothing differs from the index's
    own settings), so that one loaded shard answers every request at the nprobe it asks for, and
    skips the ids ``sel`` rejects, without mutating the index.

    Walks the wrappers a factory string builds (IDMap, pre-transforms such as OPQ/PCA, Refine) down
    to the index that scans vectors, which is where FAISS consults ``sel``: an IDMap stores the
    memory's ids beside positions, so below it the selector is translated to positions.
    Returns ``(params, keep)``: ``keep`` holds the nested parameter and selector objects, which
    SWIG does not keep alive on its own, until the search is done.
    """
    keep = []

    def keep_(obj):
        keep.append(obj)
        return obj

    def walk(idx, sel):
        idx = faiss.downcast_index(idx)
        if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return walk(idx.index, None if sel is None else keep_(faiss.IDSelectorTranslated(idx.id_map, sel)))
        if isinstance(idx, faiss.IndexPreTransform):
            inner = walk(idx.index, sel)
            return None if inner is None else keep_(faiss.SearchParametersPreTransform(index_params=inner))
        if isinstance(idx, faiss.IndexRefine):
            base = walk(idx.base_index, sel)
            params = faiss.IndexRefineSearchParameters(k_factor=float(k_factor or idx.k_factor))
            if base is not None:
                params.base_index_params = base
            return keep_(params)
        if faiss.try_extract_index_ivf(idx) is not None:
            if not nprobe and sel is None:
                return None
            params = keep_(faiss.SearchParametersIVF())
            if nprobe:
                params.nprobe = int(nprobe)
        elif sel is None:
            return None
        elif isinstance(idx, faiss.IndexHNSW):
            params = keep_(faiss.SearchParametersHNSW())
        else:
            params = keep_(faiss.SearchParameters())
        if sel is not None:
            params.sel = sel
        return params

    return walk(index, sel), keep


def plain_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """``index`` as an ``IndexIVF`` when it is one with no wrapper around it (the default factories
    ``IVF…,SQ8`` and ``IVF…,PQ…``), else None: only those take a precomputed coarse assignment."""
    inner = faiss.downcast_index(index)
    return inner if isinstance(inner, faiss.IndexIVF) else None


def coarse_assignment(shards: list["Shard"], queries: np.ndarray, nprobe: int | None = None,
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``nprobe`` nearest IVF lists of each query, ``(similarities, lists)``, from the trained
    quantiser every shard shares: searched once per batch instead of once per shard and part (the
    coarse search is a matmul against all nlist centroids). None when the shards are not plain IVF
    (Flat, HNSW, or a wrapped index such as OPQ or Refine), which then search on their own."""
    ivf = plain_ivf(shards[0].index) if shards else None
    if ivf is None:
        return None
    nprobe = int(nprobe or shards[0].defaults.get("nprobe") or ivf.nprobe)
    if nprobe < 1:
        raise ValueError(f"nprobe must be a positive whole number, got {nprobe}")
    nprobe = min(nprobe, ivf.nlist)                     # as FAISS does when one shard searches alone
    return ivf.quantizer.search(np.ascontiguousarray(queries, dtype=np.float32), nprobe)


def search_preassigned(ivf: faiss.IndexIVF, queries: np.ndarray, k: int, coarse: tuple[np.ndarray, np.ndarray],
                       params: faiss.SearchParametersIVF | None) -> tuple[np.ndarray, np.ndarray]:
    """``ivf.search`` with the coarse assignment given (FAISS's ``search_preassigned``; its Python
    wrapper takes no search parameters, so the C++ call is made here, with the nprobe and
    deletion selector of ``params``)."""
    distances, lists = coarse
    n = len(queries)
    lists, distances = np.ascontiguousarray(lists, dtype=np.int64), np.ascontiguousarray(distances, dtype=np.float32)
    if lists.ndim != 2 or lists.shape[0] != n or distances.shape != lists.shape:
        raise ValueError(f"the coarse assignment is for {lists.shape[0]} queries, not {n}")
    if params is None:
        params = faiss.SearchParametersIVF()
    params.nprobe = lists.shape[1]             # the assignment fixes how many lists each query visits
    sims, ids = np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.int64)
    ivf.search_preassigned_c(n, faiss.swig_ptr(queries), k, faiss.swig_ptr(lists), faiss.swig_ptr(distances),
                             faiss.swig_ptr(sims), faiss.swig_ptr(ids), False, params)
    return sims, ids


def merge_topk(results: list[dict], k: int, shard_numbers: list[int] | None = None) -> dict:
    """Merge per-shard answers into the global top-k by inner product.

    Each answer is a dict of ``[nq, k']`` arrays with at least ``similarities`` and ``ids`` (as
    ``Shard.query`` returns); every other array is carried along. The result has the same keys
    plus ``shards``: which shard (``shard_numbers[i]`` for the i-th answer) held each neighbour.
    """
    if not results:
        raise ValueError("no shard results to merge")
    shard_numbers = list(range(len(results))) if shard_numbers is None else shard_numbers
    merged = {key: np.concatenate([r[key][:, :k] for r in results], axis=1) for key in results[0]}
    merged["shards"] = np.concatenate([np.full(r["ids"][:, :k].shape, n) for n, r in zip(shard_numbers, results)], axis=1)
    sims = np.where(merged["ids"] >= 0, merged["similarities"], -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    rows = np.arange(sims.shape[0])[:, None]
    out = {key: value[rows, order] for key, value in merged.items()}
    out["ids"] = np.where(np.isfinite(sims[rows, order]), out["ids"], -1)
    return out
