"""Memory pruning (Geirhos et al. 2024, "Towards flexible perception with visual memory").

A memory item that often turns up among the k nearest neighbours of queries of *another* label
pulls decisions the wrong way (a mislabelled or ambiguous image). Over a query set — by default
the memory itself, leave-one-out: each memory vector is a query with its own label, its own id
excluded — count, for each item, how often it is such a wrong-label neighbour. Then

- hard pruning removes the items counted ``threshold`` times or more, through the exact remove
  path (a deletion set; ``compact``/``vacuum`` make it physical);
- soft pruning keeps every item but gives each one counted at least once the vote weight
  1.75 / (1 + count), stored with its shard and applied by every voting rule.

The default threshold: the paper's value for hard pruning was not at hand, so it is 5, half the
default k. Over leave-one-out queries an item appears in k neighbour lists on average, so 5
wrong-label appearances marks an item that misleads at least half as often as a typical item is
consulted at all.

Leave-one-out queries are the stored vectors decoded from their codes (exact for Flat, the
quantised vector for IVF-SQ/PQ): the memory keeps no other copy of them.
"""

from __future__ import annotations

import numpy as np

from index.edit.edits import remove_live
from index.queries import check_vectors
from index.shard.placement import owners
from index.snapshot import Snapshot

THRESHOLD = 5
MODES = ("hard", "soft")
BATCH = 4096


def prune(snapshot: Snapshot, queries=None, query_labels=None, threshold: int = THRESHOLD, mode: str = "hard",
          k: int = 10, reason: str | None = None) -> tuple[Snapshot, dict]:
    """Prune (``mode="hard"``) or down-weight (``"soft"``) the items that are wrong-label
    neighbours of the queries; returns (the next snapshot, summary). Where nothing changes no
    version is written and ``snapshot`` itself is returned (``summary["changed"]`` is False)."""
    check_arguments(queries, query_labels, threshold, mode, k)
    before = snapshot.version
    ids, counts, nq = wrong_label_counts(snapshot, queries, query_labels, k)
    summary = {"mode": mode, "threshold": threshold, "k": k, "queries": nq, "leave_one_out": queries is None,
               "flagged": int(len(ids)), "max_count": int(counts.max(initial=0))}
    if mode == "hard":
        pruned = ids[counts >= threshold]
        summary["pruned"] = int(len(pruned))
        record = {"mode": mode, "pruned": len(pruned), "threshold": threshold, "k": k, "queries": nq}
        after = remove_live(snapshot, pruned, "prune", record, reason) if len(pruned) else snapshot
    else:
        shards = reweighted(snapshot, ids, 1.75 / (1.0 + counts))
        summary["reweighted"] = int(len(ids))
        record = {"mode": mode, "reweighted": len(ids), "k": k, "queries": nq}
        after = snapshot.commit(shards, operation="prune", counts=record,
                                reason=reason) if shards is not None else snapshot
    summary["changed"] = after.version != before
    return after, summary


def check_arguments(queries, query_labels, threshold, mode, k) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown pruning mode {mode!r}; choose one of: {', '.join(MODES)}")
    if (queries is None) != (query_labels is None):
        raise ValueError("give queries and query_labels together (or neither, to prune leave-one-out over the memory)")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive whole number, got {k}")
    if mode == "hard" and (int(threshold) != threshold or threshold < 1):
        raise ValueError(f"threshold must be a positive whole number of wrong-label appearances, got {threshold}")


def wrong_label_counts(snapshot: Snapshot, queries, query_labels, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, counts, number of queries): each memory item that is among some query's ``k``
    nearest neighbours with a label other than the query's, and how many times."""
    wrong = []
    for ids, labels, own in query_batches(snapshot, queries, query_labels, k):
        hit = (ids >= 0) & (labels != own[:, None])
        wrong.append(ids[hit])
    found, counts = np.unique(np.concatenate(wrong) if wrong else np.zeros(0, np.int64), return_counts=True)
    nq = len(snapshot) if queries is None else len(queries)
    return found.astype(np.int64), counts, nq


def query_batches(snapshot: Snapshot, queries, query_labels, k: int):
    """Yield (neighbour ids [n, k], neighbour labels [n, k], query labels [n]) per batch of queries."""
    if queries is not None:
        queries = check_vectors(queries, snapshot.manifest.dim, "pruning queries")
        own = np.array([str(label) for label in query_labels], dtype=object)
        if len(own) != len(queries):
            raise ValueError(f"{len(queries)} pruning queries but {len(own)} query labels; give one label per query")
        for start in range(0, len(queries), BATCH):
            found = snapshot.search(queries[start:start + BATCH], k)
            yield found.ids, found.labels, own[start:start + BATCH]
        return
    for shard in snapshot.shards:
        ids, labels, vectors = shard.vectors()
        for start in range(0, len(ids), BATCH):
            stop = start + BATCH
            found = snapshot.search(vectors[start:stop], k + 1)
            keep = without_self(found.ids, ids[start:stop], k)
            yield found.ids[keep].reshape(-1, k), found.labels[keep].reshape(-1, k), labels[start:stop]


def without_self(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Mask [n, k+1] keeping k neighbours per row: all but the query's own id (or, where the
    search missed it, all but the farthest)."""
    is_self = found == own[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones(found.shape, dtype=bool)
    keep[np.arange(len(found)), drop] = False
    return keep


def reweighted(snapshot: Snapshot, ids: np.ndarray, weights: np.ndarray) -> list | None:
    """The shards with ``weights`` for ``ids`` (replacing earlier ones), or None where every shard's
    weights would stay as they are."""
    shards, changed = [], False
    owner = owners(snapshot.shards, ids)
    for s, shard in enumerate(snapshot.shards):
        mine = owner == s
        new = shard.with_weights(ids[mine], weights[mine])
        same = all(np.array_equal(a, b) for a, b in zip(new.weights, shard.weights))
        shards.append(shard if same else new)
        changed |= not same
    return shards if changed else None
