"""One shard of the memory (a FAISS index + its metadata), and the exact merge of shard results.

All shards are copies of one trained empty index, so their inner products are comparable and the
merged top-k equals the top-k of a single index holding every vector.
"""

from __future__ import annotations

import fsspec
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.manifest import ShardEntry, sha256


def search_parameters(index: faiss.Index, nprobe: int | None = None, k_factor: int | None = None):
    """FAISS per-call search parameters for ``index`` (None for a Flat index), so that one loaded
    shard answers every request at the nprobe that request asks for, without mutating the index.

    Walks the wrappers a factory string builds (IDMap, OPQ pre-transform, Refine) down to the IVF.
    Returns ``(params, keep)``: ``keep`` holds the nested parameter objects, which SWIG does not
    keep alive on its own, until the search is done.
    """
    keep = []

    def walk(idx):
        idx = faiss.downcast_index(idx)
        if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return walk(idx.index)
        if isinstance(idx, faiss.IndexPreTransform):
            inner = walk(idx.index)
            return None if inner is None else keep_(faiss.SearchParametersPreTransform(index_params=inner))
        if isinstance(idx, faiss.IndexRefine):
            base = walk(idx.base_index)
            params = faiss.IndexRefineSearchParameters(k_factor=float(k_factor or idx.k_factor))
            if base is not None:
                params.base_index_params = base
            return keep_(params)
        if faiss.try_extract_index_ivf(idx) is not None:
            return keep_(faiss.SearchParametersIVF(nprobe=int(nprobe))) if nprobe else None
        return None

    def keep_(params):
        keep.append(params)
        return params

    return walk(index), keep


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


class Shard:
    """A searchable shard: FAISS index plus (id → uri, label) metadata, sorted by id."""

    def __init__(self, index: faiss.Index, metadata: pa.Table, number: int = 0, search: dict | None = None):
        self.index, self.number = index, number
        self.defaults = dict(search or {})          # the manifest's search defaults: nprobe, k_factor
        metadata = metadata.sort_by("id")
        self.ids = metadata.column("id").to_numpy()
        self.uris = np.array(metadata.column("uri").to_pylist(), dtype=object)
        self.labels = np.array(metadata.column("label").to_pylist(), dtype=object)
        if self.index.ntotal != len(self.ids):
            raise ValueError(f"shard {number}: index holds {self.index.ntotal} vectors but metadata {len(self.ids)} rows")

    @classmethod
    def load(cls, root_url: str, entry: ShardEntry, number: int = 0, search: dict | None = None) -> "Shard":
        """Read shard ``number`` of the memory at ``root_url``, checking its sha256. ``search``
        holds the defaults every query gets unless it asks otherwise (``nprobe``, ``k_factor``)."""
        fs, root = fsspec.core.url_to_fs(root_url)
        root = root.rstrip("/")
        with fs.open(f"{root}/{entry.index}") as f:
            blob = f.read()
        if sha256(blob) != entry.sha256:
            raise ValueError(f"shard {number} of {root_url}: {entry.index} does not match its sha256 in the manifest")
        with fs.open(f"{root}/{entry.metadata}") as f:
            metadata = pq.read_table(f)
        return cls(deserialize(blob), metadata, number, search)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids) ``[nq, k]``; id −1 where the shard has fewer than k vectors.
        ``nprobe`` overrides the default for this call (IVF indexes; ignored by Flat)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise ValueError(f"queries must be [n, {self.index.d}], got {list(queries.shape)}")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be a positive whole number, got {nprobe}")
        params, _keep = search_parameters(self.index, nprobe or self.defaults.get("nprobe"),
                                          self.defaults.get("k_factor"))
        return self.index.search(queries, k, params=params)

    def query(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> dict:
        """``search`` plus each neighbour's uri and label: what one shard answers a router."""
        sims, ids = self.search(queries, k, nprobe)
        uris, labels = self.lookup(ids)
        return {"similarities": sims, "ids": ids, "uris": uris, "labels": labels}

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(uris, labels) for ``ids`` held by this shard (None for −1 or foreign ids)."""
        flat = np.asarray(ids).ravel()
        uris = np.full(flat.shape, None, dtype=object)
        labels = np.full(flat.shape, None, dtype=object)
        if len(self.ids):
            pos = np.minimum(np.searchsorted(self.ids, flat), len(self.ids) - 1)
            found = (flat >= 0) & (self.ids[pos] == flat)
            uris[found], labels[found] = self.uris[pos[found]], self.labels[pos[found]]
        return uris.reshape(np.shape(ids)), labels.reshape(np.shape(ids))


def merge_topk(results: list[dict], k: int, shard_numbers: list[int] | None = None) -> dict:
    """Merge per-shard answers into the global top-k by inner product.

    Each answer is a dict of ``[nq, k']`` arrays with at least ``similarities`` and ``ids`` (as
    ``Shard.query`` returns); every other array is carried along. The result has the same keys
    plus ``shards``: which shard (``shard_numbers[i]`` for the i-th answer) held each neighbour.
    """
    if not results:
        raise ValueError("no shard results to merge")
    shard_numbers = list(range(len(results))) if shard_numbers is None else shard_numbers
    merged = {key: np.concatenate([r[key][:, :k] for r in results], axis=1) for key in results[0]}
    merged["shards"] = np.concatenate([np.full(r["ids"][:, :k].shape, n) for n, r in zip(shard_numbers, results)], axis=1)
    sims = np.where(merged["ids"] >= 0, merged["similarities"], -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    rows = np.arange(sims.shape[0])[:, None]
    out = {key: value[rows, order] for key, value in merged.items()}
    out["ids"] = np.where(np.isfinite(sims[rows, order]), out["ids"], -1)
    return out
