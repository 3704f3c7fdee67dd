"""Which shard holds a vector: by IVF list for IVF memories, by id for the others.

An IVF memory places each vector in the shard that owns its inverted list: shard ``s`` owns the
lists ``bounds[s] ≤ list < bounds[s + 1]``, ranges the build chooses so that the shards hold about
as many vectors each (``balanced``, from the training sample's list sizes). A query's probed lists
are then each scanned once, by one shard, as one index over all vectors would scan them: splitting
every list across the shards instead (by id) repeats the per-list work of a scan (the query's
residual to the centroid, the scanner's set-up) once per shard, which cost a 4-shard memory a
good share of bare FAISS's queries/s at 1M vectors (the figures: README, "Memory at scale"). FAISS's own
distributed and on-disk indexes split a billion-vector IVF the same way, by list ranges.

Memories without inverted lists (Flat, HNSW, wrapped indexes), and those written before placement
was recorded, place by id: shard ``id % shards``. Either way a stored vector's shard is found
by asking the shards which ids they hold (``owners``), never computed from the id alone, so one
edit path serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from faiss.contrib.ivf_tools import add_preassigned

from index.shard.state import Shard


@dataclass(frozen=True)
class Placement:
    shards: int
    bounds: tuple[int, ...] | None = None      # by list: shard s owns lists bounds[s] ≤ l < bounds[s+1]

    @classmethod
    def of(cls, manifest) -> "Placement":
        """The placement a manifest records (by id where it records none)."""
        recorded = getattr(manifest, "placement", None)
        if recorded and recorded.get("by") == "lists":
            return cls(len(manifest.shards), tuple(int(b) for b in recorded["bounds"]))
        return cls(len(manifest.shards))

    @classmethod
    def balanced(cls, list_sizes: np.ndarray, shards: int) -> "Placement":
        """List ranges holding about ``1/shards`` of the vectors each, from (estimated) list sizes;
        every shard owns at least one list."""
        nlist = len(list_sizes)
        if not 1 <= shards <= nlist:
            raise ValueError(f"{shards} shards cannot each own some of {nlist} inverted lists; use at most {nlist}")
        share = np.cumsum(np.asarray(list_sizes, dtype=np.float64) + 1e-9)     # empty lists still split evenly
        cuts = np.searchsorted(share, share[-1] * np.arange(1, shards) / shards, side="right")
        cuts = np.maximum(cuts, np.arange(1, shards))                     # at least one list per shard …
        cuts = np.minimum(cuts, nlist - shards + np.arange(1, shards))    # … on both sides
        cuts = np.maximum.accumulate(cuts)
        return cls(shards, (0, *map(int, cuts), nlist))

    @property
    def by_lists(self) -> bool:
        return self.bounds is not None

    def record(self) -> dict | None:
        """What the manifest stores (None: by id)."""
        return {"by": "lists", "bounds": list(self.bounds)} if self.by_lists else None

    def assign(self, trained: faiss.Index, vectors: np.ndarray) -> np.ndarray | None:
        """The inverted list of each new vector (None when placing by id)."""
        if not self.by_lists:
            return None
        ivf = faiss.extract_index_ivf(trained)
        if ivf.nlist != self.bounds[-1]:
            raise ValueError(f"the placement covers {self.bounds[-1]} lists, the trained index has {ivf.nlist}")
        return ivf.quantizer.assign(np.ascontiguousarray(vectors, dtype=np.float32), 1).ravel()

    def shard_of(self, ids: np.ndarray, lists: np.ndarray | None = None) -> np.ndarray:
        """The shard each new vector goes to: by its list (``assign``) or by its id."""
        if self.by_lists:
            return np.searchsorted(np.asarray(self.bounds), lists, side="right") - 1
        return np.asarray(ids, dtype=np.int64) % self.shards

    def split(self, trained: faiss.Index, vectors: np.ndarray, ids: np.ndarray,
              ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """For each shard, the rows of new ``vectors`` (memory ids ``ids``) it gets and their lists
        (None when placing by id), to ``encode``: each vector's list is found once, and both picks
        its shard and is the list the shard files it in."""
        lists = self.assign(trained, vectors)
        owner = self.shard_of(ids, lists)
        rows = [np.flatnonzero(owner == s) for s in range(self.shards)]
        return [(mine, None if lists is None else lists[mine]) for mine in rows]


def encode(trained: faiss.Index, vectors: np.ndarray, ids: np.ndarray, lists: np.ndarray | None) -> faiss.Index:
    """A copy of ``trained`` holding ``vectors`` as ``ids``: a segment or a build's piece. With the
    lists already assigned (``Placement.split``) the coarse search is not repeated, except by a
    fast-scan index, whose ``add_core`` takes no assignment (it files garbage), so it assigns again."""
    index = faiss.clone_index(trained)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if lists is None or isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFFastScan):
        index.add_with_ids(vectors, ids)
    else:
        add_preassigned(faiss.extract_index_ivf(index), vectors, np.ascontiguousarray(lists, dtype=np.int64), ids)
    return index


def owners(shards: list[Shard], ids: np.ndarray) -> np.ndarray:
    """The shard holding each of ``ids`` (removed or not), −1 where none does."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.full(len(ids), -1, dtype=np.int64)
    for s, shard in enumerate(shards):
        out[shard.held(ids) & (out < 0)] = s
    return out
