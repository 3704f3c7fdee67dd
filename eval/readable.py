"""The readable images of a collection, partition by partition: what every in-process reader in
eval/ (kNN evaluation, the real-data control) needs, with one rule for bad files."""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from index.collections import Partition, decode_partition, list_partitions

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
