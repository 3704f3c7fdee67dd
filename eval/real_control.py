"""The real-data control: the same DINO recipe trained on real images, the papers' upper reference.

It is an evaluation, not the product, so it lives here rather than in encoder/ (which never reads
real images). ``CollectionStream`` serves a collection (any format ``index.ingest.collections`` reads)
with the procedural stream's interface, each worker holding the decoded images in memory: meant
for control runs on small sets such as CIFAR-10, not for a billion images.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import torch
from PIL import Image

from eval.readable import readable_images
from index.ingest.collections import open_collection

log = logging.getLogger("vismem.eval.real_control")


def load_collection(url: str, size: int) -> torch.Tensor:
    """Every readable image of the collection, resized (shorter side) and centre-cropped to
    ``size``: uint8 ``[n, 3, size, size]``. Unreadable images are skipped and logged."""
    images = [square(image, size) for _, items in readable_images(url) for _, _, image in items]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def square(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    img = Image.fromarray(image).resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


class CollectionStream:
    """Batches of a real collection for worker ``rank`` of ``world_size``: every pass over the
    data is a fresh permutation seeded by (seed, pass), and workers take disjoint slices."""

    def __init__(self, url: str, size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 steps_per_epoch: int = 10_000, device: str = "cpu"):
        self.images = load_collection(url, size)
        self.url, self.batch_size, self.seed = url, batch_size, seed
        self.rank, self.world_size, self.steps_per_epoch, self.device = rank, world_size, steps_per_epoch, device
        self.orders: dict[int, np.ndarray] = {}
        log.info("real-data stream: %d images from %s", len(self.images), url)

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self.orders:
            self.orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.images))}
        return self.orders[epoch]

    def batch(self, epoch: int, step: int) -> torch.Tensor:
        global_batch = (epoch * self.steps_per_epoch + step) * self.world_size + self.rank
        positions = np.arange(global_batch * self.batch_size, (global_batch + 1) * self.batch_size)
        n = len(self.images)
        ids = np.array([self.order(int(p // n))[p % n] for p in positions])
        return self.images[torch.from_numpy(ids)].to(self.device)


def train_on_collection(cfg, url: str, out_url: str, local: bool = False, device: str | None = None,
                        **train_kwargs) -> str:
    """Train ``cfg``'s recipe on the real collection at ``url`` (the control run); the encoder URL.
    Through Ray Train, or with ``local`` in this process on ``device`` (encoder.local)."""
    url = url if "://" in url else os.path.abspath(url)       # workers run elsewhere
    open_collection(url)                                        # a clear error before any training work
    cfg = dataclasses.replace(cfg, real_data=url)

    def stream(rank: int, world_size: int, device: str) -> CollectionStream:
        return CollectionStream(url, cfg.arch.img_size, cfg.batch_size, cfg.seed, rank, world_size, device=device)

    if local:
        from encoder.local import default_device, train_local   # here: each path imports its own trainer (Ray Train's imports ray)
        return train_local(cfg, out_url, device=device, stream=stream(0, 1, device or str(default_device())),
                           **train_kwargs)
    from encoder.train import train                             # Ray Train: imports ray
    return train(cfg, out_url, stream_factory=stream, **train_kwargs)
