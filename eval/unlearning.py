"""Exact unlearning (Geirhos et al. 2024): remove items from a memory, then check that it answers
exactly as a memory rebuilt without them, and measure accuracy before and after.

What is removed: a class (``class:LABEL``, every item with that label) or a seeded random fraction
of the items (``random:0.01``, 1%). The "most influential" items of issue 24 need the influence
evaluation and come later.

The edit is ``index.edit.edits.remove``, what ``vismem memory remove`` runs, then ``compact`` (what
``purge`` runs before its vacuum), both on the memory held in process (``eval.memory_eval.InProcess``):
the source memory is never changed. The rebuilt memory is a build (``index.build.build_memory``, in
this process) of the kept items' stored vectors, ids, labels and URIs, over the memory's own trained
index, shard count and nprobe, written under ``work`` (a temporary folder by default, deleted after).
With ``embeddings`` (the folder the memory was built from) the rebuild reads each kept item's vector
there instead, found by the collection id the memory keeps for it and checked by its URI.
For every query both memories must give the same ids (the rebuilt one's mapped back to the source's),
the same labels and the same similarities (within ``tolerance``), and no removed id may be answered.
Stored vectors are exact for Flat memories; for IVF/SQ/PQ memories they are decoded codes, which the
rebuild encodes again: a decoded vector near a list boundary can land in another list and change an
answer, so such memories are checked against their embeddings (``embeddings``).

Accuracy (``VisualMemory.classify``) before and after, on the forgotten class's queries and the
rest (a random removal: on the queries that had a removed item among their neighbours, and the
rest). Writes ``OUT/unlearning.json`` and ``unlearning.png``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from eval.memory_eval import (MemoryEval, accuracy, labelled_queries, memory_items, new_figure, open_in_process,
                              rounded, save_figure, write_report)
from index.build.build import build_memory
from index.edit import edits, maintenance
from index.ingest.embeddings import read_memory_embeddings, write_vectors
from index.snapshot import Snapshot

log = logging.getLogger("vismem.eval.unlearning")

TOLERANCE = 1e-5


@dataclass
class UnlearningConfig(MemoryEval):
    forget: str = "random:0.01"          # class:LABEL or random:FRACTION
    k: int = 10                          # neighbours compared, and voting
    rule: str = "softmax"
    work: str | None = None              # URL for the rebuilt memory (default: a temporary folder)
    embeddings: str | None = None        # the embeddings the memory was built from (None: its stored vectors)
    tolerance: float = TOLERANCE         # largest similarity difference counted as the same answer


def forget_ids(memory: Snapshot, forget: str, seed: int) -> tuple[np.ndarray, list[str]]:
    """(ids to remove, the labels forgotten: the class's, or none for a random removal)."""
    kind, _, value = forget.partition(":")
    if kind == "class" and value:
        ids, seen = memory.matching("label", {value})
        if not seen:
            raise ValueError(f"no item of memory {memory.url} has the label {value!r}")
        return np.sort(ids), [value]
    if kind == "random":
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not 0 < fraction < 1:
            raise ValueError(f"random:FRACTION needs a fraction between 0 and 1, got {forget!r}")
        ids = memory_items(memory)[0]
        n = max(1, int(round(fraction * len(ids))))
        return np.sort(np.random.default_rng([seed, 1]).choice(ids, n, replace=False)), []
    raise ValueError(f"--forget takes class:LABEL or random:FRACTION, got {forget!r} (the most influential items "
                     "come with the influence evaluation)")


def item_metadata(memory: Snapshot, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uri, collection id or -1) of each of ``ids`` (live ids of ``memory``)."""
    uris, sources = np.empty(len(ids), dtype=object), np.full(len(ids), -1, dtype=np.int64)
    for shard in memory.shards:
        uris[shard.held(ids)] = shard.describe(ids[shard.held(ids)])[0]
        for part in shard.parts:
            rows, held = part.positions(ids)
            column = part.metadata.column("source_id").to_numpy(zero_copy_only=False) \
                if "source_id" in part.metadata.column_names else np.full(len(part.ids), np.nan)
            sources[held] = np.nan_to_num(column[rows[held]].astype(np.float64), nan=-1).astype(np.int64)
    return uris, sources


def embedded_vectors(memory: Snapshot, url: str, ids: np.ndarray, uris: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """The vectors of memory items ``ids`` as ``vismem embed`` wrote them at ``url``, found by the
    collection id each item keeps, and checked by its URI."""
    table, vectors = read_memory_embeddings(memory.manifest, memory.url, url)
    known = table.column("id").to_numpy()
    rows = np.minimum(np.searchsorted(known, sources), max(len(known) - 1, 0))
    found = (sources >= 0) & (known[rows] == sources)
    found &= np.asarray(table.column("uri").to_pylist(), dtype=object)[rows] == uris
    if not found.all():
        raise ValueError(f"{int((~found).sum())} items of memory {memory.url} (e.g. id {int(ids[~found][0])}, "
                         f"{uris[~found][0]}) are not in the embeddings at {url}; give the embeddings the memory "
                         "was built from, or drop --embeddings to rebuild from its stored vectors")
    return vectors[rows]


def rebuilt(memory: Snapshot, removed: np.ndarray, work: str, embeddings: str | None = None,
            ) -> tuple[Snapshot, np.ndarray]:
    """(a memory built from ``memory``'s live items but ``removed``, over its trained index; the
    id in ``memory`` of each of the rebuilt memory's ids). The items' vectors are their stored
    ones, or with ``embeddings`` the ones at that URL. Built from the memory before the edit, so
    an edit that removes too little or too much is seen."""
    ids, labels, vectors = memory_items(memory)
    kept = ~np.isin(ids, removed)
    ids, labels, vectors = ids[kept], labels[kept], vectors[kept]
    uris, sources = item_metadata(memory, ids)
    if embeddings is not None:
        vectors = embedded_vectors(memory, embeddings, ids, uris, sources)
    m = memory.manifest
    write_vectors(f"{work}/kept", vectors, labels, uris, ids=ids, encoder=m.encoder.get("name", "vectors"),
                  encoder_sha256=m.encoder.get("sha256"))
    build_memory(f"{work}/kept", f"{work}/rebuilt", shards=len(memory.shards), factory=m.factory,
                 encoder=m.encoder, nprobe=m.search.get("nprobe"), trained=memory.trained_index(), use_ray=False)
    return Snapshot.open(f"{work}/rebuilt", nprobe=memory.nprobe), ids


def compare(edited: Snapshot, reference: Snapshot, id_map: np.ndarray, queries: np.ndarray, k: int,
            removed: np.ndarray, tolerance: float) -> dict:
    """How ``edited`` and ``reference`` (its ids mapped through ``id_map``) answer ``queries``."""
    a, b = edited.search(queries, k), reference.search(queries, k)
    ids_b = np.where(b.ids >= 0, id_map[np.maximum(b.ids, 0)], -1)
    same_ids = (a.ids == ids_b).all(axis=1)
    same_labels = (a.labels == b.labels).all(axis=1)
    gap = np.abs(np.where(a.ids >= 0, a.similarities - b.similarities, 0.0)).max(axis=1, initial=0.0)
    differ = ~(same_ids & same_labels & (gap <= tolerance))
    answered_removed = int(np.isin(a.ids, removed).any(axis=1).sum())
    return {"exact": bool(not differ.any() and not answered_removed), "queries_differing": int(differ.sum()),
            "ids_differ": int((~same_ids).sum()), "labels_differ": int((~same_labels).sum()),
            "max_similarity_difference": float(gap.max(initial=0.0)), "queries_answered_with_removed": answered_removed}


def run(cfg: UnlearningConfig, emit: Callable[[dict], None] = print) -> dict:
    """Remove, rebuild, compare and score; ``emit`` gets one record per step. Returns the summary
    written to unlearning.json (``exact``: both the removal and its compaction answer as the rebuild)."""
    memory, queries = labelled_queries(open_in_process(cfg.memory, cfg.nprobe), cfg.queries, cfg.holdout, cfg.seed)
    removed, labels = forget_ids(memory, cfg.forget, cfg.seed)
    if len(removed) >= len(memory):
        raise ValueError(f"{cfg.forget} would remove all {len(memory)} items of the memory")
    edited, _ = edits.remove(memory, ids=removed, reason=f"unlearning evaluation: {cfg.forget} (in process)")
    compacted = maintenance.compact(edited)
    emit({"step": "remove", "forget": cfg.forget, "removed": int(len(removed)), "items_before": len(memory),
          "items_after": len(edited)})
    with tempfile.TemporaryDirectory(prefix="vismem-unlearning-") as scratch:
        reference, id_map = rebuilt(memory, removed, (cfg.work or scratch).rstrip("/"), cfg.embeddings)
        emit({"step": "rebuild", "items": len(reference), "factory": reference.manifest.factory})
        checks = {}
        for name, snapshot in (("removed", edited), ("compacted", compacted)):
            checks[name] = compare(snapshot, reference, id_map, queries.vectors, cfg.k, removed, cfg.tolerance)
            emit({"step": "check", "memory": name, **checks[name]})
    before = memory.search(queries.vectors, cfg.k).ids
    groups = query_groups(queries.labels, labels, np.isin(before, removed).any(axis=1))
    scores = {}
    for group, mask in groups.items():
        scores[group] = {"queries": int(mask.sum()),
                         "before": rounded(accuracy(memory, queries.vectors[mask], queries.labels[mask], cfg.k,
                                                    cfg.rule)),
                         "after": rounded(accuracy(edited, queries.vectors[mask], queries.labels[mask], cfg.k,
                                                   cfg.rule))}
        emit({"step": "accuracy", "group": group, **scores[group]})
    summary = {"evaluation": "unlearning", "memory": cfg.memory, "queries": queries.source,
               "query_count": int(len(queries.labels)), "config": asdict(cfg), "forget": cfg.forget,
               "forgotten_labels": labels, "removed": int(len(removed)), "items_before": len(memory),
               "items_after": len(edited),
               "factory": memory.manifest.factory,
               "rebuilt_from": cfg.embeddings or "stored vectors",
               "exact": all(c["exact"] for c in checks.values()), "checks": checks,
               "accuracy": scores, "removed_ids": removed.tolist()}
    summary["plots"] = {"accuracy": plot(summary, cfg.out)}
    summary["report"] = write_report(cfg.out, "unlearning", summary)
    return summary


def query_groups(labels: np.ndarray, forgotten: list[str], touched: np.ndarray) -> dict[str, np.ndarray]:
    """{group: mask of queries}: all, and the forgotten class's / the rest (or, for a random
    removal, the queries a removed item was a neighbour of / the rest)."""
    hit = np.isin(np.asarray(labels, dtype=object), forgotten) if forgotten else touched
    name = "forgotten_class" if forgotten else "affected"
    return {"all": np.ones(len(labels), dtype=bool), name: hit, "rest": ~hit}


def plot(summary: dict, out: str) -> str:
    """Accuracy before and after per query group, as paired bars."""
    groups = list(summary["accuracy"])
    fig, ax = new_figure(f"unlearning {summary['forget']}: {summary['removed']} of {summary['items_before']} items "
                         f"removed, exact = {summary['exact']}", "query group")
    x = np.arange(len(groups))
    for offset, when, colour in ((-0.2, "before", "tab:blue"), (0.2, "after", "tab:orange")):
        values = [100 * (summary["accuracy"][g][when] or 0.0) for g in groups]
        ax.bar(x + offset, values, width=0.4, label=when, color=colour)
    ax.set_xticks(x, [f"{g} ({summary['accuracy'][g]['queries']})" for g in groups])
    ax.legend(fontsize=8)
    return save_figure(fig, out, "unlearning")
