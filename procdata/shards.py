"""Writing a procedural data set as Parquet shards with a pool of Ray actors, for sharing and
reproducing it (training streams on the fly and needs none of this).

Shard k holds images ``k·S .. (k+1)·S − 1`` of one generator and seed, with columns ``image``
(encoded bytes), ``generator``, ``seed``, ``index``. Each shard is written under a temporary name
and moved into place, so a shard that exists is complete; a re-run skips those. ``manifest.json``
is written last.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from procdata.generators import generate, get_generator
from procdata.storage import check_writable, parquet_bytes, write_atomic

log = logging.getLogger("vismem.procdata.shards")
FORMATS = ("png", "jpeg")


@dataclass
class ShardJob:
    generator: str
    n: int
    size: int
    out: str
    seed: int = 0
    shard_size: int = 1000
    format: str = "png"

    def check(self) -> None:
        """Every bad argument fails here, before Ray starts or anything is written."""
        get_generator(self.generator)
        for name in ("n", "size", "shard_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.format not in FORMATS:
            raise ValueError(f"unknown image format {self.format!r}; choose one of: {', '.join(FORMATS)}")
        check_writable(self.out, "data set")   # never creates a bucket or a path the user did not ask for

    @property
    def shards(self) -> int:
        return -(-self.n // self.shard_size)

    def shard_path(self, k: int) -> str:
        return f"{self.out.rstrip('/')}/shard-{k:05d}.parquet"


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return buf.getvalue()


def write_shard(job: ShardJob, k: int, device: str = "cpu", batch: int = 256) -> int:
    """Generate and write shard ``k`` of ``job``; returns its number of images."""
    start, stop = k * job.shard_size, min(job.n, (k + 1) * job.shard_size)
    encoded = []
    for first in range(start, stop, batch):
        images = generate(job.generator, job.seed, range(first, min(stop, first + batch)), job.size, device)
        encoded += [encode(im, job.format) for im in images.permute(0, 2, 3, 1).cpu().numpy()]
    table = pa.table({"image": pa.array(encoded, pa.binary()), "generator": [job.generator] * len(encoded),
                      "seed": pa.array([job.seed] * len(encoded), pa.int64()),
                      "index": pa.array(range(start, stop), pa.int64())})
    fs, path = fsspec.core.url_to_fs(job.shard_path(k))
    write_atomic(fs, path, parquet_bytes(table))
    return len(encoded)


def write_shards(job: ShardJob, workers: int | None = None, progress=None) -> dict:
    """Write every missing shard of ``job`` with a pool of Ray actors; returns the manifest."""
    import ray                                  # Ray: only the sharded writer needs it
    from ray.util import ActorPool              # (see above)

    job.check()
    fs, root = fsspec.core.url_to_fs(job.out)
    todo = [k for k in range(job.shards) if not fs.exists(job.shard_path(k))]
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = workers or max(1, gpus or int(ray.cluster_resources().get("CPU", 1)))
    Writer = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)(ShardWriter)
    pool = ActorPool([Writer.remote("cuda" if gpus else "cpu") for _ in range(min(workers, max(1, len(todo))))])
    started, done = time.time(), 0
    for count in pool.map_unordered(lambda actor, k: actor.write.remote(job, k), todo):
        done += count
        if progress:
            progress(done, sum(min(job.n, (k + 1) * job.shard_size) - k * job.shard_size for k in todo),
                     done / max(1e-9, time.time() - started))
    manifest = {**asdict(job), "shards": [job.shard_path(k).rsplit("/", 1)[-1] for k in range(job.shards)],
                "columns": ["image", "generator", "seed", "index"], "written_this_run": len(todo)}
    write_atomic(fs, f"{root.rstrip('/')}/manifest.json", json.dumps(manifest, indent=2).encode())   # last: complete
    return manifest


class ShardWriter:
    """A Ray actor that writes whole shards (one thread per CPU actor: the pool is the parallelism)."""

    def __init__(self, device: str = "cpu"):
        if device == "cpu":
            torch.set_num_threads(1)
        self.device = device

    def write(self, job: ShardJob, k: int) -> int:
        return write_shard(job, k, self.device)
