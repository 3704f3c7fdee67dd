"""Memory build, manifest round trip, and the exactness of merging shard results."""

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index.build.build import build_memory, choose_factory, train_empty_index
from index.ingest.embeddings import JOB_FILE, embedding_schema
from index.memory import VisualMemory
from index.shard.search import merge_topk
from index.store.manifest import Manifest, ShardEntry, list_versions, read_manifest, write_manifest


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def split_search(index_factory, vectors, queries, shards, k):
    empty = train_empty_index(vectors, index_factory)
    ids = np.arange(len(vectors))
    answers = []
    for s in range(shards):
        idx = faiss.clone_index(empty)
        rows = ids % shards == s
        idx.add_with_ids(vectors[rows], ids[rows])
        d, i = idx.search(queries, k)
        answers.append({"similarities": d, "ids": i})
    whole = faiss.clone_index(empty)
    whole.add_with_ids(vectors, ids)
    return merge_topk(answers, k), whole.search(queries, k)


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF16,PQ8"])
def test_merged_shards_equal_one_index(factory):
    rng = np.random.default_rng(0)
    vectors, queries = unit(rng.normal(size=(3000, 32))), unit(rng.normal(size=(50, 32)))
    merged, (d, i) = split_search(factory, vectors, queries, shards=3, k=7)
    np.testing.assert_array_equal(merged["ids"], i)
    np.testing.assert_allclose(merged["similarities"], d, rtol=1e-6, atol=1e-6)


def test_merge_handles_short_shards():
    a = {"similarities": np.array([[0.9, -np.inf]], np.float32), "ids": np.array([[5, -1]])}
    b = {"similarities": np.array([[0.95, 0.1]], np.float32), "ids": np.array([[7, 8]])}
    out = merge_topk([a, b], 3)
    assert out["ids"].tolist() == [[7, 5, 8]] and out["shards"].tolist() == [[1, 0, 1]]
    out = merge_topk([a], 2)
    assert out["ids"].tolist() == [[5, -1]]


def test_choose_factory_follows_collection_size():
    assert choose_factory(50_000, 192) == "IDMap2,Flat"
    assert choose_factory(1_000_000, 192) == "IVF8192,SQ8"
    assert choose_factory(1_000_000_000, 384) == "IVF262144_HNSW32,SQ8"


def write_embeddings(url, vectors, labels):
    import fsspec
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    table = pa.table({"id": pa.array(np.arange(len(vectors)), pa.int64()),
                      "uri": [f"mem://img/{i}.png" for i in range(len(vectors))], "label": labels,
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])},
                     schema=embedding_schema(vectors.shape[1]))
    with fs.open(f"{root}/part-00000.parquet", "wb") as f:
        pq.write_table(table, f)
    with fs.open(f"{root}/{JOB_FILE}", "w") as f:
        json.dump({"encoder": "raw-pixels:4", "encoder_sha256": "abc"}, f)


def test_build_open_search_classify(tmp_path):
    rng = np.random.default_rng(1)
    centres = unit(rng.normal(size=(3, 16)))
    labels = rng.integers(0, 3, 600)
    vectors = unit(centres[labels] + 0.3 * rng.normal(size=(600, 16)))
    write_embeddings(str(tmp_path / "emb"), vectors, [str(c) for c in labels])
    manifest = build_memory(str(tmp_path / "emb"), str(tmp_path / "mem"), shards=3)
    assert manifest.version == 1 and manifest.count == 600 and len(manifest.shards) == 3
    assert manifest.encoder == {"name": "raw-pixels:4", "sha256": "abc"}

    memory = VisualMemory.open(str(tmp_path / "mem"))
    assert len(memory) == 600
    found = memory.search(vectors[:5], k=4)
    assert found.ids[:, 0].tolist() == [0, 1, 2, 3, 4]            # each vector is its own nearest
    assert found.labels[:, 0].tolist() == [str(c) for c in labels[:5]]
    assert found.uris[0, 0] == "mem://img/0.png"
    assert (found.shards[:, 0] == np.arange(5) % 3).all()          # shard s owns ids ≡ s (mod 3)
    result = memory.classify(unit(centres), k=15, rule="softmax")
    assert result.decisions == ["0", "1", "2"]
    with pytest.raises(ValueError, match="dimension 8"):
        memory.search(np.ones((1, 8), np.float32))

    again = build_memory(str(tmp_path / "emb"), str(tmp_path / "mem"), shards=2)
    assert again.version == 2 and list_versions(str(tmp_path / "mem")) == [1, 2]
    assert len(VisualMemory.open(str(tmp_path / "mem"), version=1).shards) == 3


def test_manifest_round_trip_and_pointer(tmp_path):
    url = f"file://{tmp_path}/m"
    m = Manifest(version=3, encoder={"name": "e", "sha256": "s"}, dim=8, metric="inner_product", factory="IDMap2,Flat",
                 trained_index="v3/trained.faiss", shards=[ShardEntry("v3/a.faiss", "v3/a.parquet", 5, "h")], next_id=5)
    write_manifest(url, m)
    assert read_manifest(url) == m
    assert json.loads((tmp_path / "m" / "manifest.json").read_text()) == {"current": 3, "path": "v3/manifest.json"}
    assert not [p for p in (tmp_path / "m").rglob("*.tmp-*")], "temporary files must be moved into place"
    with pytest.raises(FileNotFoundError, match="no memory at"):
        read_manifest(str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="no version 9"):
        read_manifest(url, 9)


def test_memory_url_in_object_store():
    url = "memory://vismem-test/mem"
    rng = np.random.default_rng(2)
    vectors = unit(rng.normal(size=(100, 8)))
    write_embeddings("memory://vismem-test/emb", vectors, ["x"] * 100)
    build_memory("memory://vismem-test/emb", url, shards=2)
    assert len(VisualMemory.open(url)) == 100
