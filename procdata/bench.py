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


def check_device(name: str) -> str:
    """``name`` as a torch device string this machine has (cpu, cuda, cuda:N), or an error naming it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA GPU is visible to torch here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: only cpu and cuda devices are supported")
    return str(device)


def bench(generators: Sequence[str] | None = None, sizes: Sequence[int] = (64, 224), batch: int = 128,
          seconds: float = 2.0, all_cores: bool = True, devices: Sequence[str] | None = None) -> Iterator[dict]:
    """Yield one record per (generator, size, device, workers). ``devices`` defaults to the CPU
    (one core, then all cores) and the GPU when there is one."""
    cores = available_cores()
    names = list(generators or GENERATORS)
    devices = list(devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))
    for size in sizes:
        for name in names:
            per_batch = max(8, batch * 64 * 64 // (size * size)) if size > 64 else batch
            if "cpu" in devices:
                yield {"generator": name, "size": size, "device": "cpu", "workers": 1,
                       "images_per_s": round(images_per_second(name, size, "cpu", per_batch, seconds), 1)}
            if "cpu" in devices and all_cores and cores > 1:
                with ProcessPoolExecutor(cores) as pool:
                    rates = list(pool.map(_one_core, [(name, size, per_batch, seconds, w) for w in range(cores)]))
                yield {"generator": name, "size": size, "device": "cpu", "workers": cores,
                       "images_per_s": round(sum(rates), 1)}
            for device in (d for d in devices if d.startswith("cuda")):
                yield {"generator": name, "size": size, "device": device, "workers": 1,
                       "images_per_s": round(images_per_second(name, size, device, gpu_batch(size), seconds,
                                                               threads=None), 1)}


def gpu_batch(size: int) -> int:
    """A batch big enough to fill a GPU: 512 images at 224 px, more when smaller (about 75 MB of uint8)."""
    return max(512, min(16384, 512 * 224 * 224 // (size * size)))
