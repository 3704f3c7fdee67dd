"""Counterfactual explanations of a kNN decision: the fewest memory items whose removal changes it.

Removing a set S of memory items makes the query's new k neighbours the first k of its ranking
without S. So a new neighbour set T (k items of the ranking, in rank order) costs exactly the
items ranked above T's last member that are not in T: |S| = m − k when T's deepest member is
at rank m. The cheapest flip is therefore the smallest depth m at which some k of the first m
neighbours vote for another label, and the items that enter the top k (ranks > k) are the
neighbours that would have to come in.

For a candidate label c against the decision d, a dynamic programme over the ranking keeps, for
each number j of items taken and for which of c and d was taken first, the largest
score(c) − score(d): taking item i at position j adds ±its weight at j (``index.voting``'s
weights: the rule's weight of its similarity, or 1/(j + α) for the rank rule, times its sample
weight), and skipping it removes it. ``vote`` breaks a tie in favour of the label seen first, so
c wins a tie exactly when c was taken before d; the state carries that. The first depth at which
some c ≠ d wins is the answer, and ``vote`` itself confirms the new decision on the new
neighbours. This is exact for every rule, with respect to the ranking the memory's search
returns (which is what a search of the edited memory returns, for every index whose ranking of
the first k does not depend on k: Flat, IVF with SQ or PQ; a two-tier memory re-ranks more
candidates for a deeper search).

When the ranking runs out (the memory holds fewer than k + removals items), a flip may also
leave fewer than k neighbours; that costs every item not kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from index.voting import neighbour_weights, vote

MAX_REMOVALS = 20          # the default removal budget: the search goes k + this deep


@dataclass
class Counterfactual:
    """How one query's decision flips, as columns of its deep neighbour row (rank order)."""
    decision: object               # the decision on the first k
    flipped_to: object | None      # the decision once ``removed`` are gone (None: no flip within the budget)
    removed: list[int]             # columns to remove: the fewest memory items that flip the decision
    entrants: list[int]            # columns that enter the top k in their place
    scores: dict                   # the new vote's label → weight
    searched: int                  # how deep the ranking was (k + the removal budget)

    @property
    def found(self) -> bool:
        return self.flipped_to is not None


def explain(labels, similarities, ids, k: int, rule: str = "plurality", sample_weights=None,
            temperature: float = 0.07, alpha: float = 2.0) -> list[Counterfactual]:
    """One ``Counterfactual`` per query from its ranking ``[nq, depth]`` (depth > k: the deeper,
    the larger the removal sets that can be found). Ids −1 mark the end of a memory smaller
    than the depth."""
    labels = np.asarray(labels, dtype=object)
    sims = np.asarray(similarities, dtype=np.float64)
    ids = np.asarray(ids)
    if labels.shape != sims.shape or labels.shape != ids.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape}, similarities {sims.shape} and ids {ids.shape} must be [queries, depth]")
    if not 1 <= k <= labels.shape[1]:
        raise ValueError(f"k = {k} must be between 1 and the ranking's depth {labels.shape[1]}")
    samples = np.ones(sims.shape) if sample_weights is None else np.asarray(sample_weights, dtype=np.float64)
    item_weights = (samples if rule == "rank" else neighbour_weights(sims, rule, temperature, alpha) * samples)
    position_weights = (1.0 / (np.arange(k) + alpha)) if rule == "rank" else np.ones(k)
    base = vote(labels[:, :k], sims[:, :k], rule, samples[:, :k], ids[:, :k], temperature, alpha)
    out = []
    for row in range(len(labels)):
        keep = cheapest_flip(labels[row], item_weights[row], ids[row] >= 0, base.decisions[row], k, position_weights)
        if keep is None:
            out.append(Counterfactual(base.decisions[row], None, [], [], {}, labels.shape[1]))
            continue
        new = vote(labels[row, keep][None], sims[row, keep][None], rule, samples[row, keep][None],
                   ids[row, keep][None], temperature, alpha)
        deepest = int(keep[-1]) + 1 if len(keep) == k else int((ids[row] >= 0).sum())
        kept = set(keep.tolist())
        removed = [c for c in range(deepest) if c not in kept]
        out.append(Counterfactual(base.decisions[row], new.decisions[0], removed, [int(c) for c in keep if c >= k],
                                  new.scores[0], labels.shape[1]))
    return out


def cheapest_flip(labels: np.ndarray, weights: np.ndarray, valid: np.ndarray, decision, k: int,
                  position_weights: np.ndarray) -> np.ndarray | None:
    """The columns of the new top k (rank order) reached by the fewest removals, or None."""
    if decision is None:
        return None                      # nothing voted: there is no decision to flip
    rivals = list(dict.fromkeys(lab for lab, ok in zip(labels, valid) if ok and lab is not None and lab != decision))
    best, best_cost = None, None
    for rival in rivals:
        found = deepest_first(labels, weights, valid, decision, rival, k, position_weights, best_cost)
        if found is not None and (best_cost is None or found[0] < best_cost):
            best_cost, best = found
    return best


# the state of a partial neighbour set: which of the rival (c) and the decision (d) it took first
NEITHER, RIVAL_FIRST, DECISION_FIRST = 0, 1, 2


def deepest_first(labels, weights, valid, decision, rival, k: int, position_weights: np.ndarray,
                  budget: int | None) -> tuple[int, np.ndarray] | None:
    """(removals, the kept columns) of the cheapest neighbour set on which ``rival`` beats
    ``decision`` (or ties and was seen first), costing less than ``budget``; None if none."""
    n = int(valid.sum())                 # ids −1 come last: the ranking's real members
    sign = np.array([1.0 if lab == rival else -1.0 if lab == decision else 0.0 for lab in labels[:n]])
    tol = 1e-12 * max(float(np.abs(weights[:n]).sum()), 1e-300)
    margin = np.full((k + 1, 3), -np.inf)     # [taken, state] → the best score(rival) − score(decision)
    margin[0, NEITHER] = 0.0
    took, came_from = [], []
    for i in range(n):
        cost_if_last = i + 1 - k
        if budget is not None and cost_if_last >= budget:
            return None
        gain = sign[i] * weights[i] * position_weights          # [k]: taking item i at position j
        after = margin.copy()
        taken = np.zeros((k + 1, 3), dtype=bool)
        source = np.tile(np.arange(3), (k + 1, 1))
        for state in (NEITHER, RIVAL_FIRST, DECISION_FIRST):
            to = state if state != NEITHER or sign[i] == 0 else (RIVAL_FIRST if sign[i] > 0 else DECISION_FIRST)
            candidate = margin[:k, state] + gain
            better = candidate > after[1:, to]
            after[1:, to][better] = candidate[better]
            taken[1:, to] |= better
            source[1:, to][better] = state
        margin = after
        took.append(taken)
        came_from.append(source)
        if i + 1 >= k:
            state = winning_state(margin[k], tol)
            if state is not None:
                return cost_if_last, backtrack(took, came_from, k, state)
    if n == len(labels):                 # the ranking did not run out: a deeper search might still flip it
        return None
    for size in range(k - 1, 0, -1):     # the memory ran out: keep fewer than k, removing the rest
        state = winning_state(margin[size], tol)
        if state is not None and (budget is None or n - size < budget):
            return n - size, backtrack(took, came_from, size, state)
    return None


def winning_state(margins: np.ndarray, tol: float) -> int | None:
    """The state in which the rival's margin wins, if any: ahead, or level and seen first."""
    if margins[RIVAL_FIRST] >= -tol:
        return RIVAL_FIRST
    for state in (NEITHER, DECISION_FIRST):
        if margins[state] > tol:
            return state
    return None


def backtrack(took: list, came_from: list, taken: int, state: int) -> np.ndarray:
    """The kept columns, in rank order, of the set that ended in (``taken``, ``state``)."""
    kept = []
    for i in range(len(took) - 1, -1, -1):
        if taken == 0:
            break
        if took[i][taken, state]:
            kept.append(i)
            state = came_from[i][taken, state]
            taken -= 1
    return np.array(kept[::-1], dtype=np.int64)
