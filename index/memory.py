"""``VisualMemory``: search and classify against every shard of a memory, in one process.

The Ray Serve app (index.serve) does the same fan-out across actors; both use the same Shard,
merge and vote, so their answers agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from index.manifest import Manifest, read_manifest
from index.shards import Shard, merge_topk
from index.voting import vote


@dataclass
class Neighbours:
    similarities: np.ndarray   # [nq, k] inner product of unit vectors (cosine)
    ids: np.ndarray            # [nq, k] global ids, −1 where fewer than k exist
    labels: np.ndarray         # [nq, k] object
    uris: np.ndarray           # [nq, k] object
    shards: np.ndarray         # [nq, k] which shard held each neighbour


@dataclass
class Classification:
    decisions: list
    neighbours: Neighbours
    weights: np.ndarray        # [nq, k] each neighbour's vote weight
    scores: list[dict]


class VisualMemory:
    def __init__(self, url: str, manifest: Manifest, shards: list[Shard]):
        self.url, self.manifest, self.shards = url, manifest, shards

    @classmethod
    def open(cls, url: str, version: int | None = None, nprobe: int | None = None) -> "VisualMemory":
        manifest = read_manifest(url, version)
        return cls(url, manifest, [Shard.load(url, e, i, nprobe) for i, e in enumerate(manifest.shards)])

    def __len__(self) -> int:
        return sum(s.index.ntotal for s in self.shards)

    def check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.manifest.dim:
            raise ValueError(f"query vectors have dimension {queries.shape[-1]}, the memory {self.url} "
                             f"holds dimension {self.manifest.dim} (encoder {self.manifest.encoder.get('name')})")
        return queries

    def search(self, queries: np.ndarray, k: int = 10) -> Neighbours:
        queries = self.check_queries(queries)
        found = merge_topk([s.query(queries, k) for s in self.shards], k)
        return Neighbours(found["similarities"], found["ids"], found["labels"], found["uris"], found["shards"])

    def classify(self, queries: np.ndarray, k: int = 10, rule: str = "plurality") -> Classification:
        found = self.search(queries, k)
        v = vote(found.labels, found.similarities, rule, ids=found.ids)
        return Classification(v.decisions, found, v.weights, v.scores)
