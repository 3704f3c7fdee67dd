"""The readable images of a collection, partition by partition: what every in-process reader in
eval/ (kNN evaluation, the real-data control) needs, with one rule for bad files."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

import numpy as np

from index.ingest.collections import Partition, decode_partition, list_partitions

if TYPE_CHECKING:
    import torch

log = logging.getLogger("vismem.eval")


def readable_images(url: str, parts: list[Partition] | None = None
                    ) -> Iterator[tuple[Partition, list[tuple[str, str | None, np.ndarray]]]]:
    """For each partition of the collection at ``url`` (``parts``, default: listed in 4,096s):
    (the partition, [(uri, label, RGB array)]).

    An unreadable image is logged and left out, never fatal; a collection with no readable image at
    all is an error.
    """
    skipped, readable = 0, 0
    for part in list_partitions(url, 4096) if parts is None else parts:
        decoded, errors = decode_partition(part)
        for error in errors:
            log.warning("skipped %s: %s", error["uri"], error["error"])
        skipped += len(errors)
        readable += len(decoded)
        yield part, [(uri, label, image) for _, uri, label, image in decoded]
    if not readable:
        raise ValueError(f"no readable images in {url} ({skipped} unreadable)")
    if skipped:
        log.warning("%s: %d unreadable images skipped", url, skipped)


def same_size_images(url: str, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, list]:
    """Every readable image of a collection whose images share one size (CIFAR-10, say), decoded
    once as uint8 ``[n, 3, H, W]``, with their labels; ``limit`` keeps a random subset of that many.
    For evaluations that embed one collection with several encoders."""
    import torch                    # here: listing and decoding a collection needs no torch
    images, labels = [], []
    for _, items in readable_images(url):
        for _, label, image in items:
            images.append(image)
            labels.append(label)
    sizes = {image.shape for image in images}
    if len(sizes) > 1:
        raise ValueError(f"{url}: images of {len(sizes)} sizes ({sorted(sizes)[:3]} ...); resize them first")
    keep = np.random.default_rng(seed).permutation(len(images))[:limit] if limit else np.arange(len(images))
    batch = torch.from_numpy(np.stack([images[i] for i in keep])).permute(0, 3, 1, 2).contiguous()
    return batch, [labels[i] for i in keep]
