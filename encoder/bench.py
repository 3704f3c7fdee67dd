"""Encoder throughput: DINO training images/s through Ray Train at each worker count, or in one
process without Ray (``local``), with the share of step time spent generating and augmenting
procedural data; and embedding images/s. Both time the one training loop, encoder.loop."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Iterator, Sequence

import torch

from encoder.config import preset


def train_throughput(preset_name: str, workers: int, steps: int = 80, use_gpu: bool | None = None) -> dict:
    """Train ``steps`` steps on ``workers`` Ray Train workers; images/s after the first 3 steps."""
    from encoder.train import train
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    cfg = dataclasses.replace(preset(preset_name, workers=workers, max_steps=steps, use_gpu=use_gpu,
                                     log_every=10 ** 9, checkpoint_every=10 ** 9), max_minutes=None)
    metrics: dict = {}
    with tempfile.TemporaryDirectory(prefix="vismem-bench-") as out:
        train(cfg, out, result_metrics=metrics)
    rate = float(metrics["images_per_s"])
    return {"bench": "train", "preset": preset_name, "device": "cuda" if use_gpu else "cpu", "workers": workers,
            "batch_per_worker": cfg.batch_size, "steps": steps, "images_per_s": round(rate, 1),
            "images_per_s_per_worker": round(rate / workers, 1), "data_share": round(float(metrics["data_share"]), 3)}


def local_train_throughput(preset_name: str, steps: int = 80, device: str | None = None, **overrides) -> dict:
    """Train ``steps`` steps in this process on ``device`` (default: the GPU when there is one),
    no Ray and no checkpoints written; images/s after the first 3 steps. ``overrides`` replace
    fields of the preset (e.g. ``batch_size``)."""
    from encoder.local import LocalSession, default_device, local_config
    from encoder.loop import train_worker
    torch_device = torch.device(device) if device else default_device()
    cfg = local_config(dataclasses.replace(preset(preset_name, max_steps=steps, log_every=10 ** 9,
                                                  checkpoint_every=10 ** 9, **overrides), max_minutes=None),
                       torch_device)
    final = train_worker(cfg, LocalSession(torch_device, out_url=None))
    rate = float(final["images_per_s"])
    return {"bench": "train", "preset": preset_name, "device": str(torch_device), "workers": 1, "ray": False,
            "batch_per_worker": cfg.batch_size, "image_size": cfg.arch.img_size, "precision": cfg.precision,
            "steps": steps, "images_per_s": round(rate, 1), "images_per_s_per_worker": round(rate, 1),
            "data_share": round(float(final["data_share"]), 3)}


def embed_throughput(preset_name: str, images: int = 2048, batch_size: int = 256, device: str | None = None) -> dict:
    """Embedding images/s of the preset's network (random weights: speed does not depend on them)."""
    from encoder.embed import Encoder
    encoder = Encoder.load(f"random-init:{preset_name}", device=device)
    size = encoder.arch.img_size
    batch = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8)
    encoder.embed(batch[:batch_size], batch_size)                          # warm-up
    start = time.perf_counter()
    encoder.embed(batch, batch_size)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    rate = images / (time.perf_counter() - start)
    return {"bench": "embed", "preset": preset_name, "device": encoder.device.type, "workers": 1,
            "image_size": size, "images_per_s": round(rate, 1)}


def bench(presets: Sequence[str], worker_counts: Sequence[int], steps: int = 80) -> Iterator[dict]:
    """One record per (preset, worker count) for training, then one per preset for embedding."""
    for name in presets:
        runs = [train_throughput(name, w, steps) for w in worker_counts]
        base = runs[0]["images_per_s"]
        for run in runs:
            run["speedup_vs_first"] = round(run["images_per_s"] / base, 2) if base else float("nan")
            yield run
        yield embed_throughput(name)


def bench_local(presets: Sequence[str], steps: int = 80, device: str | None = None) -> Iterator[dict]:
    """One training record per preset timed in this process, then its embedding record."""
    for name in presets:
        yield local_train_throughput(name, steps, device)
        yield embed_throughput(name, device=device)


def default_worker_counts() -> list[int]:
    """1 and 2 workers, and one per core or GPU: the scaling figures."""
    from procdata.bench import available_cores
    devices = torch.cuda.device_count() or available_cores()
    return sorted({1, min(2, devices), devices})
