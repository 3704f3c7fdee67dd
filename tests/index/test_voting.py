import numpy as np
import pytest

from index.voting import vote


def test_plurality_counts_heads():
    v = vote([["a", "b", "b"]], [[0.9, 0.5, 0.4]], "plurality")
    assert v.decisions == ["b"] and v.scores[0] == {"a": 1.0, "b": 2.0}


def test_plurality_tie_goes_to_class_seen_first():
    assert vote([["b", "a", "a", "b"]], [[0.9, 0.8, 0.7, 0.6]], "plurality").decisions == ["b"]
    assert vote([["a", "b", "b", "a"]], [[0.9, 0.8, 0.7, 0.6]], "plurality").decisions == ["a"]


def test_distance_weights_are_exp_minus_euclidean_distance():
    sims = np.array([[1.0, 0.5, 0.5]])
    v = vote([["a", "b", "b"]], sims, "distance")
    assert v.weights[0] == pytest.approx(np.exp(-np.sqrt(2 - 2 * sims[0])))
    # a: exp(0) = 1 ; b: 2·exp(-1) ≈ 0.736 → a wins although outnumbered
    assert v.decisions == ["a"]


def test_softmax_uses_temperature_0_07():
    v = vote([["a", "b", "b"]], [[0.9, 0.8, 0.8]], "softmax")
    ratio = v.weights[0, 0] / v.weights[0, 1]
    assert ratio == pytest.approx(np.exp(0.1 / 0.07))
    # a: e^(0.9/T); b: 2 e^(0.8/T) → e^(0.1/0.07) ≈ 4.17 > 2, so a wins
    assert v.decisions == ["a"]
    assert vote([["a", "b", "b"]], [[0.9, 0.8, 0.8]], "softmax", temperature=1.0).decisions == ["b"]


def test_rank_weights():
    v = vote([["a", "b", "c", "b"]], [[0.9, 0.8, 0.7, 0.6]], "rank")
    assert v.weights[0] == pytest.approx([1 / 2, 1 / 3, 1 / 4, 1 / 5])
    # a: 1/2 = 0.5 ; b: 1/3 + 1/5 ≈ 0.533 → b, although a is nearest
    assert v.scores[0]["b"] == pytest.approx(1 / 3 + 1 / 5)
    assert v.decisions == ["b"]
    # α = 1 weighs the nearest more: a 1 ; b 1/2 + 1/4 → a
    assert vote([["a", "b", "c", "b"]], [[0.9, 0.8, 0.7, 0.6]], "rank", alpha=1.0).decisions == ["a"]


def test_sample_weights_and_missing_neighbours():
    v = vote([["a", "b", None]], [[0.9, 0.8, 0.0]], "plurality", sample_weights=[[0.25, 1.0, 1.0]],
             ids=[[3, 4, -1]])
    assert v.decisions == ["b"] and v.weights[0, 2] == 0
    assert vote([[None, None]], [[0.0, 0.0]], "plurality", ids=[[-1, -1]]).decisions == [None]


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown voting rule"):
        vote([["a"]], [[1.0]], "majority")
