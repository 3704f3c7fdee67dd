"""One version of a memory as a process holds it: its manifest and loaded shards, and how it answers.

A ``Snapshot`` is never changed. An edit (``index.edit``) takes one and returns the next, committed
through ``Snapshot.commit`` (the shards' new files, then ``index.store.commit.transaction``), so a
query running on the old snapshot sees one version whole and a failed edit changes nothing.
``VisualMemory`` holds a snapshot and switches to the one an edit returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import faiss
import numpy as np

from index.queries import check_vectors
from index.shard.faiss_io import load_trained
from index.shard.search import coarse_assignment, merge_topk
from index.shard.tiers import MISSING, best_exact
from index.shard.state import Part, Shard
from index.store import commit
from index.store.manifest import Manifest, next_manifest, read_manifest


@dataclass
class Neighbours:
    similarities: np.ndarray   # [nq, k] inner product of unit vectors (cosine)
    ids: np.ndarray            # [nq, k] global ids, −1 where fewer than k exist
    labels: np.ndarray         # [nq, k] object
    uris: np.ndarray           # [nq, k] object
    shards: np.ndarray         # [nq, k] which shard held each neighbour
    sample_weights: np.ndarray | None = None   # [nq, k] each neighbour's vote weight from soft pruning (1.0: none)

    def head(self, k: int) -> "Neighbours":
        """The first ``k`` of each query's neighbours."""
        return Neighbours(*(None if a is None else a[:, :k] for a in (
            self.similarities, self.ids, self.labels, self.uris, self.shards, self.sample_weights)))


@dataclass(frozen=True)
class Snapshot:
    url: str
    manifest: Manifest
    shards: list[Shard]        # never changed: an edit builds new shard objects beside these
    nprobe: int | None = None  # replaces the manifest's default nprobe in every search
    mmap: bool = False         # IVF shards read later (a rollback's) are memory-mapped too
    trained: dict = field(default_factory=dict, compare=False, repr=False)
    # {path: the trained empty index}, at most one entry, shared by the snapshots that follow this one

    @classmethod
    def open(cls, url: str, version: int | None = None, nprobe: int | None = None, mmap: bool = False) -> "Snapshot":
        """Version ``version`` (the current one by default) of the memory at ``url``, its shards
        loaded (``mmap``: IVF shards of a memory on local disk mapped, ``Shard.load``)."""
        manifest = read_manifest(url, version)
        search = manifest.search_defaults(nprobe)
        shards = [Shard.load(url, e, i, search, mmap=mmap) for i, e in enumerate(manifest.shards)]
        return cls(url, manifest, shards, nprobe, mmap)

    @property
    def version(self) -> int:
        return self.manifest.version

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    # queries -----------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, nprobe: int | None = None, k_factor: int | None = None) -> Neighbours:
        """The ``k`` nearest memory items of each query (unit-normalised first; see index.queries).
        ``nprobe`` (and ``k_factor``, candidates re-ranked per answer in a two-tier memory)
        override the manifest's defaults for this call."""
        queries = check_vectors(queries, self.manifest.dim, "query vectors")
        if k < 1:
            raise ValueError(f"k must be a positive whole number, got {k}")
        coarse = coarse_assignment(self.shards, queries, nprobe)          # once for every shard
        if self.shards[0].two_tier:
            found = two_tier_topk(self.shards, queries, k, nprobe, coarse, k_factor)
        else:
            answers = [dict(zip(("similarities", "ids"), s.search(queries, k, nprobe, coarse))) for s in self.shards]
            found = merge_topk(answers, k)
        uris, labels = np.full(found["ids"].shape, None, object), np.full(found["ids"].shape, None, object)
        weights = np.ones(found["ids"].shape)
        for n, shard in enumerate(self.shards):            # metadata of the k answers only, from their shards
            mine = (found["shards"] == n) & (found["ids"] >= 0)
            uris[mine], labels[mine], weights[mine] = shard.describe(found["ids"][mine])
        return Neighbours(found["similarities"], found["ids"], labels, uris, found["shards"], weights)

    def live(self, ids) -> np.ndarray:
        """Whether each of ``ids`` is a vector this version answers with."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros(len(ids), dtype=bool)
        for shard in self.shards:
            out |= shard.live(ids)
        return out

    def labels(self, ids=None) -> set:
        """The labels of the vectors this version answers with (of those of ``ids`` it holds, when
        given: a new version's labels of the ids an edit just added)."""
        if ids is None:
            return set().union(*(shard.live_labels() for shard in self.shards))
        ids = np.asarray(ids, dtype=np.int64)
        return set().union(*(shard.lookup(ids[shard.held(ids)])[1].tolist() for shard in self.shards))

    def matching(self, column: str, wanted: set) -> tuple[np.ndarray, set]:
        """Live ids whose ``column`` (uri or label) is in ``wanted``, and which of ``wanted`` occur."""
        found = [shard.matching(column, wanted) for shard in self.shards]
        return np.concatenate([ids for ids, _ in found]), set().union(*(seen for _, seen in found))

    def trained_index(self) -> faiss.Index:
        """The memory's trained empty index, which encodes every vector that enters it (read once
        and kept while the versions that follow share it)."""
        path = self.manifest.trained_index
        if path not in self.trained:
            self.trained.clear()
            self.trained[path] = load_trained(self.url, self.manifest)
        return self.trained[path]

    # versions ----------------------------------------------------------------------------------
    def load_version(self, version: int) -> tuple[Manifest, list[Shard]]:
        """Version ``version``'s manifest and shards, reusing the parts this snapshot already holds."""
        target = read_manifest(self.url, version)
        loaded: dict[str, Part] = {p.stored.index: p for s in self.shards for p in s.parts if p.stored is not None}
        search = target.search_defaults(self.nprobe)
        return target, [Shard.load(self.url, e, i, search, loaded, mmap=self.mmap) for i, e in enumerate(target.shards)]

    def commit(self, shards: list[Shard], **changes) -> "Snapshot":
        """Commit the next version: ``shards``' new files saved, the manifest ``next_manifest`` makes
        with ``changes`` (operation, counts, reason, next_id, ``content``, ...), through the one
        commit entry point (``index.store.commit.transaction``). Returns the next snapshot;
        ``MemoryConflict`` (nothing visible written) if another writer committed that version first."""
        with commit.transaction(self.url, self.version + 1) as txn:
            txn.manifest = next_manifest(self.manifest, [s.save(txn.fs, txn.root, txn.folder) for s in shards],
                                         **changes)
        return replace(self, manifest=txn.manifest, shards=shards)


def two_tier_topk(shards: list[Shard], queries: np.ndarray, k: int, nprobe: int | None, coarse,
                  k_factor: int | None) -> dict:
    """The top-k of two-tier shards: the memory's ``k·k_factor`` best candidates by their codes
    (every shard's best, merged), then each shard re-ranks those it holds exactly. The same answer
    as one index holding every live vector, whatever the number of shards or segments."""
    wanted = k * shards[0].k_factor(k_factor)
    answers = [dict(zip(("similarities", "ids"), s.candidates(queries, wanted, nprobe, coarse))) for s in shards]
    found = merge_topk(answers, wanted)
    found["exact"] = np.full(found["ids"].shape, MISSING, dtype=np.float32)
    for n, shard in enumerate(shards):
        mine = found["shards"] == n
        if mine.any():
            found["exact"] = np.where(mine, shard.rerank(queries, found["ids"], mine), found["exact"])
    return best_exact(found, k)
