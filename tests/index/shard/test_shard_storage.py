"""Shards stream to and from storage (no serialised copy in memory), can be memory-mapped from a
local disk, and answer the same with the coarse assignment computed once for all shards."""

import hashlib
import os

import numpy as np
import pytest

from index.build.build import build_memory
from index.memory import VisualMemory
from index.shard.faiss_io import mapped
from index.shard.search import coarse_assignment, merge_topk
from index.shard.state import Shard
from index.store.manifest import read_manifest
from index.synthetic import ClusteredVectors
from tests.index.test_memory import write_embeddings


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
        Shard.load(f"{s3_bucket}/mem", VisualMemory.open(built[0]).manifest.shards[0], mmap=True)


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


def test_a_memory_served_mapped_answers_like_a_loaded_one_and_takes_edits(ray_local, tmp_path):
    """``vismem serve --mmap``: each shard replica maps its index file (it shows in the replica's
    memory maps), answers exactly as the memory in process, and adds and removes as a loaded one
    does; a memory that is not on a local disk is refused before anything is deployed."""
    import glob

    from ray import serve

    from tests.conftest import free_port
    from index.serve import build_app, start
    from tests.index.edit.test_memory_edits import write_collection
    from tests.index.serve.test_serve_edits import ENCODER, TOKEN, call, top1
    source = ClusteredVectors(dim=48, clusters=24, spread=0.8, seed=11)
    vectors = source.rows(0, 2000)
    url = str(tmp_path / "mem")
    build_memory(write_collection(str(tmp_path / "emb"), vectors, [f"c{i % 4}" for i in range(len(vectors))],
                                  encoder=ENCODER), url, shards=2, factory="IVF16,Flat")
    port = free_port()
    serve.shutdown()                       # Serve keeps the port it first started on: start it afresh on ours
    start(url, host="127.0.0.1", port=port, name="mapped", token_digest=hashlib.sha256(TOKEN.encode()).hexdigest(),
          mmap=True)
    base = f"http://127.0.0.1:{port}"
    try:
        maps = ""
        for path in glob.glob("/proc/[0-9]*/maps"):
            try:
                with open(path) as f:
                    maps += f.read()
            except OSError:                                  # a process that ended meanwhile
                continue
        files = [os.path.realpath(f"{url}/{entry.index}") for entry in read_manifest(url).shards]
        assert all(f in maps for f in files), files

        queries = np.concatenate([source.queries(40), vectors[:10]])
        assert ids_of(top1(base, queries, k=10)) == VisualMemory.open(url).search(queries, 10).ids.tolist()
        status, added = call(f"{base}/v1/memory/add", {"vectors": source.queries(43)[40:].tolist(),
                                                       "labels": ["late"] * 3}, token=TOKEN)
        assert status == 200, added
        status, removed = call(f"{base}/v1/memory/remove", {"ids": [added["ids"][0], 5]}, token=TOKEN)
        assert status == 200, removed
        memory = VisualMemory.open(url)
        assert memory.version == removed["version"] and not memory.live([added["ids"][0], 5]).any()
        found = top1(base, queries, k=10)
        assert found["version"] == memory.version and ids_of(found) == memory.search(queries, 10).ids.tolist()
    finally:
        serve.shutdown()
    with pytest.raises(ValueError, match="only a memory on a local disk can be mapped"):
        build_app("s3://no-bucket/mem", mmap=True)


def ids_of(answer):
    return [[n["id"] for n in r["neighbours"]] for r in answer["results"]]
