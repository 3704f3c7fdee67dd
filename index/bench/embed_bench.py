"""``vismem embed --bench``: images/s of the embedding pipeline beside the bare encoder on the same images.

For each encoder: make a collection of real encoded images (procedural images saved as PNG below
128 px, JPEG above, at a realistic source size: 4:3, twice the encoder's input up to 320 px wide)
or take ``collection``; embed it with the real job (``plan_embedding`` + ``run_embedding``: Ray
Data decode tasks, the encoder actor pool, Parquet written) into a fresh folder; then, in the same
process and run, time the encoder's forward pass alone (``Encoder.embed_pixels``, same batch size,
best of ``repeats``) on the same images already decoded and resized. The ratio of the two is the
figure to read (the machine is shared, absolute images/s drift).

The pipeline's images/s is its steady state: the images of the partitions that finish after each
actor has finished one, over the seconds from then to the last (so neither the actors' start-up
nor the partitions they began during it count); ``wall_s`` and ``wall_img_s`` count from the call,
Ray Data's start-up and the first partition included (``first_partition_s``). On CPUs decoding and
the encoder share the cores, so the record also gives the CPU time of reading, decoding and
resizing one image (``decode_cpu_ms``) beside that of one forward pass (``forward_cpu_ms``):
with both on every core the pipeline reaches about ``cpu_ceiling = forward / (forward + decode)``
of the bare encoder (a little more where single-threaded actors use a core better than the bare
encoder's threads do: 4% on 2 cores for tiny-cpu). The default collection (16,384 images) keeps
every stage busy for several partitions after start-up; a small one measures little more than the
encoder alone (with decode tasks, they can decode all of it while the encoder actors start).

Ray, torch and the embedding job are imported where they are used: the CLI reads this module's
defaults for ``--help``, before Ray may be imported (``cluster.runtime.loopback_only``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa

from index.ingest.collections import list_inputs
from procdata.storage import parquet_bytes

if TYPE_CHECKING:
    from encoder import Encoder

log = logging.getLogger("vismem.index.embed_bench")
GENERATORS = ("shader", "spectral")        # smooth and textured: realistic compressed sizes


@dataclass
class EmbedBenchConfig:
    encoders: tuple[str, ...] = ("random-init:tiny-cpu",)
    images: int = 16384                   # synthetic images (ignored with a collection)
    collection: str | None = None         # a collection URL instead of synthetic images
    source_size: int | None = None        # synthetic image width (height 3/4 of it); None: 2 × input, ≤ 320
    layout: str = "parquet"               # synthetic collection: "parquet" (image bytes) or "folder" (one file each)
    partition_size: int | None = None     # None: a sixteenth of the collection
    batch_size: int = 256                 # images per forward pass, pipeline and bare alike
    concurrency: int | None = None        # encoder actors (None: the job's default, see encoder_pool)
    decode: str = "auto"                  # where images are decoded: "tasks", "actors" or "auto" (encoder_pool)
    repeats: int = 3                      # bare forward passes timed (the best counts)
    workdir: str | None = None            # where the collection and embeddings go (default: a temporary folder)
    seed: int = 0


def source_size(encoder: Encoder) -> int:
    """The default synthetic image width for ``encoder``: twice its input, at most 320 px."""
    return min(2 * encoder.arch.img_size, 320)


def write_collection(url: str, images: int, width: int, layout: str, seed: int = 0) -> str:
    """``images`` procedural images of ``width`` × ``3/4 width`` px, encoded (PNG below 128 px, JPEG
    quality 90 above), as a collection at ``url``: Parquet files of 1024 images (``image``,
    ``label``) or a folder tree ``url/<generator>/<n>.<ext>``. Returns ``url``."""
    from PIL import Image

    from procdata.generators import generate         # torch: see the module docstring
    if layout not in ("parquet", "folder"):
        raise ValueError(f"layout must be 'parquet' or 'folder', got {layout!r}")
    fmt, ext = ("PNG", "png") if width < 128 else ("JPEG", "jpg")
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    height = max(1, width * 3 // 4)
    for first in range(0, images, 1024):
        blobs, labels = [], []
        count = min(1024, images - first)
        for g, name in enumerate(GENERATORS):
            indices = range(first + g, first + count, len(GENERATORS))
            if not indices:
                continue
            if layout == "folder":
                fs.makedirs(f"{root}/{name}", exist_ok=True)
            for n, pixels in zip(indices, generate(name, seed, indices, size=width)[:, :, :height]):
                buf = io.BytesIO()
                Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buf, format=fmt, quality=90)
                if layout == "folder":
                    fs.pipe_file(f"{root}/{name}/{n:07d}.{ext}", buf.getvalue())
                blobs.append(buf.getvalue())
                labels.append(name)
        if layout == "parquet":
            fs.pipe_file(f"{root}/images-{first // 1024:05d}.parquet",
                         parquet_bytes(pa.table({"image": pa.array(blobs, pa.binary()), "label": labels})))
    return url


def timed_run(plan, cfg: EmbedBenchConfig, actors: int) -> dict:
    """Run the embedding job of ``plan``: seconds from the call, seconds to the first finished
    partition, the steady images/s (after the first ``actors`` partitions finished: one per
    actor), and the unreadable images."""
    from index.ingest.job import run_embedding       # Ray: see the module docstring
    finished = []                                     # (seconds since the call, images) per finished partition
    start = time.perf_counter()
    summary = run_embedding(plan, cfg.concurrency, cfg.batch_size,
                            progress=lambda n: finished.append((time.perf_counter() - start, n)), decode=cfg.decode)
    wall = time.perf_counter() - start
    first = min(actors, len(finished)) - 1
    after = finished[-1][0] - finished[first][0] if finished else 0
    return {"wall_s": wall, "first_partition_s": finished[0][0],
            "steady": sum(n for _, n in finished[first + 1:]) / after if after > 0 else None,
            "errors": summary.errors}


def timed_bare(encoder: Encoder, plan, cfg: EmbedBenchConfig) -> dict:
    """Decode and resize the plan's images here (CPU time per image), then time the forward pass
    alone on them: best of ``cfg.repeats``, wall and CPU time."""
    from index.ingest.job import decode              # Ray: see the module docstring
    cpu = time.process_time()
    pixels = np.concatenate([decode(part, encoder.resize).pixels for part in plan.partitions])
    decode_cpu = (time.process_time() - cpu) / max(1, len(pixels))
    encoder.embed_pixels(pixels[:cfg.batch_size], cfg.batch_size)                      # warm-up
    best, best_cpu = math.inf, math.inf
    for _ in range(cfg.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        encoder.embed_pixels(pixels, cfg.batch_size)
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu)
    return {"bare_img_s": len(pixels) / best, "decode_cpu_ms": 1000 * decode_cpu,
            "forward_cpu_ms": 1000 * best_cpu / len(pixels)}


def bench_one(spec: str, cfg: EmbedBenchConfig, work: str, cluster: dict) -> dict:
    """One encoder's record: pipeline and bare images/s, their ratio, and what explains it."""
    from encoder import Encoder                      # torch and Ray: see the module docstring
    from index.ingest.job import current_pool, plan_embedding
    encoder = Encoder.load(spec)
    width = cfg.source_size or source_size(encoder)
    slug = spec.replace(":", "-").replace("/", "-")
    collection = cfg.collection or write_collection(f"{work}/{slug}/collection", cfg.images, width, cfg.layout,
                                                    cfg.seed)
    images = sum(i.get("rows", 1) for i in list_inputs(collection))
    partition_size = cfg.partition_size or max(1, math.ceil(images / 16))
    plan = plan_embedding(collection, spec, f"{work}/{slug}/embeddings", partition_size)
    if len(plan.pending) != len(plan.partitions):
        raise ValueError(f"{work}/{slug}/embeddings already holds embeddings: give an empty --workdir")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    pool = current_pool(cfg.concurrency, len(plan.pending), cfg.decode)        # what the job will get
    log.info("%s: embedding %d images in %d partitions through the pipeline (%d actors, decoding in %s)", spec,
             images, len(plan.pending), pool.actors, "tasks" if pool.decode_tasks else "the actors")
    run = timed_run(plan, cfg, pool.actors)
    log.info("%s: timing the bare forward pass on the same images", spec)
    bare = timed_bare(encoder, plan, cfg)
    rate = run["steady"]
    ceiling = bare["forward_cpu_ms"] / (bare["forward_cpu_ms"] + bare["decode_cpu_ms"])
    return {"bench": "embed", "encoder": spec, "image_size": encoder.arch.img_size,
            "source": "collection" if cfg.collection else f"{width}x{max(1, width * 3 // 4)} {cfg.layout}",
            "images": images, "errors": run["errors"], "partitions": len(plan.partitions), "batch_size": cfg.batch_size,
            "device": encoder.device.type, "cpus": cluster.get("CPU"), "gpus": cluster.get("GPU", 0),
            "actors": pool.actors, "actor_threads": pool.threads, "decode": "tasks" if pool.decode_tasks else "actors",
            "pipeline_img_s": None if rate is None else round(rate, 1), "bare_img_s": round(bare["bare_img_s"], 1),
            "ratio": None if rate is None else round(rate / bare["bare_img_s"], 3),
            "wall_s": round(run["wall_s"], 2), "wall_img_s": round(images / run["wall_s"], 1),
            "first_partition_s": round(run["first_partition_s"], 2),
            "decode_cpu_ms": round(bare["decode_cpu_ms"], 3), "forward_cpu_ms": round(bare["forward_cpu_ms"], 3),
            "cpu_ceiling": round(ceiling, 3) if encoder.device.type == "cpu" else None,
            "load_avg": None if load is None else round(load, 2)}


def run(cfg: EmbedBenchConfig, emit=print) -> dict:
    """Benchmark each encoder of ``cfg`` (Ray must be up); ``emit`` gets one record per encoder."""
    import ray                                       # Ray: see the module docstring
    if cfg.images <= 0 or cfg.batch_size <= 0 or (cfg.concurrency or 1) <= 0 or cfg.repeats <= 0:
        raise ValueError("images, batch size, concurrency and repeats must be positive")
    cpus = ray.cluster_resources()
    records = []
    with tempfile.TemporaryDirectory(prefix="vismem-embed-bench-") as tmp:
        work = (cfg.workdir or tmp).rstrip("/")
        for spec in cfg.encoders:
            records.append(bench_one(spec, cfg, work, cpus))
            emit(records[-1])
    return {"records": records}
