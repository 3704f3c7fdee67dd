"""Batch embedding of a real image collection as a streaming Ray Data pipeline.

``plan_embedding`` lists the collection, compares it with what the output folder already records
and writes one record per new partition (the layout is in ``index.ingest.embeddings``). ``run_embedding``
makes each pending partition one row of a Ray Dataset and streams it through two steps:

1. decode: read and decode the partition's images (``decode_partition``) and resize each to the
   encoder's input (``Encoder.resize``: uint8 ``[3, S, S]``), a partition at a time, so unreadable
   images are listed with their partition;
2. ``EmbedPartitions``, an actor pool: the encoder on the partition's uint8 batch
   (``Encoder.embed_pixels``, on the device), then the partition's record (with its unreadable
   images) and its Parquet, written straight to the output URL.

Where the decode runs depends on the cluster (``encoder_pool``). With GPUs it is a stage of its own,
CPU tasks (``decode_batch``) feeding one actor per GPU, and Ray Data runs the stages concurrently:
partition i+1 is decoded while the GPU embeds partition i. On CPUs only, each actor decodes its own
partitions (one actor per CPU): the two steps would share the same cores anyway, and a stage of
their own would add the decode workers' start-up and the decoded pixels' trip through the object
store (decoding in the actors is the faster on CPUs: both layouts measured in README, "Memory at
scale", and ``eval/results/embed_bench_*``). Either way no image or vector passes through the driver. The vectors equal
``Encoder.embed``'s on the same images up to the rounding of the resized pixels to uint8 (the cosine bound
is ``tests/index/ingest/test_embed_pipeline.py``'s).

Running again into the same output: inputs already recorded and unchanged are skipped; new inputs
(a collection that grew) go into new partitions numbered after the existing ones, with ids after
the largest one used, so no id already handed out changes; a recorded input that changed or
disappeared is refused. A killed job resumes: a record without its Parquet is redone with the same
inputs and ids. An input that disappears between the plan and its reading is listed as unreadable
(each of its images). Every run ends by checking that each image of the collection is either
embedded or listed as unreadable.
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
from index.ingest.collections import Partition, decode_partition, list_inputs, make_partitions
from index.ingest.embeddings import (ERRORS_FILE, FORMAT, JOB_FILE, embedding_table, part_name, read_job, read_records,
                                     write_errors, write_job, write_record)
from procdata.storage import check_writable, parquet_bytes, write_atomic

log = logging.getLogger("vismem.index.embed")
ACTOR_START_TIMEOUT_S = 600        # seconds the pipeline waits for its encoder actors (GPUs may need a node to start)


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


# stage 1: decode (CPU tasks) -------------------------------------------------------------------
@dataclass
class DecodedPartition:
    """A partition after the decode stage: its readable images resized for the encoder, with their
    ids, URIs and labels, and one record ``{"id", "uri", "error"}`` per unreadable image."""

    part: Partition
    ids: list[int]
    uris: list[str]
    labels: list[str | None]
    pixels: np.ndarray          # uint8 [n, 3, S, S]
    errors: list[dict]

    def to_row(self) -> dict:
        meta = {"partition": self.part.to_dict(), "ids": self.ids, "uris": self.uris, "labels": self.labels,
                "errors": self.errors}
        return {"meta": json.dumps(meta), "pixels": self.pixels}

    @classmethod
    def from_row(cls, meta: str, pixels: np.ndarray) -> "DecodedPartition":
        m = json.loads(meta)
        return cls(Partition(**m["partition"]), m["ids"], m["uris"], m["labels"], pixels, m["errors"])


def decode(part: Partition, resize) -> DecodedPartition:
    """Read and decode ``part``'s images, then resize each with ``resize`` (an ``Encoder.resize``).

    Every image of ``part`` is either decoded or listed as unreadable, also when its file changed
    after the plan: a missing image file of a folder tree is one unreadable image (and a tar's
    samples are listed by ``read_partition``); a Parquet file that cannot be opened at all
    (deleted since the plan listed it, or damaged) lists each of the partition's rows, and one that
    now ends before the partition's last row lists the rows it lacks.
    """
    try:
        decoded, errors = decode_partition(part)
    except Exception as e:  # noqa: BLE001 (listed per image like any unreadable image, never fatal)
        if part.parquet is None:
            raise
        decoded, errors = [], unreadable_rows(part, range(part.start, part.stop),
                                              f"cannot read ({type(e).__name__}: {e})")
    if part.parquet is not None and len(decoded) + len(errors) < len(part):
        errors += unreadable_rows(part, range(part.start + len(decoded) + len(errors), part.stop),
                                  "the file has fewer rows than when the job was planned")
    ids, uris, labels, images = (list(column) for column in zip(*decoded)) if decoded else ([], [], [], [])
    pixels = resize.many(images)
    return DecodedPartition(part, ids, uris, labels, pixels, errors)


def unreadable_rows(part: Partition, rows: range, reason: str) -> list[dict]:
    """An error record for each of the ``rows`` of ``part``'s Parquet file (ids as numbered by the plan)."""
    return [{"id": part.first_id + row - part.start, "uri": f"{part.parquet}#row={row}",
             "error": f"{reason}: {part.parquet}"} for row in rows]


def decode_batch(batch: dict, resize) -> dict:
    """Ray Data task: one row ``{"partition": JSON}`` → one row ``{"meta": JSON, "pixels": uint8
    [n, 3, S, S]}`` of its decoded partition (the map is called with ``batch_size=1``)."""
    [spec] = batch["partition"]
    row = decode(Partition(**json.loads(spec)), resize).to_row()
    return {"meta": np.array([row["meta"]]), "pixels": row["pixels"][None]}


# stage 2: the encoder (an actor pool) ----------------------------------------------------------
class EmbedPartitions:
    """Ray Data actor: loads the encoder once, then embeds partitions on its device and writes each
    one's record and Parquet. A row is a decoded partition (``decode_batch``'s) or, where the actors
    decode (CPU-only clusters), the partition itself (``{"partition": JSON}``)."""

    def __init__(self, encoder_spec: str, out_url: str, batch_size: int = 256, threads: int | None = None):
        self.encoder = Encoder.load(encoder_spec, threads=threads)
        self.fs, self.root = fsspec.core.url_to_fs(out_url)
        self.root = self.root.rstrip("/")
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        if "partition" in batch:
            [spec] = batch["partition"]
            done = self.embed_one(Partition(**json.loads(spec)))
        else:
            [meta], [pixels] = batch["meta"], batch["pixels"]
            done = self.write(DecodedPartition.from_row(meta, pixels))
        return {"images": np.array([done], dtype=np.int64)}

    def embed_one(self, part: Partition) -> int:
        """Decode, embed and write ``part`` in this process: both stages, one after the other."""
        return self.write(decode(part, self.encoder.resize))

    def write(self, decoded: DecodedPartition) -> int:
        """Embed ``decoded``, write its record, then its Parquet (which marks it complete); its size."""
        vectors = self.encoder.embed_pixels(decoded.pixels, self.batch_size)
        part = decoded.part
        write_record(self.fs, self.root, {**partition_record(part), "embedded": len(decoded.ids),
                                          "errors": decoded.errors})
        write_atomic(self.fs, f"{self.root}/{part_name(part.number)}",
                     parquet_bytes(embedding_table(decoded.ids, decoded.uris, decoded.labels, vectors)))
        return len(part)


DECODE_WHERE = ("auto", "tasks", "actors")


@dataclass
class EncoderPool:
    """Ray resources of the pipeline: ``actors`` encoder actors of ``num_gpus`` / ``num_cpus`` each,
    torch on ``threads`` CPU threads in each (None: torch's default), and, where decoding is a stage
    of its own (``decode_tasks``), ``decode_cpus`` per decode task (else None: the actors decode)."""

    actors: int
    num_gpus: float | None
    num_cpus: float | None
    threads: int | None
    decode_cpus: float | None

    @property
    def decode_tasks(self) -> bool:
        return self.decode_cpus is not None


def encoder_pool(cluster: dict, concurrency: int | None = None, partitions: int | None = None,
                 decode: str = "auto", free_cpus: float | None = None) -> EncoderPool:
    """How the pipeline runs on a cluster with resources ``cluster`` (``ray.cluster_resources()``):
    ``concurrency`` encoder actors (default: one per GPU, or one per CPU on a CPU-only cluster; at
    most one per GPU, and no more than the ``partitions`` to embed), and where images are decoded
    (``decode``: "tasks", "actors", or "auto": tasks with GPUs, actors on CPUs only).

    With GPUs: one GPU per actor, batches on the device, Ray Data's one CPU per actor and per
    decode task. CPUs only, decoding in the actors: the pool shares out the CPUs that are free
    (``free_cpus``, ``ray.available_resources()``: a Serve deployment may hold some; default all),
    ``free / actors`` each with torch on as many threads, so each actor decodes and embeds its own
    partitions and every core is busy with one of them. CPUs only with decode tasks (what GPU
    clusters run, measured or tested on CPUs): the actors ask for a quarter of a CPU each and the
    pool for at most a quarter of the CPUs (docs/ARCHITECTURE.md §8: a pool holding every CPU starves
    the decode tasks and Ray Data deadlocks), while torch in each actor runs ``CPU // actors``
    threads (single-threaded actors lose nothing to the decode tasks beside them, where two threads
    of one actor stall on each other: README, "Memory at scale"); decode tasks ask for half a CPU, so
    that two share a core and one's work hides the pause Ray Data takes between one task and the next. The two requests always differ, so Ray Data never fuses the stages.
    """
    if concurrency is not None and concurrency <= 0:
        raise ValueError(f"concurrency must be positive, got {concurrency}")
    if decode not in DECODE_WHERE:
        raise ValueError(f"decode must be one of {', '.join(DECODE_WHERE)}, got {decode!r}")
    cpus = float(cluster.get("CPU", 1))
    gpus = int(cluster.get("GPU", 0))
    actors = min(concurrency or gpus, gpus) if gpus else concurrency or max(1, int(cpus))
    actors = min(actors, partitions) if partitions else actors
    in_tasks = decode == "tasks" or (decode == "auto" and gpus > 0)
    if gpus:
        return EncoderPool(actors, num_gpus=1, num_cpus=None, threads=None, decode_cpus=1 if in_tasks else None)
    if not in_tasks:
        free = cpus if free_cpus is None or free_cpus <= 0 else min(cpus, free_cpus)
        actors = min(actors, max(1, int(free))) if concurrency is None else actors
        return EncoderPool(actors, num_gpus=None, num_cpus=free / actors, threads=max(1, int(free // actors)),
                           decode_cpus=None)
    return EncoderPool(actors, num_gpus=None, num_cpus=min(0.25, cpus / (4 * actors)),
                       threads=max(1, int(cpus) // actors), decode_cpus=min(0.5, cpus / 2))


def current_pool(concurrency: int | None, partitions: int, decode: str = "auto") -> EncoderPool:
    """``encoder_pool`` for the connected Ray cluster as it is now: CPUs other actors hold are left to them."""
    return encoder_pool(ray.cluster_resources(), concurrency, partitions, decode, ray.available_resources().get("CPU"))


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


def run_embedding(plan: EmbeddingPlan, concurrency: int | None = None, batch_size: int = 256,
                  progress: Callable[[int], object] | None = None, decode: str = "auto") -> EmbedSummary:
    """Embed the plan's pending partitions through the Ray Data pipeline, then summarise.
    ``concurrency``: encoder actors; ``decode``: where images are decoded (see ``encoder_pool``).

    ``progress(n)`` is called in the caller's process each time a partition finishes, with its
    number of images (embedded or unreadable); ``plan.pending_images`` is their total, so
    ``tqdm(total=plan.pending_images).update`` fits.
    """
    if plan.pending:
        for row in embedding_dataset(plan, concurrency, batch_size, decode).iter_rows():
            if progress is not None:
                progress(int(row["images"]))
    fs, root = fsspec.core.url_to_fs(plan.out)
    return summarise(fs, root.rstrip("/"), plan)


def embedding_dataset(plan: EmbeddingPlan, concurrency: int | None, batch_size: int,
                      decode: str = "auto") -> ray.data.Dataset:
    """One row per pending partition → ``decode_batch`` tasks (where decoding is a stage of its
    own) → a pool of ``EmbedPartitions`` actors (``batch_size``: images per forward pass). One row
    per partition all the way, so each actor call embeds and writes one whole partition."""
    pool = current_pool(concurrency, len(plan.pending), decode)
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start, context.wait_for_min_actors_s
    context.enable_progress_bars = context.print_on_execution_start = False   # the caller shows progress
    log_once("ray_data_progress_manager_disabled")     # and Ray's notice "Progress bars disabled" would confuse
    # Decoding starts once the encoder actors are up: a cluster without room for them fails with Ray's
    # "Timed out while starting actors" instead of waiting for ever, and the decode tasks do not fill the
    # object store while the encoder loads.
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    try:                                               # (a dataset copies the context: restoring it is safe)
        ds = ray.data.from_items([{"partition": json.dumps(p.to_dict())} for p in plan.pending],
                                 override_num_blocks=len(plan.pending))
        if pool.decode_tasks:
            ds = ds.map_batches(decode_batch, fn_kwargs={"resize": plan.encoder.resize}, batch_size=1,
                                num_cpus=pool.decode_cpus)
        return ds.map_batches(EmbedPartitions,
                              fn_constructor_args=(plan.encoder_spec, plan.out, batch_size, pool.threads), batch_size=1,
                              compute=ray.data.ActorPoolStrategy(size=pool.actors), num_gpus=pool.num_gpus,
                              num_cpus=pool.num_cpus)
    finally:
        context.enable_progress_bars, context.print_on_execution_start, context.wait_for_min_actors_s = saved


def embed_collection(collection_url: str, encoder_spec: str, out_url: str, partition_size: int = 512,
                     concurrency: int | None = None, batch_size: int = 256,
                     progress: Callable[[int], object] | None = None, decode: str = "auto") -> EmbedSummary:
    """Embed every image of ``collection_url`` into Parquet under ``out_url`` (resumable, extendable)."""
    plan = plan_embedding(collection_url, encoder_spec, out_url, partition_size)
    return run_embedding(plan, concurrency, batch_size, progress, decode)


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
