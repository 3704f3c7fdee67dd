"""Shards stream to and from storage (no serialised copy in memory), can be memory-mapped from a
local disk, and answer the same with the coarse assignment computed once for all shards."""

import hashlib

import numpy as np
import pytest

from index.build import build_memory
from index.memory import VisualMemory
from index.shards import coarse_assignment, mapped, merge_topk
from index.synthetic import ClusteredVectors
from test_memory import write_embeddings


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data = ClusteredVectors(dim=32, clusters=256, spread=0.8, seed=7)
    root = tmp_path_factory.mktemp("storage")
    write_embeddings(str(root / "emb"), data.rows(0, 9_000), [str(i % 4) for i in range(9_000)])
    build_memory(str(root / "emb"), str(root / "mem"), shards=3, factory="IVF64,SQ8", use_ray=False)
    return str(root / "mem"), data


def test_streamed_files_hash_as_the_manifest_says(built):
    url, _ = built
    memory = VisualMemory.open(url)
    for entry in memory.manifest.shards:
        with open(f"{url}/{entry.index}", "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry.sha256
    path = f"{url}/{memory.manifest.shards[1].index}"
    with open(path, "r+b") as f:                       # one flipped byte is caught by the streaming reader
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    try:
        with pytest.raises(ValueError, match="does not match its sha256"):
            VisualMemory.open(url)
        with pytest.raises(ValueError, match="does not match its sha256"):
            VisualMemory.open(url, mmap=True)
    finally:
        with open(path, "r+b") as f:
            f.seek(-1, 2)
            f.write(last)


def test_a_mapped_memory_answers_like_a_loaded_one_and_can_be_edited(built, tmp_path):
    import shutil
    url, data = built
    copy = str(tmp_path / "mem")
    shutil.copytree(url, copy)
    loaded, mapped_memory = VisualMemory.open(copy), VisualMemory.open(copy, mmap=True)
    assert all(mapped(s.index) for s in mapped_memory.shards) and not mapped(loaded.shards[0].index)
    queries = data.queries(100)
    a, b = loaded.search(queries, 10), mapped_memory.search(queries, 10)
    assert (a.ids == b.ids).all() and np.allclose(a.similarities, b.similarities)
    mapped_memory.remove(ids=a.ids[:5, 0], reason="test")
    mapped_memory.add(data.rows(9_000, 9_100), ["new"] * 100, [f"new/{i}" for i in range(100)])
    mapped_memory.compact()                             # reads the mapped base into memory to merge it
    after = VisualMemory.open(copy)
    assert len(after) == 9_000 - 5 + 100 and not after.live(a.ids[:5, 0]).any()


def test_only_a_local_memory_can_be_mapped(s3_bucket, built):
    with pytest.raises(ValueError, match="only a memory on a local disk can be mapped"):
        VisualMemory.open(f"{s3_bucket}/mem-that-does-not-matter", mmap=True) if False else \
            __import__("index.shards", fromlist=["Shard"]).Shard.load(
                f"{s3_bucket}/mem", VisualMemory.open(built[0]).manifest.shards[0], mmap=True)


def test_one_coarse_assignment_answers_exactly_like_each_shard_searching_alone(built, tmp_path):
    import shutil
    url, data = built
    copy = str(tmp_path / "mem")
    shutil.copytree(url, copy)
    memory = VisualMemory.open(copy)
    memory.add(data.rows(9_000, 9_500), ["x"] * 500, [None] * 500)           # segments
    memory.remove(ids=np.arange(0, 9_000, 7))                               # and a deletion set
    queries = data.queries(200)
    for nprobe in (1, 4, 64):
        coarse = coarse_assignment(memory.shards, queries, nprobe)
        together = merge_topk([s.query(queries, 10, nprobe, coarse) for s in memory.shards], 10)
        alone = merge_topk([s.query(queries, 10, nprobe) for s in memory.shards], 10)
        assert (together["ids"] == alone["ids"]).all() and np.allclose(together["similarities"], alone["similarities"])
        assert not np.isin(together["ids"], np.arange(0, 9_000, 7)).any()
