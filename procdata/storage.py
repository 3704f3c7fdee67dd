"""Storage helpers every package shares (procdata is the lowest layer, so they live here).

Storage is always an fsspec URL (docs/ARCHITECTURE.md §3). Three things every writer needs, each in one place:
an atomic write (a reader never sees half a file), a Parquet table as bytes, and the check that an
output location can be written without creating a bucket or a path the user did not ask for.
"""

from __future__ import annotations

import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then move it into place.

    On a local disk the move is a rename; on S3 it is a copy and a delete, so a reader sees either
    no object or the whole one, never a partial upload.
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of one Parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def check_writable(url: str, what: str = "output") -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root of ``url``, after checking that its top level exists (an S3 bucket is
    never created for the user: a typo would otherwise make a new bucket) and that a file can be
    written there. Folders (or S3 prefixes) below the top level are created as needed."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise ValueError(f"cannot use {what} {url}: {e}") from None
    root = root.rstrip("/")
    top = root[:len(root) - len(root.lstrip("/"))] + root.lstrip("/").split("/", 1)[0]
    try:
        top_exists = fs.exists(top)
    except Exception as e:  # noqa: BLE001 (s3fs raises many kinds: bad endpoint, auth, ...)
        raise PermissionError(f"cannot reach {what} {url}: {type(e).__name__}: {e}") from None
    if not top_exists:
        raise FileNotFoundError(f"cannot write {what} {url}: {top} does not exist (a missing bucket is never "
                                "created for you); create it first")
    probe = f"{root}/.write-test-{uuid.uuid4().hex}"
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except Exception as e:  # noqa: BLE001 (any storage error means the same: cannot write there)
        raise PermissionError(f"cannot write {what} {url}: {type(e).__name__}: {e}") from None
    return fs, root
