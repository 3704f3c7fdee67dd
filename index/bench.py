"""``vismem index bench``: build a memory from clustered synthetic vectors through the real path
(embedding Parquet → ``build_memory``), then measure recall@10 against exact search and queries/s
across nprobe, beside bare FAISS holding the same vectors in one index with the same factory.

The memory's answers are sharded and merged; bare FAISS is the reference for both the quality
(recall must match: merging is exact) and the speed (the ratio is what the README reports, since
this machine is shared and absolute figures drift). ``--also`` measures other factory strings with
bare FAISS only, to show why the default was chosen.

FAISS and the modules built on it are imported where they are used: the CLI reads this module's
defaults for ``--help``, and must start on machines without FAISS (``eval-knn`` runs there).
"""

from __future__ import annotations

import logging
import resource
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np

if TYPE_CHECKING:
    import faiss

from index.embeddings import write_vectors
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
    workdir: str | None = None            # where embeddings and the memory go (default: a temporary folder)
    file_rows: int = 100_000              # vectors per embedding Parquet file
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


def bare_faiss(vectors: np.ndarray, factory: str) -> tuple[faiss.Index, float]:
    """One index over every vector, trained and filled the way the build does: (index, seconds)."""
    from index.build import train_empty_index
    start = time.perf_counter()
    index = train_empty_index(vectors, factory)
    index.add_with_ids(vectors, np.arange(len(vectors)))
    return index, time.perf_counter() - start


def bare_search(index: faiss.Index, k: int, nprobe: int):
    from index.shards import search_parameters

    def search(queries):
        params, _keep = search_parameters(index, nprobe)
        return index.search(queries, k, params=params)[1]
    return search


def run(cfg: IndexBenchConfig, emit=print):
    """Run the benchmark; ``emit`` gets one dict per measurement. Returns the summary dict."""
    import faiss

    from index.build import build_memory, with_ids
    from index.memory import VisualMemory
    from index.recall import recall_at_k
    data = ClusteredVectors(cfg.dim, cfg.clusters, cfg.spread, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="vismem-index-bench-") as tmp:
        work = (cfg.workdir or tmp).rstrip("/")
        start = time.perf_counter()
        write_synthetic_embeddings(f"{work}/embeddings", data, cfg.vectors, cfg.file_rows)
        log.info("wrote %d synthetic vectors in %.0fs", cfg.vectors, time.perf_counter() - start)

        start = time.perf_counter()
        manifest = build_memory(f"{work}/embeddings", f"{work}/memory", cfg.shards, cfg.factory, replace=True)
        build_s = time.perf_counter() - start
        fs, root = fsspec.core.url_to_fs(f"{work}/memory")
        memory_bytes = sum(fs.size(f"{root}/{s.index}") for s in manifest.shards)
        summary = {"what": "build", "vectors": cfg.vectors, "dim": cfg.dim, "shards": cfg.shards,
                   "factory": manifest.factory, "build_s": round(build_s, 1),
                   "bytes_per_vector": round(memory_bytes / cfg.vectors, 1), "default_nprobe": manifest.search.get("nprobe"),
                   "claimed_recall": manifest.recall, "peak_rss_gb": round(peak_rss_gb(), 2)}
        emit(summary)
        memory = VisualMemory.open(f"{work}/memory")
        vectors = data.rows(0, cfg.vectors)
        queries = data.queries(cfg.queries)
        truth = faiss.knn(queries, vectors, cfg.k, metric=faiss.METRIC_INNER_PRODUCT)[1]

        bare, bare_s = bare_faiss(vectors, manifest.factory)
        emit({"what": "bare_faiss_build", "factory": manifest.factory, "train_add_s": round(bare_s, 1),
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
            emit(record)
            if record["default"]:
                summary.update(default_recall_at_10=record["recall_at_10"], default_qps_ratio=record["qps_ratio"])
        del bare
        for factory in cfg.also:
            index, seconds = bare_faiss(vectors, with_ids(factory, cfg.dim))
            bytes_per_vector = round(faiss.serialize_index(index).nbytes / cfg.vectors, 1)
            for nprobe in cfg.nprobes:
                found, qps = timed_search(bare_search(index, cfg.k, nprobe), queries, repeat=1)
                emit({"what": "bare_factory", "factory": factory, "train_add_s": round(seconds, 1),
                      "bytes_per_vector": bytes_per_vector, "nprobe": nprobe,
                      "recall_at_10": round(recall_at_k(found, truth), 4), "qps": round(qps)})
            del index
    return summary


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
