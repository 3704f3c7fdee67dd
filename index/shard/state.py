"""One shard of the memory, as it is stored and searched: its state and the rule of which ids are live.

A shard is kept the way log-structured stores keep data (docs/ARCHITECTURE.md §5): a base index, small delta
segments that hold vectors added later, and a deletion set of removed ids. Base and segments are
copies of the memory's one trained empty index, so their inner products are comparable; the
deletion set is applied inside FAISS at search time (an ``IDSelector`` in the per-call search
parameters, ``index.shard.search``), so every part returns its k best *live* vectors and merging the
parts' top-k gives exactly the answer of one index built from the live vectors alone. The same holds
across shards.

A shard may also carry vote weights (soft pruning): (id, weight) pairs, 1.0 for every id not
listed, stored beside the deletion set and returned with every answer as ``sample_weights``, so
every voting rule, in process or served, applies them. ``compacted`` rewrites base, segments and
deletion set as one base index holding exactly the live vectors' codes (copied, not re-encoded).

``Shard.save`` and ``Shard.load`` are the one way a shard reaches storage, for the build and for
every edit; index files stream or are memory-mapped through ``index.shard.faiss_io``. A batch of
queries is assigned to IVF lists once for all shards and parts (``coarse_assignment``), which share
one trained quantiser, and each part scans only its lists (``search_preassigned``). A shard object
is never changed by an edit: ``with_segment`` and ``without`` return a new one sharing the unchanged
parts, so a query running on the old object sees one version whole.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from index.shard.faiss_io import (STREAM_BLOCK, check_mappable, copy_index, map_index, mapped, merge_codes, read_index,
                                  reconstruct, write_index)
from index.shard import columns, tiers
from index.shard.columns import metadata_table  # noqa: F401 (at home in columns, imported from here too)
from index.shard.search import merge_topk, plain_ivf, search_parameters, search_preassigned
from index.store import commit
from index.store.manifest import Segment, ShardEntry, sha256

OVERFETCH_LIMIT = 4096         # removed ids per shard up to which Flat parts over-fetch (see Shard.overfetch)
def ids_bytes(ids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, dtype=np.int64), allow_pickle=False)
    return buf.getvalue()


def read_ids(data: bytes) -> np.ndarray:
    """The ids of a deletion file (``ids_bytes`` read back)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def live_mask(ids: np.ndarray, deleted: np.ndarray) -> np.ndarray:
    """The live-id rule: whether each of ``ids`` is live, that is not in the deletion set ``deleted``
    (held by the shard or not: ``Shard.live`` asks both)."""
    return ~np.isin(ids, deleted)


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


@dataclass
class Part:
    """A searchable piece of a shard (its base or one delta segment): an index and its metadata,
    sorted by id. ``stored`` says where its files are, None until ``Shard.save`` writes them."""
    index: faiss.Index
    metadata: pa.Table
    stored: Segment | None = None
    mapped_from: str | None = None     # the local file whose lists ``index`` maps (``map_index``)
    tier: np.ndarray | None = None     # two-tier format: re-rank vectors, one row per metadata row (index.shard.tiers)

    def __post_init__(self):
        id_column = self.metadata.column("id")                # one chunk (a stored part): no copy, mapped or not
        ids = id_column.chunk(0).to_numpy() if id_column.num_chunks == 1 else id_column.to_numpy()
        if len(ids) > 1 and (np.diff(ids) < 0).any():        # sorted already (a stored part): kept as it is,
            order = np.argsort(ids, kind="stable")           # mapped columns included
            self.metadata, ids = self.metadata.take(order), ids[order]
            self.tier = None if self.tier is None else self.tier[order]    # rows follow the metadata
        self.ids = ids
        if self.index.ntotal != len(self.ids):
            raise ValueError(f"index holds {self.index.ntotal} vectors but metadata {len(self.ids)} rows")
        if self.tier is not None and len(self.tier) != len(self.ids):
            raise ValueError(f"the re-rank tier holds {len(self.tier)} vectors but metadata {len(self.ids)} rows")
        if plain_ivf(self.index) is not None:           # threads over queries in search_preassigned too (FAISS's
            plain_ivf(self.index).parallel_mode = 3     # default, 0, runs it on one thread); set once, never on a query

    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of each id in this part, whether the part holds it)."""
        if not len(self.ids):
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return pos, (ids >= 0) & (self.ids[pos] == ids)

    def values(self, column: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The ``column`` ("uri" or "label") of ``rows`` (all when None), read from the metadata
        columns, which are not held as Python objects (``index.shard.columns``)."""
        return columns.values(self.metadata, column, rows)

    def decoded(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (ids this part holds): the re-rank tier's rows where the part
        has one (the vectors the memory answers with), else decoded from the codes (``reconstruct``)."""
        if self.tier is None:
            return reconstruct(self.index, ids, self.mapped_from)
        return np.asarray(self.tier[self.positions(np.asarray(ids, dtype=np.int64))[0]], dtype=np.float32)


class Shard:
    """A searchable shard: base + delta segments, minus the deletion set."""

    def __init__(self, index: faiss.Index, metadata: pa.Table, number: int = 0, search: dict | None = None,
                 tier: np.ndarray | None = None):
        try:
            base = Part(index, metadata, tier=tier)
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

    @property
    def two_tier(self) -> bool:
        """Whether codes pick candidates that a re-rank tier scores (``index.shard.tiers``)."""
        return self.parts[0].tier is not None

    def tier_rows(self, vectors: np.ndarray) -> np.ndarray | None:
        """``vectors`` as this shard's re-rank tier keeps them (None for a one-tier shard)."""
        return tiers.tier_of(vectors, self.parts[0].tier.dtype if self.two_tier else None)

    def k_factor(self, asked: int | None = None) -> int:
        """Candidates per answer a two-tier search re-ranks: ``asked``, else the manifest's default."""
        k_factor = asked if asked is not None else self.defaults.get("k_factor") or tiers.DEFAULT_K_FACTOR
        if int(k_factor) != k_factor or k_factor < 1:
            raise ValueError(f"k_factor must be a positive whole number, got {k_factor}")
        return int(k_factor)

    def __len__(self) -> int:
        """Live vectors: base and segments, less the removed ones."""
        return sum(len(p.ids) for p in self.parts) - len(self.deleted)

    # edits -------------------------------------------------------------------------------------
    def with_segment(self, index: faiss.Index, metadata: pa.Table, tier: np.ndarray | None = None) -> "Shard":
        """This shard plus a delta segment (``index`` encodes ``metadata``'s ids; ``tier``: their
        re-rank vectors, in the metadata's order, which a two-tier shard needs)."""
        if (tier is None) == self.two_tier:
            raise ValueError(f"shard {self.number} is {'two' if self.two_tier else 'one'}-tier: a segment "
                             f"{'needs' if self.two_tier else 'cannot have'} re-rank vectors (index.shard.tiers)")
        overlap = self.held(metadata.column("id").to_numpy())
        if overlap.any():
            raise ValueError(f"shard {self.number} already holds ids {metadata.column('id').to_numpy()[overlap][:10].tolist()}")
        return self._derive(parts=self.parts + [Part(index, metadata, tier=tier)])

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
        live = live_mask(metadata.column("id").to_numpy(), self.deleted)
        metadata = metadata.filter(pa.array(live))
        tier = np.concatenate([p.tier for p in self.parts])[live] if self.two_tier else None   # removed rows dropped
        keep = live_mask(self.weights[0], self.deleted)
        weights = (self.weights[0][keep], self.weights[1][keep])
        shard = Shard(index, metadata, self.number, self.defaults, tier)
        return shard._derive(weights=weights, weights_file=self.weights_file if keep.all() else None)

    def vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, labels, vectors) of the live vectors, the vectors decoded from their codes."""
        ids, labels, vectors = [], [], []
        for part in self.parts:
            live = live_mask(part.ids, self.deleted)
            ids.append(part.ids[live])
            labels.append(part.values("label")[live])
            vectors.append(part.decoded(part.ids[live]))
        return np.concatenate(ids), np.concatenate(labels), np.concatenate(vectors)

    def live_ids(self, part: Part) -> np.ndarray:
        """The ids of ``part`` (one of ``parts``) this shard answers with, in the part's order."""
        return part.ids[live_mask(part.ids, self.deleted)]

    def live_labels(self) -> set:
        """The labels of the vectors this shard answers with."""
        return set().union(*(part.values("label", np.flatnonzero(live_mask(part.ids, self.deleted)))
                             for part in self.parts))

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
                values = part.values(column)
                hit = np.fromiter((v in wanted for v in values), dtype=bool, count=len(values))
                hit &= live_mask(part.ids, self.deleted)
                ids.append(part.ids[hit])
                seen.update(values[hit])
        return np.concatenate(ids), seen

    def live(self, ids: np.ndarray) -> np.ndarray:
        """Whether each of ``ids`` is a vector this shard answers with."""
        ids = np.asarray(ids, dtype=np.int64)
        return self.held(ids) & live_mask(ids, self.deleted)

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
               coarse: tuple[np.ndarray, np.ndarray] | None = None,
               k_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids) ``[nq, k]`` of live vectors; id −1 where the shard has fewer than k.
        ``nprobe`` overrides the default for this call (IVF indexes; ignored by Flat). ``coarse`` is
        the queries' assignment to IVF lists (``coarse_assignment``), computed once for all shards
        and parts, which share one trained quantiser. A two-tier shard re-ranks its
        ``k·k_factor`` best candidates exactly (``candidates``, ``rerank``)."""
        if self.two_tier:
            _, ids = self.candidates(queries, k * self.k_factor(k_factor), nprobe, coarse)
            best = tiers.best_exact({"ids": ids, "exact": self.rerank(queries, ids)}, k)
            return best["similarities"], best["ids"]
        return self.candidates(queries, k, nprobe, coarse)

    def rerank(self, queries: np.ndarray, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Exact similarities ``[nq, m]`` of ``queries`` with the candidates ``ids`` (those in
        ``mask``, when given) this two-tier shard holds, from its re-rank tier (``tiers.MISSING``
        for the others)."""
        return tiers.rerank(np.ascontiguousarray(queries, dtype=np.float32), ids, self.parts, mask)

    def candidates(self, queries: np.ndarray, k: int, nprobe: int | None = None,
                   coarse: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best live vectors by their codes' similarity (what ``search`` answers for a
        one-tier shard), its parts' answers merged."""
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
        gone = ~live_mask(ids, self.deleted)
        missing = np.float32(-np.finfo(np.float32).max)          # what FAISS reports where fewer than k exist
        sims = np.where(gone, missing, sims)
        ids = np.where(gone, -1, ids)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)

    def query(self, queries: np.ndarray, k: int, nprobe: int | None = None,
              coarse: tuple[np.ndarray, np.ndarray] | None = None, k_factor: int | None = None) -> dict:
        """``search`` plus each neighbour's ``describe``: what one shard answers a router."""
        sims, ids = self.search(queries, k, nprobe, coarse, k_factor)
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
            if found.any():
                uris[found], labels[found] = part.values("uri", pos[found]), part.values("label", pos[found])
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
                meta = f"{stem}{columns.suffix(part.tier is not None)}"
                commit.write(fs, f"{root}/{meta}", columns.table_bytes(part.metadata, meta))
                if part.tier is not None:
                    commit.write(fs, f"{root}/{stem}.tier.npy", lambda f: digest.append(tiers.write(part.tier, f)))
                part.stored = Segment(f"{stem}.faiss", meta, len(part.ids), digest[0],
                                      *((f"{stem}.tier.npy", digest[1]) if part.tier is not None else ()))
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
                          weights_digest, base.tier, base.tier_sha256)

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
        stored = [Segment(entry.index, entry.metadata, entry.base_count, entry.sha256, entry.tier, entry.tier_sha256),
                  *entry.segments]
        reused = {s.index: loaded[s.index] for s in stored if loaded and s.index in loaded and loaded[s.index].stored == s}
        local = isinstance(fs, LocalFileSystem)
        paths = [f"{root}/{s.metadata}" for s in stored if s.index not in reused
                 and not (local and s.metadata.endswith(columns.ARROW))]          # those are mapped instead
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
            except ValueError as e:
                raise ValueError(f"shard {number} of {root_url}: {s.index} {e}") from None
            tier = tiers.load(fs, f"{root}/{s.tier}", s.tier_sha256, local,
                              f"shard {number} of {root_url}: {s.tier}") if s.tier else None
            try:
                metadata = columns.read_table(f"{root}/{s.metadata}", blobs.get(f"{root}/{s.metadata}"))
                parts.append(Part(index, metadata, s, f"{root}/{s.index}" if mapped(index) else None, tier))
            except ValueError as e:
                raise ValueError(f"shard {number} of {root_url}: {s.index} {e}") from None
        deleted = np.zeros(0, dtype=np.int64)
        if entry.deleted:
            deleted = read_ids(checked(entry.deleted, entry.deleted_sha256))
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
