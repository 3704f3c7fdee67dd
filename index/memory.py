"""``VisualMemory``: search, classify and edit a memory, in one process.

The Ray Serve app (index.serve) does the same fan-out across actors; both use the same Shard,
merge and vote, so their answers agree. Edits (``add``, ``add_embeddings``, ``remove``,
``rollback``, ``compact``, ``prune``) each commit a new version (index.edits, index.maintenance,
index.prune, index.commit) and are visible to this object's next query; another process sees them
when it opens the memory again. ``vacuum`` deletes old versions and unreferenced files and
``purge`` removes vectors from every file (index.maintenance).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from index import edits, history, maintenance
from index import prune as pruning
from index.manifest import Manifest, list_versions, read_manifest
from index.queries import check_vectors
from index.shards import Shard, coarse_assignment, merge_topk
from index.voting import vote


@dataclass
class Neighbours:
    similarities: np.ndarray   # [nq, k] inner product of unit vectors (cosine)
    ids: np.ndarray            # [nq, k] global ids, −1 where fewer than k exist
    labels: np.ndarray         # [nq, k] object
    uris: np.ndarray           # [nq, k] object
    shards: np.ndarray         # [nq, k] which shard held each neighbour
    sample_weights: np.ndarray | None = None   # [nq, k] each neighbour's vote weight from soft pruning (1.0: none)


@dataclass
class Classification:
    decisions: list
    neighbours: Neighbours
    weights: np.ndarray        # [nq, k] each neighbour's vote weight
    scores: list[dict]


class VisualMemory:
    def __init__(self, url: str, manifest: Manifest, shards: list[Shard], nprobe: int | None = None):
        self.url, self.manifest, self.shards, self.nprobe = url, manifest, shards, nprobe
        self.mmap = False
        self._trained: tuple[str, faiss.Index] | None = None

    @classmethod
    def open(cls, url: str, version: int | None = None, nprobe: int | None = None, mmap: bool = False,
             ) -> "VisualMemory":
        """The memory at ``url`` (current version by default). ``nprobe`` replaces the default the
        build recorded in the manifest, for every search of this object. ``mmap`` maps IVF shards of
        a memory on local disk instead of reading them (``Shard.load``): shards larger than RAM."""
        manifest = read_manifest(url, version)
        search = manifest.search_defaults(nprobe)
        memory = cls(url, manifest, [Shard.load(url, e, i, search, mmap=mmap) for i, e in enumerate(manifest.shards)],
                     nprobe)
        memory.mmap = mmap                     # shards this object reads later (rollback) are mapped too
        return memory

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def version(self) -> int:
        return self.manifest.version

    # queries -----------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, nprobe: int | None = None) -> Neighbours:
        """The ``k`` nearest memory items of each query (unit-normalised first; see index.queries).
        ``nprobe`` overrides the manifest's default for this call."""
        queries = check_vectors(queries, self.manifest.dim, "query vectors")
        if k < 1:
            raise ValueError(f"k must be a positive whole number, got {k}")
        coarse = coarse_assignment(self.shards, queries, nprobe)          # once for every shard
        answers = [dict(zip(("similarities", "ids"), s.search(queries, k, nprobe, coarse))) for s in self.shards]
        found = merge_topk(answers, k)
        uris, labels = np.full(found["ids"].shape, None, object), np.full(found["ids"].shape, None, object)
        weights = np.ones(found["ids"].shape)
        for n, shard in enumerate(self.shards):            # metadata of the k answers only, from their shards
            mine = (found["shards"] == n) & (found["ids"] >= 0)
            uris[mine], labels[mine], weights[mine] = shard.describe(found["ids"][mine])
        return Neighbours(found["similarities"], found["ids"], labels, uris, found["shards"], weights)

    def classify(self, queries, k: int = 10, rule: str = "plurality", nprobe: int | None = None) -> Classification:
        found = self.search(queries, k, nprobe)
        v = vote(found.labels, found.similarities, rule, sample_weights=found.sample_weights, ids=found.ids)
        return Classification(v.decisions, found, v.weights, v.scores)

    def live(self, ids) -> np.ndarray:
        """Whether each of ``ids`` is a vector this version answers with."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros(len(ids), dtype=bool)
        for shard in self.shards:
            out |= shard.live(ids)
        return out

    # edits -------------------------------------------------------------------------------------
    def add(self, vectors, labels, uris, source_ids=None, reason: str | None = None) -> tuple[int, np.ndarray]:
        """Add vectors (new classes welcome) as a new version; returns (version, their new ids)."""
        return edits.add(self, vectors, labels, uris, source_ids, reason)

    def add_embeddings(self, url: str, reason: str | None = None) -> tuple[int, np.ndarray]:
        """Add the output of ``vismem embed`` at ``url``, which must come from the memory's encoder;
        each vector's collection id is kept as its ``source_id``."""
        from index.build import embedding_encoder
        from index.embeddings import embedding_matrix, read_embeddings
        table = read_embeddings(url)
        vectors = embedding_matrix(table)
        edits.check_embeddings_encoder(self.manifest, self.url, embedding_encoder(url), vectors.shape[1], url)
        if len(vectors) == 0:
            raise ValueError(f"no vectors under {url}: nothing to add")
        return self.add(vectors, table.column("label").to_pylist(), table.column("uri").to_pylist(),
                        table.column("id").to_numpy(), reason)

    def remove(self, ids=None, uris=None, labels=None, reason: str | None = None) -> tuple[int, np.ndarray]:
        """Remove exactly the vectors named (by id, uri or label) as a new version; no later query of
        this object or of a memory opened at that version returns them. Returns (version, ids)."""
        return edits.remove(self, ids, uris, labels, reason)

    def rollback(self, version: int, reason: str | None = None) -> int:
        """A new version equal in content to ``version``; returns its number."""
        return edits.rollback(self, version, reason)

    def compact(self, reason: str | None = None) -> int:
        """Rewrite the shards that have segments or removed vectors as one base index each (same
        answers; removed vectors gone from the new version's files) as a new version; returns it."""
        return maintenance.compact(self, reason)

    def vacuum(self, keep_last: int | None = None, older_than_s: float | None = None, dry_run: bool = False,
               grace_s: float = maintenance.GRACE_S) -> dict:
        """Delete versions not kept and the files no kept version references (see index.maintenance);
        writes no version and returns what it deleted."""
        return maintenance.vacuum(self, keep_last, older_than_s, dry_run, grace_s)

    def prune(self, queries=None, query_labels=None, threshold: int = pruning.THRESHOLD, mode: str = "hard",
              k: int = 10, reason: str | None = None) -> tuple[int, dict]:
        """Hard- or soft-prune items that are wrong-label neighbours of the queries (the memory
        itself, leave-one-out, by default); returns (version, summary). See index.prune."""
        return pruning.prune(self, queries, query_labels, threshold, mode, k, reason)

    def purge(self, ids=None, uris=None, labels=None, reason: str | None = None,
              grace_s: float = maintenance.GRACE_S) -> dict:
        """Remove, compact and vacuum all older versions: the vectors named are then in no file
        under the memory root. Unlearning is complete only after this."""
        return maintenance.purge(self, ids, uris, labels, reason, grace_s)

    def switch(self, manifest: Manifest, shards: list[Shard]) -> None:
        """Answer from ``shards`` of the committed ``manifest`` from now on (after an edit)."""
        self.shards, self.manifest = shards, manifest

    def trained_index(self) -> faiss.Index:
        """The memory's trained empty index, which encodes every vector that enters it."""
        if self._trained is None or self._trained[0] != self.manifest.trained_index:
            self._trained = (self.manifest.trained_index, edits.load_trained(self.url, self.manifest))
        return self._trained[1]

    # history -----------------------------------------------------------------------------------
    def versions(self) -> list[int]:
        return list_versions(self.url)

    def log(self) -> list[dict]:
        """The audit trail: one record per version (version, time, operation, counts, user, reason)."""
        return history.log(self.url)

    def diff(self, a: int, b: int) -> dict:
        """The ids added and removed from version ``a`` to version ``b``."""
        return history.diff(self.url, a, b)
