"""The embeddings contract (docs/ARCHITECTURE.md §3): what ``vismem embed`` writes and ``vismem index build`` reads.

One output folder ``OUT/`` holds the embeddings of one collection by one encoder:

- ``_embedding.json``: the job record, ``{"format", "collection", "encoder", "encoder_sha256", "dim"}``;
  a later run into the same folder must name the same collection, format and encoder.
- ``part-NNNNN.json``: one record per partition, ``{"number", "first_id", "count", "inputs"}``, written
  when the partition is planned, then again by the worker with ``"embedded"`` (vectors written) and
  ``"errors"`` (one ``{"id", "uri", "error"}`` per unreadable image) just before the Parquet. An input
  is an image file (``{"uri", "label", "size", "etag" | "mtime"}``) or, for Parquet collections, the
  rows ``[start, stop)`` of one file (``{"uri", "size", "etag" | "mtime", "rows", "start", "stop"}``).
  The ids of a partition are ``first_id .. first_id + count - 1`` (or the collection's own ``id`` column).
- ``part-NNNNN.parquet``: the vectors, columns ``id`` int64, ``uri`` string, ``label`` string (nullable),
  ``embedding`` fixed_size_list<float32>[dim]. It is written last, so it marks the partition complete;
  a record without its Parquet is redone by the next run.
- ``errors.jsonl``: every unreadable image of every partition, rewritten at the end of each run.

``embedding_encoder`` reads back the encoder a folder's vectors came from,
``check_embeddings_encoder`` refuses vectors of another encoder than a memory's (the one check, for
the build, an add and a memory's queries) and ``read_memory_embeddings`` reads a folder with it.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.ingest.files import protocol_prefix
from procdata.storage import parquet_bytes, write_atomic

FORMAT = "vismem-embeddings/2"
JOB_FILE, ERRORS_FILE = "_embedding.json", "errors.jsonl"
PART = re.compile(r"part-(\d{5,})\.(parquet|json)$")


def part_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def record_name(number: int) -> str:
    return f"part-{number:05d}.json"


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("uri", pa.string()), ("label", pa.string()),
                      ("embedding", pa.list_(pa.float32(), dim))])


def embedding_table(ids: list[int], uris: list[str], labels: list[str | None], vectors: np.ndarray) -> pa.Table:
    """One partition's vectors as a table of the embeddings schema."""
    dim = vectors.shape[1]
    return pa.table({"id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string()),
                     "label": pa.array(labels, pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), dim)},
                    schema=embedding_schema(dim))


def write_vectors(url: str, vectors: np.ndarray, labels, uris, ids=None, collection: str = "vectors",
                  encoder: str = "vectors", encoder_sha256: str | None = None, rows_per_file: int = 100_000) -> str:
    """An embeddings folder at ``url`` from vectors already in hand (benchmarks, figures, vectors
    made by another tool), readable by everything that reads ``vismem embed``'s output. ``ids``
    default to 0..n-1; ``encoder_sha256`` defaults to the sha256 of the ``encoder`` string."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    ids = np.arange(len(vectors)) if ids is None else np.asarray(ids)
    labels, uris = list(labels), list(uris)
    for number, start in enumerate(range(0, len(vectors), rows_per_file)):
        stop = min(len(vectors), start + rows_per_file)
        table = embedding_table(ids[start:stop].tolist(), uris[start:stop], labels[start:stop], vectors[start:stop])
        write_atomic(fs, f"{root}/{part_name(number)}", parquet_bytes(table))
    write_job(fs, root, {"format": FORMAT, "collection": collection, "encoder": encoder, "dim": int(vectors.shape[1]),
                         "encoder_sha256": encoder_sha256 or hashlib.sha256(encoder.encode()).hexdigest()})
    return url


# records ---------------------------------------------------------------------------------------
def read_json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def write_json(fs, path: str, value) -> None:
    write_atomic(fs, path, json.dumps(value, indent=1).encode())


def read_job(fs, root: str) -> dict | None:
    """The job record of the output folder ``root``, or None for a new folder."""
    return read_json(fs, f"{root}/{JOB_FILE}")


def write_job(fs, root: str, job: dict) -> None:
    write_json(fs, f"{root}/{JOB_FILE}", job)


def write_record(fs, root: str, record: dict) -> None:
    write_json(fs, f"{root}/{record_name(record['number'])}", record)


def read_records(fs, root: str) -> tuple[list[dict], set[int]]:
    """Every partition record under ``root`` (by number) and the numbers whose Parquet exists."""
    fs.invalidate_cache(root)                      # workers in other processes wrote here
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] if fs.exists(root) else []
    found = [(int(m[1]), m[2]) for m in map(PART.match, names) if m]
    complete = {n for n, kind in found if kind == "parquet"}
    paths = [f"{root}/{record_name(n)}" for n, kind in sorted(found) if kind == "json"]
    blobs = fs.cat(paths) if paths else {}          # s3fs fetches them concurrently
    records = [json.loads(blobs[p]) for p in paths]
    return records, complete


def write_errors(fs, root: str, errors: list[dict]) -> None:
    write_atomic(fs, f"{root}/{ERRORS_FILE}", "".join(json.dumps(e) + "\n" for e in errors).encode())


# readers ---------------------------------------------------------------------------------------
def embedding_files(url: str) -> list[str]:
    """The embedding Parquet files under ``url`` (as URLs), in order."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    fs.invalidate_cache(root)                      # workers in other processes may have written here
    if not fs.exists(root):
        raise FileNotFoundError(f"no embeddings at {url}")
    files = sorted(protocol_prefix(url) + p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no embedding Parquet files (part-*.parquet) under {url}")
    return files


def embedding_dim(schema: pa.Schema, path: str) -> int:
    """The dimension of a file's ``embedding`` column; an error naming the file when it has none."""
    if "embedding" not in schema.names or not pa.types.is_fixed_size_list(schema.field("embedding").type):
        raise ValueError(f"{path} is not an embeddings file: it needs an 'embedding' fixed-size list column "
                         f"(columns: {', '.join(schema.names)})")
    return schema.field("embedding").type.list_size


def iter_embeddings(url: str) -> Iterator[tuple[str, pa.Table]]:
    """(file URL, table) for each embedding Parquet file under ``url``, one file in memory at a time.

    Every file must hold vectors of the same dimension: embeddings of two encoders never mix.
    """
    first = None
    for path in embedding_files(url):
        with fsspec.open(path, "rb") as f:
            table = pq.read_table(f)
        dim = embedding_dim(table.schema, path)
        if first is None:
            first = path, dim
        elif dim != first[1]:
            raise ValueError(f"{url} mixes embedding dimensions: {first[0]} has {first[1]}-d vectors, {path} has "
                             f"{dim}-d; keep one encoder's embeddings per folder")
        yield path, table


def read_embeddings(url: str) -> pa.Table:
    """All embedding Parquet under ``url`` as one table (id, uri, label, embedding), sorted by id."""
    return pa.concat_tables(table for _, table in iter_embeddings(url)).sort_by("id")


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as a float32 ``[n, dim]`` array."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


# the encoder behind them -----------------------------------------------------------------------
def embedding_encoder(embeddings_url: str) -> dict:
    """The encoder recorded by the embedding job that wrote ``embeddings_url``."""
    with fsspec.open(embeddings_url.rstrip("/") + "/" + JOB_FILE) as f:
        job = json.load(f)
    return {"name": job["encoder"], "sha256": job["encoder_sha256"]}


def read_memory_embeddings(manifest, memory_url: str, url: str) -> tuple[pa.Table, np.ndarray]:
    """(table, vectors) of the embeddings at ``url``, refused unless they come from the encoder of
    the memory at ``memory_url`` (``manifest``: its current Manifest): vectors to add to it, or
    queries to measure or prune it with."""
    table = read_embeddings(url)
    vectors = embedding_matrix(table)
    check_embeddings_encoder(manifest, memory_url, embedding_encoder(url), vectors.shape[1], url)
    return table, vectors


def check_embeddings_encoder(manifest, memory_url: str, encoder: dict, dim: int, source: str,
                             remedy: str = "embed the images with the memory's encoder") -> None:
    """Vectors joining a memory (added to it, built into its next version, or searched as its
    queries) must come from the memory's encoder (``manifest``: the memory's current Manifest) and
    have its dimension: similarities between two encoders' vectors mean nothing. The refusal names
    the memory, ``source``, both encoders and both dimensions, and ends with ``remedy``."""
    if encoder.get("sha256") != manifest.encoder.get("sha256") or dim != manifest.dim:
        raise ValueError(f"memory {memory_url} holds vectors of encoder {manifest.encoder.get('name')} "
                         f"(sha256 {str(manifest.encoder.get('sha256'))[:12]}, {manifest.dim}-d); {source} holds "
                         f"vectors of encoder {encoder.get('name')} (sha256 {str(encoder.get('sha256'))[:12]}, "
                         f"{dim}-d); {remedy}")
