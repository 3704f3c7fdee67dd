"""Batch embedding of a real image collection with Ray Data: a pool of encoder actors.

``plan_embedding`` lists the collection, compares it with what the output folder already records
and writes one record per new partition (the layout is in ``index.embeddings``). ``run_embedding``
makes each pending partition one row of a Ray Dataset; an actor of the pool reads its images,
embeds them and writes the partition's record (with its unreadable images) and then its Parquet
straight to the output URL, so no image or vector passes through the driver.

Running again into the same output: inputs already recorded and unchanged are skipped; new inputs
(a collection that grew) go into new partitions numbered after the existing ones, with ids after
the largest one used, so no id already handed out changes; a recorded input that changed or
disappeared is refused. A killed job resumes: a record without its Parquet is redone with the same
inputs and ids. Every run ends by checking that each image of the collection is either embedded or
listed as unreadable.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable

import fsspec
import numpy as np
import ray
from ray.util.debug import log_once

from encoder import Encoder
from index.collections import Partition, decode_partition, list_inputs, make_partitions
from index.embeddings import (ERRORS_FILE, FORMAT, JOB_FILE, embedding_table, part_name, read_job, read_records, write_errors,
                              write_job, write_record)
from procdata.storage import check_writable, parquet_bytes, write_atomic

log = logging.getLogger("vismem.index.embed")


@dataclass
class EmbedSummary:
    out: str
    encoder: str
    dim: int
    partitions: int
    computed: int              # partitions embedded by this run (the rest existed)
    images: int                # vectors written, over all partitions
    errors: int                # unreadable images, over all partitions
    total: int                 # images in the collection: always images + errors


class EmbedPartitions:
    """Ray Data actor: loads the encoder once, then embeds and writes whole partitions."""

    def __init__(self, encoder_spec: str, out_url: str, batch_size: int = 256):
        self.encoder = Encoder.load(encoder_spec)
        self.fs, self.root = fsspec.core.url_to_fs(out_url)
        self.root = self.root.rstrip("/")
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        done = [self.embed_one(Partition(**json.loads(spec))) for spec in batch["partition"]]
        return {"images": np.array(done, dtype=np.int64)}

    def embed_one(self, part: Partition) -> int:
        """Embed ``part``, write its record, then its Parquet (which marks it complete); its size."""
        decoded, errors = decode_partition(part)
        ids, uris, labels, images = (list(column) for column in zip(*decoded)) if decoded else ([], [], [], [])
        vectors = self.encoder.embed(images, self.batch_size) if images else np.zeros((0, self.encoder.dim), np.float32)
        write_record(self.fs, self.root, {**partition_record(part), "embedded": len(ids), "errors": errors})
        write_atomic(self.fs, f"{self.root}/{part_name(part.number)}",
                     parquet_bytes(embedding_table(ids, uris, labels, vectors)))
        return len(part)


def partition_record(part: Partition) -> dict:
    return {"number": part.number, "first_id": part.first_id, "count": len(part), "inputs": part.inputs}


@dataclass
class EmbeddingPlan:
    """What an embedding job will do, worked out (and checked) before any Ray work starts."""

    collection: str
    encoder_spec: str
    out: str
    encoder: Encoder
    partitions: list[Partition]    # every partition of the output once this job is done
    pending: list[Partition]       # those this job embeds
    images: int                    # images in the collection

    @property
    def pending_images(self) -> int:
        """Images this job reads: the total of a progress bar."""
        return sum(len(p) for p in self.pending)


def plan_embedding(collection_url: str, encoder_spec: str, out_url: str, partition_size: int = 512) -> EmbeddingPlan:
    """List the collection, load the encoder, check the output folder and what it already holds,
    then record the new partitions. Every bad input (or changed collection) fails here, before Ray
    starts and before anything is written; the records are written last, in order."""
    if partition_size <= 0:
        raise ValueError("partition size must be positive")
    encoder = Encoder.load(encoder_spec)
    inputs = list_inputs(collection_url)
    fs, root = check_writable(out_url, "embeddings output")
    job = {"format": FORMAT, "collection": collection_url, "encoder": encoder.name,
           "encoder_sha256": encoder.sha256, "dim": encoder.dim}
    previous = read_job(fs, root)
    records, complete = read_records(fs, root)
    check_same_job(previous, job, out_url, bool(records or complete))
    added = make_partitions(new_inputs(inputs, records, collection_url, out_url), partition_size,
                            max((r["number"] + 1 for r in records), default=0),
                            max((r["first_id"] + r["count"] for r in records), default=0))

    if previous is None:
        write_job(fs, root, job)
    for part in added:             # in order: a plan killed half-way leaves a prefix that the next plan extends
        write_record(fs, root, partition_record(part))
    recorded = [Partition(r["number"], r["first_id"], r["inputs"]) for r in records]
    pending = [p for p in recorded if p.number not in complete] + added
    log.info("%s: %d partitions, %d to embed (%d new)", collection_url, len(recorded) + len(added), len(pending),
             len(added))
    return EmbeddingPlan(collection_url, encoder_spec, out_url, encoder, recorded + added, pending,
                         sum(i.get("rows", 1) for i in inputs))


def check_same_job(previous: dict | None, job: dict, out_url: str, has_parts: bool) -> None:
    """Refuse to mix vectors of two encoders (or two collections) in one output folder."""
    if previous is None:
        if has_parts:
            raise ValueError(f"{out_url} holds part files but no {JOB_FILE}; choose another --out")
        return
    if previous.get("format") != FORMAT:
        raise ValueError(f"{out_url} holds embeddings written by an older vismem (without per-input records), "
                         "which cannot be extended; choose a new --out")
    for key in ("collection", "encoder_sha256"):
        if previous.get(key) != job[key]:
            raise ValueError(f"{out_url} already holds embeddings with {key}={previous.get(key)!r}, not "
                             f"{job[key]!r}; choose another --out or delete it")


def new_inputs(listed: list[dict], records: list[dict], collection_url: str, out_url: str) -> list[dict]:
    """The listed inputs that no record holds (for a Parquet file recorded in part: its remaining
    rows). Refuses when a recorded input changed or disappeared: its vectors would be stale."""
    recorded: dict[str, dict] = {}
    for entry in (e for r in records for e in r["inputs"]):
        seen = recorded.setdefault(entry["uri"], dict(entry))
        if "stop" in entry:
            seen["stop"] = max(seen["stop"], entry["stop"])
    now = {entry["uri"]: entry for entry in listed}
    removed = [uri for uri in recorded if uri not in now]
    changed = [uri for uri, entry in recorded.items() if uri in now and not same_file(entry, now[uri])]
    if removed or changed:
        raise ValueError(f"{collection_url} changed since it was embedded into {out_url}: "
                         + "; ".join(f"{what} {len(uris)}: {', '.join(uris[:5])}{' ...' if len(uris) > 5 else ''}"
                                     for what, uris in (("changed", changed), ("removed", removed)) if uris)
                         + ". Vectors already written cannot be replaced in place: restore those files, or embed "
                           "the collection into a new --out")
    fresh = []
    for entry in listed:
        seen = recorded.get(entry["uri"])
        if seen is None:
            fresh.append(entry)
        elif "rows" in entry and seen["stop"] < entry["rows"]:
            fresh.append({**entry, "start": seen["stop"]})
    return fresh


def same_file(recorded: dict, listed: dict) -> bool:
    return all(recorded.get(key) == listed.get(key) for key in ("size", "etag", "mtime", "rows"))


def run_embedding(plan: EmbeddingPlan, concurrency: int = 2, batch_size: int = 256,
                  progress: Callable[[int], object] | None = None) -> EmbedSummary:
    """Embed the plan's pending partitions on a pool of Ray actors, then summarise.

    ``progress(n)`` is called in the caller's process each time a partition finishes, with its
    number of images (embedded or unreadable); ``plan.pending_images`` is their total, so
    ``tqdm(total=plan.pending_images).update`` fits.
    """
    if plan.pending:
        for row in embedding_dataset(plan, concurrency, batch_size).iter_rows():
            if progress is not None:
                progress(int(row["images"]))
    fs, root = fsspec.core.url_to_fs(plan.out)
    return summarise(fs, root.rstrip("/"), plan)


def embedding_dataset(plan: EmbeddingPlan, concurrency: int, batch_size: int) -> ray.data.Dataset:
    """One row per pending partition, mapped by a pool of ``EmbedPartitions`` actors."""
    use_gpu = bool(ray.cluster_resources().get("GPU"))
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start
    context.enable_progress_bars = context.print_on_execution_start = False   # the caller shows progress
    log_once("ray_data_progress_manager_disabled")     # and Ray's notice "Progress bars disabled" would confuse
    try:                                               # (a dataset copies the context: restoring it is safe)
        ds = ray.data.from_items([{"partition": json.dumps(p.to_dict())} for p in plan.pending],
                                 override_num_blocks=len(plan.pending))
        return ds.map_batches(EmbedPartitions, fn_constructor_args=(plan.encoder_spec, plan.out, batch_size),
                              batch_size=1,
                              compute=ray.data.ActorPoolStrategy(size=max(1, min(concurrency, len(plan.pending)))),
                              num_gpus=1 if use_gpu else None, num_cpus=None if use_gpu else 0.5)
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved


def embed_collection(collection_url: str, encoder_spec: str, out_url: str, partition_size: int = 512,
                     concurrency: int = 2, batch_size: int = 256,
                     progress: Callable[[int], object] | None = None) -> EmbedSummary:
    """Embed every image of ``collection_url`` into Parquet under ``out_url`` (resumable, extendable)."""
    plan = plan_embedding(collection_url, encoder_spec, out_url, partition_size)
    return run_embedding(plan, concurrency, batch_size, progress)


def summarise(fs, root: str, plan: EmbeddingPlan) -> EmbedSummary:
    """Collect every partition's errors into ``errors.jsonl``, count what was written, and check
    that every image of the collection is accounted for."""
    records, complete = read_records(fs, root)
    done = [r for r in records if r["number"] in complete]
    embedded = sum(r["embedded"] for r in done)
    errors = [e for r in done for e in r["errors"]]
    write_errors(fs, root, errors)
    if errors:
        log.warning("%d unreadable image(s) skipped; see %s/%s", len(errors), plan.out, ERRORS_FILE)
    if embedded + len(errors) != plan.images:
        unfinished = len(records) - len(done)
        raise RuntimeError(f"{plan.out}: {embedded} images embedded + {len(errors)} unreadable = "
                           f"{embedded + len(errors)}, but {plan.collection} holds {plan.images} images"
                           + (f"; {unfinished} partition(s) have no Parquet: run the same command again to finish them"
                              if unfinished else ""))
    return EmbedSummary(plan.out, plan.encoder.name, plan.encoder.dim, len(records), len(plan.pending), embedded,
                        len(errors), plan.images)
