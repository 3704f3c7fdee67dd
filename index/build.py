"""Embeddings → a sharded memory: choose the index type, train one empty index, fill the shards.

Shard ``s`` owns the ids with ``id % shards == s``, so adding and removing vectors later touches
exactly one shard per id.
"""

from __future__ import annotations

import logging
import math

import faiss
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.embed_job import JOB_FILE, embedding_matrix, read_embeddings
from index.manifest import Manifest, ShardEntry, read_manifest, sha256, version_dir, write_bytes_atomic, write_manifest
from index.shards import serialize

log = logging.getLogger("vismem.index.build")
FLAT_LIMIT = 100_000


def choose_factory(n: int, dim: int) -> str:
    """Flat below ~100k vectors; IVF-PQ above (HNSW coarse quantiser and OPQ from 10M).

    nlist ≈ 8·√N rounded to a power of two; PQ with ~4 dimensions per 8-bit sub-quantiser.
    """
    if n < FLAT_LIMIT:
        return "IDMap2,Flat"
    nlist = 2 ** round(math.log2(8 * math.sqrt(n)))
    m = max(d for d in range(1, min(64, dim // 4) + 1) if dim % d == 0)
    if n >= 10_000_000:
        return f"OPQ{m},IVF{nlist}_HNSW32,PQ{m}"
    return f"IVF{nlist},PQ{m}"


def training_size(factory: str) -> int:
    """How many vectors to train on: ≥ 39·nlist and ≥ 9,984 for 8-bit PQ (DESIGN.md §3)."""
    if "IVF" not in factory:
        return 0
    nlist = int(factory.split("IVF")[1].split(",")[0].split("_")[0])
    return max(39 * nlist, 9_984 if "PQ" in factory else 0)


def train_empty_index(vectors: np.ndarray, factory: str, seed: int = 0) -> faiss.Index:
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        want = training_size(factory)
        if len(vectors) < want:
            log.warning("training %s on %d vectors (< %d recommended)", factory, len(vectors), want)
        sample = vectors[np.random.default_rng(seed).permutation(len(vectors))[:max(want, 1)]]
        if faiss.get_num_gpus() > 0 and "IVF" in factory:
            ivf = faiss.extract_index_ivf(index)
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
        index.train(np.ascontiguousarray(sample))
    return index


def build_memory(embeddings_url: str, memory_url: str, shards: int = 2, factory: str | None = None,
                 encoder: dict | None = None) -> Manifest:
    """Build version 1 (or the next version) of the memory at ``memory_url`` from embeddings."""
    if shards <= 0:
        raise ValueError("the number of shards must be positive")
    table = read_embeddings(embeddings_url)
    vectors = embedding_matrix(table)
    if len(vectors) == 0:
        raise ValueError(f"no vectors under {embeddings_url}: every image failed to embed?")
    encoder = encoder or embedding_encoder(embeddings_url)
    factory = factory or choose_factory(len(vectors), vectors.shape[1])
    log.info("building %s over %d vectors of dim %d in %d shards", factory, len(vectors), vectors.shape[1], shards)
    empty = train_empty_index(vectors, factory)

    fs, root = fsspec.core.url_to_fs(memory_url)
    root = root.rstrip("/")
    try:
        version = read_manifest(memory_url).version + 1
    except FileNotFoundError:
        version = 1
    vdir = version_dir(version)
    fs.makedirs(f"{root}/{vdir}", exist_ok=True)
    write_bytes_atomic(fs, f"{root}/{vdir}/trained.faiss", serialize(empty))
    ids = table.column("id").to_numpy()
    entries = []
    for s in range(shards):
        rows = np.flatnonzero(ids % shards == s)
        index = faiss.clone_index(empty)
        index.add_with_ids(vectors[rows], ids[rows])
        blob = serialize(index)
        write_bytes_atomic(fs, f"{root}/{vdir}/shard-{s:04d}.faiss", blob)
        sink = pa.BufferOutputStream()
        pq.write_table(table.select(["id", "uri", "label"]).take(pa.array(rows)), sink)
        write_bytes_atomic(fs, f"{root}/{vdir}/shard-{s:04d}.parquet", sink.getvalue().to_pybytes())
        entries.append(ShardEntry(f"{vdir}/shard-{s:04d}.faiss", f"{vdir}/shard-{s:04d}.parquet", len(rows), sha256(blob)))
    manifest = Manifest(version=version, encoder=encoder, dim=int(vectors.shape[1]), metric="inner_product",
                        factory=factory, trained_index=f"{vdir}/trained.faiss", shards=entries,
                        next_id=int(ids.max()) + 1, parent=version - 1 if version > 1 else None)
    write_manifest(memory_url, manifest)
    return manifest


def embedding_encoder(embeddings_url: str) -> dict:
    """The encoder recorded by the embedding job that wrote ``embeddings_url``."""
    import json
    with fsspec.open(embeddings_url.rstrip("/") + "/" + JOB_FILE) as f:
        job = json.load(f)
    return {"name": job["encoder"], "sha256": job["encoder_sha256"]}
