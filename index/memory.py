"""``VisualMemory``: search and classify against every shard of a memory, in one process.

The Ray Serve app (index.serve) does the same fan-out across actors; both use the same Shard,
merge and vote, so their answers agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from index.manifest import Manifest, read_manifest
from index.queries import check_vectors
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
        """The memory at ``url`` (current version by default). ``nprobe`` replaces the default the
        build recorded in the manifest, for every search of this object."""
        manifest = read_manifest(url, version)
        search = manifest.search_defaults(nprobe)
        return cls(url, manifest, [Shard.load(url, e, i, search) for i, e in enumerate(manifest.shards)])

    def __len__(self) -> int:
        return sum(s.index.ntotal for s in self.shards)

    def search(self, queries, k: int = 10, nprobe: int | None = None) -> Neighbours:
        """The ``k`` nearest memory items of each query (unit-normalised first; see index.queries).
        ``nprobe`` overrides the manifest's default for this call."""
        queries = check_vectors(queries, self.manifest.dim, "query vectors")
        if k < 1:
            raise ValueError(f"k must be a positive whole number, got {k}")
        found = merge_topk([s.query(queries, k, nprobe) for s in self.shards], k)
        return Neighbours(found["similarities"], found["ids"], found["labels"], found["uris"], found["shards"])

    def classify(self, queries, k: int = 10, rule: str = "plurality", nprobe: int | None = None) -> Classification:
        found = self.search(queries, k, nprobe)
        v = vote(found.labels, found.similarities, rule, ids=found.ids)
        return Classification(v.decisions, found, v.weights, v.scores)
