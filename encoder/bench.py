"""Encoder throughput: DINO training images/s through Ray Train at each worker count, or in one
process without Ray (``local``), with the share of step time spent generating and augmenting
procedural data; and embedding images/s. Both time the one training loop, encoder.loop."""

from __future__ import annotations

import dataclasses
import io
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from encoder.config import preset
from procdata.bench import available_cores


def train_throughput(preset_name: str, workers: int, steps: int = 80, use_gpu: bool | None = None) -> dict:
    """Train ``steps`` steps on ``workers`` Ray Train workers; images/s after the first 3 steps."""
    from encoder.train import train                     # Ray Train: only the Ray path needs it
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
    from encoder.local import LocalSession, default_device, local_config   # the loop's modules: only when timed
    from encoder.loop import train_worker               # (encoder.loop imports Ray Train's session API)
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
    from encoder.embed import Encoder                   # timm: only the embedding benches load it
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
    devices = torch.cuda.device_count() or available_cores()
    return sorted({1, min(2, devices), devices})


def jpeg_images(count: int, height: int, width: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEG files (quality 90) of smooth colour fields with fine noise: decoding them costs
    what decoding photos of that size costs (the cost is in the pixel count and the entropy)."""

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class DecodeResize(torch.utils.data.Dataset):
    """Encoded images → uint8 ``[3, S, S]`` with the encoder's CPU step (decode, then ``Encoder.resize``)."""

    def __init__(self, blobs: list[bytes], resize):
        self.blobs, self.resize = blobs, resize

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int):
        from encoder.embed import decode_image          # timm: only the embedding benches load it
        return torch.from_numpy(self.resize(decode_image(self.blobs[i])))


def pipeline_throughput(preset_name: str, images: int, source: tuple[int, int], workers: Sequence[int],
                        batch_size: int = 256, device: str | None = None) -> dict:
    """Embedding fed by CPU decode-and-resize workers (torch DataLoader processes: the GPU check runs
    without Ray; the Ray Data pipeline runs the same two steps) against the bare forward pass on the
    same pixels, and one core's decode-and-resize rate: how many CPU cores keep one device busy."""
    from encoder.embed import Encoder                   # timm: only the embedding benches load it
    encoder = Encoder.load(f"random-init:{preset_name}", device=device)
    blobs = jpeg_images(min(images, 256), *source)
    blobs = [blobs[i % len(blobs)] for i in range(images)]
    data = DecodeResize(blobs, encoder.resize)
    start = time.perf_counter()
    pixels = torch.stack([data[i] for i in range(min(images, 512))])
    one_core = len(pixels) / (time.perf_counter() - start)
    pixels = torch.cat([pixels] * -(-images // len(pixels)))[:images]
    encoder.embed_pixels(pixels[:batch_size], batch_size)                  # warm-up
    bare = max(images / timed(lambda: encoder.embed_pixels(pixels, batch_size)) for _ in range(2))
    record = {"bench": "embed_pipeline", "preset": preset_name, "device": encoder.device.type, "images": images,
              "source_px": list(source), "image_size": encoder.arch.img_size, "bare_images_per_s": round(bare, 1),
              "decode_resize_per_core_images_per_s": round(one_core, 1),
              "cores_for_bare_rate": round(bare / one_core, 1), "loader": []}
    for n in workers:
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=n, pin_memory=False,
                                             prefetch_factor=4 if n else None, persistent_workers=False)

        def run():
            for batch in loader:
                encoder.embed_pixels(batch, batch_size)
        rate = images / timed(run)
        record["loader"].append({"workers": n, "images_per_s": round(rate, 1), "ratio_to_bare": round(rate / bare, 2)})
    return record


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def device_decode_throughput(preset_name: str, images: int, source: tuple[int, int], batch_size: int = 256,
                             device: str | None = None) -> dict:
    """JPEG decode on the GPU (nvJPEG through torchvision, a batch per call), resize on the GPU and
    embed, against the bare forward on the same pixels: whether an encoder actor that decodes its
    own JPEGs keeps up with its network, where CPU decode needs ~13 cores per GPU."""
    from torchvision.io import ImageReadMode, decode_jpeg   # torchvision: this bench only

    from encoder.embed import Encoder                   # timm: only the embedding benches load it
    encoder = Encoder.load(f"random-init:{preset_name}", device=device)
    blobs = jpeg_images(min(images, 256), *source)
    data = [torch.frombuffer(bytearray(blobs[i % len(blobs)]), dtype=torch.uint8) for i in range(images)]
    resize = encoder.resize

    def decoded(start: int) -> torch.Tensor:
        batch = decode_jpeg(data[start:start + batch_size], mode=ImageReadMode.RGB, device=encoder.device)
        # float: CUDA has no uint8 antialiased resize; rounded back to uint8 to match the CPU step
        return torch.cat([resize.apply(x[None].float()).round_().clamp_(0, 255).to(torch.uint8) for x in batch])

    pixels = torch.cat([decoded(s) for s in range(0, min(images, 4 * batch_size), batch_size)]).cpu()
    pixels = torch.cat([pixels] * -(-images // len(pixels)))[:images]
    encoder.embed_pixels(pixels[:batch_size], batch_size)
    bare = max(images / timed(lambda: encoder.embed_pixels(pixels, batch_size)) for _ in range(2))
    decode_only = images / timed(lambda: [decoded(s) for s in range(0, images, batch_size)])

    @torch.no_grad()
    def run():
        for start in range(0, images, batch_size):
            encoder.vectors(encoder.normalise(decoded(start).float() / 255))
    rate = max(images / timed(run) for _ in range(2))

    @torch.no_grad()
    def overlapped():
        """Batch i+1 decoded by a second thread on its own CUDA stream while batch i is embedded."""
        stream = torch.cuda.Stream() if encoder.device.type == "cuda" else None

        def decode_on_side(start):
            if stream is None:
                return decoded(start)
            with torch.cuda.stream(stream):
                x = decoded(start)
            stream.synchronize()
            return x
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(decode_on_side, 0)
            for start in range(0, images, batch_size):
                x = pending.result()
                if start + batch_size < images:
                    pending = pool.submit(decode_on_side, start + batch_size)
                encoder.vectors(encoder.normalise(x.float() / 255))
    overlap_rate = max(images / timed(overlapped) for _ in range(2))
    return {"bench": "embed_device_decode", "overlapped_images_per_s": round(overlap_rate, 1),
            "overlapped_ratio_to_bare": round(overlap_rate / bare, 2), "preset": preset_name, "device": encoder.device.type, "images": images,
            "source_px": list(source), "bare_images_per_s": round(bare, 1),
            "decode_resize_images_per_s": round(decode_only, 1), "images_per_s": round(rate, 1),
            "ratio_to_bare": round(rate / bare, 2)}
