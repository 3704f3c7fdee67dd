"""Batch embedding of a real image collection with Ray Data: a pool of encoder actors.

Each partition of the collection becomes one row of a Ray Dataset; an actor of the pool reads
its images, embeds them and writes ``part-NNNNN.parquet`` (id, uri, label, embedding) straight to
the output URL, so no image or vector passes through the driver. Unreadable images are skipped
and listed in ``errors.jsonl``. A partition whose Parquet exists is not recomputed, so a killed
job resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from encoder import Encoder
from index.collections import Partition, decode_partition, list_partitions
from index.manifest import write_bytes_atomic

log = logging.getLogger("vismem.index.embed")
JOB_FILE, ERRORS_FILE = "_embedding.json", "errors.jsonl"


@dataclass
class EmbedSummary:
    out: str
    encoder: str
    dim: int
    partitions: int
    computed: int              # partitions embedded by this run (the rest existed)
    images: int                # vectors written, over all partitions
    errors: int                # unreadable images, over all partitions


def part_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("uri", pa.string()), ("label", pa.string()),
                      ("embedding", pa.list_(pa.float32(), dim))])


class EmbedPartitions:
    """Ray Data actor: loads the encoder once, then embeds and writes whole partitions."""

    def __init__(self, encoder_spec: str, out_url: str, batch_size: int = 256):
        self.encoder = Encoder.load(encoder_spec)
        self.fs, self.root = fsspec.core.url_to_fs(out_url)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        summaries = [self.embed_one(Partition(**json.loads(spec))) for spec in batch["partition"]]
        return {"summary": np.array([json.dumps(s) for s in summaries], dtype=object)}

    def embed_one(self, part: Partition) -> dict:
        decoded, errors = decode_partition(part)
        ids, uris, labels, images = (list(column) for column in zip(*decoded)) if decoded else ([], [], [], [])
        vectors = self.encoder.embed(images, self.batch_size) if images else np.zeros((0, self.encoder.dim), np.float32)
        table = pa.table({"id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string()),
                          "label": pa.array(labels, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()),
                                                                         self.encoder.dim)},
                         schema=embedding_schema(self.encoder.dim))
        errors_path = f"{self.root}/{part_name(part.number)}.errors.json"
        write_bytes_atomic(self.fs, errors_path, json.dumps(errors).encode())
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_bytes_atomic(self.fs, f"{self.root}/{part_name(part.number)}", sink.getvalue().to_pybytes())
        return {"partition": part.number, "images": len(ids), "errors": len(errors)}


def check_job(fs, root: str, out_url: str, job: dict) -> None:
    """Refuse to mix vectors of two encoders (or two collections) in one output folder."""
    path = f"{root}/{JOB_FILE}"
    if fs.exists(path):
        with fs.open(path) as f:
            previous = json.load(f)
        for key in ("collection", "encoder_sha256", "partition_size"):
            if previous.get(key) != job[key]:
                raise ValueError(f"{out_url} already holds embeddings with {key}={previous.get(key)!r}, not "
                                 f"{job[key]!r}; choose another --out or delete it")
    else:
        fs.makedirs(root, exist_ok=True)
        write_bytes_atomic(fs, path, json.dumps(job, indent=2).encode())


@dataclass
class EmbeddingPlan:
    """What an embedding job will do, worked out (and checked) before any Ray work starts."""

    collection: str
    encoder_spec: str
    out: str
    encoder: Encoder
    partitions: list[Partition]
    pending: list[Partition]


def plan_embedding(collection_url: str, encoder_spec: str, out_url: str, partition_size: int = 512) -> EmbeddingPlan:
    """List the collection, load the encoder and check the output folder: every bad input fails
    here, before Ray starts and before anything is written beside the job record."""
    encoder = Encoder.load(encoder_spec)
    partitions = list_partitions(collection_url, partition_size)
    fs, root = fsspec.core.url_to_fs(out_url)
    root = root.rstrip("/")
    check_job(fs, root, out_url, {"collection": collection_url, "encoder": encoder.name,
                                  "encoder_sha256": encoder.sha256, "dim": encoder.dim,
                                  "partition_size": partition_size})
    pending = [p for p in partitions if not fs.exists(f"{root}/{part_name(p.number)}")]
    log.info("%s: %d partitions, %d to embed", collection_url, len(partitions), len(pending))
    return EmbeddingPlan(collection_url, encoder_spec, out_url, encoder, partitions, pending)


def run_embedding(plan: EmbeddingPlan, concurrency: int = 2, batch_size: int = 256) -> EmbedSummary:
    """Embed the plan's pending partitions on a pool of Ray actors, then summarise."""
    if plan.pending:
        use_gpu = bool(ray.cluster_resources().get("GPU"))
        ds = ray.data.from_items([{"partition": json.dumps(p.to_dict())} for p in plan.pending],
                                 override_num_blocks=len(plan.pending))
        ds = ds.map_batches(EmbedPartitions, fn_constructor_args=(plan.encoder_spec, plan.out, batch_size), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=max(1, min(concurrency, len(plan.pending)))),
                            num_gpus=1 if use_gpu else None, num_cpus=None if use_gpu else 0.5)
        ds.take_all()
    fs, root = fsspec.core.url_to_fs(plan.out)
    return summarise(fs, root.rstrip("/"), plan.out, plan.encoder, plan.partitions, len(plan.pending))


def embed_collection(collection_url: str, encoder_spec: str, out_url: str, partition_size: int = 512,
                     concurrency: int = 2, batch_size: int = 256) -> EmbedSummary:
    """Embed every image of ``collection_url`` into Parquet under ``out_url`` (resumable)."""
    plan = plan_embedding(collection_url, encoder_spec, out_url, partition_size)
    return run_embedding(plan, concurrency, batch_size)


def summarise(fs, root: str, out_url: str, encoder: Encoder, partitions: list[Partition], computed: int) -> EmbedSummary:
    """Collect every partition's errors into ``errors.jsonl`` and count what was written."""
    images, errors = 0, []
    for part in partitions:
        with fs.open(f"{root}/{part_name(part.number)}.errors.json") as f:
            errors.extend(json.load(f))
        images += pq.read_metadata(fs.open(f"{root}/{part_name(part.number)}")).num_rows
    write_bytes_atomic(fs, f"{root}/{ERRORS_FILE}", "".join(json.dumps(e) + "\n" for e in errors).encode())
    if errors:
        log.warning("%d unreadable image(s) skipped; see %s/%s", len(errors), out_url, ERRORS_FILE)
    return EmbedSummary(out_url, encoder.name, encoder.dim, len(partitions), computed, images, len(errors))


def read_embeddings(url: str) -> pa.Table:
    """All embedding Parquet under ``url`` as one table (id, uri, label, embedding), sorted by id."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"no embeddings at {url}")
    files = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no embedding Parquet files (part-*.parquet) under {url}")
    tables = []
    for path in files:
        with fs.open(path) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables).sort_by("id")


def embedding_matrix(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
