"""Generator throughput: images/s per generator and size, on one core, on all cores (one process
per core, each single-threaded) and on the GPU when there is one."""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, Sequence

import torch

from procdata.generators import GENERATORS, generate


def images_per_second(name: str, size: int, device: str = "cpu", batch: int = 256, seconds: float = 2.0,
                      threads: int | None = 1, seed: int = 0) -> float:
    """Generate batches of ``name`` for about ``seconds`` (after one warm-up batch); images/s."""
    if threads:
        torch.set_num_threads(threads)
    generate(name, seed, range(min(batch, 8)), size, device)                 # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    done, start, next_index = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds or done == 0:
        generate(name, seed, range(next_index, next_index + batch), size, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        done += batch
        next_index += batch
    return done / (time.perf_counter() - start)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _one_core(args) -> float:
    name, size, batch, seconds, worker = args
    return images_per_second(name, size, "cpu", batch, seconds, threads=1, seed=worker)


def bench(generators: Sequence[str] | None = None, sizes: Sequence[int] = (64, 224), batch: int = 128,
          seconds: float = 2.0, all_cores: bool = True) -> Iterator[dict]:
    """Yield one record per (generator, size, device, workers)."""
    cores = available_cores()
    names = list(generators or GENERATORS)
    for size in sizes:
        for name in names:
            per_batch = max(8, batch * 64 * 64 // (size * size)) if size > 64 else batch
            yield {"generator": name, "size": size, "device": "cpu", "workers": 1,
                   "images_per_s": round(images_per_second(name, size, "cpu", per_batch, seconds), 1)}
            if all_cores and cores > 1:
                with ProcessPoolExecutor(cores) as pool:
                    rates = list(pool.map(_one_core, [(name, size, per_batch, seconds, w) for w in range(cores)]))
                yield {"generator": name, "size": size, "device": "cpu", "workers": cores,
                       "images_per_s": round(sum(rates), 1)}
            if torch.cuda.is_available():
                yield {"generator": name, "size": size, "device": "cuda", "workers": 1,
                       "images_per_s": round(images_per_second(name, size, "cuda", 4 * batch, seconds, threads=None), 1)}
