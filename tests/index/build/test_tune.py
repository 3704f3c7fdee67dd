"""`vismem index tune` records the cheapest nprobe that reaches a target recall, and the memory then
answers at that recall on queries it has never seen."""

import json

import numpy as np
import pytest

from cluster.cli import main
from index.exact import exact_search
from index.build.build import build_memory
from index.build.recall import NprobeSweep, recall_at_k
from index.build.tune import tune
from index.memory import VisualMemory
from index.store.manifest import read_manifest
from index.synthetic import ClusteredVectors
from tests.index.test_memory import write_embeddings


@pytest.fixture(scope="module")
def memory_url(tmp_path_factory):
    data = ClusteredVectors(dim=48, clusters=512, spread=0.8, seed=11)
    root = tmp_path_factory.mktemp("tune")
    write_embeddings(str(root / "emb"), data.rows(0, 20_000), [str(i % 3) for i in range(20_000)])
    build_memory(str(root / "emb"), str(root / "mem"), shards=3, factory="IVF256,SQ8", nprobe=1, use_ray=False)
    return str(root / "mem"), data


def held_out_recall(memory: VisualMemory, data: ClusteredVectors, nprobe=None) -> float:
    queries = data.queries(300)
    ids, _, vectors = zip(*(s.vectors() for s in memory.shards))
    ids, vectors = np.concatenate(ids), np.concatenate(vectors)
    truth = ids[exact_search(vectors, queries, 10)[1]]
    return recall_at_k(memory.search(queries, 10, nprobe=nprobe).ids, truth)


def test_tune_picks_the_cheapest_nprobe_that_reaches_the_target(memory_url):
    url, data = memory_url
    memory = VisualMemory.open(url)
    assert held_out_recall(memory, data) < 0.8                       # built at nprobe 1: the test can fail
    version, low = tune(memory, 0.8)
    version2, high = tune(memory, 0.97)
    assert version2 == version + 1 and low["nprobe"] < high["nprobe"]
    for result in (low, high):
        by = {int(n): r for n, r in result["by_nprobe"].items()}
        assert by[result["nprobe"]] >= result["target"]
        assert all(r < result["target"] for n, r in by.items() if n < result["nprobe"])   # none cheaper reaches it
    m = read_manifest(url)
    assert m.operation == "tune" and m.search["nprobe"] == high["nprobe"] and m.recall["recall"] == high["recall"]
    reopened = VisualMemory.open(url)
    assert held_out_recall(reopened, data) >= 0.95                   # the claim holds on queries never seen
    assert held_out_recall(memory, data) == held_out_recall(reopened, data)   # the tuning process follows too
    assert len(reopened) == 20_000 and reopened.manifest.counts == {"nprobe": high["nprobe"]}


def test_tune_with_outside_queries_and_from_the_command_line(memory_url, tmp_path, capsys):
    url, data = memory_url
    write_embeddings(str(tmp_path / "q"), data.queries(200), ["0"] * 200)
    assert main(["index", "tune", "--memory", url, "--target-recall", "0.9", "--queries", str(tmp_path / "q"),
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["held_out"] == "outside queries" and record["queries"] == 200 and record["recall"] >= 0.9
    assert read_manifest(url).search["nprobe"] == record["nprobe"]


def test_tune_refuses_what_it_cannot_do(tmp_path, memory_url):
    url, data = memory_url
    write_embeddings(str(tmp_path / "emb"), data.rows(0, 500), ["a"] * 500)
    build_memory(str(tmp_path / "emb"), str(tmp_path / "flat"), shards=2, use_ray=False)
    with pytest.raises(ValueError, match="exact index .*no nprobe to tune"):
        tune(VisualMemory.open(str(tmp_path / "flat")), 0.9)
    with pytest.raises(ValueError, match=r"target recall must be in \(0, 1\]"):
        tune(VisualMemory.open(url), 1.5)


def test_a_sweep_over_nprobe_answers_as_each_search_would(memory_url):
    """The build's calibration scans each list once across its nprobe sweep (``NprobeSweep``); at
    every step it must answer exactly what a search at that nprobe answers, removed ids included."""
    url, data = memory_url
    memory = VisualMemory.open(url)
    shard = memory.shards[1].without(memory.shards[1].parts[0].ids[::7])
    queries = data.queries(200)
    sweep = NprobeSweep(shard, queries, 11)
    for nprobe in (1, 2, 4, 8, 32, 256, 512):
        sims, ids = sweep.at(nprobe)
        expected_sims, expected_ids = shard.search(queries, 11, nprobe)
        assert np.array_equal(ids, expected_ids)
        found = ids >= 0                        # past the neighbours found, FAISS and the merge differ on the fill
        np.testing.assert_allclose(sims[found], expected_sims[found], rtol=1e-6, atol=1e-6)
    assert (ids >= 0).all()                     # at nprobe 512 every query finds 11


def test_tune_picks_both_knobs_of_a_two_tier_memory(tmp_path):
    """Built pinned too shallow (nprobe 1, k_factor 2), a two-tier memory is tuned to the cheapest
    (nprobe, k_factor) reaching the target, recorded in its manifest and met on unseen queries."""
    data = ClusteredVectors(dim=48, clusters=256, spread=0.8, seed=12)
    write_embeddings(str(tmp_path / "emb"), data.rows(0, 8_000), [str(i % 3) for i in range(8_000)])
    url = str(tmp_path / "mem")
    build_memory(str(tmp_path / "emb"), url, shards=2, factory="IVF64,PQ24x4fs,Refine(SQfp16)", nprobe=1,
                 k_factor=2, use_ray=False)
    memory = VisualMemory.open(url)
    assert read_manifest(url).search == {"nprobe": 1, "k_factor": 2} and held_out_recall(memory, data) < 0.9
    _, result = tune(memory, 0.95)
    assert result["recall"] >= 0.95 and result["by_setting"][f"{result['nprobe']},{result['k_factor']}"] >= 0.95
    assert read_manifest(url).search == {"nprobe": result["nprobe"], "k_factor": result["k_factor"]}
    assert (result["nprobe"], result["k_factor"]) != (1, 2) and held_out_recall(VisualMemory.open(url), data) >= 0.93
