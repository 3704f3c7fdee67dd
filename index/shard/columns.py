"""A part's metadata (id, uri, label, source_id) as a file: Parquet, or Arrow IPC mapped from local disk.

One-tier parts keep their metadata in Parquet (compressed, read whole at load). A two-tier part
(``index.shard.tiers``) writes it as an uncompressed Arrow IPC file instead, which a memory on a
local disk memory-maps: the columns are then file pages, not anonymous memory, and an answer reads
only the rows of its k neighbours (``values``); the ids are the one column every search touches
(``Part.positions``), and they are paged in like the re-rank tier. The file kind follows the name.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from procdata.storage import parquet_bytes

ARROW = ".arrow"
METADATA_SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string()), ("label", pa.string()),
                             ("source_id", pa.int64())])


def metadata_table(ids, uris, labels, source_ids=None) -> pa.Table:
    """The metadata of memory items: the memory's id, and the uri, label and id in its collection
    (each column a sequence, or an Arrow array that is used without a trip through Python objects)."""
    def column(values, kind):
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            return values.cast(kind)
        return pa.array(list(values), kind)
    return pa.table({"id": pa.array(ids, pa.int64()), "uri": column(uris, pa.string()),
                     "label": column(labels, pa.string()),
                     "source_id": column(source_ids if source_ids is not None else [None] * len(ids), pa.int64())},
                    schema=METADATA_SCHEMA)


def suffix(two_tier: bool) -> str:
    """The metadata file's suffix for a part of one tier or two."""
    return ARROW if two_tier else ".parquet"


def table_bytes(table: pa.Table, path: str) -> bytes:
    """``table`` in the file format ``path``'s suffix names (one record batch for Arrow IPC)."""
    if not path.endswith(ARROW):
        return parquet_bytes(table)
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks(), max_chunksize=max(1, len(table)))
    return sink.getvalue()


def read_table(path: str, blob: bytes | None = None, columns: list[str] | None = None) -> pa.Table:
    """The metadata table stored at local ``path`` (memory-mapped when it is Arrow IPC), or in
    ``blob``, the bytes of the file ``path`` names."""
    if not path.endswith(ARROW):
        return pq.read_table(pa.BufferReader(blob) if blob is not None else path, columns=columns)
    source = pa.BufferReader(blob) if blob is not None else pa.memory_map(path, "r")
    table = pa.ipc.open_file(source).read_all()
    return table.select(columns) if columns else table


def values(table: pa.Table, column: str, rows: np.ndarray | None = None) -> np.ndarray:
    """``column`` of ``table`` at ``rows`` (all rows when None) as an object array (None for nulls):
    Python objects are made only for the rows asked."""
    data = table.column(column)
    if rows is not None:
        data = data.take(pa.array(np.asarray(rows, dtype=np.int64)))
    return np.array(data.to_pylist(), dtype=object)
