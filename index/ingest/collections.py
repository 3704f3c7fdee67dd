"""Readers of real image collections on any fsspec URL, split into partitions for embedding.

Three formats (docs/ARCHITECTURE.md §3): a folder tree ``ROOT/<label>/<name>.<ext>``; Parquet files with an
``image`` binary column (and optional ``label``, ``id``, ``uri``, ``filename``); WebDataset tars
(uncompressed ``.tar`` shards of samples ``<key>.<jpg|png|...>`` with an optional ``<key>.cls``,
``.label`` or ``.json`` label; details in ``index.ingest.webdataset``). The URL names a folder or one file;
a folder that holds ``.tar`` files is a WebDataset collection, else one that holds ``.parquet``
files is a Parquet collection, else it is a folder tree. A folder holding both tars and Parquet
files is refused (embed each as its own collection); image files beside tars or Parquet files are
not part of the collection (a warning says so for tars).

A collection is a sorted list of *inputs*: one per image file of a folder tree, one per Parquet
file or tar, each with what tells a changed file from an unchanged one (its size, and its ETag where
the store has one, else its modification time), so that a re-run of an embedding job can tell new,
changed and removed inputs apart. A Parquet file or tar has ``rows`` (its rows, or samples) and is
split into ranges ``[start, stop)``. Partitions number the items from ``first_id`` in listing order,
so the same collection always gets the same ids.

The URI of an item is its file's URL for a folder tree. For a Parquet row it is the row's ``uri``
column when there is one, else ``<file URL>#row=<n>:<filename>`` from the row's ``filename`` column,
else ``<file URL>#row=<n>`` (``n`` counts rows of that file from 0): unique, and it says where to look.
For a WebDataset sample it is ``<tar URL>#<key>`` (``a/b/000123`` for ``a/b/000123.jpg``).
"""

from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq

from index.ingest import webdataset
from index.ingest.files import IMAGE_EXTENSIONS, fingerprint, protocol_prefix

log = logging.getLogger("vismem.index.collections")


def is_tar(path: str) -> bool:
    """A WebDataset shard: an (uncompressed) ``.tar`` file."""
    return path.lower().endswith(".tar")


@dataclass
class Partition:
    """A slice of a collection that one task embeds and writes as one Parquet file.

    ``inputs`` are either image files (``{"uri", "label", "size", "etag" | "mtime"}``, one per image)
    or one Parquet file's rows ``[start, stop)`` (``{"uri", "size", "etag" | "mtime", "rows", "start",
    "stop"}``) or one tar's samples ``[start, stop)`` (the same, plus ``"offset"``: the byte offset of
    sample ``start``'s first header).
    """

    number: int
    first_id: int
    inputs: list[dict]

    @property
    def file(self) -> str | None:
        """The Parquet file or tar whose rows (samples) ``[start, stop)`` this partition holds; None
        for a partition of image files."""
        return self.inputs[0]["uri"] if self.inputs and "rows" in self.inputs[0] else None

    @property
    def parquet(self) -> str | None:
        return self.file if self.file is not None and not is_tar(self.file) else None

    @property
    def tar(self) -> str | None:
        return self.file if self.file is not None and is_tar(self.file) else None

    @property
    def uris(self) -> list[str]:
        return [] if self.file else [i["uri"] for i in self.inputs]

    @property
    def labels(self) -> list[str | None]:
        return [] if self.file else [i["label"] for i in self.inputs]

    @property
    def start(self) -> int:
        return self.inputs[0]["start"] if self.file else 0

    @property
    def stop(self) -> int:
        return self.inputs[0]["stop"] if self.file else 0

    def __len__(self) -> int:
        return self.stop - self.start if self.file else len(self.inputs)

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


def list_inputs(url: str) -> list[dict]:
    """The inputs of the collection at ``url`` in sorted order: one per image file of a folder tree
    (with its label), one per Parquet file (with its row count), or one per tar (with its sample
    count and, in memory only, ``sample_offsets``: see ``index.ingest.webdataset``)."""
    fs, root = open_collection(url)
    prefix = protocol_prefix(url)
    files = {root: fs.info(root)} if fs.isfile(root) else fs.find(root, detail=True)
    parquet_files = sorted(p for p in files if p.endswith(".parquet"))
    tars = sorted(p for p in files if is_tar(p))
    compressed = sorted(p for p in files if webdataset.is_compressed_tar(p))
    if tars and parquet_files:
        raise ValueError(f"{url} holds both Parquet files ({len(parquet_files)}, e.g. {prefix + parquet_files[0]}) and "
                         f"WebDataset tars ({len(tars)}, e.g. {prefix + tars[0]}): embed each format as its own "
                         "collection, into its own --out")
    if compressed and (tars or not parquet_files and not any(p.lower().endswith(IMAGE_EXTENSIONS) for p in files)):
        named = ", ".join(prefix + p for p in compressed[:3]) + (" ..." if len(compressed) > 3 else "")
        raise ValueError(f"{url} holds compressed tars ({len(compressed)}: {named}): WebDataset collections are read from "
                         "uncompressed .tar files (a range of samples is read by seeking, which compression "
                         "prevents); decompress them (gunzip, ...) into .tar files")
    if tars:
        loose = sum(p.lower().endswith(IMAGE_EXTENSIONS) for p in files)
        if loose:
            log.warning("%s: %d image file(s) beside the WebDataset tars are not part of the collection", url, loose)
        inputs = webdataset.tar_inputs(fs, prefix, tars, files)
        if not sum(i["rows"] for i in inputs):
            raise ValueError(f"the WebDataset collection {url} has no samples (no tar member named <key>.<ext>)")
        return inputs
    if parquet_files:
        inputs = [parquet_input(fs, prefix + path, files[path]) for path in parquet_files]
        if not sum(i["rows"] for i in inputs):
            raise ValueError(f"the Parquet collection {url} has no rows")
        return inputs
    images = sorted(p for p in files if p.lower().endswith(IMAGE_EXTENSIONS))
    if not images:
        raise ValueError(f"no images under {url}: expected ROOT/<label>/<name>.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS[:3])}|...>"
                         f", Parquet files with an 'image' column, or WebDataset .tar files")
    return [{"uri": prefix + path, "label": label_of(root, path), **fingerprint(files[path])} for path in images]


def parquet_input(fs, uri: str, info: dict) -> dict:
    """One Parquet file of a collection as an input: its fingerprint and row count."""
    with fs.open(info["name"]) as f:
        meta = pq.ParquetFile(f)
        if "image" not in meta.schema_arrow.names:
            raise ValueError(f"{uri} has no 'image' column (columns: {', '.join(meta.schema_arrow.names)})")
        rows = meta.metadata.num_rows
    return {"uri": uri, **fingerprint(info), "rows": rows}


def label_of(root: str, path: str) -> str | None:
    """The folder directly under ROOT that holds ``path``; None for images directly in ROOT."""
    rel = os.path.relpath(path, root).split("/")
    return rel[0] if len(rel) > 1 else None


def make_partitions(inputs: list[dict], partition_size: int, number: int = 0, first_id: int = 0) -> list[Partition]:
    """Partitions of ``inputs`` (from ``list_inputs``) numbered from ``number``, with ids from
    ``first_id`` in order: images in chunks of ``partition_size``; each Parquet file (or tar) in row
    (sample) ranges of ``partition_size`` from its ``start`` (default 0: a resumed plan may have
    recorded the first rows). A tar's range records the byte offset of its first sample, taken
    from the listed ``sample_offsets``, which no partition carries (partitions are written as JSON)."""
    if partition_size <= 0:
        raise ValueError("partition size must be positive")
    parts, next_id = [], first_id
    images = [i for i in inputs if "rows" not in i]
    for start in range(0, len(images), partition_size):
        chunk = images[start:start + partition_size]
        parts.append(Partition(number + len(parts), next_id, chunk))
        next_id += len(chunk)
    for file in (i for i in inputs if "rows" in i):
        offsets = file.get("sample_offsets")
        entry = {k: v for k, v in file.items() if k not in ("sample_offsets", "offset")}
        for start in range(file.get("start", 0), file["rows"], partition_size):
            stop = min(file["rows"], start + partition_size)
            extra = {"offset": int(offsets[start])} if offsets is not None else {}
            parts.append(Partition(number + len(parts), next_id, [{**entry, "start": start, "stop": stop, **extra}]))
            next_id += stop - start
    return parts


def list_partitions(url: str, partition_size: int = 512, first_id: int = 0) -> list[Partition]:
    """Partitions of the collection at ``url``: a folder tree, Parquet file(s) or WebDataset tar(s)."""
    if partition_size <= 0:
        raise ValueError("partition size must be positive")
    return make_partitions(list_inputs(url), partition_size, 0, first_id)


def read_partition(part: Partition) -> list[tuple[int, str, str | None, bytes | Exception]]:
    """(id, uri, label, encoded bytes or the error reading them) for each item of ``part``."""
    if part.file is None:
        out = []
        for offset, (uri, label) in enumerate(zip(part.uris, part.labels)):
            try:
                with fsspec.open(uri, "rb") as f:
                    data: bytes | Exception = f.read()
            except Exception as e:  # noqa: BLE001 (one unreadable file is skipped and reported, never fatal)
                data = e
            out.append((part.first_id + offset, uri, label, data))
        return out
    if part.tar is not None:
        return webdataset.read_samples(part.inputs[0], part.first_id)
    with fsspec.open(part.parquet, "rb") as f:
        table = read_rows(pq.ParquetFile(f), part.start, part.stop)
    cols = table.column_names
    images = table.column("image").to_pylist()
    labels = table.column("label").to_pylist() if "label" in cols else [None] * len(images)
    ids = table.column("id").to_pylist() if "id" in cols else [part.first_id + i for i in range(len(images))]
    return [(int(i), u, None if lab is None else str(lab),
             img if img is not None else ValueError("no image bytes (null)"))
            for i, u, lab, img in zip(ids, row_uris(part, table), labels, images)]


def row_uris(part: Partition, table) -> list[str]:
    """The URIs of a Parquet partition's rows (see the module docstring)."""
    if "uri" in table.column_names:
        return table.column("uri").to_pylist()
    names = table.column("filename").to_pylist() if "filename" in table.column_names else [None] * len(table)
    return [f"{part.parquet}#row={part.start + i}" + ("" if name is None else f":{name}")
            for i, name in enumerate(names)]


def decode_partition(part: Partition) -> tuple[list[tuple[int, str, str | None, np.ndarray]], list[dict]]:
    """The readable images of ``part`` as (id, uri, label, RGB array), and one record
    ``{"id", "uri", "error"}`` per image that could not be read or decoded (never fatal); the error
    says why, then names the URI: ``"not an image file: s3://bucket/photos/dog/d.jpg"``."""
    from encoder.embed import decode_image          # here: listing a collection must not import torch

    images, errors = [], []
    for item_id, uri, label, data in read_partition(part):
        try:
            if isinstance(data, Exception):
                raise data
            images.append((item_id, uri, label, decode_image(data)))
        except ValueError as e:                     # decode_image's and read_partition's own reasons
            errors.append({"id": item_id, "uri": uri, "error": f"{e}: {uri}"})
        except Exception as e:  # noqa: BLE001 (one bad image is skipped and reported, never fatal)
            errors.append({"id": item_id, "uri": uri, "error": f"cannot read ({type(e).__name__}: {e}): {uri}"})
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


def item_bytes(uri: str) -> bytes:
    """The image file bytes of the item named ``uri``, a URI this module gives (module docstring):
    a file's bytes, a Parquet row's ``image`` or a WebDataset sample's image file; any other URI
    is read as a file. A sample is found by walking its tar from the start: one item's cost (a
    thumbnail), not a way to read many."""
    base, sep, fragment = uri.partition("#")
    if sep and fragment.startswith("row=") and fragment[4:].split(":", 1)[0].isdigit():
        row = int(fragment[4:].split(":", 1)[0])
        with fsspec.open(base, "rb") as f:
            file = pq.ParquetFile(f)
            if row >= file.metadata.num_rows:
                raise FileNotFoundError(f"{uri}: {base} has {file.metadata.num_rows} rows")
            return read_rows(file, row, row + 1).column("image")[0].as_py()
    if sep and base.lower().endswith(".tar"):
        with fsspec.open(base, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for sample in webdataset.iter_samples(tar, read_from=0):
                if sample.key == fragment and "image" in sample.data:
                    return sample.data["image"]
        raise FileNotFoundError(f"{uri}: no image of sample {fragment!r} in {base}")
    with fsspec.open(uri, "rb") as f:
        return f.read()
