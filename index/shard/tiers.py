"""The two-tier shard format: small fast-scan codes in RAM pick candidates, vectors on disk re-rank them.

A factory such as ``IVF4096,PQ48x4fs,Refine(SQfp16)`` is FAISS's own grammar for "scan 4-bit
PQ codes, then re-rank with fp16 vectors", but FAISS keeps an ``IndexRefine``'s refine vectors in
RAM and cannot memory-map them. vismem therefore takes such a factory apart (``split``): the base
(a plain IVF index, placed, assigned and searched like any other) is the memory's trained index,
and the refine tier is kept beside each part's index as a ``.npy`` of its vectors (float16 for
``Refine(SQfp16)``, float32 for ``RFlat``), one row per metadata row, in id order. On a local disk
the tier is memory-mapped (``load``), so the OS pages in only the rows a query re-ranks; what stays
in anonymous memory is the codes and ids (docs/ARCHITECTURE.md §5).

A two-tier search asks the codes for ``k·k_factor`` candidates and scores them exactly against
the tier (``rerank``); ``k_factor`` is a search default in the manifest, like ``nprobe``.
"""

from __future__ import annotations

import hashlib
import io

import faiss
import numpy as np

from index.shard.faiss_io import STREAM_BLOCK

DEFAULT_K_FACTOR = 8
TIER_DTYPES = {"float16": "Refine(SQfp16)", "float32": "RFlat"}
RERANK_BLOCK = 16_384                                   # candidates scored at once (25 MB of float32 at d=384)
MISSING = np.float32(-np.finfo(np.float32).max)        # what FAISS reports where fewer than k exist


def split(index: faiss.Index) -> tuple[faiss.Index, np.dtype | None]:
    """(base, tier dtype) of an index a factory string built: an ``IndexRefine`` over a plain IVF
    index is the base (an owned copy) and the dtype its refine vectors are kept in; any other
    index is itself and None. A refine stage vismem cannot keep on disk is refused, naming it."""
    inner = faiss.downcast_index(index)
    if not isinstance(inner, faiss.IndexRefine):
        return index, None
    base = faiss.downcast_index(inner.base_index)
    if not isinstance(base, faiss.IndexIVF):
        return index, None                  # FAISS's own refine in RAM (e.g. over HNSW): one tier, IDMap2-wrapped
    refine = faiss.downcast_index(inner.refine_index)
    if isinstance(refine, faiss.IndexFlat):
        dtype = np.dtype("float32")
    elif isinstance(refine, faiss.IndexScalarQuantizer) and refine.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
        dtype = np.dtype("float16")
    else:
        raise ValueError(f"vismem keeps the re-rank tier of an IVF factory on disk as float16 or float32 vectors, "
                         f"not {type(refine).__name__}: end the factory with "
                         f"{' or '.join(TIER_DTYPES.values())}")
    return faiss.clone_index(base), dtype


def tier_of(vectors: np.ndarray, dtype: np.dtype | str | None) -> np.ndarray | None:
    """The re-rank rows of ``vectors`` in the tier's dtype (None for a one-tier memory)."""
    return None if dtype is None else np.ascontiguousarray(vectors, dtype=np.dtype(dtype))


def write(tier: np.ndarray, f) -> str:
    """Write ``tier`` as a ``.npy`` to the open binary file ``f`` in blocks; return its sha256."""
    digest = hashlib.sha256()

    class Hashing(io.RawIOBase):
        def writable(self):
            return True

        def write(self, block):
            digest.update(block)
            f.write(bytes(block))
            return len(block)

    out = io.BufferedWriter(Hashing(), STREAM_BLOCK)
    np.lib.format.write_array(out, np.ascontiguousarray(tier), allow_pickle=False)
    out.flush()
    return digest.hexdigest()


def load(fs, path: str, expected: str, local: bool, name: str) -> np.ndarray:
    """The tier stored at ``path``, checked against its sha256 ``expected`` block by block:
    memory-mapped read-only where the memory is on a local disk (``local``), else read whole.
    ``name`` names the file in the error a damaged one raises."""
    digest = hashlib.sha256()
    chunks = None if local else []
    with fs.open(path, "rb", block_size=STREAM_BLOCK) as f:
        for block in iter(lambda: f.read(STREAM_BLOCK), b""):
            digest.update(block)
            if chunks is not None:
                chunks.append(block)
    if digest.hexdigest() != expected:
        raise ValueError(f"{name} does not match its sha256 in the manifest")
    if local:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    return np.load(io.BytesIO(b"".join(chunks)), allow_pickle=False)


def rerank(queries: np.ndarray, ids: np.ndarray, parts, mask: np.ndarray | None = None) -> np.ndarray:
    """Exact inner products ``[nq, m]`` of each query with the tier rows of its candidate ``ids``
    (``[nq, m]``; only where ``mask``, when given), looked up in ``parts`` (each with ``positions``
    and ``tier``); ``MISSING`` elsewhere, for −1 and for ids no part holds. Only the candidates'
    rows are read (from disk pages when mapped)."""
    flat = ids.ravel()
    out = np.full(flat.shape, MISSING, dtype=np.float32)
    asked = np.flatnonzero((flat >= 0) & (True if mask is None else mask.ravel()))
    query_of = asked // ids.shape[1]
    for part in parts:
        pos, found = part.positions(flat[asked])
        held = np.flatnonzero(found)
        for start in range(0, len(held), RERANK_BLOCK):    # a block of rows at a time: bounded scratch memory
            mine = held[start:start + RERANK_BLOCK]
            mine = mine[np.argsort(pos[mine], kind="stable")]       # read the tier in file order
            rows = np.asarray(part.tier[pos[mine]], dtype=np.float32)
            out[asked[mine]] = np.einsum("ij,ij->i", rows, queries[query_of[mine]])
    return out.reshape(ids.shape)


def best_exact(found: dict, k: int) -> dict:
    """The ``k`` best of candidates ``found`` (``ids``, their ``exact`` similarities and any other
    ``[nq, m]`` arrays, which are carried along) by exact similarity, as ``similarities``; −1 ids
    where fewer than ``k`` exist."""
    scores = np.where(found["ids"] >= 0, found["exact"], -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = {key: np.take_along_axis(value, order, 1) for key, value in found.items() if key != "exact"}
    best = np.take_along_axis(scores, order, 1)
    gone = ~np.isfinite(best)
    out["similarities"] = np.where(gone, MISSING, best).astype(np.float32)
    out["ids"] = np.where(gone, -1, out["ids"])
    return out
