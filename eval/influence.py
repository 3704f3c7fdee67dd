"""Identifiable memory items (paper A's privacy measure): an item is *identifiable* when removing
it from the memory flips some test query's decision, so that the query's answer gives away that
the item is in the memory.

Exact, and from one search: removing an item that is not among a query's k nearest neighbours
leaves that query's k neighbours, and so its decision, as they were; removing one that is, in
place j, leaves the other k − 1 in order with the (k + 1)-th appended, which is what a search of
the edited memory returns. So each query is searched once at k + 1 (``Snapshot.search``), and for
each of its k neighbours ``index.voting.vote`` decides without it, with the sample weights, exactly
as ``VisualMemory.classify`` votes. A sweep over k comes from the same search at the largest
k + 1. Queries are labelled embeddings or a held-out split of the memory (``eval.memory_eval``);
labels are not needed for the flips, only for the accuracy reported beside them. Writes
``OUT/influence.json`` (every identifiable id with its URI, how many queries it flips and the
first five of them) and ``influence.png``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from eval.memory_eval import (MemoryEval, labelled_queries, new_figure, open_in_process, rounded, save_figure,
                              write_report)
from index.voting import RULES, vote

log = logging.getLogger("vismem.eval.influence")


@dataclass
class InfluenceConfig(MemoryEval):
    k: int = 20
    rule: str = "softmax"
    temperature: float = 0.07
    alpha: float = 2.0
    ks: tuple[int, ...] = (1, 5, 10, 20, 50)        # the sweep of the plot (the headline is at k)


def decide(found, columns: np.ndarray | slice, cfg: InfluenceConfig) -> np.ndarray:
    """The decisions of ``vote`` on the neighbours in ``columns`` (a slice, or [n, k] column indices)."""
    if isinstance(columns, slice):
        pick = (lambda a: a[:, columns])
    else:
        rows = np.arange(len(columns))[:, None]
        pick = (lambda a: a[rows, columns])
    v = vote(pick(found.labels), pick(found.similarities), cfg.rule, sample_weights=pick(found.sample_weights),
             ids=pick(found.ids), temperature=cfg.temperature, alpha=cfg.alpha)
    return np.asarray(v.decisions, dtype=object)


def flips(found, k: int, cfg: InfluenceConfig) -> tuple[np.ndarray, np.ndarray]:
    """(decisions at k [n], flipped [n, k]: removing neighbour j of query i changes its decision).
    Without neighbour j the vote is on the other k - 1 and the (k+1)-th, where the search has one."""
    n, available = found.ids.shape
    k = min(k, available)
    base = decide(found, slice(0, k), cfg)
    width = min(k + 1, available)
    flipped = np.zeros((n, k), dtype=bool)
    for j in range(k):
        keep = np.array([c for c in range(width) if c != j])
        flipped[:, j] = decide(found, np.broadcast_to(keep, (n, len(keep))), cfg) != base
    return base, flipped & (found.ids[:, :k] >= 0)


def identifiable(found, k: int, cfg: InfluenceConfig) -> dict:
    """Per identifiable id: (its URI, the queries whose decision its removal flips)."""
    _, flipped = flips(found, k, cfg)
    rows, cols = np.nonzero(flipped)
    out: dict = {}
    for row, col in zip(rows, cols):
        item = int(found.ids[row, col])
        out.setdefault(item, [found.uris[row, col], []])[1].append(int(row))
    return out


def run(cfg: InfluenceConfig, emit: Callable[[dict], None] = print) -> dict:
    """The headline at ``cfg.k`` and the sweep over ``cfg.ks``; ``emit`` gets one record per k."""
    if cfg.rule not in RULES:
        raise ValueError(f"unknown voting rule {cfg.rule!r}; choose from: {', '.join(RULES)}")
    if cfg.k < 1 or min(cfg.ks, default=1) < 1 or cfg.temperature <= 0 or cfg.alpha <= 0:
        raise ValueError("k and every k of the sweep must be positive, and so must T and α")
    memory, queries = labelled_queries(open_in_process(cfg.memory, cfg.nprobe), cfg.queries, cfg.holdout, cfg.seed)
    ks = sorted({k for k in (*cfg.ks, cfg.k) if k < len(memory)} | {min(cfg.k, len(memory))})
    found = memory.search(queries.vectors, min(max(ks) + 1, len(memory)))
    truth = np.asarray(queries.labels, dtype=object)
    sweep, headline = [], None
    for k in tqdm(ks, desc="influence", unit="k", disable=not cfg.progress):
        items = identifiable(found, k, cfg)
        point = {"k": k, "identifiable": len(items), "identifiable_fraction": rounded(len(items) / len(memory), 6),
                 "accuracy": rounded(float(np.mean(decide(found, slice(0, k), cfg) == truth))),
                 "queries_flippable": len({q for _, qs in items.values() for q in qs})}
        emit(point)
        sweep.append(point)
        if k == min(cfg.k, len(memory)):
            headline = (point, items)
    point, items = headline
    listed = [{"id": item, "uri": uri, "flips": len(qs), "queries": qs[:5]}
              for item, (uri, qs) in sorted(items.items(), key=lambda kv: (-len(kv[1][1]), kv[0]))]
    summary = {"evaluation": "influence", "memory": cfg.memory, "queries": queries.source,
               "memory_items": len(memory), "query_count": int(len(truth)), "k": point["k"], "rule": cfg.rule,
               "identifiable": point["identifiable"], "identifiable_fraction": point["identifiable_fraction"],
               "accuracy": point["accuracy"], "queries_flippable": point["queries_flippable"], "sweep": sweep,
               "identifiable_items": listed, "config": asdict(cfg)}
    summary["plots"] = {"sweep": plot(summary, cfg.out)}
    summary["report"] = write_report(cfg.out, "influence", summary)
    return summary


def plot(summary: dict, out: str) -> str:
    fig, ax = new_figure(f"identifiable memory items ({summary['memory_items']} items, {summary['query_count']} "
                         f"queries, {summary['rule']})", "k (neighbours voting)", "identifiable items (%)",
                         log_x=True)
    curve = summary["sweep"]
    ax.plot([p["k"] for p in curve], [100 * p["identifiable_fraction"] for p in curve], "o-", markersize=4)
    return save_figure(fig, out, "influence")
