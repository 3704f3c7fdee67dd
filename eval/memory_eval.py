"""What the evaluations on a stored memory share (``eval.voting``, ``eval.pruning``,
``eval.unlearning``): the memory in process, its labelled queries, accuracy, and the report files.

``InProcess`` is a snapshot whose edits stay in this process: every edit of ``index.edit``
(remove, prune, compact) commits through ``Snapshot.commit`` (docs/ARCHITECTURE.md §5), and
``InProcess.commit`` returns the next snapshot with the edited shards without writing anything.
So an evaluation edits with the very code ``vismem memory remove|prune|compact`` runs, and the
source memory is never changed: no version is written and no file is touched.

Queries are an embeddings folder as ``vismem embed`` writes it (refused unless it comes from the
memory's encoder), or a held-out split of the memory itself: a seeded random fraction of its items,
whose stored vectors are the queries and which the memory answering them no longer holds (removed
in process, as above).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import fsspec
import numpy as np

from index.edit import edits
from index.ingest.embeddings import read_memory_embeddings
from index.memory import VisualMemory
from index.snapshot import Snapshot
from index.store.manifest import next_manifest

HOLDOUT = 0.1


@dataclass(frozen=True)
class InProcess(Snapshot):
    """A snapshot whose edits are kept in this process and never written (see the module docstring).

    Its manifest after an edit is the next version's (operation, counts, version number), with the
    source version's shard entries: the edited shards exist only as objects."""

    def commit(self, shards: list, **changes) -> "InProcess":
        return replace(self, manifest=next_manifest(self.manifest, self.manifest.shards, **changes), shards=shards)

    @classmethod
    def of(cls, snapshot: Snapshot) -> "InProcess":
        return cls(snapshot.url, snapshot.manifest, snapshot.shards, snapshot.nprobe, snapshot.mmap,
                   snapshot.trained)


@dataclass
class MemoryEval:
    """What every evaluation of a stored memory is given (each config adds its own knobs)."""
    memory: str                          # any stored memory URL
    out: str                             # folder URL for NAME.json and the plots
    queries: str | None = None           # labelled embeddings URL; None: a held-out split of the memory
    holdout: float | None = None         # the held-out fraction (default HOLDOUT)
    seed: int = 0
    nprobe: int | None = None
    progress: bool = True


@dataclass
class Queries:
    vectors: np.ndarray        # [n, dim] float32
    labels: np.ndarray         # [n] object
    source: str                # the embeddings URL, or "holdout:FRACTION:SEED"


def open_in_process(url: str, nprobe: int | None = None) -> InProcess:
    return InProcess.of(Snapshot.open(url, nprobe=nprobe))


def memory_items(snapshot: Snapshot) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, vectors) of every live item, sorted by id; vectors decoded from their codes
    (exact for Flat memories, the quantised vector for SQ/PQ)."""
    found = [shard.vectors() for shard in snapshot.shards]
    ids = np.concatenate([f[0] for f in found])
    order = np.argsort(ids, kind="stable")
    return (ids[order], np.concatenate([f[1] for f in found])[order],
            np.concatenate([f[2] for f in found])[order].astype(np.float32, copy=False))


def labelled_queries(memory: InProcess, queries: str | None, holdout: float | None,
                     seed: int = 0) -> tuple[InProcess, Queries]:
    """(the memory that answers, its queries): the embeddings at ``queries``, or else a held-out
    ``holdout`` fraction of the memory's own items (default ``HOLDOUT``), removed from the
    memory that answers them."""
    if queries is not None:
        if holdout is not None:
            raise ValueError("give labelled queries (an embeddings URL) or a held-out fraction, not both")
        table, vectors = read_memory_embeddings(memory.manifest, memory.url, queries)
        labels = np.asarray(table.column("label").to_pylist(), dtype=object)
        if any(label is None for label in labels):
            raise ValueError(f"{queries} has queries without a label; an accuracy needs every label")
        return memory, Queries(vectors, labels, queries)
    holdout = HOLDOUT if holdout is None else holdout
    if not 0 < holdout < 1:
        raise ValueError(f"the held-out fraction must be between 0 and 1, got {holdout}")
    ids, labels, vectors = memory_items(memory)
    n = int(round(holdout * len(ids)))
    if n < 1 or n >= len(ids):
        raise ValueError(f"a held-out fraction {holdout} of {len(ids)} items leaves no queries or no memory")
    chosen = np.sort(np.random.default_rng(seed).choice(len(ids), n, replace=False))
    answering, _ = edits.remove(memory, ids=ids[chosen], reason="held-out queries (in process)")
    return answering, Queries(vectors[chosen], labels[chosen], f"holdout:{holdout}:{seed}")


def as_memory(snapshot: Snapshot) -> VisualMemory:
    """A ``VisualMemory`` answering from ``snapshot`` (its classify is the one every command uses)."""
    return VisualMemory(snapshot.url, snapshot.manifest, snapshot.shards, snapshot.nprobe)


def accuracy(snapshot: Snapshot, queries: np.ndarray, labels: np.ndarray, k: int, rule: str) -> float | None:
    """Top-1 of ``VisualMemory.classify`` (None for no queries)."""
    if not len(queries):
        return None
    decisions = np.asarray(as_memory(snapshot).classify(queries, k, rule).decisions, dtype=object)
    return float(np.mean(decisions == np.asarray(labels, dtype=object)))


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def write_report(out: str, name: str, summary: dict) -> str:
    """``OUT/NAME.json``; returns its URL."""
    url = f"{out.rstrip('/')}/{name}.json"
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return url


def new_figure(title: str, xlabel: str, ylabel: str = "top-1 accuracy (%)", log_x: bool = False):
    """(figure, axes) of the house plot: grid, labels, title."""
    import matplotlib                   # here: only an evaluation that draws pays for matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt     # (see above)
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig, ax


def save_figure(fig, out: str, name: str) -> str:
    """``OUT/NAME.png``; returns its URL."""
    import matplotlib.pyplot as plt     # here: see new_figure
    url = f"{out.rstrip('/')}/{name}.png"
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fig.tight_layout()
    with fs.open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return url
