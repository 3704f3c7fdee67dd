"""``VisualMemory``: search, classify and edit a memory, in one process.

The Ray Serve app (index.serve) does the same fan-out across actors; both use the same Shard,
merge and vote, so their answers agree. A ``VisualMemory`` holds one version's snapshot
(``index.snapshot``) and answers from it. Edits (``add``, ``add_embeddings``, ``remove``,
``rollback``, ``compact``, ``prune``) each commit a new version (index.edit.edits,
index.edit.maintenance, index.edit.prune, through index.store.commit) and return its snapshot,
which this object switches to: they are visible to its next query; another process sees them when
it opens the memory again. ``vacuum`` deletes old versions and unreferenced files and ``purge``
removes vectors from every file (index.edit.maintenance).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import faiss
import numpy as np

from index.counterfactual import Counterfactual, explain
from index.edit import edits, maintenance
from index.edit import prune as pruning
from index.shard.state import Shard
from index.snapshot import Neighbours, Snapshot
from index.store import history
from index.store.manifest import Manifest, list_versions
from index.voting import vote


@dataclass
class Classification:
    decisions: list
    neighbours: Neighbours
    weights: np.ndarray        # [nq, k] each neighbour's vote weight
    scores: list[dict]
    counterfactuals: list[Counterfactual] | None = None   # with ``classify(counterfactual=N)``
    ranking: Neighbours | None = None   # [nq, k + N]: the neighbours the counterfactuals' columns index


class VisualMemory:
    def __init__(self, url: str, manifest: Manifest, shards: list[Shard], nprobe: int | None = None):
        self.snapshot = Snapshot(url, manifest, shards, nprobe)

    @classmethod
    def open(cls, url: str, version: int | None = None, nprobe: int | None = None, mmap: bool = False,
             ) -> "VisualMemory":
        """The memory at ``url`` (current version by default). ``nprobe`` replaces the default the
        build recorded in the manifest, for every search of this object. ``mmap`` maps IVF shards of
        a memory on local disk instead of reading them (``Shard.load``): shards larger than RAM."""
        snapshot = Snapshot.open(url, version, nprobe, mmap)
        memory = cls(url, snapshot.manifest, snapshot.shards, nprobe)
        memory.snapshot = snapshot             # shards this object reads later (rollback) are mapped too
        return memory

    # the version this object answers from (read-only: an edit switches to a new snapshot) ----------
    @property
    def url(self) -> str:
        return self.snapshot.url

    @property
    def manifest(self) -> Manifest:
        return self.snapshot.manifest

    @property
    def shards(self) -> list[Shard]:
        return self.snapshot.shards

    @property
    def nprobe(self) -> int | None:
        return self.snapshot.nprobe

    @property
    def mmap(self) -> bool:
        return self.snapshot.mmap

    def __len__(self) -> int:
        return len(self.snapshot)

    @property
    def version(self) -> int:
        return self.snapshot.version

    # queries -----------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, nprobe: int | None = None, k_factor: int | None = None) -> Neighbours:
        """The ``k`` nearest memory items of each query (unit-normalised first; see index.queries).
        ``nprobe`` and ``k_factor`` (a two-tier memory's candidates re-ranked per answer)
        override the manifest's defaults for this call."""
        return self.snapshot.search(queries, k, nprobe, k_factor)

    def classify(self, queries, k: int = 10, rule: str = "plurality", nprobe: int | None = None,
                 counterfactual: int | None = None) -> Classification:
        """Each query's decision by ``rule`` over its ``k`` neighbours. ``counterfactual``: also
        find, with at most that many removals, the fewest memory items whose removal would change
        each decision (index.counterfactual), from one search ``k + counterfactual`` deep."""
        if counterfactual is not None and counterfactual < 1:
            raise ValueError(f"counterfactual (the most removals to try) must be at least 1, got {counterfactual}")
        ranking = self.search(queries, k + (counterfactual or 0), nprobe)
        found = ranking.head(k)
        v = vote(found.labels, found.similarities, rule, sample_weights=found.sample_weights, ids=found.ids)
        if counterfactual is None:
            return Classification(v.decisions, found, v.weights, v.scores)
        explained = explain(ranking.labels, ranking.similarities, ranking.ids, k, rule, ranking.sample_weights)
        return Classification(v.decisions, found, v.weights, v.scores, explained, ranking)

    def live(self, ids) -> np.ndarray:
        """Whether each of ``ids`` is a vector this version answers with."""
        return self.snapshot.live(ids)

    def labels(self, ids=None) -> set:
        """The labels of the vectors this version answers with (of those of ``ids`` it holds, when given)."""
        return self.snapshot.labels(ids)

    # edits -------------------------------------------------------------------------------------
    def add(self, vectors, labels, uris, source_ids=None, reason: str | None = None) -> tuple[int, np.ndarray]:
        """Add vectors (new classes welcome) as a new version; returns (version, their new ids)."""
        self.snapshot, ids = edits.add(self.snapshot, vectors, labels, uris, source_ids, reason)
        return self.version, ids

    def add_embeddings(self, url: str, reason: str | None = None) -> tuple[int, np.ndarray]:
        """Add the output of ``vismem embed`` at ``url``, which must come from the memory's encoder;
        each vector's collection id is kept as its ``source_id``."""
        self.snapshot, ids = edits.add_embeddings(self.snapshot, url, reason)
        return self.version, ids

    def remove(self, ids=None, uris=None, labels=None, reason: str | None = None) -> tuple[int, np.ndarray]:
        """Remove exactly the vectors named (by id, uri or label) as a new version; no later query of
        this object or of a memory opened at that version returns them. Returns (version, ids)."""
        self.snapshot, removed = edits.remove(self.snapshot, ids, uris, labels, reason)
        return self.version, removed

    def rollback(self, version: int, reason: str | None = None) -> int:
        """A new version equal in content to ``version``; returns its number."""
        self.snapshot = edits.rollback(self.snapshot, version, reason)
        return self.version

    def compact(self, reason: str | None = None) -> int:
        """Rewrite the shards that have segments or removed vectors as one base index each (same
        answers; removed vectors gone from the new version's files) as a new version; returns it."""
        self.snapshot = maintenance.compact(self.snapshot, reason)
        return self.version

    def vacuum(self, keep_last: int | None = None, older_than_s: float | None = None, dry_run: bool = False,
               grace_s: float = maintenance.GRACE_S) -> dict:
        """Delete versions not kept and the files no kept version references (see
        index.edit.maintenance); writes no version and returns what it deleted."""
        return maintenance.vacuum(self.snapshot, keep_last, older_than_s, dry_run, grace_s)

    def prune(self, queries=None, query_labels=None, threshold: int = pruning.THRESHOLD, mode: str = "hard",
              k: int = 10, reason: str | None = None) -> tuple[int, dict]:
        """Hard- or soft-prune items that are wrong-label neighbours of the queries (the memory
        itself, leave-one-out, by default); returns (version, summary). See index.edit.prune."""
        self.snapshot, summary = pruning.prune(self.snapshot, queries, query_labels, threshold, mode, k, reason)
        return self.version, summary

    def purge(self, ids=None, uris=None, labels=None, reason: str | None = None,
              grace_s: float = maintenance.GRACE_S) -> dict:
        """Remove, compact and vacuum all older versions: the vectors named are then in no file
        under the memory root. Unlearning is complete only after this. With nothing named it
        finishes an interrupted purge (compact if needed, then vacuum). Returns what each step did.

        Each step switches this object to the version it commits as it goes, so a purge that fails
        part-way leaves it answering from the last step that committed."""
        out = {"removed": [], "remove_version": None, "compact_version": None}
        if ids is not None or uris is not None or labels is not None:
            out["remove_version"], removed = self.remove(ids=ids, uris=uris, labels=labels, reason=reason)
            out["removed"] = np.asarray(removed).tolist()
        if any(maintenance.needs_compaction(s) for s in self.shards):
            out["compact_version"] = self.compact(reason=reason)
        out["vacuum"] = self.vacuum(keep_last=1, grace_s=grace_s)
        out["version"] = self.version
        return out

    def switch(self, manifest: Manifest, shards: list[Shard]) -> None:
        """Answer from ``shards`` of the committed ``manifest`` from now on (after an edit)."""
        self.snapshot = replace(self.snapshot, manifest=manifest, shards=shards)

    def trained_index(self) -> faiss.Index:
        """The memory's trained empty index, which encodes every vector that enters it."""
        return self.snapshot.trained_index()

    # history -----------------------------------------------------------------------------------
    def versions(self) -> list[int]:
        return list_versions(self.url)

    def log(self) -> list[dict]:
        """The audit trail: one record per version (version, time, operation, counts, user, reason)."""
        return history.log(self.url)

    def diff(self, a: int, b: int) -> dict:
        """The ids added and removed from version ``a`` to version ``b``."""
        return history.diff(self.url, a, b)
