"""kNN classification accuracy of one embedding of a memory set and a query set."""

from __future__ import annotations

import faiss
import numpy as np

from index.voting import RULES, vote


def knn_accuracy(memory: np.ndarray, memory_labels, queries: np.ndarray, query_labels, k: int = 10,
                 rules=RULES) -> dict[str, float]:
    """Top-1 accuracy per voting rule, with an exact inner-product (cosine) search."""
    index = faiss.IndexFlatIP(memory.shape[1])
    index.add(np.ascontiguousarray(memory, dtype=np.float32))
    sims, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    memory_labels = np.asarray(memory_labels, dtype=object)
    truth = np.asarray(query_labels, dtype=object)
    out = {}
    for rule in rules:
        decisions = np.asarray(vote(memory_labels[ids], sims, rule, ids=ids).decisions, dtype=object)
        out[rule] = float(np.mean(decisions == truth))
    return out
