"""An IVF memory's shards each own a range of its inverted lists (index.shard.placement): about as many
vectors each, every list scanned by one shard, answers those of one index over every vector, and
edits that follow the lists; memories recorded without a placement keep placing by id."""

import json

import faiss
import numpy as np
import pytest

from index.build.build import build_memory
from index.memory import VisualMemory
from index.shard.faiss_io import load_trained
from index.shard.placement import Placement
from index.shard.search import plain_ivf
from index.store.manifest import read_manifest
from index.synthetic import ClusteredVectors
from tests.index.test_memory import write_embeddings

N = 12_000


@pytest.fixture(scope="module")
def data():
    return ClusteredVectors(dim=32, clusters=512, spread=0.8, seed=3)


@pytest.fixture
def memory_url(tmp_path, data):
    write_embeddings(str(tmp_path / "emb"), data.rows(0, N), [str(i % 5) for i in range(N)])
    build_memory(str(tmp_path / "emb"), str(tmp_path / "mem"), shards=4, factory="IVF64,SQ8", use_ray=False)
    return str(tmp_path / "mem")


def lists_held(shard) -> set[int]:
    """The inverted lists in which a shard's parts hold vectors."""
    held = set()
    for part in shard.parts:
        invlists = plain_ivf(part.index).invlists
        held |= {lst for lst in range(invlists.nlist) if invlists.list_size(lst)}
    return held


def bare_index(url: str, vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """One index over ``vectors`` with the memory's trained index: the reference answers."""
    index = load_trained(url, read_manifest(url))
    index.add_with_ids(vectors, ids)
    return index


def test_shards_own_list_ranges_of_about_equal_size(memory_url):
    manifest = read_manifest(memory_url)
    placement = Placement.of(manifest)
    assert manifest.placement["by"] == "lists" and placement.bounds[0] == 0 and placement.bounds[-1] == 64
    memory = VisualMemory.open(memory_url)
    sizes = [len(s) for s in memory.shards]
    assert sum(sizes) == N and max(sizes) < 1.3 * N / 4 and min(sizes) > 0.7 * N / 4
    for s, shard in enumerate(memory.shards):
        assert lists_held(shard) <= set(range(placement.bounds[s], placement.bounds[s + 1]))


def test_answers_are_those_of_one_index_over_every_vector(memory_url, data):
    memory = VisualMemory.open(memory_url)
    queries = data.queries(200)
    bare = bare_index(memory_url, data.rows(0, N), np.arange(N))
    for nprobe in (1, 4, 64):
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        sims, ids = bare.search(queries, 10, params=params)
        found = memory.search(queries, 10, nprobe=nprobe)
        assert np.array_equal(found.ids, ids)
        np.testing.assert_allclose(found.similarities, sims, rtol=1e-6, atol=1e-6)


def test_added_vectors_go_to_the_shard_of_their_list_and_remove_finds_them(memory_url, data):
    memory = VisualMemory.open(memory_url)
    placement = Placement.of(memory.manifest)
    added = data.queries(300)
    _, ids = memory.add(added, ["new"] * len(added), [f"new://{i}" for i in range(len(added))])
    lists = placement.assign(memory.trained_index(), added)
    reopened = VisualMemory.open(memory_url)
    for s, shard in enumerate(reopened.shards):
        mine = (lists >= placement.bounds[s]) & (lists < placement.bounds[s + 1])
        assert np.array_equal(shard.held(ids), mine)
        assert lists_held(shard) <= set(range(placement.bounds[s], placement.bounds[s + 1]))
    assert reopened.live(ids).all() and len(reopened) == N + len(added)

    everything = np.concatenate([data.rows(0, N), added])
    bare = bare_index(memory_url, everything, np.arange(len(everything)))
    sims, expected = bare.search(added, 5, params=faiss.SearchParametersIVF(nprobe=8))
    assert np.array_equal(reopened.search(added, 5, nprobe=8).ids, expected)

    gone = ids[::3]
    reopened.remove(ids=gone)
    again = VisualMemory.open(memory_url)
    assert not again.live(gone).any() and again.live(np.setdiff1d(ids, gone)).all()
    assert not np.isin(again.search(added, 10, nprobe=64).ids, gone).any()
    compacted = VisualMemory.open(memory_url)
    compacted.compact()
    assert np.array_equal(VisualMemory.open(memory_url).search(added, 5, nprobe=8).ids,
                          again.search(added, 5, nprobe=8).ids)


def test_a_memory_recorded_without_placement_keeps_placing_by_id(tmp_path, data):
    """A vismem-memory/2 IVF memory split every list by id: its edits must go on doing so."""
    write_embeddings(str(tmp_path / "emb"), data.rows(0, 4_000), ["a"] * 4_000)
    url = str(tmp_path / "mem")
    build_memory(str(tmp_path / "emb"), url, shards=2, factory="IVF16,Flat", use_ray=False)
    with open(f"{url}/v1/manifest.json") as f:
        m = json.load(f)
    m["format"], m["placement"] = "vismem-memory/2", None
    with open(f"{url}/v1/manifest.json", "w") as f:
        json.dump(m, f)
    memory = VisualMemory.open(url)
    assert not Placement.of(memory.manifest).by_lists
    _, ids = memory.add(data.queries(50), ["b"] * 50, None)
    reopened = VisualMemory.open(url)
    for s, shard in enumerate(reopened.shards):
        assert np.array_equal(shard.held(ids), ids % 2 == s)


def test_balanced_bounds():
    assert Placement.balanced(np.array([10, 10, 10, 10]), 2).bounds == (0, 2, 4)
    assert Placement.balanced(np.array([100, 0, 0, 0, 0, 1]), 3).bounds == (0, 1, 2, 6)   # each owns a list
    assert Placement.balanced(np.zeros(8), 4).bounds == (0, 2, 4, 6, 8)
    assert Placement.balanced(np.array([5, 5, 5]), 3).bounds == (0, 1, 2, 3)
    skewed = Placement.balanced(np.array([1] * 90 + [100] * 10), 2)
    assert skewed.bounds == (0, 94, 100)                 # 490 and 600 vectors: the cut before the half
    with pytest.raises(ValueError, match="5 shards cannot each own some of 4 inverted lists"):
        Placement.balanced(np.ones(4), 5)


def test_more_shards_than_lists_is_refused_before_training(tmp_path, data):
    write_embeddings(str(tmp_path / "emb"), data.rows(0, 2_000), ["a"] * 2_000)
    with pytest.raises(ValueError, match="20 shards cannot each own some of the 16 inverted lists"):
        build_memory(str(tmp_path / "emb"), str(tmp_path / "mem"), shards=20, factory="IVF16,Flat", use_ray=False)
