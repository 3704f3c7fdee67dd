"""``vismem index tune``: find the cheapest nprobe at which a memory answers at a target recall, and
record it in a new version's manifest (its search default and the recall measured).

Recall is measured the way the memory answers: each query goes through the shards and the exact
merge (``Snapshot.search``, what ``VisualMemory.search`` answers), and its true neighbours come from exact search over the vectors
the memory holds, decoded from their codes one part (a shard's base or segment) at a time (so nprobe is tuned against what the
index stores; what the codes lose to quantisation is the factory's business and is the same at
every nprobe). Queries are held-out vectors: an embeddings folder of the memory's encoder
(``queries_url``), or by default a sample of the memory's own vectors, each left out of its own
answers (leave-one-out). The measurement and the commit work on the memory's snapshot
(``index.snapshot``); ``tune`` then switches the open memory to the tuned version.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from index.build.build import nprobe_candidates
from index.build.recall import K_FACTORS, RunningTopk, cheapest_setting, drop_self, query_bytes, recall_at_k
from index.exact import exact_topk
from index.memory import VisualMemory
from index.snapshot import Snapshot

log = logging.getLogger("vismem.index.tune")


def exact_neighbours(snapshot: Snapshot, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids ``[nq, k]`` of the exact top-k of ``queries`` among the memory's live vectors as stored,
    one part's decoded vectors in memory at a time, merged as they come."""
    best = RunningTopk(len(queries), k)
    for shard in snapshot.shards:
        for part in shard.parts:
            ids = shard.live_ids(part)
            if len(ids):
                best.add(*exact_topk(queries, part.decoded(ids), ids, k))
    return best.ids


def held_out_sample(snapshot: Snapshot, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, ids) of ``n`` random live vectors of the memory: the ids drawn first, then only
    those decoded from their codes."""
    live = [(shard, part, shard.live_ids(part)) for shard in snapshot.shards for part in shard.parts]
    everyone = np.concatenate([ids for _, _, ids in live])
    chosen = np.random.default_rng(seed).choice(everyone, size=min(n, len(everyone)), replace=False)
    vectors, ids = [], []
    for _, part, part_ids in live:
        mine = part_ids[np.isin(part_ids, chosen)]
        if len(mine):
            vectors.append(part.decoded(mine))
            ids.append(mine)
    return np.ascontiguousarray(np.concatenate(vectors)), np.concatenate(ids)


def measure(snapshot: Snapshot, queries: np.ndarray, own: np.ndarray | None, target: float, k: int = 10,
            ) -> dict:
    """Recall@k at nprobe = 1, 2, 4, … up to the first that reaches ``target`` (or nlist).
    ``own``: each query's id in the memory, left out of its answers (None for outside queries)."""
    ivf = faiss.try_extract_index_ivf(snapshot.shards[0].index)
    if ivf is None:
        raise ValueError(f"memory {snapshot.url} is an exact index ({snapshot.manifest.factory}): every search scans "
                         "every vector, so there is no nprobe to tune")
    extra = 0 if own is None else 1
    truth = exact_neighbours(snapshot, queries, k + extra)
    truth = truth if own is None else drop_self(truth, own, k)
    if snapshot.shards[0].two_tier:
        return measure_two_tier(snapshot, queries, own, truth, target, k)
    by_nprobe: dict[int, float] = {}
    for nprobe in nprobe_candidates(ivf.nlist):
        found = snapshot.search(queries, k + extra, nprobe=nprobe).ids
        by_nprobe[nprobe] = recall_at_k(found if own is None else drop_self(found, own, k), truth)
        log.info("recall@%d at nprobe %d: %.4f", k, nprobe, by_nprobe[nprobe])
        if by_nprobe[nprobe] >= target:
            break
    best = next((n for n, r in by_nprobe.items() if r >= target), max(by_nprobe, key=by_nprobe.get))
    return {"k": k, "recall": by_nprobe[best], "nprobe": best, "target": target, "queries": len(queries),
            "by_nprobe": {str(n): round(r, 4) for n, r in by_nprobe.items()},
            "measured_by": "tune", "truth": "exact search over the stored vectors",
            "held_out": "leave-one-out memory vectors" if own is not None else "outside queries"}


def measure_two_tier(snapshot: Snapshot, queries: np.ndarray, own: np.ndarray | None, truth: np.ndarray,
                     target: float, k: int) -> dict:
    """``measure`` for a two-tier memory: the cheapest (nprobe, k_factor) reaching ``target``, as the
    build calibrates it (``recall.cheapest_setting``, cost ``recall.query_bytes``)."""
    extra = 0 if own is None else 1
    ivf = faiss.extract_index_ivf(snapshot.shards[0].index)
    row_bytes = snapshot.manifest.dim * snapshot.shards[0].parts[0].tier.dtype.itemsize

    def recall_of(nprobe: int, k_factor: int) -> float:
        found = snapshot.search(queries, k + extra, nprobe=nprobe, k_factor=k_factor).ids
        recall = recall_at_k(found if own is None else drop_self(found, own, k), truth)
        log.info("recall@%d at nprobe %d, k_factor %d: %.4f", k, nprobe, k_factor, recall)
        return recall

    def cost(nprobe: int, k_factor: int) -> float:
        return query_bytes(nprobe, k_factor, k, len(snapshot) / ivf.nlist, ivf.code_size, row_bytes)

    (nprobe, k_factor), by = cheapest_setting(recall_of, nprobe_candidates(ivf.nlist), K_FACTORS, cost, target)
    return {"k": k, "recall": by[(nprobe, k_factor)], "nprobe": nprobe, "k_factor": k_factor, "target": target,
            "queries": len(queries), "bytes_per_query": round(cost(nprobe, k_factor)),
            "by_setting": {f"{n},{f}": round(r, 4) for (n, f), r in by.items()},
            "measured_by": "tune", "truth": "exact search over the stored vectors",
            "held_out": "leave-one-out memory vectors" if own is not None else "outside queries"}


def tune(memory: VisualMemory, target: float, queries: np.ndarray | None = None, held_out: int = 1000, k: int = 10,
         reason: str | None = None) -> tuple[int, dict]:
    """Measure recall across nprobe and commit a version whose default nprobe is the cheapest that
    reaches ``target``; ``memory`` answers from it afterwards. Returns (version, measurement). A
    target no nprobe reaches is refused, naming the best recall seen, and nothing is written."""
    after, result = tuned(memory.snapshot, target, queries, held_out, k, reason)
    memory.switch(after.manifest, after.shards)
    return after.version, result


def tuned(snapshot: Snapshot, target: float, queries: np.ndarray | None = None, held_out: int = 1000, k: int = 10,
          reason: str | None = None) -> tuple[Snapshot, dict]:
    """``tune`` on a snapshot: (the next snapshot, measurement)."""
    if not 0 < target <= 1:
        raise ValueError(f"the target recall must be in (0, 1], got {target}")
    if queries is None:
        queries, own = held_out_sample(snapshot, held_out)
    else:
        own = None
    result = measure(snapshot, np.ascontiguousarray(queries, dtype=np.float32), own, target, k)
    if result["recall"] < target:
        raise ValueError(f"no nprobe reaches recall@{k} {target} on memory {snapshot.url}: the best is "
                         f"{result['recall']:.4f} at nprobe {result['nprobe']} "
                         f"({result.get('by_nprobe') or result['by_setting']}); the codes "
                         f"of {snapshot.manifest.factory} are too coarse: rebuild with a finer factory (e.g. ...,SQ8)")
    search = {**snapshot.manifest.search, **{key: result[key] for key in ("nprobe", "k_factor") if key in result}}
    defaults = {**search, **({"nprobe": snapshot.nprobe} if snapshot.nprobe else {})}   # an override stays one
    shards = [s._derive() for s in snapshot.shards]
    for shard in shards:
        shard.defaults = dict(defaults)
    after = snapshot.commit(shards, operation="tune", search=search, recall=result, counts={"nprobe": result["nprobe"]},
                            reason=reason)
    return after, result
