"""Recall of a sharded memory against exact search: the helpers the build and ``tune`` share.

A memory must answer at the recall it claims. The build (``index.build.parallel_add``) and ``vismem index
tune`` (``index.build.tune``) measure it: held-out vectors are searched both exactly (``index.exact``,
block by block: ``exact_topk``) and through the shards as a query would be (each shard, then the
exact merge); a memory vector used as a query has its own id dropped from both lists
(``drop_self``), and recall@k is the share of the true k neighbours the shards return.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from index.shard.search import merge_topk, plain_ivf


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


class RunningTopk:
    """The exact top-k of queries over blocks of vectors that arrive one at a time (one file, one
    shard part): ``add`` each block's ``exact_topk``, read ``ids`` at the end."""

    def __init__(self, queries: int, k: int):
        self.k = k
        self.similarities = np.full((queries, k), -np.inf, dtype=np.float32)
        self.ids = np.full((queries, k), -1, dtype=np.int64)

    def add(self, similarities: np.ndarray, ids: np.ndarray) -> None:
        merged = merge_topk([{"similarities": self.similarities, "ids": self.ids},
                             {"similarities": similarities, "ids": ids}], self.k)
        self.similarities, self.ids = merged["similarities"], merged["ids"]


K_FACTORS = (2, 4, 8, 16, 32, 64)        # candidates re-ranked per answer a two-tier calibration tries, in order


def query_bytes(nprobe: int, k_factor: int, k: int, per_list: float, code_bytes: int, row_bytes: int) -> float:
    """The cost of a two-tier search, as the bytes one query reads: the codes of ``nprobe`` lists
    of ``per_list`` vectors, and the ``k·k_factor`` re-rank rows of its candidates."""
    return nprobe * per_list * code_bytes + k * k_factor * row_bytes


def cheapest_setting(recall_of: Callable[[int, int], float], nprobes: list[int], k_factors, cost, target: float,
                     ) -> tuple[tuple[int, int], dict]:
    """The cheapest ``(nprobe, k_factor)`` by ``cost`` whose ``recall_of`` reaches ``target`` (else
    the best seen), and every recall measured, ``{(nprobe, k_factor): recall}``.

    Recall never falls as ``k_factor`` grows (the candidates are a superset, re-ranked exactly),
    so the smallest nprobe for the next k_factor is at most the last one's: the first k_factor
    climbs ``nprobes`` (until the target, or recall stops rising), the next ones step down from
    there. The k_factors stop once re-ranking alone costs more than the best setting found."""
    by: dict[tuple[int, int], float] = {}

    def reaches(i: int, k_factor: int) -> bool:
        key = (nprobes[i], k_factor)
        if key not in by:
            by[key] = recall_of(*key)
        return by[key] >= target

    best, low = None, None                 # low: index of the smallest nprobe reaching the target so far
    for k_factor in k_factors:
        if best is not None and cost(nprobes[0], k_factor) >= cost(*best):
            break
        if low is None:
            for i in range(len(nprobes)):
                if reaches(i, k_factor):
                    low = i
                    break
                if stopped_rising([by[(n, k_factor)] for n in nprobes[:i + 1]]):
                    break
            if low is None:
                continue
        else:
            reaches(low, k_factor)
            while low > 0 and reaches(low - 1, k_factor):
                low -= 1
        if best is None or cost(nprobes[low], k_factor) < cost(*best):
            best = (nprobes[low], k_factor)
    return best or max(by, key=by.get), by


def stopped_rising(recalls: list[float]) -> bool:
    """Whether recall gained under 0.002 over the last two doublings of nprobe: more will not help."""
    return len(recalls) > 3 and recalls[-1] - recalls[-3] < 0.002


class NprobeSweep:
    """One shard's answers to ``queries`` at increasing nprobe, each step scanning only the lists
    the previous steps did not (``Shard.search`` over the new slice of the coarse assignment, merged
    into the running top-k): a sweep up to nprobe n scans n lists per query, where searching each
    nprobe afresh scans 1 + 2 + 4 + … + n, about twice as many. (The n nearest lists are the
    n' < n nearest plus the next ones, unless two centroids are exactly as near a query.)"""

    def __init__(self, shard, queries: np.ndarray, k: int):
        self.shard, self.queries, self.k = shard, np.ascontiguousarray(queries, dtype=np.float32), k
        self.ivf = plain_ivf(shard.index)
        self.best, self.scanned = RunningTopk(len(queries), k), 0

    def at(self, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids) ``[nq, k]`` as ``shard.search(queries, k, nprobe)`` gives them."""
        if self.ivf is None:
            return self.shard.search(self.queries, self.k, nprobe)
        nprobe = min(nprobe, self.ivf.nlist)
        if nprobe > self.scanned:
            distances, lists = self.ivf.quantizer.search(self.queries, nprobe)
            new = (distances[:, self.scanned:], lists[:, self.scanned:])
            self.best.add(*self.shard.search(self.queries, self.k, None, new))
            self.scanned = nprobe
        return self.best.similarities.copy(), self.best.ids.copy()
