"""A FAISS index's bytes: to and from storage, memory-mapped, copied, merged and decoded.

Index files stream through FAISS's callback reader and writer with their sha256 computed on the
way (``write_index``, ``read_index``: no serialised copy in memory); a local memory's IVF shards can
instead be memory-mapped (``map_index``), so a shard larger than RAM can answer. ``merge_codes`` and
``reconstruct`` move and decode stored codes without re-encoding them (compaction, the build's
merge, pruning's leave-one-out queries). ``load_trained`` reads a version's trained empty index, the
one every vector that enters the memory is encoded with.
"""

from __future__ import annotations

import hashlib

import faiss
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from index.store import commit


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


STREAM_BLOCK = 1 << 22         # bytes per read or write while an index streams to or from storage


def write_index(index: faiss.Index, f) -> str:
    """Write ``index`` in FAISS's format to the open binary file ``f`` as a stream, and return the
    file's sha256: FAISS's Python callback writer hands over one block at a time, so no serialised
    copy of the index is ever held whole (``serialize`` would hold two)."""
    digest = hashlib.sha256()

    def put(block: bytes) -> None:
        digest.update(block)
        f.write(block)

    writer = faiss.PyCallbackIOWriter(put, STREAM_BLOCK)     # hands over at most STREAM_BLOCK bytes a call
    faiss.write_index(index, writer)
    del writer
    return digest.hexdigest()


def read_index(f, expected: str) -> faiss.Index:
    """The index stored in the open binary file ``f``, read as a stream and checked against its
    sha256 ``expected``: the index is built from blocks as they arrive, without a copy of the file
    in memory. A file that does not match raises ``ValueError``, also when its damage made FAISS
    fail first (the rest of the file is then hashed to tell damage from a FAISS error)."""
    digest = hashlib.sha256()

    def get(n: int) -> bytes:
        block = f.read(n)
        digest.update(block)
        return block

    reader = faiss.PyCallbackIOReader(get, STREAM_BLOCK)
    try:
        index = faiss.read_index(reader)
    except (RuntimeError, MemoryError):
        for block in iter(lambda: f.read(STREAM_BLOCK), b""):
            digest.update(block)
        if digest.hexdigest() != expected:
            raise ValueError("does not match its sha256 in the manifest") from None
        raise
    finally:
        del reader
    digest.update(f.read())                    # trailing bytes, if any: they count in the file's hash
    if digest.hexdigest() != expected:
        raise ValueError("does not match its sha256 in the manifest")
    return index


def check_mappable(root_url: str) -> None:
    """Refuse, naming it, a memory that is not on a local disk: only local files can be mapped."""
    fs, _ = commit.filesystem(root_url)
    if not isinstance(fs, LocalFileSystem):
        raise ValueError(f"cannot memory-map the shards of {root_url}: only a memory on a local disk can be "
                         "mapped (copy it to local disk first, e.g. with `aws s3 sync`)")


def map_index(path: str, expected: str) -> faiss.Index:
    """The index in the local file ``path`` with its inverted lists memory-mapped (IVF indexes;
    FAISS reads other types into memory), after checking the file's sha256 ``expected`` block by
    block. The mapping is read-only: the OS pages lists in as queries visit them, so a shard
    larger than RAM can answer queries."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(STREAM_BLOCK), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError("does not match its sha256 in the manifest")
    return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)


def mapped(index: faiss.Index) -> bool:
    """Whether ``index``'s inverted lists are a read-only file mapping (see ``map_index``)."""
    ivf = faiss.try_extract_index_ivf(index)            # (fast-scan lists, BlockInvertedLists, are never mapped)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def copy_index(index: faiss.Index, mapped_from: str | None = None) -> faiss.Index:
    """An independent in-memory copy of ``index``; one mapped from the local file ``mapped_from``
    is read from it into memory (FAISS cannot clone a mapping, and merging out of it would write
    to it)."""
    return faiss.read_index(mapped_from) if mapped_from else faiss.clone_index(index)


def merge_codes(into: faiss.Index, other: faiss.Index) -> None:
    """Move ``other``'s codes and ids into ``into`` (two copies of one trained index) unchanged:
    FAISS's ``merge_from`` copies the stored codes, so nothing is re-encoded or approximated."""
    try:
        into.merge_from(other, 0)
    except RuntimeError as e:
        raise ValueError(f"FAISS cannot merge indexes of type {type(into).__name__}, so this memory's shards "
                         f"cannot be compacted ({str(e).splitlines()[0][:200]})") from None


def reconstruct(index: faiss.Index, ids: np.ndarray, mapped_from: str | None = None) -> np.ndarray:
    """The vectors stored under ``ids``, decoded from their codes (exact for Flat, the quantised
    vector otherwise). An IVF index needs a map from id to list entry, built on a copy so that the
    index queries run on is never changed (``mapped_from``: see ``copy_index``)."""
    if not len(ids):
        return np.zeros((0, index.d), dtype=np.float32)
    if faiss.try_extract_index_ivf(index) is not None:
        index = copy_index(index, mapped_from)
        faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.Hashtable)
    return index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))


def load_trained(memory_url: str, manifest) -> faiss.Index:
    """The trained empty index of version ``manifest`` of the memory at ``memory_url``."""
    fs, root = commit.filesystem(memory_url)
    return deserialize(fs.cat_file(f"{root}/{manifest.trained_index}"))
