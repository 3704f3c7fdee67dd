"""A build is a parallel add: Ray tasks encode the embedding files into per-shard pieces and merge
each shard, the driver holding only the training sample. The shards it writes are byte-identical to
the same build run in one process, locally and on S3, and a file that vanishes mid-build fails the
build with nothing committed."""

import numpy as np
import pytest

from index.build.build import build_memory
from index.ingest.embeddings import write_vectors
from index.memory import VisualMemory
from index.store.manifest import list_versions, read_manifest
from index.synthetic import ClusteredVectors


@pytest.fixture(scope="module")
def vectors():
    return ClusteredVectors(dim=32, clusters=256, spread=0.8, seed=5).rows(0, 12_000)


def write(url, vectors, rows_per_file=2_500):
    write_vectors(url, vectors, [str(i % 5) for i in range(len(vectors))], [f"img/{i}.png" for i in range(len(vectors))],
                  rows_per_file=rows_per_file)


def shard_digests(url):
    m = read_manifest(url)
    return [(s.sha256, s.count) for s in m.shards], m.search, m.recall["recall"]


def test_ray_build_writes_the_same_shards_as_the_build_in_one_process(ray_local, vectors, tmp_path):
    write(str(tmp_path / "emb"), vectors)
    stages = []
    build_memory(str(tmp_path / "emb"), str(tmp_path / "local"), shards=3, factory="IVF64,SQ8", use_ray=False)
    on_ray = build_memory(str(tmp_path / "emb"), str(tmp_path / "ray"), shards=3, factory="IVF64,SQ8", use_ray=True,
                          progress=lambda stage, done, total: stages.append((stage, done, total)))
    assert shard_digests(str(tmp_path / "local")) == shard_digests(str(tmp_path / "ray"))
    assert on_ray.count == 12_000 and on_ray.recall["recall"] >= 0.95
    assert ("encode", 5, 5) in stages and ("merge", 3, 3) in stages          # 5 files, 3 shards
    memory = VisualMemory.open(str(tmp_path / "ray"))
    found = memory.search(vectors[:50], 1)
    assert (found.ids[:, 0] == np.arange(50)).all()                          # each vector finds itself


def test_memory_ids_follow_the_collection_ids_whatever_the_file_names(vectors, tmp_path):
    """Files named against the order of their ids: memory id i is still collection id i."""
    n = 4_000
    emb = str(tmp_path / "emb")
    write_vectors(emb, vectors[n // 2:n], ["b"] * (n // 2), [f"img/{i}.png" for i in range(n // 2, n)],
                  ids=np.arange(n // 2, n), rows_per_file=n)                 # part-00000: ids 2000..3999
    later = tmp_path / "later"
    write_vectors(str(later), vectors[:n // 2], ["a"] * (n // 2), [f"img/{i}.png" for i in range(n // 2)],
                  ids=np.arange(n // 2), rows_per_file=n)
    (later / "part-00000.parquet").rename(tmp_path / "emb" / "part-00001.parquet")   # ids 0..1999 in the later name
    build_memory(emb, str(tmp_path / "mem"), shards=2, use_ray=False)
    memory = VisualMemory.open(str(tmp_path / "mem"))
    found = memory.search(vectors[[0, 1999, 2000, 3999]], 1)
    assert found.ids[:, 0].tolist() == [0, 1999, 2000, 3999]
    assert found.uris[:, 0].tolist() == ["img/0.png", "img/1999.png", "img/2000.png", "img/3999.png"]


def test_build_on_s3_with_ray(ray_local, s3_bucket, vectors, tmp_path):
    write(f"{s3_bucket}/emb", vectors[:6_000], rows_per_file=2_000)
    write(str(tmp_path / "emb"), vectors[:6_000], rows_per_file=2_000)
    build_memory(f"{s3_bucket}/emb", f"{s3_bucket}/mem", shards=2, factory="IVF32,SQ8", use_ray=True)
    build_memory(str(tmp_path / "emb"), str(tmp_path / "mem"), shards=2, factory="IVF32,SQ8", use_ray=False)
    assert shard_digests(f"{s3_bucket}/mem") == shard_digests(str(tmp_path / "mem"))
    a, b = VisualMemory.open(f"{s3_bucket}/mem"), VisualMemory.open(str(tmp_path / "mem"))
    assert (a.search(vectors[:100], 5).ids == b.search(vectors[:100], 5).ids).all()


@pytest.mark.parametrize("use_ray", [False, True])
def test_a_file_that_vanishes_mid_build_fails_it_with_nothing_committed(ray_local, vectors, tmp_path, monkeypatch,
                                                                          use_ray):
    import index.build.build
    emb, mem = str(tmp_path / "emb"), str(tmp_path / "mem")
    write(emb, vectors[:6_000], rows_per_file=2_000)
    build_memory(emb, mem, shards=2, use_ray=False)
    real = index.build.build.plan_files

    def plan_then_lose_a_file(url):
        planned = real(url)
        (tmp_path / "emb" / "part-00001.parquet").unlink()
        return planned

    monkeypatch.setattr(index.build.build, "plan_files", plan_then_lose_a_file)
    with pytest.raises(Exception, match=r"embedding file .*part-00001\.parquet disappeared while the build"):
        build_memory(emb, mem, shards=2, use_ray=use_ray)
    assert list_versions(mem) == [1] and not [p for p in (tmp_path / "mem").glob("v2/**/*") if p.is_file()]
    assert len(VisualMemory.open(mem)) == 6_000


def test_use_ray_without_ray_is_a_clear_error(vectors, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)
    write(str(tmp_path / "emb"), vectors[:500])
    with pytest.raises(RuntimeError, match="asked to run on Ray"):
        build_memory(str(tmp_path / "emb"), str(tmp_path / "mem"), shards=2, use_ray=True)
