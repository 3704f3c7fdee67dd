"""WebDataset tar collections (docs/ARCHITECTURE.md §3): listing a tar's samples and reading a range of them.

A WebDataset shard is an uncompressed POSIX tar in which a *sample* is a run of consecutive regular
file members sharing a *key*: the member path up to the first ``.`` of its last path component
(``a/b/000123.jpg`` and ``a/b/000123.cls`` are the sample ``a/b/000123``; their extensions, lowercased,
are ``jpg`` and ``cls``). As in the ``webdataset`` library, members whose last path component has no
extension or starts with ``.`` (``README``, ``._000123.jpg``, ``.DS_Store``) and members that are not
regular files (folders, links) belong to no sample. A key that comes back after another one (files
of a sample not kept together, as ``tar`` without ``--sort=name`` may write them) is refused at listing.

- The image of a sample is its first member whose extension is exactly an image extension (``jpg``,
  ``jpeg``, ``png``, ``webp``, ...; ``000123.seg.png`` is not one); a sample without one is an
  unreadable item ("sample has no image (members: ...)"), reported like an undecodable image.
- Its label is the stripped text of its ``.cls`` member, else of its ``.label`` member, else the
  ``"label"`` field of its ``.json`` member (as text); None when there is none (or the JSON is not
  an object with a ``label``).
- Its URI is ``<tar URL>#<key>``; an item that could not be read at all (the tar was cut or
  replaced after listing) is ``<tar URL>#sample=<n>`` (``n`` counts the tar's samples from 0).

Listing a tar walks its headers only (``tarfile`` seeks over member data), counts its samples and
keeps the byte offset of each sample's first header in memory, so that a range of samples
``[start, stop)`` is read by seeking to its first header, never by reading the tar before it. A tar
cut short (mid-header, mid-member, or without its end-of-archive blocks), a corrupt one, or one with
data after its end-of-archive marker (concatenated tars) is refused at listing, by name. Compressed
tars (``.tar.gz``, ``.tgz``, ...) are refused too: seeking into one means decompressing everything
before the range.
"""

from __future__ import annotations

import json
import logging
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import numpy as np

from index.ingest.files import IMAGE_EXTENSIONS, fingerprint

log = logging.getLogger("vismem.index.collections")

COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.lz4")
IMAGE_EXTS = frozenset(e[1:] for e in IMAGE_EXTENSIONS)
LABEL_EXTS = ("cls", "label")               # in order of preference; then a .json member's "label"
READ_EXTS = IMAGE_EXTS | {"json", *LABEL_EXTS}
BLOCK = tarfile.BLOCKSIZE
SCAN_THREADS = 8                           # tars whose headers are walked at once when listing


class BrokenTar(Exception):
    """A tar that could not be walked to its end; ``key`` is the sample being read when it broke."""

    def __init__(self, reason: str, samples: int, key: str | None, at: int | None):
        super().__init__(reason)
        self.reason, self.samples, self.key, self.at = reason, samples, key, at


@dataclass
class Sample:
    offset: int                              # byte offset of the header of its first member
    key: str
    members: list[str] = field(default_factory=list)      # member base names, in tar order
    data: dict[str, bytes] = field(default_factory=dict)  # what was read: "image", "cls", "label", "json"


def is_compressed_tar(path: str) -> bool:
    return path.lower().endswith(COMPRESSED_TAR_SUFFIXES)


def split_name(name: str) -> tuple[str, str] | None:
    """(key, lowercased extension) of a tar member, or None for a member that belongs to no sample."""
    folder, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_samples(tar: tarfile.TarFile, read_from: int | None = None) -> Iterator[Sample]:
    """The samples of ``tar`` from its current position, in order. With ``read_from``, the image,
    label and JSON members of the samples numbered ``read_from`` and after (from 0 here) are read into
    ``Sample.data``; without it only headers are read. A tar that cannot be walked further raises
    ``BrokenTar`` (a tar that simply ends yields what it holds: the caller checks the count)."""
    current: Sample | None = None
    count = 0
    try:
        while True:
            member = tar.next()
            tar.members = []             # walked once: do not keep every TarInfo of a large tar in memory
            if member is None:
                break
            split = split_name(member.name) if member.isfile() else None
            if split is None:
                continue
            key, ext = split
            if current is None or key != current.key:
                if current is not None:
                    yield current
                    count += 1
                current = Sample(member.offset, key)
            current.members.append(member.name.rpartition("/")[2])
            if read_from is not None and count >= read_from and ext in READ_EXTS:
                slot = "image" if ext in IMAGE_EXTS else ext
                if slot not in current.data:
                    current.data[slot] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as e:      # not OSError: a store that fails says so itself
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, tarfile.ReadError) else str(e)
        raise BrokenTar(reason, count, current.key if current else None, tar.offset) from e
    if current is not None:
        yield current


def scan_tar(f, uri: str, size: int) -> list[int]:
    """The byte offsets of the samples of the tar open as ``f`` (from its start); a ValueError that
    names ``uri`` when the tar is cut short, corrupt, compressed or followed by more data."""
    def refuse(samples: int, what: str) -> ValueError:
        return ValueError(f"{uri}: truncated or corrupt tar: {samples} complete sample(s) readable, then {what}. "
                          f"Copy the tar again (or remove it from the collection) and re-run")

    head = f.read(BLOCK)
    f.seek(0)
    if head[:2] == b"\x1f\x8b":
        raise ValueError(f"{uri} is gzip-compressed: WebDataset collections are read from uncompressed .tar files "
                         "(a range of samples is read by seeking); gunzip it and name it .tar")
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as e:
        if size == 0:
            raise ValueError(f"{uri} is empty (0 bytes), not a tar: remove it or copy it again") from None
        if head[257:262] == b"ustar":               # a tar header's magic: a tar cut (or damaged) in its first header
            raise refuse(0, f"{e} at byte 0 of {size}") from None
        raise ValueError(f"{uri} is not a tar file ({e})") from None
    offsets: list[int] = []
    seen: set[str] = set()
    try:
        for sample in iter_samples(tar):
            if sample.key in seen:
                raise ValueError(f"{uri}: the files of sample {sample.key} are not consecutive (its key comes back "
                                 f"at byte {sample.offset}): a WebDataset tar keeps each sample's files together. "
                                 "Re-create it with its members in name order (tar --sort=name)")
            seen.add(sample.key)
            offsets.append(sample.offset)
    except BrokenTar as e:
        raise refuse(e.samples, f"{e.reason} at byte {e.at} of {size}") from None
    end = tar.offset                     # where the end-of-archive blocks must be
    f.seek(end)
    if f.read(BLOCK) != bytes(BLOCK):
        # a tar cut between members (or with a damaged header): tarfile stops there as if at its end
        # (the last sample found may miss members: it is not counted as complete)
        raise refuse(max(0, len(offsets) - 1), f"no end-of-archive marker at byte {end} of {size} "
                                               "(cut short, or a damaged header)")
    tail = f.read(min(size - end - BLOCK, 1 << 20)) if size > end + BLOCK else b""
    if tail.strip(b"\0") or size - end - BLOCK > 1 << 20:
        raise ValueError(f"{uri}: data after the end-of-archive marker at byte {end} of {size} (tars concatenated "
                         f"into one file?); the samples after it would be lost: re-create the tar")
    return offsets


def tar_input(fs, uri: str, info: dict) -> dict:
    """One tar of a collection as an input: its fingerprint and sample count (``rows``), plus
    ``sample_offsets`` (numpy int64, in memory only: ``make_partitions`` keeps just the offset of
    each range's first sample)."""
    with fs.open(info["name"], "rb") as f:
        offsets = scan_tar(f, uri, info["size"])
    if not offsets:
        log.warning("%s holds no samples", uri)
    return {"uri": uri, **fingerprint(info), "rows": len(offsets), "sample_offsets": np.array(offsets, np.int64)}


def tar_inputs(fs, prefix: str, paths: list[str], infos: dict) -> list[dict]:
    """The inputs of the tars ``paths`` (in that order); headers of several tars are walked at once."""
    def one(path: str) -> dict:
        return tar_input(fs, prefix + path, infos[path])

    if len(paths) <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(min(SCAN_THREADS, len(paths))) as pool:
        return list(pool.map(one, paths))


def label_of_sample(sample: Sample) -> str | None:
    for ext in LABEL_EXTS:
        text = sample.data.get(ext, b"").decode("utf-8", "replace").strip()
        if text:
            return text
    if "json" in sample.data:
        try:
            meta = json.loads(sample.data["json"])
        except ValueError:
            return None
        if isinstance(meta, dict) and meta.get("label") is not None:
            return str(meta["label"])
    return None


def read_samples(entry: dict, first_id: int) -> list[tuple[int, str, str | None, bytes | Exception]]:
    """(id, uri, label, image bytes or the error reading them) for the samples ``[start, stop)`` of
    the tar of a partition input ``entry`` (``{"uri", "size", ..., "start", "stop", "offset"}``):
    exactly ``stop - start`` items, whatever happened to the tar since it was listed (a sample that
    cannot be read is an item with its error). Without an ``"offset"`` the tar is walked from its
    start to sample ``start``."""
    uri, start, stop = entry["uri"], entry["start"], entry["stop"]
    out: list[tuple[int, str, str | None, bytes | Exception]] = []
    failure, broken_key = None, None
    offset = entry.get("offset")
    skip = 0 if offset is not None else start
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        fs.invalidate_cache(path)       # the size of the tar now, not as listed earlier in this process
        with fs.open(path, "rb") as f:
            f.seek(offset or 0)
            tar = tarfile.open(fileobj=f, mode="r:")
            for sample in iter_samples(tar, read_from=skip):
                if skip:
                    skip -= 1
                    continue
                image = sample.data.get("image")
                if image is None:
                    image = ValueError(f"sample has no image (members: {', '.join(sample.members)})")
                out.append((first_id + len(out), f"{uri}#{sample.key}", label_of_sample(sample), image))
                if len(out) == stop - start:
                    break
    except BrokenTar as e:
        failure, broken_key = e.reason, None if skip else e.key
    except Exception as e:  # noqa: BLE001 (a tar gone or replaced: its samples are reported, never fatal)
        failure = f"{type(e).__name__}: {e}"
    if len(out) < stop - start:
        why, first_missing = changed(fs, path, entry), len(out)
        for position in range(first_missing, stop - start):
            n = start + position
            key = broken_key if position == first_missing else None
            reason = (f"cannot read sample {n} of the tar ({failure})" if failure
                      else f"the tar ends before sample {n}") + why
            out.append((first_id + position, f"{uri}#{key}" if key else f"{uri}#sample={n}", None, ValueError(reason)))
    return out


def changed(fs, path: str, entry: dict) -> str:
    """How the tar of ``entry`` differs from when it was listed (for error messages), or ''."""
    try:
        now = fingerprint(fs.info(path))
    except Exception as e:  # noqa: BLE001
        return f"; the tar is gone since the collection was listed ({type(e).__name__})"
    diff = [f"{k} {entry.get(k)} -> {now.get(k)}" for k in ("size", "etag", "mtime") if entry.get(k) != now.get(k)]
    return f"; the tar changed after the collection was listed ({', '.join(diff)})" if diff else ""
