"""``vismem eval voting|pruning|unlearning`` on a tiny synthetic memory: the figures agree with the
library computed another way, the source memory is never changed, and the unlearning check fails
when the edit is not exact. No Ray: the builds run in process."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import eval.pruning
import eval.unlearning
from cluster.cli import main
from eval.knn import knn_sweep
from eval.influence import InfluenceConfig
from eval.influence import run as run_influence
from eval.memory_eval import accuracy, as_memory, memory_items, open_in_process
from eval.pruning import PruningConfig
from eval.pruning import run as run_pruning
from eval.unlearning import UnlearningConfig
from eval.unlearning import run as run_unlearning
from eval.voting import VotingConfig
from eval.voting import run as run_voting
from index.build.build import build_memory
from index.edit import edits
from index.edit import prune as prune_module
from index.exact import exact_search
from index.ingest.embeddings import write_vectors
from index.memory import VisualMemory
from index.store.manifest import list_versions
from index.synthetic import ClusteredVectors

CLASSES = ["c0", "c1", "c2", "c3"]


def files_of(root) -> dict:
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 2-shard Flat memory of 400 clustered 16-d vectors in 4 classes (a class per pair of
    clusters, 5% of the labels flipped: something for pruning to find), and 80 labelled queries."""
    root = tmp_path_factory.mktemp("evals")
    source = ClusteredVectors(dim=16, clusters=8, spread=0.9, seed=3)
    centres = source.centres / np.linalg.norm(source.centres, axis=1, keepdims=True)

    def labels(x):
        return np.array([CLASSES[i % 4] for i in np.argmax(x @ centres.T, axis=1)], dtype=object)

    vectors, queries = source.rows(0, 400), source.queries(80)
    y = labels(vectors)
    rng = np.random.default_rng(0)
    flip = rng.choice(len(y), 20, replace=False)
    y[flip] = rng.choice(CLASSES, len(flip))
    write_vectors(str(root / "emb"), vectors, y, [f"mem://{i}.png" for i in range(len(y))], encoder="raw-pixels:4")
    write_vectors(str(root / "queries"), queries, labels(queries), [f"q://{i}.png" for i in range(len(queries))],
                  encoder="raw-pixels:4")
    build_memory(str(root / "emb"), str(root / "mem"), shards=2, factory="IDMap2,Flat", use_ray=False)
    return {"root": root, "mem": str(root / "mem"), "queries": str(root / "queries"), "vectors": vectors,
            "labels": y, "query_vectors": queries, "query_labels": labels(queries)}


def test_voting_sweeps_agree_with_exact_search_and_the_vote(data, tmp_path):
    before = files_of(data["mem"])
    records = []
    cfg = VotingConfig(data["mem"], str(tmp_path / "v"), queries=data["queries"], ks=(1, 5, 10, 1000),
                       temperatures=(0.07, 0.5), alphas=(1.0, 2.0), progress=False)
    summary = run_voting(cfg, records.append)
    truth = data["query_labels"]
    _, nearest = exact_search(data["vectors"], data["query_vectors"], 1)         # memory ids are the rows here
    nn1 = float(np.mean(data["labels"][nearest[:, 0]] == truth))
    for rule, curve in summary["k_sweep"].items():
        assert [p["k"] for p in curve] == [1, 5, 10]                             # k above the memory is dropped
        assert curve[0]["accuracy"] == pytest.approx(nn1, abs=1e-4), rule       # k = 1: the exact 1-NN, every rule
    softmax = {p["k"]: p["accuracy"] for p in summary["k_sweep"]["softmax"]}
    independent = knn_sweep(data["vectors"], data["labels"], data["query_vectors"], truth, ks=(5, 10))["by_k"]
    assert softmax[5] == pytest.approx(independent[5], abs=1e-4) and softmax[10] == pytest.approx(independent[10],
                                                                                                   abs=1e-4)
    assert summary["temperature_sweep"][0] == {"temperature": 0.07, "accuracy": softmax[10]}
    assert summary["alpha_sweep"][1]["accuracy"] == summary["k_sweep"]["rank"][2]["accuracy"]   # α = 2 at k = 10
    memory = VisualMemory.open(data["mem"])
    plurality = np.mean(np.asarray(memory.classify(data["query_vectors"], 10, "plurality").decisions) == truth)
    assert summary["k_sweep"]["plurality"][2]["accuracy"] == pytest.approx(plurality, abs=1e-4)
    assert summary["best"]["accuracy"] == max(r["accuracy"] for r in summary["by_rule"].values())
    assert len(records) == 4 * 3 + 2 + 2 and summary["query_count"] == 80 and summary["memory_items"] == 400
    assert json.load(open(tmp_path / "v" / "voting.json"))["by_rule"] == summary["by_rule"]
    for name in ("voting_k", "voting_temperature", "voting_alpha"):
        assert (tmp_path / "v" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files_of(data["mem"]) == before


def test_a_held_out_split_is_not_in_the_memory_that_answers(data, tmp_path):
    memory = open_in_process(data["mem"])
    summary = run_voting(VotingConfig(data["mem"], str(tmp_path), holdout=0.25, ks=(1,), temperatures=(),
                                      alphas=(), rules=("plurality",), progress=False), lambda r: None)
    assert summary["query_count"] == 100 and summary["memory_items"] == 300 and len(memory) == 400
    assert summary["k_sweep"]["plurality"][0]["accuracy"] < 1.0      # its own vector would make 1-NN perfect
    assert list_versions(data["mem"]) == [1]


def test_pruning_sweeps_equal_committed_pruning_and_leave_the_memory_alone(data, tmp_path):
    before = files_of(data["mem"])
    cfg = PruningConfig(data["mem"], str(tmp_path / "p"), queries=data["queries"], thresholds=(1, 3, 1000),
                        prune_ks=(0, 5), progress=False)
    summary = run_pruning(cfg, lambda r: None)
    assert files_of(data["mem"]) == before and list_versions(data["mem"]) == [1]
    x, y = data["query_vectors"], data["query_labels"]
    memory = VisualMemory.open(data["mem"])
    assert summary["unpruned"] == pytest.approx(accuracy(memory.snapshot, x, y, 10, "softmax"), abs=1e-4)
    hard = {p["threshold"]: p for p in summary["hard"]}
    assert hard[1000]["changed"] == 0 and hard[1000]["accuracy"] == summary["unpruned"]   # nothing to prune
    assert hard[1]["changed"] > hard[3]["changed"] > 0
    soft = {p["prune_k"]: p for p in summary["soft"]}
    assert soft[0]["accuracy"] == summary["unpruned"] and soft[5]["changed"] > 0
    for mode, threshold, k, point in (("hard", 3, 10, hard[3]), ("soft", 5, 5, soft[5])):
        copy = str(tmp_path / f"copy-{mode}")                         # the same pruning, committed on a copy
        shutil.copytree(data["mem"], copy)
        pruned = VisualMemory.open(copy)
        _, info = pruned.prune(threshold=threshold, mode=mode, k=k)
        assert info.get("pruned", info.get("reweighted")) == point["changed"]
        assert accuracy(VisualMemory.open(copy).snapshot, x, y, 10, "softmax") == pytest.approx(point["accuracy"],
                                                                                                  abs=1e-4)
    for name in ("pruning_hard", "pruning_soft"):
        assert (tmp_path / "p" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("outside", [False, True])
def test_one_shared_search_gives_every_points_counts(data, monkeypatch, outside):
    memory = open_in_process(data["mem"])
    x, y = (data["query_vectors"], list(data["query_labels"])) if outside else (None, None)
    calls = []
    real = eval.pruning.pruning.query_batches
    monkeypatch.setattr(eval.pruning.pruning, "query_batches", lambda *a: calls.append(a[-1]) or real(*a))
    shared = eval.pruning.SharedNeighbours(memory, x, y, 20, progress=False)
    assert calls == [20]                                               # searched once, at the largest k
    for k in (1, 3, 10, 20):
        ids, counts, _ = prune_module.wrong_label_counts(memory, x, y, k)     # prune's own count, searched at k
        found, found_counts = shared.counts(k)
        assert np.array_equal(found, ids) and np.array_equal(found_counts, counts), k
    with pytest.raises(ValueError, match="outside the shared search"):
        shared.counts(21)


def test_identifiable_items_are_those_whose_removal_flips_a_decision(data, tmp_path, rule="softmax"):
    cfg = InfluenceConfig(data["mem"], str(tmp_path / "i"), queries=data["queries"], k=5, rule=rule, ks=(1, 5, 20),
                          progress=False)
    summary = run_influence(cfg, lambda r: None)
    memory = open_in_process(data["mem"])
    x = data["query_vectors"]
    base = np.asarray(as_memory(memory).classify(x, 5, rule).decisions, dtype=object)
    brute = {}
    for item in memory_items(memory)[0]:                      # every item removed in turn, classified again
        edited, _ = edits.remove(memory, ids=np.array([item]))
        changed = np.flatnonzero(np.asarray(as_memory(edited).classify(x, 5, rule).decisions, dtype=object) != base)
        if len(changed):
            brute[int(item)] = changed.tolist()
    listed = {i["id"]: i for i in summary["identifiable_items"]}
    assert set(listed) == set(brute) and len(brute) > 0
    assert all(listed[i]["flips"] == len(qs) for i, qs in brute.items())
    assert all(listed[i]["uri"] == f"mem://{i}.png" for i in listed)           # ids are the rows here
    assert summary["identifiable"] == len(brute) and summary["identifiable_fraction"] == round(len(brute) / 400, 6)
    assert [p["k"] for p in summary["sweep"]] == [1, 5, 20] and summary["sweep"][1]["identifiable"] == len(brute)
    _, nearest = exact_search(data["vectors"], x, 2)          # k = 1: the nearest flips where the second differs
    differs = data["labels"][nearest[:, 0]] != data["labels"][nearest[:, 1]]
    assert summary["sweep"][0]["identifiable"] == len(set(nearest[differs, 0].tolist())) > 0
    assert (tmp_path / "i" / "influence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unlearning_a_class_is_exact_and_forgets_it(data, tmp_path):
    before = files_of(data["mem"])
    summary = run_unlearning(UnlearningConfig(data["mem"], str(tmp_path / "u"), forget="class:c1",
                                              queries=data["queries"], progress=False), lambda r: None)
    assert summary["exact"] and all(c["queries_differing"] == 0 for c in summary["checks"].values())
    assert summary["removed"] == int((data["labels"] == "c1").sum()) == 400 - summary["items_after"]
    assert summary["removed_ids"] == np.flatnonzero(data["labels"] == "c1").tolist()
    scores = summary["accuracy"]
    assert scores["forgotten_class"]["queries"] == int((data["query_labels"] == "c1").sum()) > 0
    assert scores["forgotten_class"]["before"] > 0.5 and scores["forgotten_class"]["after"] == 0.0
    assert scores["rest"]["after"] >= scores["rest"]["before"] - 0.05
    assert files_of(data["mem"]) == before
    assert (tmp_path / "u" / "unlearning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unlearning_a_random_fraction_of_a_held_out_split(data, tmp_path):
    summary = run_unlearning(UnlearningConfig(data["mem"], str(tmp_path), forget="random:0.05", holdout=0.2,
                                              progress=False), lambda r: None)
    assert summary["exact"] and summary["removed"] == 16 and summary["items_after"] == 320 - 16
    assert summary["accuracy"]["affected"]["queries"] > 0          # some query had a removed neighbour


@pytest.mark.parametrize("fault", ["too_little", "too_much"])
def test_the_unlearning_check_fails_when_the_edit_is_not_exact(data, tmp_path, monkeypatch, capsys, fault):
    real = eval.unlearning.edits.remove
    nearest = VisualMemory.open(data["mem"]).search(data["query_vectors"][data["query_labels"] != "c1"], 1).ids[0, 0]

    def faulty(snapshot, ids, reason=None):
        ids = ids[1:] if fault == "too_little" else np.union1d(ids, [nearest])
        return real(snapshot, ids=ids, reason=reason)

    monkeypatch.setattr(eval.unlearning.edits, "remove", faulty)
    code = main(["eval", "unlearning", "--memory", data["mem"], "--queries", data["queries"], "--forget", "class:c1",
                 "--out", str(tmp_path), "--json"])
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 2 and "does not answer as the rebuilt one" in err and not summary["exact"]
    check = summary["checks"]["removed"]
    if fault == "too_little":
        assert check["queries_answered_with_removed"] > 0
    else:
        assert check["ids_differ"] > 0 and check["queries_differing"] > 0


def test_the_commands_print_records_and_a_summary(data, tmp_path, capsys):
    for name, extra in (("voting", ["--ks", "1,10", "--temperatures", "0.07", "--alphas", "2"]),
                        ("pruning", ["--thresholds", "2", "--prune-ks", "0,3"]),
                        ("unlearning", ["--forget", "random:0.02"]), ("influence", ["-k", "5", "--ks", "1,5"])):
        assert main(["eval", name, "--memory", data["mem"], "--holdout", "0.1", "--out", str(tmp_path / name),
                     "--json"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        summary = json.loads(lines[-1])
        assert summary["evaluation"] == name and summary["report"].endswith(f"{name}.json")
        assert all(os.path.exists(url) for url in summary["plots"].values())
        assert all(json.loads(line) for line in lines if line.startswith("{"))
    assert main(["eval", "unlearning", "--memory", data["mem"], "--forget", "most-influential", "--out",
                 str(tmp_path)]) == 2
    assert "class:LABEL or random:FRACTION" in capsys.readouterr().err


def test_an_ivf_memory_is_checked_against_its_embeddings(data, tmp_path):
    build_memory(str(data["root"] / "emb"), str(tmp_path / "ivf"), shards=2, factory="IVF8,SQ8", nprobe=2,
                 use_ray=False)
    summary = run_unlearning(UnlearningConfig(str(tmp_path / "ivf"), str(tmp_path / "u"), forget="class:c2",
                                              queries=data["queries"], embeddings=str(data["root"] / "emb"),
                                              progress=False), lambda r: None)
    assert summary["exact"] and summary["rebuilt_from"] == str(data["root"] / "emb")
    assert summary["accuracy"]["forgotten_class"]["after"] == 0.0
    with pytest.raises(ValueError, match="not in the embeddings"):                 # another collection's vectors
        run_unlearning(UnlearningConfig(str(tmp_path / "ivf"), str(tmp_path / "u"), forget="class:c2",
                                        queries=data["queries"], embeddings=data["queries"], progress=False),
                       lambda r: None)
