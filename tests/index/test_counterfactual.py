"""Counterfactual explanations against brute force: every subset of a small ranking removed in turn,
and on a real memory, the removal applied and the memory asked again."""

import itertools

import numpy as np
import pytest

from index.build.build import build_memory
from index.counterfactual import explain
from index.memory import VisualMemory
from index.voting import RULES, vote
from tests.index.test_memory import unit, write_embeddings


def brute_force(labels, sims, ids, weights, k, rule):
    """The fewest columns whose removal changes the vote on the first k (None: no flip), trying
    every subset; a subset that leaves fewer than k only counts where the ranking ran out."""
    valid = [c for c in range(len(ids)) if ids[c] >= 0]
    exhausted = len(valid) < len(ids)
    decision = vote([labels[:k]], [sims[:k]], rule, [weights[:k]], [ids[:k]]).decisions[0]
    if decision is None:
        return None
    for size in range(1, len(valid) + 1):
        for removed in itertools.combinations(valid, size):
            kept = [c for c in valid if c not in removed][:k]
            if len(kept) < k and not exhausted:
                continue
            if not kept:
                continue
            new = vote([labels[kept]], [sims[kept]], rule, [weights[kept]], [ids[kept]]).decisions[0]
            if new is not None and new != decision:
                return size
    return None


def random_ranking(rng, depth, ran_out):
    sims = np.sort(rng.uniform(-0.2, 1.0, depth))[::-1]
    labels = rng.choice(np.array(["a", "b", "c", None], dtype=object), depth, p=[0.45, 0.3, 0.2, 0.05])
    ids = np.arange(depth)
    if ran_out:
        ids[rng.integers(depth // 2, depth):] = -1
    if rng.random() < 0.5:                    # plurality and rank ties stay common without sample weights
        weights = np.ones(depth)
    else:
        weights = rng.choice([0.25, 0.5, 1.0, 1.0], depth)
    return labels, sims, ids, weights


@pytest.mark.parametrize("rule", RULES)
def test_the_fewest_removals_equal_brute_force(rule):
    rng = np.random.default_rng(RULES.index(rule))
    checked = flips = 0
    for case in range(60):
        depth = int(rng.integers(3, 10))
        k = int(rng.integers(1, min(depth, 5) + 1))
        labels, sims, ids, weights = random_ranking(rng, depth, ran_out=case % 3 == 0)
        expected = brute_force(labels, sims, ids, weights, k, rule)
        got = explain([labels], [sims], [ids], k, rule, sample_weights=[weights])[0]
        assert (len(got.removed) if got.found else None) == expected, (case, labels, ids, weights, k, got)
        if got.found:
            flips += 1
            valid = [c for c in range(depth) if ids[c] >= 0 and c not in got.removed]
            kept = valid[:k]
            assert set(got.entrants) == {c for c in kept if c >= k}
            new = vote([labels[kept]], [sims[kept]], rule, [weights[kept]], [ids[kept]])
            assert new.decisions[0] == got.flipped_to != got.decision
        checked += 1
    assert checked == 60 and flips > 20           # the cases exercise flips, not only "none found"


def test_rank_ties_need_the_rival_first():
    # rank rule, α = 2: positions weigh 1/2, 1/3, 1/4, 1/5, 1/6. b at 1 and 4 (1/3 + 1/6) ties a at 0 (1/2),
    # and a was seen first: a keeps the decision, so the tie is no flip
    labels = np.array(["a", "b", "x", "y", "b", "b"], dtype=object)
    sims = np.linspace(0.9, 0.4, 6)
    got = explain([labels], [sims], [np.arange(6)], 5, "rank")[0]
    assert got.decision == "a"
    assert brute_force(labels, sims, np.arange(6), np.ones(6), 5, "rank") == len(got.removed)


def test_no_flip_within_the_budget_says_so():
    labels = np.array(["a"] * 8, dtype=object)
    got = explain([labels], [np.linspace(0.9, 0.2, 8)], [np.arange(8)], 3, "softmax")[0]
    assert not got.found and got.removed == [] and got.searched == 8 and got.decision == "a"


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="must be"):
        explain([["a", "b"]], [[0.9]], [[0, 1]], 1)
    with pytest.raises(ValueError, match="k = 3"):
        explain([["a", "b"]], [[0.9, 0.8]], [[0, 1]], 3)


def test_removing_the_set_from_a_memory_flips_its_answer(tmp_path):
    rng = np.random.default_rng(5)
    centres = unit(rng.normal(size=(3, 16)))
    labels = rng.integers(0, 3, 300)
    vectors = unit(centres[labels] + 0.6 * rng.normal(size=(300, 16)))
    write_embeddings(str(tmp_path / "emb"), vectors, [str(c) for c in labels])
    build_memory(str(tmp_path / "emb"), str(tmp_path / "mem"), shards=2)
    memory = VisualMemory.open(str(tmp_path / "mem"))
    queries = unit(rng.normal(size=(6, 16)))
    for rule in ("plurality", "softmax"):
        answer = memory.classify(queries, k=7, rule=rule, counterfactual=12)
        plain = memory.classify(queries, k=7, rule=rule)
        assert answer.decisions == plain.decisions
        for row, cf in enumerate(answer.counterfactuals):
            assert cf.found, f"query {row}: 12 removals should flip a 7-neighbour vote among 3 mixed classes"
            removed_ids = answer.ranking.ids[row, cf.removed]
            edited = VisualMemory.open(str(tmp_path / "mem"))
            edited.remove(ids=removed_ids)
            again = edited.classify(queries[row:row + 1], k=7, rule=rule)
            assert again.decisions[0] == cf.flipped_to != cf.decision
            assert set(again.neighbours.ids[0]) >= set(answer.ranking.ids[row, cf.entrants])
            edited.rollback(1)


@pytest.mark.parametrize("rule", ["plurality", "rank"])
def test_equals_brute_force_over_every_removal_from_a_small_memory(tmp_path, rule):
    """Every subset of a 9-item memory removed with the memory's own edit (kept in process), and
    the edited memory asked again: the fewest removals that change its answer are the explanation's."""
    from eval.memory_eval import InProcess, as_memory
    from index.edit import edits
    rng = np.random.default_rng(11)
    vectors = unit(rng.normal(size=(9, 8)))
    labels = ["a", "a", "b", "a", "c", "b", "a", "c", "b"]
    write_embeddings(str(tmp_path / "emb"), vectors, labels)
    build_memory(str(tmp_path / "emb"), str(tmp_path / "mem"), shards=2)
    snapshot = InProcess.of(VisualMemory.open(str(tmp_path / "mem")).snapshot)
    queries = unit(rng.normal(size=(4, 8)))
    answer = as_memory(snapshot).classify(queries, k=3, rule=rule, counterfactual=6)
    fewest = [None] * len(queries)
    for size in range(1, 7):
        for removed in itertools.combinations(range(9), size):
            edited, _ = edits.remove(snapshot, ids=np.array(removed))
            decisions = as_memory(edited).classify(queries, k=3, rule=rule).decisions
            for row, decision in enumerate(decisions):
                if fewest[row] is None and decision is not None and decision != answer.decisions[row]:
                    fewest[row] = size
    assert [len(cf.removed) if cf.found else None for cf in answer.counterfactuals] == fewest
    assert any(f is not None and f > 1 for f in fewest)
