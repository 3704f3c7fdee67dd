"""One shard of the memory, as it is stored and searched, and the exact merge of shard results.

A shard is kept the way log-structured stores keep data (DESIGN §3): a base index, small delta
segments that hold vectors added later, and a deletion set of removed ids. Base and segments are
copies of the memory's one trained empty index, so their inner products are comparable; the
deletion set is applied inside FAISS at search time (an ``IDSelector`` in the per-call search
parameters), so every part returns its k best *live* vectors and merging the parts' top-k gives
exactly the answer of one index built from the live vectors alone. The same holds across shards.

A shard may also carry vote weights (soft pruning): (id, weight) pairs, 1.0 for every id not
listed, stored beside the deletion set and returned with every answer as ``sample_weights``, so
every voting rule, in process or served, applies them. ``compacted`` rewrites base, segments and
deletion set as one base index holding exactly the live vectors' codes (copied, not re-encoded).

``Shard.save`` and ``Shard.load`` are the one way a shard reaches storage, for the build and for
every edit. Index files stream through FAISS's callback reader and writer with their sha256
computed on the way (no serialised copy in memory); a local memory's IVF shards can instead be
memory-mapped (``map_index``), so a shard larger than RAM can answer. A batch of queries is
assigned to IVF lists once for all shards and parts (``coarse_assignment``), which share one
trained quantiser, and each part scans only its lists (``search_preassigned``). A shard object is never changed by an edit: ``with_segment`` and ``without`` return a
new one sharing the unchanged parts, so a query running on the old object sees one version whole.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from index import commit
from index.manifest import Segment, ShardEntry, sha256
from procdata.storage import parquet_bytes

OVERFETCH_LIMIT = 4096         # removed ids per shard up to which Flat parts over-fetch (see Shard.overfetch)
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


def search_parameters(index: faiss.Index, nprobe: int | None = None, k_factor: int | None = None,
                      sel: faiss.IDSelector | None = None):
    """FAISS per-call search parameters for ``index`` (None when nothing differs from the index's
    own settings), so that one loaded shard answers every request at the nprobe it asks for, and
    skips the ids ``sel`` rejects, without mutating the index.

    Walks the wrappers a factory string builds (IDMap, pre-transforms such as OPQ/PCA, Refine) down
    to the index that scans vectors, which is where FAISS consults ``sel``: an IDMap stores the
    memory's ids beside positions, so below it the selector is translated to positions.
    Returns ``(params, keep)``: ``keep`` holds the nested parameter and selector objects, which
    SWIG does not keep alive on its own, until the search is done.
    """
    keep = []

    def keep_(obj):
        keep.append(obj)
        return obj

    def walk(idx, sel):
        idx = faiss.downcast_index(idx)
        if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return walk(idx.index, None if sel is None else keep_(faiss.IDSelectorTranslated(idx.id_map, sel)))
        if isinstance(idx, faiss.IndexPreTransform):
            inner = walk(idx.index, sel)
            return None if inner is None else keep_(faiss.SearchParametersPreTransform(index_params=inner))
        if isinstance(idx, faiss.IndexRefine):
            base = walk(idx.base_index, sel)
            params = faiss.IndexRefineSearchParameters(k_factor=float(k_factor or idx.k_factor))
            if base is not None:
                params.base_index_params = base
            return keep_(params)
        if faiss.try_extract_index_ivf(idx) is not None:
            if not nprobe and sel is None:
                return None
            params = keep_(faiss.SearchParametersIVF())
            if nprobe:
                params.nprobe = int(nprobe)
        elif sel is None:
            return None
        elif isinstance(idx, faiss.IndexHNSW):
            params = keep_(faiss.SearchParametersHNSW())
        else:
            params = keep_(faiss.SearchParameters())
        if sel is not None:
            params.sel = sel
        return params

    return walk(index, sel), keep


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
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists)


def copy_index(index: faiss.Index, mapped_from: str | None = None) -> faiss.Index:
    """An independent in-memory copy of ``index``; one mapped from the local file ``mapped_from``
    is read from it into memory (FAISS cannot clone a mapping, and merging out of it would write
    to it)."""
    return faiss.read_index(mapped_from) if mapped_from else faiss.clone_index(index)


def ids_bytes(ids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, dtype=np.int64), allow_pickle=False)
    return buf.getvalue()


WEIGHTS_DTYPE = np.dtype([("id", "<i8"), ("weight", "<f8")])
NO_WEIGHTS = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))


def weights_bytes(weights: tuple[np.ndarray, np.ndarray]) -> bytes:
    """(ids, weights) as one .npy of (id, weight) records (no pickle needed to read it back)."""
    records = np.zeros(len(weights[0]), dtype=WEIGHTS_DTYPE)
    records["id"], records["weight"] = weights
    buf = io.BytesIO()
    np.save(buf, records, allow_pickle=False)
    return buf.getvalue()


def read_weights(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    records = np.load(io.BytesIO(data), allow_pickle=False)
    return records["id"].astype(np.int64), records["weight"].astype(np.float64)


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


@dataclass
class Part:
    """A searchable piece of a shard (its base or one delta segment): an index and its metadata,
    sorted by id. ``stored`` says where its files are, None until ``Shard.save`` writes them."""
    index: faiss.Index
    metadata: pa.Table
    stored: Segment | None = None
    mapped_from: str | None = None     # the local file whose lists ``index`` maps (``map_index``)

    def __post_init__(self):
        self.metadata = self.metadata.sort_by("id")
        self.ids = self.metadata.column("id").to_numpy()
        self.uris = np.array(self.metadata.column("uri").to_pylist(), dtype=object)
        self.labels = np.array(self.metadata.column("label").to_pylist(), dtype=object)
        if self.index.ntotal != len(self.ids):
            raise ValueError(f"index holds {self.index.ntotal} vectors but metadata {len(self.ids)} rows")
        if plain_ivf(self.index) is not None:           # threads over queries in search_preassigned too (FAISS's
            plain_ivf(self.index).parallel_mode = 3     # default, 0, runs it on one thread); set once, never on a query

    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of each id in this part, whether the part holds it)."""
        if not len(self.ids):
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return pos, (ids >= 0) & (self.ids[pos] == ids)


class Shard:
    """A searchable shard: base + delta segments, minus the deletion set."""

    def __init__(self, index: faiss.Index, metadata: pa.Table, number: int = 0, search: dict | None = None):
        try:
            base = Part(index, metadata)
        except ValueError as e:
            raise ValueError(f"shard {number}: {e}") from None
        self._set(number, search, [base], np.zeros(0, dtype=np.int64), None)

    def _set(self, number, search, parts, deleted, deleted_file, selector=None, weights=NO_WEIGHTS,
             weights_file=None):
        self.number, self.defaults = number, dict(search or {})   # the manifest's search defaults: nprobe, k_factor
        self.parts, self.deleted, self.deleted_file = parts, deleted, deleted_file
        self._selector = selector
        self.weights, self.weights_file = weights, weights_file   # (sorted ids, vote weights), (path, sha256)
        return self

    def _derive(self, **changes) -> "Shard":
        """A new shard sharing every part of this one that ``changes`` does not replace."""
        state = {"parts": self.parts, "deleted": self.deleted, "deleted_file": self.deleted_file,
                 "selector": self._selector, "weights": self.weights, "weights_file": self.weights_file}
        return Shard.__new__(Shard)._set(self.number, self.defaults, **{**state, **changes})

    @property
    def index(self) -> faiss.Index:
        """The base index (every part is encoded with the same trained index)."""
        return self.parts[0].index

    def __len__(self) -> int:
        """Live vectors: base and segments, less the removed ones."""
        return sum(len(p.ids) for p in self.parts) - len(self.deleted)

    # edits -------------------------------------------------------------------------------------
    def with_segment(self, index: faiss.Index, metadata: pa.Table) -> "Shard":
        """This shard plus a delta segment (``index`` encodes ``metadata``'s ids)."""
        overlap = self.held(metadata.column("id").to_numpy())
        if overlap.any():
            raise ValueError(f"shard {self.number} already holds ids {metadata.column('id').to_numpy()[overlap][:10].tolist()}")
        return self._derive(parts=self.parts + [Part(index, metadata)])

    def without(self, ids: np.ndarray) -> "Shard":
        """This shard with ``ids`` (live ids it holds) added to its deletion set."""
        return self._derive(deleted=np.union1d(self.deleted, np.asarray(ids, dtype=np.int64)), deleted_file=None,
                            selector=None)

    def with_weights(self, ids: np.ndarray, weights: np.ndarray) -> "Shard":
        """This shard with vote weights ``weights`` for ``ids`` (ids it holds) and 1.0 for every other
        id: the weights replace the shard's earlier ones."""
        ids, weights = np.asarray(ids, dtype=np.int64), np.asarray(weights, dtype=np.float64)
        if not self.held(ids).all():
            raise ValueError(f"shard {self.number} does not hold ids {ids[~self.held(ids)][:10].tolist()}")
        keep = weights != 1.0
        order = np.argsort(ids[keep], kind="stable")
        return self._derive(weights=(ids[keep][order], weights[keep][order]), weights_file=None)

    def compacted(self) -> "Shard":
        """This shard as one base index of exactly its live vectors and an empty deletion set.

        The base's codes are copied, the segments' merged in (``merge_codes``) and the removed ids
        dropped with ``remove_ids``: every live vector keeps the very code it had, so the answers
        (ids and scores) are those of the shard before, and no removed vector is left in it.
        Vote weights of removed ids are dropped with them.
        """
        index = copy_index(self.parts[0].index, self.parts[0].mapped_from)
        for part in self.parts[1:]:
            merge_codes(index, copy_index(part.index, part.mapped_from))
        if len(self.deleted):
            dropped = index.remove_ids(faiss.IDSelectorBatch(self.deleted))
            if dropped != len(self.deleted):
                raise RuntimeError(f"shard {self.number}: removed {dropped} of {len(self.deleted)} deleted ids")
        metadata = pa.concat_tables([p.metadata for p in self.parts],
                                    promote_options="default")          # a vismem-memory/1 base lacks source_id
        metadata = metadata.filter(pc.invert(pc.is_in(metadata.column("id"), pa.array(self.deleted, pa.int64()))))
        keep = ~np.isin(self.weights[0], self.deleted)
        weights = (self.weights[0][keep], self.weights[1][keep])
        shard = Shard(index, metadata, self.number, self.defaults)
        return shard._derive(weights=weights, weights_file=self.weights_file if keep.all() else None)

    def vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, labels, vectors) of the live vectors, the vectors decoded from their codes."""
        ids, labels, vectors = [], [], []
        for part in self.parts:
            live = ~np.isin(part.ids, self.deleted)
            ids.append(part.ids[live])
            labels.append(part.labels[live])
            vectors.append(reconstruct(part.index, part.ids[live], part.mapped_from))
        return np.concatenate(ids), np.concatenate(labels), np.concatenate(vectors)

    def held(self, ids: np.ndarray) -> np.ndarray:
        """Whether each of ``ids`` is in some part of the shard, removed or not."""
        ids = np.asarray(ids, dtype=np.int64)
        found = np.zeros(len(ids), dtype=bool)
        for part in self.parts:
            found |= part.positions(ids)[1]
        return found

    def matching(self, column: str, wanted: set) -> tuple[np.ndarray, set]:
        """Live ids whose ``column`` ("uri" or "label") is in ``wanted``, and which of ``wanted`` occur."""
        ids, seen = [np.zeros(0, dtype=np.int64)], set()
        if wanted:
            for part in self.parts:
                values = part.uris if column == "uri" else part.labels
                hit = np.fromiter((v in wanted for v in values), dtype=bool, count=len(values))
                hit &= ~np.isin(part.ids, self.deleted)
                ids.append(part.ids[hit])
                seen.update(values[hit])
        return np.concatenate(ids), seen

    def live(self, ids: np.ndarray) -> np.ndarray:
        """Whether each of ``ids`` is a vector this shard answers with."""
        ids = np.asarray(ids, dtype=np.int64)
        return self.held(ids) & ~np.isin(ids, self.deleted)

    # search ------------------------------------------------------------------------------------
    def selector(self) -> faiss.IDSelector | None:
        """The IDSelector that rejects removed ids (None when nothing is removed), built once per
        deletion set: FAISS checks it for each scanned vector, a hash lookup behind a Bloom filter."""
        if not len(self.deleted):
            return None
        if self._selector is None:
            batch = faiss.IDSelectorBatch(self.deleted)
            self._selector = (faiss.IDSelectorNot(batch), batch)        # the Not holds a bare pointer to the batch
        return self._selector[0]

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               coarse: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids) ``[nq, k]`` of live vectors; id −1 where the shard has fewer than k.
        ``nprobe`` overrides the default for this call (IVF indexes; ignored by Flat). ``coarse`` is
        the queries' assignment to IVF lists (``coarse_assignment``), computed once for all shards
        and parts, which share one trained quantiser."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise ValueError(f"queries must be [n, {self.index.d}], got {list(queries.shape)}")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be a positive whole number, got {nprobe}")
        if coarse is not None and nprobe and min(nprobe, self.index.nlist if plain_ivf(self.index) else nprobe) \
                != coarse[1].shape[1]:
            raise ValueError(f"nprobe {nprobe} asked, but the coarse assignment holds {coarse[1].shape[1]} lists")
        answers = []
        for part in [p for p in self.parts if p.index.ntotal] or self.parts[:1]:
            if self.overfetch(part):
                sims, ids = self.search_flat_overfetching(part, queries, k)
            else:
                params, _keep = search_parameters(part.index, nprobe or self.defaults.get("nprobe"),
                                                  self.defaults.get("k_factor"), self.selector())
                if coarse is not None and plain_ivf(part.index) is not None:
                    sims, ids = search_preassigned(plain_ivf(part.index), queries, k, coarse, params)
                else:
                    sims, ids = part.index.search(queries, k, params=params)
            answers.append({"similarities": sims, "ids": ids})
        if len(answers) == 1:
            return answers[0]["similarities"], answers[0]["ids"]
        merged = merge_topk(answers, k)
        return merged["similarities"], merged["ids"]

    def overfetch(self, part: "Part") -> bool:
        """Whether ``part`` is searched by over-fetching rather than with the deletion selector: a
        brute-force index given an ``IDSelector`` leaves FAISS's batched BLAS path for a scalar loop
        (tens of times slower), so a Flat part with few removed ids is searched for k + that many
        and the removed ones dropped, which gives the same k; with many, compaction is the cure."""
        if not len(self.deleted) or len(self.deleted) > OVERFETCH_LIMIT:
            return False
        inner = faiss.downcast_index(part.index)
        inner = faiss.downcast_index(inner.index) if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)) else inner
        return isinstance(inner, faiss.IndexFlat)

    def search_flat_overfetching(self, part: "Part", queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best live vectors of a Flat ``part``: its k + (removed ids it holds) best, less those."""
        removed = int(part.positions(self.deleted)[1].sum())
        sims, ids = part.index.search(queries, k + removed)
        if not removed:
            return sims, ids
        gone = np.isin(ids, self.deleted)
        missing = np.float32(-np.finfo(np.float32).max)          # what FAISS reports where fewer than k exist
        sims = np.where(gone, missing, sims)
        ids = np.where(gone, -1, ids)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)

    def query(self, queries: np.ndarray, k: int, nprobe: int | None = None,
              coarse: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
        """``search`` plus each neighbour's ``describe``: what one shard answers a router."""
        sims, ids = self.search(queries, k, nprobe, coarse)
        uris, labels, weights = self.describe(ids)
        return {"similarities": sims, "ids": ids, "uris": uris, "labels": labels, "sample_weights": weights}

    def describe(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uris, labels, vote weights) of ``ids``, what an answer carries beside each id: the
        weight is 1.0 unless soft pruning gave it another; None, None, 1.0 for −1 or foreign ids."""
        uris, labels = self.lookup(ids)
        return uris, labels, self.sample_weights(ids)

    def sample_weights(self, ids: np.ndarray) -> np.ndarray:
        """Each id's vote weight (float64, same shape as ``ids``): 1.0 where none is recorded."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        out = np.ones(flat.shape, dtype=np.float64)
        known, values = self.weights
        if len(known):
            pos = np.minimum(np.searchsorted(known, flat), len(known) - 1)
            hit = (flat >= 0) & (known[pos] == flat)
            out[hit] = values[pos[hit]]
        return out.reshape(np.shape(ids))

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(uris, labels) for ``ids`` held by this shard (None for −1 or foreign ids)."""
        flat = np.asarray(ids).ravel()
        uris = np.full(flat.shape, None, dtype=object)
        labels = np.full(flat.shape, None, dtype=object)
        for part in self.parts:
            pos, found = part.positions(flat)
            uris[found], labels[found] = part.uris[pos[found]], part.labels[pos[found]]
        return uris.reshape(np.shape(ids)), labels.reshape(np.shape(ids))

    # storage -----------------------------------------------------------------------------------
    def save(self, fs, root: str, folder: str) -> ShardEntry:
        """Write the parts and deletion set not stored yet under ``folder`` (relative to the memory
        root ``root``), and return the shard's manifest entry, which references the stored ones."""
        name = f"{folder}/shard-{self.number:04d}"
        for j, part in enumerate(self.parts):
            if part.stored is None:
                stem = name if j == 0 else f"{name}-segment-{j:04d}"
                digest = []
                commit.write(fs, f"{root}/{stem}.faiss", lambda f: digest.append(write_index(part.index, f)))
                commit.write(fs, f"{root}/{stem}.parquet", parquet_bytes(part.metadata))
                part.stored = Segment(f"{stem}.faiss", f"{stem}.parquet", len(part.ids), digest[0])
        if len(self.deleted) and self.deleted_file is None:
            blob = ids_bytes(self.deleted)
            commit.write(fs, f"{root}/{name}-deleted.npy", blob)
            self.deleted_file = (f"{name}-deleted.npy", sha256(blob))
        if len(self.weights[0]) and self.weights_file is None:
            blob = weights_bytes(self.weights)
            commit.write(fs, f"{root}/{name}-weights.npy", blob)
            self.weights_file = (f"{name}-weights.npy", sha256(blob))
        base = self.parts[0].stored
        path, digest = self.deleted_file or (None, None)
        weights_path, weights_digest = self.weights_file if len(self.weights[0]) else (None, None)
        return ShardEntry(base.index, base.metadata, len(self), base.sha256, [p.stored for p in self.parts[1:]],
                          path, len(self.deleted), digest, base.count, weights_path, len(self.weights[0]),
                          weights_digest)

    @classmethod
    def load(cls, root_url: str, entry: ShardEntry, number: int = 0, search: dict | None = None,
             loaded: dict[str, Part] | None = None, mmap: bool = False) -> "Shard":
        """Read shard ``number`` of the memory at ``root_url`` (base, segments, deletion set),
        checking every file's sha256. ``search`` holds the defaults every query gets unless it asks
        otherwise (``nprobe``, ``k_factor``). ``loaded`` maps index paths to parts already in this
        process (another version's), which are reused instead of read again.

        Index files stream into FAISS block by block (no second copy in memory); with ``mmap`` and a
        memory on a local disk, IVF indexes are memory-mapped instead (``map_index``), so a shard
        larger than RAM can be served. The small files (metadata, deletion set, weights) are fetched
        together (s3fs fetches them concurrently)."""
        fs, root = commit.filesystem(root_url)
        if mmap:
            check_mappable(root_url)
        stored = [Segment(entry.index, entry.metadata, entry.base_count, entry.sha256), *entry.segments]
        reused = {s.index: loaded[s.index] for s in stored if loaded and s.index in loaded and loaded[s.index].stored == s}
        paths = [f"{root}/{s.metadata}" for s in stored if s.index not in reused]
        paths += [f"{root}/{p}" for p in (entry.deleted, entry.weights) if p]
        blobs = fs.cat(paths) if paths else {}               # a dict; s3fs fetches them concurrently

        def checked(path, digest):
            if sha256(blobs[f"{root}/{path}"]) != digest:
                raise ValueError(f"shard {number} of {root_url}: {path} does not match its sha256 in the manifest")
            return blobs[f"{root}/{path}"]

        def index_file(path, digest):
            try:
                if mmap:
                    return map_index(f"{root}/{path}", digest)
                with fs.open(f"{root}/{path}", "rb", block_size=STREAM_BLOCK) as f:
                    return read_index(f, digest)
            except (RuntimeError, MemoryError) as e:
                raise ValueError(f"FAISS cannot read it ({str(e).strip().splitlines()[-1][:200]})") from None

        parts = []
        for s in stored:
            if s.index in reused:
                parts.append(reused[s.index])
                continue
            try:
                index = index_file(s.index, s.sha256)
                parts.append(Part(index, pq.read_table(pa.BufferReader(blobs[f"{root}/{s.metadata}"])), s,
                                  f"{root}/{s.index}" if mapped(index) else None))
            except ValueError as e:
                raise ValueError(f"shard {number} of {root_url}: {s.index} {e}") from None
        deleted = np.zeros(0, dtype=np.int64)
        if entry.deleted:
            deleted = np.load(io.BytesIO(checked(entry.deleted, entry.deleted_sha256)), allow_pickle=False)
        weights = NO_WEIGHTS
        if entry.weights:
            weights = read_weights(checked(entry.weights, entry.weights_sha256))
        shard = Shard.__new__(Shard)._set(number, search, parts, deleted,
                                          (entry.deleted, entry.deleted_sha256) if entry.deleted else None,
                                          weights=weights,
                                          weights_file=(entry.weights, entry.weights_sha256) if entry.weights else None)
        if len(shard) != entry.count or len(deleted) != entry.deleted_count or len(weights[0]) != entry.weights_count:
            raise ValueError(f"shard {number} of {root_url}: its files hold {len(shard)} live vectors, "
                             f"{len(deleted)} removed ids and {len(weights[0])} weights; the manifest says "
                             f"{entry.count}, {entry.deleted_count} and {entry.weights_count}")
        return shard


def plain_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """``index`` as an ``IndexIVF`` when it is one with no wrapper around it (the default factories
    ``IVF…,SQ8`` and ``IVF…,PQ…``), else None: only those take a precomputed coarse assignment."""
    inner = faiss.downcast_index(index)
    return inner if isinstance(inner, faiss.IndexIVF) else None


def coarse_assignment(shards: list["Shard"], queries: np.ndarray, nprobe: int | None = None,
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``nprobe`` nearest IVF lists of each query, ``(similarities, lists)``, from the trained
    quantiser every shard shares: searched once per batch instead of once per shard and part (the
    coarse search is a matmul against all nlist centroids). None when the shards are not plain IVF
    (Flat, HNSW, or a wrapped index such as OPQ or Refine), which then search on their own."""
    ivf = plain_ivf(shards[0].index) if shards else None
    if ivf is None:
        return None
    nprobe = int(nprobe or shards[0].defaults.get("nprobe") or ivf.nprobe)
    if nprobe < 1:
        raise ValueError(f"nprobe must be a positive whole number, got {nprobe}")
    nprobe = min(nprobe, ivf.nlist)                     # as FAISS does when one shard searches alone
    return ivf.quantizer.search(np.ascontiguousarray(queries, dtype=np.float32), nprobe)


def search_preassigned(ivf: faiss.IndexIVF, queries: np.ndarray, k: int, coarse: tuple[np.ndarray, np.ndarray],
                       params: faiss.SearchParametersIVF | None) -> tuple[np.ndarray, np.ndarray]:
    """``ivf.search`` with the coarse assignment given (FAISS's ``search_preassigned``; its Python
    wrapper takes no search parameters, so the C++ call is made here, with the nprobe and
    deletion selector of ``params``)."""
    distances, lists = coarse
    n = len(queries)
    lists, distances = np.ascontiguousarray(lists, dtype=np.int64), np.ascontiguousarray(distances, dtype=np.float32)
    if lists.ndim != 2 or lists.shape[0] != n or distances.shape != lists.shape:
        raise ValueError(f"the coarse assignment is for {lists.shape[0]} queries, not {n}")
    if params is None:
        params = faiss.SearchParametersIVF()
    params.nprobe = lists.shape[1]             # the assignment fixes how many lists each query visits
    sims, ids = np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.int64)
    ivf.search_preassigned_c(n, faiss.swig_ptr(queries), k, faiss.swig_ptr(lists), faiss.swig_ptr(distances),
                             faiss.swig_ptr(sims), faiss.swig_ptr(ids), False, params)
    return sims, ids


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
