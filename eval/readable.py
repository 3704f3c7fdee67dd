"""The readable images of a collection, partition by partition: what every in-process reader in
eval/ (kNN evaluation, the real-data control) needs, with one rule for bad files."""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from encoder.embed import decode_image
from index.collections import Partition, list_partitions, read_partition

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
        items = []
        for _, uri, label, data in read_partition(part):
            try:
                if isinstance(data, Exception):
                    raise data
                items.append((uri, label, decode_image(data)))
            except Exception as e:  # noqa: BLE001 (one bad image is skipped and reported, never fatal)
                skipped += 1
                log.warning("skipped %s: %s", uri, e)
        readable += len(items)
        yield part, items
    if not readable:
        raise ValueError(f"no readable images in {url} ({skipped} unreadable)")
    if skipped:
        log.warning("%s: %d unreadable images skipped", url, skipped)
