"""Voting rules that turn k neighbours into a decision (Geirhos et al. 2024).

    plurality  w = 1
    distance   w = exp(-d), d = ‖a − b‖ = √(2 − 2·sim) for unit vectors
    softmax    w = exp(sim / T), T = 0.07
    rank       w = 1 / (rank + α), α = 2, rank 0 for the nearest

Optional per-sample weights multiply w (soft pruning). Ties go to the class seen first, i.e. the
tied class whose nearest neighbour is nearest. Neighbours with id −1 (fewer than k found) or no
label do not vote.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("plurality", "distance", "softmax", "rank")


@dataclass
class Vote:
    decisions: list            # one label per query (None if no neighbour voted)
    weights: np.ndarray        # [nq, k] each neighbour's vote weight
    scores: list[dict]         # per query: label → summed weight, in first-seen order


def neighbour_weights(similarities: np.ndarray, rule: str, temperature: float = 0.07, alpha: float = 2.0) -> np.ndarray:
    sims = np.asarray(similarities, dtype=np.float64)
    if rule == "plurality":
        return np.ones_like(sims)
    if rule == "distance":
        return np.exp(-np.sqrt(np.clip(2.0 - 2.0 * sims, 0.0, None)))
    if rule == "softmax":
        return np.exp((sims - 1.0) / temperature)   # shifted by the constant exp(-1/T): same argmax, no overflow
    if rule == "rank":
        return np.broadcast_to(1.0 / (np.arange(sims.shape[1]) + alpha), sims.shape).copy()
    raise ValueError(f"unknown voting rule {rule!r}; choose one of: {', '.join(RULES)}")


def vote(labels, similarities, rule: str = "plurality", sample_weights=None, ids=None,
         temperature: float = 0.07, alpha: float = 2.0) -> Vote:
    """Decide each query's label from its neighbours' ``labels`` ``[nq, k]`` and ``similarities``."""
    labels = np.asarray(labels, dtype=object)
    sims = np.asarray(similarities, dtype=np.float64)
    if labels.shape != sims.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and similarities {sims.shape} must both be [queries, k]")
    weights = neighbour_weights(sims, rule, temperature, alpha)
    if sample_weights is not None:
        weights = weights * np.asarray(sample_weights, dtype=np.float64)
    valid = np.array([[lab is not None for lab in row] for row in labels], dtype=bool).reshape(labels.shape)
    if ids is not None:
        valid &= np.asarray(ids) >= 0
    weights = np.where(valid, weights, 0.0)

    decisions, scores = [], []
    for row_labels, row_weights, row_valid in zip(labels, weights, valid):
        score: dict = {}
        for label, w, ok in zip(row_labels, row_weights, row_valid):
            if ok:
                score[label] = score.get(label, 0.0) + float(w)
        best = max(score.values(), default=None)
        # dicts keep insertion order, so the first label reaching the best score was seen first
        decisions.append(next((lab for lab, s in score.items() if np.isclose(s, best, rtol=1e-12, atol=0)), None))
        scores.append(score)
    return Vote(decisions, weights, scores)
