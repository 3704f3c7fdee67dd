"""A build as a parallel add: embedding files → per-shard pieces → one index per shard.

The driver never holds the collection. It reads the files' Parquet footers (``plan_files``), a
training sample (``sample_rows``, one task per file) and the trained empty index; then

1. one task per embedding file (``encode_file``) reads the file once, sorts it by collection id,
   numbers its vectors with memory ids and encodes them with the trained index into one *piece*
   per shard (``index.shard.placement``: the shard owning each vector's IVF list), exactly as
   ``VisualMemory.add`` encodes a delta segment; it also
   returns the exact top-k of the calibration queries among its vectors;
2. one task per shard (``merge_shard``) merges its pieces' codes into one index (``merge_codes``,
   the path ``compact`` uses: codes are moved, never re-encoded), streams the shard to storage with
   its sha256, and searches the calibration queries at increasing nprobe.

With Ray connected, the tasks run on the cluster (pieces travel through the object store, one
CPU each, retried if a worker dies); without Ray they run one after another in this process,
which then holds one file's vectors and the pieces' codes, never the float vectors of the whole
collection. Both give byte-identical shards.
"""

from __future__ import annotations

import functools
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import faiss
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.build.recall import (K_FACTORS, NprobeSweep, RunningTopk, cheapest_setting, drop_self, query_bytes,
                                recall_at_k, stopped_rising)
from index.exact import exact_topk
from index.ingest.embeddings import embedding_dim, embedding_files, embedding_matrix
from index.shard.faiss_io import deserialize, merge_codes, serialize
from index.shard.placement import Placement, encode
from index.shard.search import merge_topk
from index.shard.state import Shard, metadata_table
from index.shard.tiers import best_exact, tier_of
from index.store import commit
from index.store.manifest import ShardEntry

log = logging.getLogger("vismem.index.build")
TASK_OPTIONS = {"num_cpus": 1, "max_retries": 3}     # FAISS runs one OpenMP thread per CPU Ray gives a task


@dataclass
class EmbeddingFile:
    """One embedding Parquet file as the build plans it: its rows get memory ids first … first+rows−1."""
    url: str
    rows: int
    first: int
    min_id: int | None = None


def plan_files(url: str) -> tuple[list[EmbeddingFile], int]:
    """The embedding files under ``url`` from their footers only, in the order of their smallest
    collection id (the Parquet statistics), and the vectors' dimension. Memory ids follow that
    order and, within a file, the collection's ids: for ``vismem embed``'s output (ids in
    contiguous ranges per file) that is the order of the collection's ids."""
    paths = embedding_files(url)

    def footer(path):
        try:
            with fsspec.open(path, "rb") as f:
                meta = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 (pyarrow and the stores raise many kinds; name the file)
            raise ValueError(f"cannot read the Parquet footer of {path} ({type(e).__name__}: {e})") from None
        dim = embedding_dim(meta.schema_arrow, path)
        missing = [c for c in ("id", "uri", "label") if c not in meta.schema_arrow.names]
        if missing:
            raise ValueError(f"{path} is not an embeddings file: it lacks the column(s) {', '.join(missing)} "
                             f"(columns: {', '.join(meta.schema_arrow.names)})")
        column = [meta.metadata.schema.column(i).path for i in range(meta.metadata.num_columns)].index("id")
        stats = [meta.metadata.row_group(g).column(column).statistics for g in range(meta.metadata.num_row_groups)]
        lows = [s.min for s in stats if s is not None and s.has_min_max]
        if len(lows) != len(stats):
            log.warning("%s has no id statistics: its vectors get memory ids after those of files that have them",
                        path)
        return path, meta.metadata.num_rows, dim, min(lows) if len(lows) == len(stats) and lows else None

    with ThreadPoolExecutor(16) as pool:                 # footers are small reads; S3 answers them in parallel
        footers = list(pool.map(footer, paths))
    dims = {dim for _, _, dim, _ in footers}
    if len(dims) > 1:
        raise ValueError(f"{url} mixes embedding dimensions {sorted(dims)}; keep one encoder's embeddings per folder")
    footers.sort(key=lambda f: (f[3] if f[3] is not None else np.iinfo(np.int64).max, f[0]))
    files, first = [], 0
    for path, rows, _, low in footers:
        files.append(EmbeddingFile(path, rows, first, low))
        first += rows
    return files, dims.pop()


def read_file(file: EmbeddingFile, columns: tuple[str, ...] = ("id", "uri", "label", "embedding")) -> pa.Table:
    """The file's rows (``columns`` of them) sorted by collection id; a clear error if it vanished or
    changed since planning."""
    try:
        with fsspec.open(file.url, "rb") as f:
            table = pq.read_table(f, columns=list(columns))
    except FileNotFoundError:
        raise FileNotFoundError(f"embedding file {file.url} disappeared while the build was reading the folder; "
                                "nothing was committed: run the build again once the folder is complete") from None
    except Exception as e:  # noqa: BLE001 (a damaged file: name it)
        raise ValueError(f"cannot read embedding file {file.url} ({type(e).__name__}: {e}); nothing was "
                         "committed") from None
    if len(table) != file.rows:
        raise ValueError(f"embedding file {file.url} changed while the build was reading the folder ({len(table)} "
                         f"rows, {file.rows} when planned); nothing was committed: run the build again")
    ids = table.column("id").to_numpy()
    if len(ids) > 1 and (np.diff(ids) < 0).any():         # ``vismem embed`` writes them sorted: no copy then
        table = table.take(np.argsort(ids, kind="stable"))
    return table


def hands_back_memory(task):
    """A build task that returns what Arrow's allocator kept when it ends: a Ray worker runs task
    after task, and mimalloc keeps each one's freed buffers (0.6 GB after encoding a file of 100,000
    vectors), so the worker's RSS would grow with the tasks it ran instead of staying at one file's."""
    @functools.wraps(task)
    def run(*args):
        try:
            return task(*args)
        finally:
            pa.default_memory_pool().release_unused()
    return run


@hands_back_memory
def sample_rows(file: EmbeddingFile, positions: np.ndarray) -> np.ndarray:
    """The vectors at ``positions`` (in the file's id order): a task's share of the training sample."""
    return embedding_matrix(read_file(file, ("id", "embedding")).take(positions))


@hands_back_memory
def encode_file(file: EmbeddingFile, trained: np.ndarray, placement: Placement, queries: np.ndarray, k: int,
                tier_dtype: str | None = None):
    """Encode one file into one piece per shard, plus the exact top-``k`` of ``queries`` among its
    vectors. Returns ``(piece_0, …, piece_{shards−1}, (similarities, ids))``; a piece is
    ``(serialised index, metadata table, re-rank rows or None)``, empty when the file holds no
    vector of that shard (``tier_dtype``: the two-tier format's, ``index.shard.tiers``).
    Each vector's list is found once: it picks the shard and is the list the piece files it in."""
    table = read_file(file)
    vectors = embedding_matrix(table)
    ids = file.first + np.arange(len(table), dtype=np.int64)
    empty = deserialize(trained)
    columns = table.select(["uri", "label", "id"])
    pieces = []
    for rows, lists in placement.split(empty, vectors, ids):
        index = encode(empty, vectors[rows], ids[rows], lists)
        mine = columns.take(rows)
        pieces.append((serialize(index), metadata_table(ids[rows], mine["uri"], mine["label"], mine["id"]),
                       tier_of(vectors[rows], tier_dtype)))
    return (*pieces, exact_topk(queries, vectors, ids, k))


@dataclass
class Calibration:
    """What the shard tasks search to measure recall: memory vectors with their ids and true neighbours."""
    queries: np.ndarray        # [nq, d]
    own: np.ndarray            # [nq] the memory id of each query vector
    truth: np.ndarray          # [nq, k] exact neighbours, own id dropped
    candidates: list[int]      # nprobes to try, in order
    target: float
    cost: tuple | None = None  # two-tier: (vectors per list, code bytes, re-rank row bytes): see recall.query_bytes
    k_factors: tuple = K_FACTORS     # two-tier: the k_factors to try, in order


@hands_back_memory
def merge_shard(number: int, trained: np.ndarray, memory_url: str, folder: str,
                calibration: Calibration | None, *pieces) -> tuple[ShardEntry, dict]:
    """Merge shard ``number`` from its ``pieces``, write it under ``folder`` of the memory, and
    search the calibration queries at each candidate nprobe until this shard finds the true
    neighbours it holds at the target recall (a margin above it), or stops improving. The merged
    recall can be lower than any shard's, so the driver asks for more nprobes if it needs them
    (``search_shard``). Returns the shard's manifest entry and ``{nprobe: (similarities, ids)}``."""
    index = deserialize(trained)
    for blob, *_ in pieces:
        merge_codes(index, deserialize(blob))
    tier = np.concatenate([rows for *_, rows in pieces]) if pieces and pieces[0][2] is not None else None
    shard = Shard(index, pa.concat_tables([metadata for _, metadata, _ in pieces]), number, tier=tier)
    fs, root = commit.filesystem(memory_url)
    entry = shard.save(fs, root, folder)
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if calibration is not None and not shard.two_tier:        # two tiers: calibrate_two_tier searches them
        k = calibration.truth.shape[1]
        mine = shard.held(calibration.truth.ravel()).reshape(calibration.truth.shape)   # the true neighbours it holds
        history, sweep = [], NprobeSweep(shard, calibration.queries, k + 1)
        for nprobe in calibration.candidates:
            found[nprobe] = sweep.at(nprobe)
            ids = drop_self(found[nprobe][1], calibration.own, k)
            hits = sum(len(set(f) & set(t[m])) for f, t, m in zip(ids, calibration.truth, mine))
            history.append(hits / max(1, int(mine.sum())))
            if history[-1] >= min(0.999, calibration.target + 0.02) or stopped_rising(history):
                break
    return entry, found


def search_shard(memory_url: str, entry: ShardEntry, number: int, queries: np.ndarray, k: int,
                 nprobes: list[int], k_factor: int | None = None) -> dict:
    """Shard ``number`` of a written (not yet committed) build, read back, searched at ``nprobes``
    (a two-tier shard: its candidates at ``k_factor``, ``two_tier_answers``)."""
    shard = Shard.load(memory_url, entry, number)
    if shard.two_tier:
        return two_tier_answers(shard, queries, k, nprobes, k_factor)
    sweep = NprobeSweep(shard, queries, k)
    return {n: sweep.at(n) for n in sorted(nprobes)}


def two_tier_answers(shard: Shard, queries: np.ndarray, k: int, nprobes: list[int], k_factor: int) -> dict:
    """``{nprobe: (code similarities, ids, exact similarities)}`` of a two-tier shard's ``k·k_factor``
    best candidates: merged across shards by their codes and then ordered exactly, they give what
    the memory answers (``Snapshot.search``)."""
    out = {}
    for nprobe in nprobes:
        sims, ids = shard.candidates(queries, k * k_factor, nprobe)
        out[nprobe] = (sims, ids, shard.rerank(queries, ids))
    return out


def calibrate_two_tier(runner: "Runner", entries: list[ShardEntry], calibration: Calibration,
                       memory_url: str) -> dict:
    """The cheapest (nprobe, k_factor) of a two-tier memory whose merged recall reaches the target
    (``recall.cheapest_setting``; cost: the bytes a query reads, ``recall.query_bytes``). In this
    process the shards are read once; on Ray each measurement is one task per shard."""
    k, queries = calibration.truth.shape[1], calibration.queries
    local = None if runner.ray else [Shard.load(memory_url, e, s) for s, e in enumerate(entries)]

    def recall_of(nprobe: int, k_factor: int) -> float:
        if local is not None:
            answers = [two_tier_answers(shard, queries, k + 1, [nprobe], k_factor) for shard in local]
        else:
            answers = runner.get([runner.submit(search_shard, memory_url, e, s, queries, k + 1, [nprobe], k_factor)
                                  for s, e in enumerate(entries)], "calibrate")
        found = merge_topk([dict(zip(("similarities", "ids", "exact"), a[nprobe])) for a in answers],
                           (k + 1) * k_factor)
        recall = recall_at_k(drop_self(best_exact(found, k + 1)["ids"], calibration.own, k), calibration.truth)
        log.info("recall@%d at nprobe %d, k_factor %d: %.3f", k, nprobe, k_factor, recall)
        return recall

    def cost(nprobe: int, k_factor: int) -> float:
        return query_bytes(nprobe, k_factor, k, *calibration.cost)

    (nprobe, k_factor), by = cheapest_setting(recall_of, calibration.candidates, calibration.k_factors, cost,
                                              calibration.target)
    return {"k": k, "recall": by[(nprobe, k_factor)], "nprobe": nprobe, "k_factor": k_factor,
            "target": calibration.target, "queries": len(calibration.own), "bytes_per_query": round(cost(nprobe, k_factor)),
            "by_setting": {f"{n},{f}": round(r, 4) for (n, f), r in by.items()}}


def merged_recall(results: list[dict], calibration: Calibration, nprobe: int) -> float:
    """Recall@k at ``nprobe`` of the shards' answers merged, each query's own id left out."""
    k = calibration.truth.shape[1]
    merged = merge_topk([{"similarities": r[nprobe][0], "ids": r[nprobe][1]} for r in results], k + 1)["ids"]
    return recall_at_k(drop_self(merged, calibration.own, k), calibration.truth)


def calibrate(runner: "Runner", entries: list[ShardEntry], results: list[dict], calibration: Calibration,
              memory_url: str) -> dict:
    """The smallest candidate nprobe whose merged recall reaches the target (else the best), as
    ``{"k", "recall", "nprobe", "target", "queries", "by_nprobe"}``. The shards' first answers
    cover the nprobes every shard searched; when none of those reaches the target, the shards are
    searched again at the next candidates, until one does or recall stops rising."""
    k = calibration.truth.shape[1]
    by_nprobe: dict[int, float] = {}
    remaining = list(calibration.candidates)
    while remaining:
        common = [n for n in remaining if all(n in r for r in results)]
        if not common:
            batch = remaining[:2]
            answers = runner.get([runner.submit(search_shard, memory_url, e, s, calibration.queries, k + 1, batch)
                                  for s, e in enumerate(entries)], "calibrate")
            results = [{**r, **a} for r, a in zip(results, answers)]
            continue
        for n in common:
            by_nprobe[n] = merged_recall(results, calibration, n)
            log.info("recall@%d at nprobe %d: %.3f", k, n, by_nprobe[n])
            remaining.remove(n)
        values = list(by_nprobe.values())
        if max(values) >= calibration.target or stopped_rising(values):
            break
    best = next((n for n, r in by_nprobe.items() if r >= calibration.target), max(by_nprobe, key=by_nprobe.get))
    return {"k": k, "recall": by_nprobe[best], "nprobe": best, "target": calibration.target,
            "queries": len(calibration.own), "by_nprobe": {str(n): round(r, 4) for n, r in by_nprobe.items()}}


class Runner:
    """Runs the build's tasks on Ray when it is connected, else in this process, one after another."""

    def __init__(self, progress: Callable[[str, int, int], object] | None = None, use_ray: bool | None = None,
                 urls: tuple[str, ...] = ()):
        ray = sys.modules.get("ray")           # never import Ray here: a build without it must not start it
        connected = ray is not None and ray.is_initialized()
        if use_ray and not connected:
            raise RuntimeError("the build was asked to run on Ray, but this process is not connected to Ray")
        in_process = [u for u in urls if u.startswith("memory://")]
        if use_ray and in_process:
            raise ValueError(f"{in_process[0]} lives in this process's memory, which Ray workers cannot reach; "
                             "build in process (--local) or use storage every worker shares")
        local = [u for u in urls if "://" not in u or u.startswith("file://")]
        if use_ray and local and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
            raise ValueError(f"{local[0]} is a local path, but the Ray cluster has several nodes, whose tasks would "
                             "each read and write their own disk; use storage every node shares (s3://...)")
        self.ray = ray if connected and use_ray is not False and not in_process else None
        self.progress = progress or (lambda stage, done, total: None)
        self.remotes: dict = {}            # one Ray remote function per task function, exported once

    @property
    def workers(self) -> int:
        return int(self.ray.cluster_resources().get("CPU", 1)) if self.ray else 1

    def put(self, value):
        return self.ray.put(value) if self.ray else value

    def submit(self, fn, *args, num_returns: int = 1):
        """Start ``fn(*args)``; a handle (a Ray ObjectRef, or a list of them for several returns)."""
        if not self.ray:
            result = fn(*args)
            return result if num_returns == 1 else list(result)
        if fn not in self.remotes:
            self.remotes[fn] = self.ray.remote(fn)
        return self.remotes[fn].options(num_returns=num_returns, **TASK_OPTIONS).remote(*args)

    def each(self, handles: list, stage: str):
        """(position, result) of each of ``handles`` as it finishes, fetched one at a time."""
        if not self.ray:
            for i, result in enumerate(handles):
                self.progress(stage, i + 1, len(handles))
                yield i, result
            return
        position = {h: i for i, h in enumerate(handles)}
        pending = list(handles)
        while pending:
            [ready], pending = self.ray.wait(pending, num_returns=1)
            result = self.fetch(ready, stage, position[ready], len(handles), pending)
            self.progress(stage, len(handles) - len(pending), len(handles))
            yield position[ready], result

    def get(self, handles: list, stage: str) -> list:
        """The results of ``handles`` in order, reporting progress as each finishes."""
        if not self.ray:
            for done in range(len(handles)):
                self.progress(stage, done + 1, len(handles))
            return list(handles)
        return [result for _, result in sorted(self.each(handles, stage), key=lambda pair: pair[0])]

    def fetch(self, handle, stage: str, number: int, total: int, pending: list):
        """One finished task's result. A task whose worker died more often than Ray retries it
        (``TASK_OPTIONS``) fails the build with the stage and task named, the other tasks cancelled;
        a task's own error (a vanished file) comes through as it was raised."""
        try:
            return self.ray.get(handle)
        except (self.ray.exceptions.WorkerCrashedError, self.ray.exceptions.NodeDiedError,
                self.ray.exceptions.ObjectLostError, self.ray.exceptions.OutOfMemoryError) as e:
            for other in pending:
                self.ray.cancel(other, force=True)
            raise RuntimeError(f"the build's {stage} task {number + 1} of {total} failed: its worker died "
                               f"{TASK_OPTIONS['max_retries'] + 1} times ({type(e).__name__}; out of memory? "
                               "see the Ray dashboard or the python-core-worker logs); nothing was committed") from e


def training_sample(runner: Runner, files: list[EmbeddingFile], dim: int, size: int, seed: int = 0,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, memory ids) of ``size`` rows drawn uniformly without replacement from every file,
    in random order; each file is read by its own task, only the drawn rows come back, and each
    task's rows go straight to their shuffled places (the sample is held once)."""
    total = files[-1].first + files[-1].rows
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    owner = np.searchsorted(np.array([f.first for f in files]), chosen, side="right") - 1
    slot = rng.permutation(len(chosen))
    rows = [np.flatnonzero(owner == i) for i in range(len(files))]
    jobs = [(mine, runner.submit(sample_rows, file, chosen[mine] - file.first))
            for file, mine in zip(files, rows) if len(mine)]
    vectors, ids = np.empty((len(chosen), dim), np.float32), np.empty(len(chosen), np.int64)
    for j, part in runner.each([handle for _, handle in jobs], "sample"):
        vectors[slot[jobs[j][0]]] = part
        ids[slot[jobs[j][0]]] = chosen[jobs[j][0]]
    return vectors, ids


def parallel_add(runner: Runner, files: list[EmbeddingFile], trained: faiss.Index, placement: Placement, memory_url: str,
                 folder: str, calibration_sample: tuple[np.ndarray, np.ndarray] | None, candidates: list[int],
                 target: float, k: int = 10, tier_dtype: str | None = None, k_factors: tuple = K_FACTORS,
                 ) -> tuple[list[ShardEntry], dict | None]:
    """Encode every file into pieces, merge each shard, and measure recall: (entries, recall).
    ``tier_dtype``: the two-tier format's re-rank rows (``index.shard.tiers``), None for one tier;
    its calibration tries ``k_factors``."""
    blob = runner.put(serialize(trained))
    queries, own = calibration_sample if calibration_sample is not None else (np.zeros((0, trained.d), np.float32),
                                                                              np.zeros(0, np.int64))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    query_ref = runner.put(queries)
    shards = placement.shards
    encoded = [runner.submit(encode_file, f, blob, placement, query_ref, k + 1, tier_dtype, num_returns=shards + 1)
               for f in files]
    best = RunningTopk(len(queries), k + 1)
    for _, (sims, ids) in runner.each([e[shards] for e in encoded], "encode"):
        best.add(sims, ids)
    calibration = None
    if calibration_sample is not None:
        calibration = Calibration(queries, own, drop_self(best.ids, own, k), candidates, target)
        if tier_dtype is not None:
            ivf = faiss.extract_index_ivf(trained)
            calibration.cost = (sum(f.rows for f in files) / ivf.nlist, ivf.code_size,
                                trained.d * np.dtype(tier_dtype).itemsize)
            calibration.k_factors = tuple(k_factors)
    merged = [runner.submit(merge_shard, s, blob, memory_url, folder, calibration, *[e[s] for e in encoded],
                            num_returns=1) for s in range(shards)]
    results = runner.get(merged, "merge")
    entries = [entry for entry, _ in results]
    if calibration is None:
        return entries, None
    if tier_dtype is not None:
        return entries, calibrate_two_tier(runner, entries, calibration, memory_url)
    return entries, calibrate(runner, entries, [found for _, found in results], calibration, memory_url)
