"""``vismem index bench``: build a memory from clustered synthetic vectors through the real path
(embedding Parquet → ``build_memory``), then measure recall@10 against exact search and queries/s
across nprobe, beside bare FAISS holding the same vectors in one index with the same factory.

The memory's answers are sharded and merged; bare FAISS is the reference for both the quality
(recall must match: merging is exact) and the speed (the ratio is what the README reports, since
this machine is shared and absolute figures drift). ``--also`` measures other factory strings with
bare FAISS only, to show why the default was chosen.

FAISS, Ray and the modules built on them are imported where they are used: the CLI reads this
module's defaults for ``--help``, and must start on machines without FAISS (``eval-knn`` runs there)
and before Ray may be imported.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np

if TYPE_CHECKING:
    import faiss

from index.ingest.embeddings import write_vectors
from index.synthetic import ClusteredVectors

log = logging.getLogger("vismem.index.bench")
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class IndexBenchConfig:
    vectors: int = 1_000_000
    dim: int = 384
    clusters: int = 32_768
    spread: float = 0.6
    shards: int = 4
    queries: int = 1000
    k: int = 10
    factory: str | None = None            # None: the build's default for this size
    nprobes: tuple[int, ...] = NPROBES
    also: tuple[str, ...] = ()            # more factory strings, bare FAISS only
    memories: tuple[str, ...] = ()        # more factory strings built as memories, measured beside the default
    latency_queries: int = 200            # single queries timed one at a time, per memory
    workdir: str | None = None            # where embeddings and the memory go (default: a temporary folder)
    file_rows: int = 100_000              # vectors per embedding Parquet file
    workers: int | None = None            # CPUs of the local Ray for the parallel build (default: all)
    seed: int = 0


def write_synthetic_embeddings(url: str, data: ClusteredVectors, n: int, file_rows: int) -> None:
    """``n`` vectors of ``data`` as an embeddings folder that ``build_memory`` reads like any other."""
    spec = f"synthetic:clustered:{data.dim}:{data.clusters}:{data.spread}:{data.seed}"
    write_vectors(url, data.rows(0, n), [None] * n, [f"synthetic://{i}" for i in range(n)], collection=spec,
                  encoder=spec, rows_per_file=file_rows)


def timed_search(search, queries: np.ndarray, repeat: int = 3) -> tuple[np.ndarray, float]:
    """(ids, queries/s): the best of ``repeat`` runs of one batched search (the machine is shared)."""
    best, ids = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        ids = search(queries)
        best = min(best, time.perf_counter() - start)
    return ids, len(queries) / best


def bare_faiss(vectors: np.ndarray, factory: str) -> tuple[faiss.Index, float, float]:
    """One index over every vector, trained and filled the way the build does: (index, seconds
    training, seconds adding)."""
    from index.build.build import train_empty_index           # FAISS: see the module docstring
    start = time.perf_counter()
    index = train_empty_index(vectors, factory)
    trained = time.perf_counter()
    index.add_with_ids(vectors, np.arange(len(vectors)))
    return index, trained - start, time.perf_counter() - trained


def bare_search(index: faiss.Index, k: int, nprobe: int):
    from index.shard.search import search_parameters            # FAISS: see the module docstring

    def search(queries):
        params, _keep = search_parameters(index, nprobe)
        return index.search(queries, k, params=params)[1]
    return search


def run(cfg: IndexBenchConfig, emit=print, start_ray=None):
    """Run the benchmark; ``emit`` gets one dict per measurement. Returns the summary dict.

    Each build (one worker in one process; all workers on Ray) and the bare FAISS build run in a
    process of their own, so that each one's peak RSS is its own. Searches compare the memory with
    one bare FAISS index filled from the memory's own trained index, so both hold the same codes.
    ``start_ray(num_cpus=...)`` starts the local Ray of the parallel build in its process (the CLI
    passes ``cluster.runtime.init_ray``; default ``ray.init``).
    """
    import faiss                                                # FAISS and what builds on it: see the docstring

    from index.build.build import CALIBRATION_QUERIES, training_size
    from index.build.recall import recall_at_k
    from index.exact import exact_search
    from index.memory import VisualMemory
    from index.shard.faiss_io import load_trained
    from index.store.manifest import read_manifest
    data = ClusteredVectors(cfg.dim, cfg.clusters, cfg.spread, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="vismem-index-bench-") as tmp:
        work = (cfg.workdir or tmp).rstrip("/")
        start = time.perf_counter()
        write_synthetic_embeddings(f"{work}/embeddings", data, cfg.vectors, cfg.file_rows)
        log.info("wrote %d synthetic vectors in %.0fs", cfg.vectors, time.perf_counter() - start)

        builds = {}
        for workers in dict.fromkeys((1, cfg.workers or os.cpu_count() or 1)):
            builds[workers] = in_own_process(timed_build, f"{work}/embeddings", f"{work}/memory-{workers}w",
                                             cfg.shards, cfg.factory, workers, start_ray)
        memory_url = f"{work}/memory-{max(builds)}w"
        manifest = read_manifest(memory_url)
        bare_build = in_own_process(timed_bare_build, data, cfg.vectors, manifest.factory)
        sample_gb = (training_size(manifest.factory) + CALIBRATION_QUERIES) * cfg.dim * 4 / 2 ** 30
        fs, root = fsspec.core.url_to_fs(memory_url)
        memory_bytes = sum(fs.size(f"{root}/{s.index}") for s in manifest.shards)
        for workers, build in builds.items():
            emit(build_run_record(cfg, manifest.factory, workers, build, bare_build, sample_gb))
        summary = {"what": "build", "vectors": cfg.vectors, "dim": cfg.dim, "shards": cfg.shards,
                   "factory": manifest.factory, "build_s": round(builds[max(builds)]["seconds"], 1),
                   "bytes_per_vector": round(memory_bytes / cfg.vectors, 1), "default_nprobe": manifest.search.get("nprobe"),
                   "claimed_recall": manifest.recall, "shard_vectors": [s.count for s in manifest.shards],
                   "placement": (manifest.placement or {}).get("by", "ids")}

        start = time.perf_counter()
        memory = VisualMemory.open(memory_url)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        mapped = VisualMemory.open(memory_url, mmap=True) if "://" not in memory_url else None
        mmap_s = time.perf_counter() - start
        summary.update(load_s=round(load_s, 2), mmap_load_s=round(mmap_s, 2) if mapped else None)
        emit(summary)
        vectors = data.rows(0, cfg.vectors)
        queries = data.queries(cfg.queries)
        truth = exact_search(vectors, queries, cfg.k)[1]

        bare = load_trained(memory_url, manifest)           # the memory's trained index: the same codes
        bare.add_with_ids(vectors, np.arange(cfg.vectors))
        emit({"what": "bare_faiss_index", "factory": manifest.factory,
              "bytes_per_vector": round(faiss.serialize_index(bare).nbytes / cfg.vectors, 1)})
        sweep = sorted(set(cfg.nprobes) | ({manifest.search["nprobe"]} if manifest.search.get("nprobe") else set()))
        for nprobe in sweep if manifest.search else [None]:
            found, qps = timed_search(lambda q: memory.search(q, cfg.k, nprobe=nprobe).ids, queries)
            bare_found, bare_qps = timed_search(bare_search(bare, cfg.k, nprobe), queries)
            record = {"what": "search", "factory": manifest.factory, "nprobe": nprobe,
                      "default": nprobe == manifest.search.get("nprobe"),
                      "recall_at_10": round(recall_at_k(found, truth), 4), "qps": round(qps),
                      "bare_recall_at_10": round(recall_at_k(bare_found, truth), 4), "bare_qps": round(bare_qps),
                      "qps_ratio": round(qps / bare_qps, 2)}
            if mapped is not None:
                record["mmap_qps"] = round(timed_search(lambda q: mapped.search(q, cfg.k, nprobe=nprobe).ids,
                                                        queries)[1])
            emit(record)
            if record["default"]:
                summary.update(default_recall_at_10=record["recall_at_10"], default_qps_ratio=record["qps_ratio"])
        del bare
        del memory, mapped
        compare_memories(cfg, work, {manifest.factory: memory_url}, queries, truth, summary, emit,
                         lambda factory, build: build_run_record(cfg, factory, 1, build, bare_build, sample_gb))
        for factory in cfg.also:
            bare_factory_figures(cfg, factory, vectors, queries, truth, emit)
    return summary


def compare_memories(cfg: IndexBenchConfig, work: str, compared: dict, queries: np.ndarray, truth: np.ndarray,
                     summary: dict, emit, build_record) -> None:
    """``--memories``: build each factory as a memory (one worker, in its own process), then open
    the default memory and each of them in a fresh process and emit their ``resident_record``."""
    for factory in cfg.memories:
        url = f"{work}/memory-{len(compared)}"
        emit(build_record(factory, in_own_process(timed_build, f"{work}/embeddings", url, cfg.shards, factory, 1)))
        compared[factory] = url
    for url in compared.values():
        emit(resident_record(cfg, url, queries, truth, summary))


def resident_record(cfg: IndexBenchConfig, url: str, queries: np.ndarray, truth: np.ndarray, summary: dict) -> dict:
    """One memory opened in a fresh process (``resident_search``): its resident anonymous bytes per
    vector, recall@10, batched queries/s and single-query latency at its calibrated defaults, and
    the bytes of its files per vector (codes and ids; a two-tier memory's re-rank tier apart)."""
    from index.build.recall import recall_at_k                 # FAISS underneath: see the module docstring
    from index.store.manifest import read_manifest
    manifest = read_manifest(url)
    fs, root = fsspec.core.url_to_fs(url)
    indexes = sum(fs.size(f"{root}/{p}") for s in manifest.shards for p in [s.index] + [g.index for g in s.segments])
    tier = sum(fs.size(f"{root}/{s.tier}") for s in manifest.shards if s.tier)
    measured = in_own_process(resident_search, url, queries, cfg.k, cfg.latency_queries)
    record = {"what": "resident", "vectors": cfg.vectors, "dim": cfg.dim, "shards": cfg.shards,
              "factory": manifest.factory, **manifest.search,
              "recall_at_10": round(recall_at_k(measured.pop("ids"), truth), 4),
              "index_file_bytes_per_vector": round(indexes / cfg.vectors, 1),
              "tier_file_bytes_per_vector": round(tier / cfg.vectors, 1), **measured}
    if record["factory"] == summary["factory"]:
        summary["resident"] = record
    else:
        base = summary.get("resident")
        if base:
            record["qps_ratio_to_default"] = round(record["qps"] / base["qps"], 2)
            record["latency_ratio_to_default"] = round(record["single_p50_ms"] / base["single_p50_ms"], 2)
            record["ram_ratio_to_default"] = round(record["rss_anon_bytes_per_vector"]
                                                   / base["rss_anon_bytes_per_vector"], 3)
    return record


def resident_search(url: str, queries: np.ndarray, k: int, single: int) -> dict:
    """In this (fresh) process: RssAnon before ``VisualMemory.open``, after it and after a batch of
    searches (codes, ids, metadata, search buffers: what the memory keeps in anonymous memory; a
    mapped tier's pages are file pages, reported apart as RssFile), the batch's ids and best
    queries/s, and the latency of ``single`` queries asked one at a time."""
    from index.memory import VisualMemory                       # FAISS underneath: see the module docstring
    before = rss_kb()
    memory = VisualMemory.open(url)
    opened = rss_kb()
    ids, qps = timed_search(lambda q: memory.search(q, k).ids, queries)
    searched = rss_kb()
    latencies = []
    for query in queries[:single]:
        start = time.perf_counter()
        memory.search(query[None], k)
        latencies.append(time.perf_counter() - start)
    n = len(memory)
    return {"ids": ids, "qps": round(qps), "single_p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 3),
            "single_p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 3),
            "rss_anon_bytes_per_vector_open": round((opened["RssAnon"] - before["RssAnon"]) * 1024 / n, 1),
            "rss_anon_bytes_per_vector": round((searched["RssAnon"] - before["RssAnon"]) * 1024 / n, 1),
            "rss_file_mb_after_search": round((searched["RssFile"] - before["RssFile"]) / 1024, 1)}


def rss_kb(pid: int | str = "self") -> dict:
    """A process's resident memory by kind (``RssAnon``, ``RssFile``, ``RssShmem``), in kB."""
    with open(f"/proc/{pid}/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith("Rss")}


def build_run_record(cfg: IndexBenchConfig, factory: str, workers: int, build: dict, bare_build: dict,
                     sample_gb: float) -> dict:
    """The figures of one timed build (``timed_build``) beside the bare FAISS build's."""
    return {"what": "build_run", "vectors": cfg.vectors, "dim": cfg.dim, "shards": cfg.shards,
            "factory": factory, "workers": workers, "build_s": round(build["seconds"], 1),
            "stages_ended_s": build["stages_ended_s"],
            "vectors_per_s": round(cfg.vectors / build["seconds"]),
            "bare_train_add_s": round(bare_build["seconds"], 1),
            "wall_ratio_to_bare": round(build["seconds"] / bare_build["seconds"], 2),
            "bare_train_s": round(bare_build["train_s"], 1), "bare_add_s": round(bare_build["add_s"], 1),
            "worker_peak_rss_gb": build["worker_peak_rss_gb"],
            "file_vectors_gb": round(cfg.file_rows * cfg.dim * 4 / 2 ** 30, 2),
            "driver_peak_rss_gb": build["peak_rss_gb"], "training_sample_gb": round(sample_gb, 2),
            "driver_above_sample_gb": round(build["peak_rss_gb"] - sample_gb, 2),
            "bare_peak_rss_gb": bare_build["peak_rss_gb"]}


def bare_factory_figures(cfg: IndexBenchConfig, factory: str, vectors: np.ndarray, queries: np.ndarray,
                         truth: np.ndarray, emit) -> None:
    """``--also``: one bare FAISS index of ``factory`` over the same vectors, recall@10 and
    queries/s at each nprobe of the sweep."""
    import faiss                                                # FAISS: see the module docstring

    from index.build.build import with_ids
    from index.build.recall import recall_at_k
    index, train_s, add_s = bare_faiss(vectors, with_ids(factory, cfg.dim))
    bytes_per_vector = round(faiss.serialize_index(index).nbytes / cfg.vectors, 1)
    for nprobe in cfg.nprobes:
        found, qps = timed_search(bare_search(index, cfg.k, nprobe), queries, repeat=1)
        emit({"what": "bare_factory", "factory": factory, "train_add_s": round(train_s + add_s, 1),
              "bytes_per_vector": bytes_per_vector, "nprobe": nprobe,
              "recall_at_10": round(recall_at_k(found, truth), 4), "qps": round(qps)})


def in_own_process(fn, *args) -> dict:
    """``fn(*args)`` (a dict) run in a fresh process, so that its peak RSS is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def timed_build(embeddings: str, memory: str, shards: int, factory: str | None, workers: int, start_ray=None) -> dict:
    """``vismem index build`` in this process: with one worker, in process on one thread (FAISS's
    OpenMP included); otherwise on a local Ray of ``workers`` CPUs (its start-up not counted).
    Seconds, when each stage of the build ended, and this driver's peak RSS."""
    import faiss                                                # FAISS and Ray: see the module docstring
    import ray

    from index.build.build import build_memory
    if workers > 1:
        (start_ray or ray.init)(num_cpus=workers)
    else:
        faiss.omp_set_num_threads(1)
    ended = {}
    try:
        start = time.perf_counter()
        build_memory(embeddings, memory, shards, factory, replace=True, use_ray=workers > 1,
                     progress=lambda stage, done, total: ended.__setitem__(stage, round(time.perf_counter() - start, 1)))
        return {"seconds": time.perf_counter() - start, "stages_ended_s": ended,
                "peak_rss_gb": round(peak_rss_gb(), 2),
                "worker_peak_rss_gb": round(worker_peak_rss_gb(), 2) if workers > 1 else None}
    finally:
        if workers > 1:
            ray.shutdown()


def timed_bare_build(data: ClusteredVectors, n: int, factory: str) -> dict:
    """Bare FAISS's train + add of the same vectors in one process (every core through OpenMP):
    the reference for the build's wall time."""
    vectors = data.rows(0, n)
    _, train_s, add_s = bare_faiss(vectors, factory)
    return {"seconds": train_s + add_s, "train_s": train_s, "add_s": add_s, "peak_rss_gb": round(peak_rss_gb(), 2)}


def peak_rss_gb(pid: int | str = "self") -> float:
    """A process's peak resident memory: ``VmHWM`` on Linux, which a new program starts afresh
    (``ru_maxrss`` keeps the peak of the process that forked it across ``exec``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2 ** 20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20 if pid == "self" else 0.0


def worker_peak_rss_gb() -> float:
    """The largest peak RSS of this local Ray's live task workers (each ran build tasks: one file's
    vectors and its pieces, or one shard's merge)."""
    import ray                                                  # Ray: see the module docstring
    from ray.util.state import list_workers
    address = ray.get_runtime_context().gcs_address     # this driver's Ray, not another one on the machine
    workers = list_workers(address=address, filters=[("worker_type", "=", "WORKER"), ("is_alive", "=", True)],
                           limit=10_000)
    return max([peak_rss_gb(w.pid) for w in workers], default=0.0)
