"""Readers of real image collections on any fsspec URL, split into partitions for embedding.

Two formats (DESIGN.md §4): a folder tree ``ROOT/<label>/<name>.<ext>`` and Parquet files with
an ``image`` binary column (and optional ``label``, ``id``, ``uri``). Items are listed in sorted
order and numbered from ``first_id``, so the same collection always gets the same ids.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Partition:
    """A slice of a collection that one task embeds and writes as one Parquet file."""

    number: int
    first_id: int
    uris: list[str] = field(default_factory=list)        # folder trees: one URI per image
    labels: list[str | None] = field(default_factory=list)
    parquet: str | None = None                           # Parquet collections: file and row range
    start: int = 0
    stop: int = 0

    def __len__(self) -> int:
        return len(self.uris) if self.parquet is None else self.stop - self.start

    def to_dict(self) -> dict:
        return asdict(self)


def open_collection(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root of ``url``; a clear error when it is missing or unreachable."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise ValueError(f"cannot open collection {url}: {e}") from None
    try:
        exists = fs.exists(root)
    except Exception as e:  # noqa: BLE001 (s3fs raises many kinds: missing bucket, bad endpoint, auth)
        raise FileNotFoundError(f"cannot reach collection {url}: {type(e).__name__}: {e}") from None
    if not exists:
        raise FileNotFoundError(f"no collection at {url}: the path (or bucket) does not exist")
    return fs, root.rstrip("/")


def protocol_prefix(url: str) -> str:
    """What to put before a listed path to get a URL again (``s3://``, ``memory://``, or nothing)."""
    return "" if "://" not in url or url.startswith("file://") else url.split("://", 1)[0] + "://"


def list_partitions(url: str, partition_size: int = 512, first_id: int = 0) -> list[Partition]:
    """Partitions of the collection at ``url``: a folder tree or Parquet file(s)."""
    if partition_size <= 0:
        raise ValueError("partition size must be positive")
    fs, root = open_collection(url)
    prefix = protocol_prefix(url)
    files = [root] if fs.isfile(root) else sorted(fs.find(root))
    parquet_files = [f for f in files if f.endswith(".parquet")]
    if parquet_files:
        return parquet_partitions(fs, prefix, parquet_files, partition_size, first_id)
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise ValueError(f"no images under {url}: expected ROOT/<label>/<name>.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS[:3])}|...> "
                         f"or Parquet files with an 'image' column")
    parts = []
    for number, start in enumerate(range(0, len(images), partition_size)):
        chunk = images[start:start + partition_size]
        labels = [label_of(root, path) for path in chunk]
        parts.append(Partition(number, first_id + start, [prefix + p for p in chunk], labels))
    return parts


def label_of(root: str, path: str) -> str | None:
    """The folder directly under ROOT that holds ``path``; None for images directly in ROOT."""
    rel = os.path.relpath(path, root).split("/")
    return rel[0] if len(rel) > 1 else None


def parquet_partitions(fs, prefix: str, files: list[str], partition_size: int, first_id: int) -> list[Partition]:
    parts, next_id = [], first_id
    for path in files:
        with fs.open(path) as f:
            meta = pq.ParquetFile(f)
            if "image" not in meta.schema_arrow.names:
                raise ValueError(f"{prefix}{path} has no 'image' column (columns: {', '.join(meta.schema_arrow.names)})")
            rows = meta.metadata.num_rows
        for start in range(0, rows, partition_size):
            stop = min(rows, start + partition_size)
            parts.append(Partition(len(parts), next_id, parquet=prefix + path, start=start, stop=stop))
            next_id += stop - start
    if not parts:
        raise ValueError(f"the Parquet collection {prefix}{files[0]} has no rows")
    return parts


def read_partition(part: Partition) -> list[tuple[int, str, str | None, bytes | Exception]]:
    """(id, uri, label, encoded bytes or the error reading them) for each item of ``part``."""
    if part.parquet is None:
        out = []
        for offset, (uri, label) in enumerate(zip(part.uris, part.labels)):
            try:
                with fsspec.open(uri, "rb") as f:
                    data: bytes | Exception = f.read()
            except Exception as e:  # noqa: BLE001 (one unreadable file is skipped and reported, never fatal)
                data = e
            out.append((part.first_id + offset, uri, label, data))
        return out
    with fsspec.open(part.parquet, "rb") as f:
        table = read_rows(pq.ParquetFile(f), part.start, part.stop)
    cols = table.column_names
    images = table.column("image").to_pylist()
    labels = table.column("label").to_pylist() if "label" in cols else [None] * len(images)
    uris = (table.column("uri").to_pylist() if "uri" in cols
            else [f"{part.parquet}#row={part.start + i}" for i in range(len(images))])
    ids = table.column("id").to_pylist() if "id" in cols else [part.first_id + i for i in range(len(images))]
    return [(int(i), u, None if lab is None else str(lab), img if img is not None else ValueError("null image"))
            for i, u, lab, img in zip(ids, uris, labels, images)]


def decode_partition(part: Partition) -> tuple[list[tuple[int, str, str | None, np.ndarray]], list[dict]]:
    """The readable images of ``part`` as (id, uri, label, RGB array), and one record
    ``{"id", "uri", "error"}`` per image that could not be read or decoded (never fatal)."""
    from encoder.embed import decode_image          # here: listing a collection must not import torch

    images, errors = [], []
    for item_id, uri, label, data in read_partition(part):
        try:
            if isinstance(data, Exception):
                raise data
            images.append((item_id, uri, label, decode_image(data)))
        except Exception as e:  # noqa: BLE001 (one bad image is skipped and reported, never fatal)
            errors.append({"id": item_id, "uri": uri, "error": f"{type(e).__name__}: {e}"})
    return images, errors


def read_rows(file: pq.ParquetFile, start: int, stop: int):
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    groups, first_row, row = [], 0, 0
    for group in range(file.metadata.num_row_groups):
        rows = file.metadata.row_group(group).num_rows
        if row < stop and row + rows > start:
            first_row = row if not groups else first_row
            groups.append(group)
        row += rows
    return file.read_row_groups(groups).slice(start - first_row, stop - start)
