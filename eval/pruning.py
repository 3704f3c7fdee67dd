"""Pruning sweeps on a memory (Geirhos et al. 2024): accuracy against the pruning parameter, for
hard pruning (items that are wrong-label neighbours ``threshold`` times or more are removed) and
soft pruning (every such item votes with weight 1.75 / (1 + count)).

Each point is ``index.edit.prune.prune`` itself, what ``vismem memory prune`` runs, on the memory
held in process (``eval.memory_eval.InProcess``): the source memory is never changed. Hard pruning
is swept over ``threshold`` at one pruning k; soft pruning, which has no threshold, over the pruning
k (how many neighbours of each pruning query are counted), where k = 0 counts nothing: the memory
unpruned. Pruning queries are the memory itself, leave-one-out (prune's default), or
``prune_queries``, never the evaluation queries. Writes ``OUT/pruning.json`` and
``pruning_hard.png``, ``pruning_soft.png``.

The pruning queries' neighbours are searched once, at the sweep's largest k (``SharedNeighbours``):
``prune`` would search them again for every point (minutes a point at 50k items). Every point's
wrong-label counts are the first k columns of that search (``prune``'s leave-one-out drops the
query's own id from k + 1 neighbours, and the first k kept of k_max + 1 are the same k), and its
edit is the one ``prune`` commits: ``remove_live`` for hard pruning, ``reweighted`` for soft.
Each point is scored on its memory compacted in process (``compacted``): the same answers, faster.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from eval.memory_eval import (MemoryEval, accuracy, labelled_queries, new_figure, open_in_process, rounded,
                              save_figure, write_report)
from eval.sweeps import PRUNE_KS, THRESHOLDS
from index.edit import maintenance
from index.edit import prune as pruning
from index.edit.edits import remove_live
from index.ingest.embeddings import read_memory_embeddings
from index.snapshot import Snapshot

log = logging.getLogger("vismem.eval.pruning")


@dataclass
class PruningConfig(MemoryEval):
    k: int = 10                          # neighbours of each evaluation query's vote
    rule: str = "softmax"
    modes: tuple[str, ...] = pruning.MODES
    thresholds: tuple[int, ...] = THRESHOLDS
    prune_k: int = 10                    # neighbours counted by hard pruning
    prune_ks: tuple[int, ...] = PRUNE_KS  # the soft sweep; 0: unpruned
    prune_queries: str | None = None     # labelled embeddings URL; None: leave-one-out over the memory


def check(cfg: PruningConfig) -> None:
    for mode in cfg.modes:
        if mode not in pruning.MODES:
            raise ValueError(f"unknown pruning mode {mode!r}; choose from: {', '.join(pruning.MODES)}")
    if min(cfg.thresholds, default=1) < 1 or min(cfg.prune_ks, default=0) < 0 or cfg.prune_k < 1 or cfg.k < 1:
        raise ValueError("thresholds and the pruning k must be positive whole numbers (soft sweep ks: 0 or more)")


def run(cfg: PruningConfig, emit: Callable[[dict], None] = print) -> dict:
    """Both sweeps; ``emit`` gets one record per point. Returns the summary written to pruning.json."""
    check(cfg)
    memory, queries = labelled_queries(open_in_process(cfg.memory, cfg.nprobe), cfg.queries, cfg.holdout, cfg.seed)
    prune_x = prune_y = None
    if cfg.prune_queries is not None:
        table, prune_x = read_memory_embeddings(memory.manifest, memory.url, cfg.prune_queries)
        prune_y = table.column("label").to_pylist()

    def score(snapshot) -> float:
        return rounded(accuracy(compacted(snapshot), queries.vectors, queries.labels, cfg.k, cfg.rule))

    unpruned = score(memory)
    emit({"mode": "none", "accuracy": unpruned, "items": len(memory)})
    points = [("hard", t) for t in cfg.thresholds if "hard" in cfg.modes]
    points += [("soft", k) for k in cfg.prune_ks if "soft" in cfg.modes]
    ks = [cfg.prune_k] * ("hard" in cfg.modes and bool(cfg.thresholds)) + [k for m, k in points if m == "soft"]
    shared = SharedNeighbours(memory, prune_x, prune_y, max(ks, default=0), cfg.progress)
    curves: dict = {mode: [] for mode in cfg.modes}
    for mode, value in tqdm(points, desc="prune", unit="point", disable=not cfg.progress):
        if mode == "soft" and value == 0:
            point = {"prune_k": 0, "accuracy": unpruned, "changed": 0}
        else:
            threshold, k = (value, cfg.prune_k) if mode == "hard" else (pruning.THRESHOLD, value)
            pruned, info = shared.prune(threshold=threshold, mode=mode, k=k)
            point = {"threshold": threshold} if mode == "hard" else {"prune_k": k}
            point.update(accuracy=score(pruned), changed=info.get("pruned", info.get("reweighted", 0)),
                         flagged=info["flagged"], max_count=info["max_count"])
        curves[mode].append(point)
        emit({"mode": mode, **point})
    summary = {"evaluation": "pruning", "memory": cfg.memory, "queries": queries.source, "memory_items": len(memory),
               "query_count": int(len(queries.labels)), "pruning_queries": cfg.prune_queries or "leave-one-out",
               "config": asdict(cfg), "unpruned": unpruned, "best": best_points(curves, unpruned),
               "hard": curves.get("hard", []), "soft": curves.get("soft", [])}
    summary["plots"] = plot(summary, cfg.out)
    summary["report"] = write_report(cfg.out, "pruning", summary)
    return summary


class SharedNeighbours:
    """The pruning queries' neighbours, searched once at ``k_max``; ``prune`` derives any point of
    the sweep (k <= ``k_max``) from them and edits as ``index.edit.prune.prune`` does."""

    def __init__(self, memory: Snapshot, queries, query_labels, k_max: int, progress: bool = True):
        self.memory, self.k_max, self.nq = memory, k_max, len(memory) if queries is None else len(queries)
        ids, wrong = [], []
        if k_max > 0:
            batches = pruning.query_batches(memory, queries, query_labels, k_max)
            sizes = [self.nq] if queries is not None else [len(shard) for shard in memory.shards]
            total = sum(-(-size // pruning.BATCH) for size in sizes)
            for found, labels, own in tqdm(batches, desc="pruning search", unit="batch", total=total,
                                           disable=not progress):
                ids.append(found)
                wrong.append((found >= 0) & (labels != own[:, None]))
        self.ids = np.concatenate(ids) if ids else np.zeros((0, k_max), np.int64)
        self.wrong = np.concatenate(wrong) if wrong else np.zeros((0, k_max), bool)

    def counts(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, counts) of the items that are wrong-label neighbours among the first ``k``."""
        if not 1 <= k <= self.k_max:
            raise ValueError(f"k = {k} is outside the shared search (1 to {self.k_max})")
        found, counts = np.unique(self.ids[:, :k][self.wrong[:, :k]], return_counts=True)
        return found.astype(np.int64), counts

    def prune(self, threshold: int, mode: str, k: int) -> tuple[Snapshot, dict]:
        """What ``pruning.prune(memory, ..., threshold, mode, k)`` returns, from the shared search."""
        ids, counts = self.counts(k)
        info = {"mode": mode, "threshold": threshold, "k": k, "queries": self.nq, "flagged": int(len(ids)),
                "max_count": int(counts.max(initial=0))}
        if mode == "hard":
            removed = ids[counts >= threshold]
            info["pruned"] = int(len(removed))
            record = {"mode": mode, "pruned": len(removed), "threshold": threshold, "k": k, "queries": self.nq}
            return (remove_live(self.memory, removed, "prune", record) if len(removed) else self.memory), info
        shards = pruning.reweighted(self.memory, ids, 1.75 / (1.0 + counts))
        info["reweighted"] = int(len(ids))
        record = {"mode": mode, "reweighted": len(ids), "k": k, "queries": self.nq}
        return (self.memory.commit(shards, operation="prune", counts=record) if shards is not None
                else self.memory), info


def compacted(snapshot: Snapshot) -> Snapshot:
    """``snapshot`` compacted in process where a shard holds removed ids (``index.edit.maintenance
    .compact``, what ``vismem memory compact`` runs; nothing is written): the same answers, but a
    Flat shard with thousands removed is otherwise searched through FAISS's ID selector, a scalar
    loop tens of times slower than its batched search (``Shard.overfetch``)."""
    if any(maintenance.needs_compaction(shard) for shard in snapshot.shards):
        return maintenance.compact(snapshot, reason="evaluation (in process)")
    return snapshot


def best_points(curves: dict, unpruned: float) -> dict:
    """Per mode, the best point and its change from the unpruned accuracy (percentage points)."""
    out = {}
    for mode, curve in curves.items():
        if curve:
            best = max(curve, key=lambda p: p["accuracy"])
            out[mode] = {**best, "change_points": round(100 * (best["accuracy"] - unpruned), 2)}
    return out


def plot(summary: dict, out: str) -> dict:
    urls = {}
    where = f"{summary['memory_items']} items, {summary['query_count']} queries, k = {summary['config']['k']}, " \
            f"{summary['config']['rule']}"
    for mode, key, label in (("hard", "threshold", "hard-pruning threshold (wrong-label appearances)"),
                             ("soft", "prune_k", "soft-pruning k (neighbours counted; 0: unpruned)")):
        curve = summary[mode]
        if not curve:
            continue
        fig, ax = new_figure(f"{mode} pruning ({where})", label)
        ax.plot([p[key] for p in curve], [100 * p["accuracy"] for p in curve], "o-", markersize=4, label=mode)
        ax.axhline(100 * summary["unpruned"], color="grey", linestyle="--", label="unpruned")
        if mode == "hard":
            twin = ax.twinx()
            twin.plot([p[key] for p in curve], [p["changed"] for p in curve], "s:", color="tab:red", markersize=3)
            twin.set_ylabel("items removed", color="tab:red")
        ax.legend(fontsize=8)
        urls[mode] = save_figure(fig, out, f"pruning_{mode}")
    return urls
