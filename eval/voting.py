"""Voting-rule sweeps on a memory (Geirhos et al. 2024, "Towards flexible perception with visual
memory"): accuracy against k for every rule of ``index.voting``, against the softmax temperature T,
and against the rank rule's α.

One search of the memory (``Snapshot.search``, what ``VisualMemory.classify`` searches with) at the
largest k; every point of every sweep is ``index.voting.vote`` on the first k neighbours of it,
with their soft-pruning weights, exactly as ``classify`` votes. The queries are labelled embeddings
or a held-out split of the memory (``eval.memory_eval``). Writes ``OUT/voting.json`` and a plot
per sweep: ``voting_k.png``, ``voting_temperature.png``, ``voting_alpha.png``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from eval.memory_eval import (MemoryEval, labelled_queries, new_figure, open_in_process, rounded, save_figure,
                              write_report)
from eval.sweeps import ALPHAS, KS, TEMPERATURES
from index.voting import RULES, vote

log = logging.getLogger("vismem.eval.voting")


@dataclass
class VotingConfig(MemoryEval):
    ks: tuple[int, ...] = KS
    temperatures: tuple[float, ...] = TEMPERATURES
    alphas: tuple[float, ...] = ALPHAS
    k: int = 10                          # the k of the temperature and α sweeps
    temperature: float = 0.07            # T of the k sweep's softmax rule
    alpha: float = 2.0                   # α of the k sweep's rank rule
    rules: tuple[str, ...] = RULES


def check(cfg: VotingConfig) -> None:
    for rule in cfg.rules:
        if rule not in RULES:
            raise ValueError(f"unknown voting rule {rule!r}; choose from: {', '.join(RULES)}")
    if not cfg.ks or min(cfg.ks) < 1 or cfg.k < 1:
        raise ValueError("every k must be a positive whole number")
    if min(cfg.temperatures, default=1) <= 0 or cfg.temperature <= 0:
        raise ValueError("softmax temperatures must be positive")
    if min(cfg.alphas, default=1) <= 0 or cfg.alpha <= 0:
        raise ValueError("rank α must be positive (the nearest neighbour's weight is 1/α)")


def run(cfg: VotingConfig, emit: Callable[[dict], None] = print) -> dict:
    """Every sweep; ``emit`` gets one record per point. Returns the summary written to voting.json."""
    check(cfg)
    memory, queries = labelled_queries(open_in_process(cfg.memory, cfg.nprobe), cfg.queries, cfg.holdout, cfg.seed)
    largest = min(max(max(cfg.ks), cfg.k), len(memory))
    found = memory.search(queries.vectors, largest)
    truth = np.asarray(queries.labels, dtype=object)

    def score(rule: str, k: int, temperature: float = cfg.temperature, alpha: float = cfg.alpha) -> float:
        v = vote(found.labels[:, :k], found.similarities[:, :k], rule, sample_weights=found.sample_weights[:, :k],
                 ids=found.ids[:, :k], temperature=temperature, alpha=alpha)
        return float(np.mean(np.asarray(v.decisions, dtype=object) == truth))

    ks = sorted({k for k in cfg.ks if k <= len(memory)})
    points = [("k", rule, k) for rule in cfg.rules for k in ks] + [("temperature", "softmax", t)
                                                                   for t in cfg.temperatures]
    points += [("alpha", "rank", a) for a in cfg.alphas]
    sweeps: dict = {"k": {rule: [] for rule in cfg.rules}, "temperature": [], "alpha": []}
    k_small = min(cfg.k, len(memory))
    for sweep, rule, value in tqdm(points, desc="vote", unit="point", disable=not cfg.progress):
        if sweep == "k":
            record = {"sweep": "k", "rule": rule, "k": value, "accuracy": rounded(score(rule, value))}
            sweeps["k"][rule].append({"k": value, "accuracy": record["accuracy"]})
        elif sweep == "temperature":
            record = {"sweep": "temperature", "rule": rule, "k": k_small, "temperature": value,
                      "accuracy": rounded(score(rule, k_small, temperature=value))}
            sweeps["temperature"].append({"temperature": value, "accuracy": record["accuracy"]})
        else:
            record = {"sweep": "alpha", "rule": rule, "k": k_small, "alpha": value,
                      "accuracy": rounded(score(rule, k_small, alpha=value))}
            sweeps["alpha"].append({"alpha": value, "accuracy": record["accuracy"]})
        emit(record)
    summary = summarise(cfg, sweeps, len(memory), queries)
    summary["plots"] = plot(summary, cfg.out)
    summary["report"] = write_report(cfg.out, "voting", summary)
    return summary


def summarise(cfg: VotingConfig, sweeps: dict, memory_size: int, queries) -> dict:
    by_rule = {}
    for rule, curve in sweeps["k"].items():
        best = max(curve, key=lambda p: (p["accuracy"], -p["k"]))
        by_rule[rule] = {"best_k": best["k"], "accuracy": best["accuracy"]}
    best_rule = max(by_rule, key=lambda r: (by_rule[r]["accuracy"], -by_rule[r]["best_k"])) if by_rule else None
    best = {"rule": best_rule, **by_rule[best_rule]} if best_rule else None
    return {"evaluation": "voting", "memory": cfg.memory, "queries": queries.source, "memory_items": memory_size,
            "query_count": int(len(queries.labels)), "config": asdict(cfg), "best": best, "by_rule": by_rule,
            "k_sweep": sweeps["k"], "temperature_sweep": sweeps["temperature"], "alpha_sweep": sweeps["alpha"]}


def plot(summary: dict, out: str) -> dict:
    """One PNG per sweep; returns {sweep: URL}."""
    cfg, urls = summary["config"], {}
    where = f"{summary['memory_items']} items, {summary['query_count']} queries"
    if any(summary["k_sweep"].values()):
        fig, ax = new_figure(f"accuracy against k ({where})", "k (neighbours voting)", log_x=True)
        for rule, curve in summary["k_sweep"].items():
            ax.plot([p["k"] for p in curve], [100 * p["accuracy"] for p in curve], "o-", label=rule, markersize=4)
        ax.legend(fontsize=8)
        urls["k"] = save_figure(fig, out, "voting_k")
    for sweep, key, label in (("temperature_sweep", "temperature", "softmax temperature T"),
                              ("alpha_sweep", "alpha", "rank offset α (w = 1 / (rank + α))")):
        curve = summary[sweep]
        if not curve:
            continue
        fig, ax = new_figure(f"{'softmax' if key == 'temperature' else 'rank'} rule at k = {cfg['k']} ({where})",
                             label, log_x=True)
        ax.plot([p[key] for p in curve], [100 * p["accuracy"] for p in curve], "o-", markersize=4)
        urls[key] = save_figure(fig, out, f"voting_{key}")
    return urls
