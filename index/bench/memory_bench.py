"""``vismem memory bench``: what editing a memory costs, at the scale of the defaults.

For each size (100k and 1M clustered synthetic vectors of d=384 by default, built through the real
path with the default factory), in one process: the latency of removing 1, 100 and 1,000 ids
(each a new committed version) beside bare FAISS ``remove_ids`` on the same shard's index, which
is the pass over the index that the deletion set avoids; the time to add 10,000 vectors and
whether the next query finds them. Then, with ``http``, the largest memory is served with Ray
Serve and single-id removes go through HTTP: the acknowledgement's latency, and whether the first
query after it (and its latency) still returns the id.

FAISS, Ray and the modules built on them are imported where they are used: the CLI reads this
module's defaults for ``--help``, which must not wait for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

import numpy as np

from index.bench.index_bench import write_synthetic_embeddings
from index.synthetic import ClusteredVectors

log = logging.getLogger("vismem.index.memory_bench")


@dataclass
class MemoryBenchConfig:
    sizes: tuple[int, ...] = (100_000, 1_000_000)
    dim: int = 384
    clusters: int = 32_768
    spread: float = 0.6
    shards: int = 4
    batches: tuple[int, ...] = (1, 100, 1000)     # ids per remove
    repeats: int = 10                               # removes per batch size
    add: int = 10_000                               # vectors per add
    http: bool = True                               # serve the largest memory and remove through HTTP
    http_removes: int = 50
    workdir: str | None = None
    seed: int = 0


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def bare_remove_ms(memory, ids: np.ndarray) -> float:
    """Bare FAISS ``remove_ids`` of ``ids`` on a copy of shard 0's base index: a pass over it."""
    import faiss                                    # FAISS: see the module docstring
    index = faiss.clone_index(memory.shards[0].index)
    start = time.perf_counter()
    index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64)))
    return (time.perf_counter() - start) * 1000


def edit_figures(cfg: MemoryBenchConfig, memory, data: ClusteredVectors, n: int, emit) -> np.ndarray:
    """Remove latencies per batch size and an add of ``cfg.add`` vectors, on an open memory.
    Returns the ids still live (in a random order) for the HTTP figures."""
    order = np.random.default_rng(cfg.seed).permutation(n)
    taken = 0
    for batch in cfg.batches:
        times = []
        for _ in range(cfg.repeats):
            ids = order[taken:taken + batch]
            taken += batch
            start = time.perf_counter()
            memory.remove(ids=ids)
            times.append(time.perf_counter() - start)
        emit({"what": "remove", "vectors": n, "ids_per_remove": batch, **percentiles(times),
              "per_id_ms": round(float(np.median(times)) * 1000 / batch, 4),
              "bare_faiss_remove_ids_ms": round(bare_remove_ms(memory, order[taken - batch:taken]), 2)})
    new = data.rows(n, n + cfg.add, stream=1)
    start = time.perf_counter()
    _, ids = memory.add(new, [f"added-{i % 10}" for i in range(len(new))], [f"added://{i}" for i in range(len(new))])
    seconds = time.perf_counter() - start
    found = memory.search(new[:100], 1).ids[:, 0]
    emit({"what": "add", "vectors": n, "added": cfg.add, "seconds": round(seconds, 3),
          "vectors_per_s": round(cfg.add / seconds), "next_query_finds_them": float(np.mean(found == ids[:100]))})
    return order[taken:]


def http_figures(cfg: MemoryBenchConfig, memory_url: str, data: ClusteredVectors, live: np.ndarray, emit) -> None:
    """Single-id removes through the served app (Ray must be up: the caller connects), first alone,
    then while two threads query it without pause: the acknowledgement's latency; the first query after each acknowledgement (its
    latency, and whether it returns the removed id); and whether any query that started after an
    acknowledgement returned that id."""
    from ray import serve                           # Ray Serve: see the module docstring

    from index.serve import free_port, start as start_serving
    token = secrets.token_hex(16)
    port = free_port()
    half = cfg.http_removes // 2
    alone, loaded = live[:half], live[half:cfg.http_removes]
    start_serving(memory_url, port=port, name="vismem-memory-bench",
                  token_digest=hashlib.sha256(token.encode()).hexdigest())
    base = f"http://127.0.0.1:{port}"
    try:
        removes(base, token, data, alone, [], {}, emit, "http_remove_alone", len(live))
        seen: list[tuple[float, set]] = []
        acked: dict[int, float] = {}
        stop = threading.Event()

        def load():
            rng = np.random.default_rng()
            while not stop.is_set():
                begun = time.perf_counter()
                vectors = np.concatenate([data.rows(int(t), int(t) + 1) for t in rng.choice(loaded, 8)])
                answer = post(f"{base}/v1/search", {"vectors": vectors.tolist(), "k": 10})
                seen.append((begun, {n["id"] for r in answer["results"] for n in r["neighbours"]}))

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            removes(base, token, data, loaded, seen, acked, emit, "http_remove_under_query_load", len(live))
        finally:
            stop.set()
            for t in threads:
                t.join()
    finally:
        serve.delete("vismem-memory-bench")


def removes(base: str, token: str, data: ClusteredVectors, targets: np.ndarray, seen: list, acked: dict, emit,
            what: str, vectors: int) -> None:
    """Remove ``targets`` one at a time through HTTP, each followed by a query for its vector."""
    acks, firsts, returned = [], [], 0
    for target in targets:
        vector = data.rows(int(target), int(target) + 1).tolist()
        begun = time.perf_counter()
        post(f"{base}/v1/memory/remove", {"ids": [int(target)]}, token)
        acked[int(target)] = done = time.perf_counter()
        acks.append(done - begun)
        answer = post(f"{base}/v1/search", {"vectors": vector, "k": 10})
        firsts.append(time.perf_counter() - done)
        returned += int(target) in {n["id"] for n in answer["results"][0]["neighbours"]}
    stale = sum(1 for begun, ids in list(seen) for t, when in acked.items() if when < begun and t in ids)
    emit({"what": what, "vectors": vectors, "removes": len(targets), "ack": percentiles(acks),
          "first_query_after_ack": percentiles(firsts), "first_query_returned_the_id": returned,
          "concurrent_queries": len(seen), "queries_after_an_ack_returning_that_id": stale})


def run(cfg: MemoryBenchConfig, emit=print) -> dict:
    """Build each size's memory, measure it (``emit`` gets one dict per figure); returns a summary.
    With ``cfg.http`` the caller connects Ray first (``vismem memory bench`` does)."""
    from index.build.build import build_memory      # FAISS: see the module docstring
    from index.memory import VisualMemory
    data = ClusteredVectors(cfg.dim, cfg.clusters, cfg.spread, cfg.seed)
    summary = {"sizes": list(cfg.sizes)}
    with tempfile.TemporaryDirectory(prefix="vismem-memory-bench-") as tmp:
        work = (cfg.workdir or tmp).rstrip("/")
        for n in cfg.sizes:
            start = time.perf_counter()
            write_synthetic_embeddings(f"{work}/emb-{n}", data, n, 100_000)
            manifest = build_memory(f"{work}/emb-{n}", f"{work}/mem-{n}", cfg.shards, replace=True)
            emit({"what": "build", "vectors": n, "factory": manifest.factory, "shards": cfg.shards,
                  "seconds": round(time.perf_counter() - start, 1)})
            memory = VisualMemory.open(f"{work}/mem-{n}")
            live = edit_figures(cfg, memory, data, n, emit)
            if cfg.http and n == max(cfg.sizes):
                http_figures(cfg, f"{work}/mem-{n}", data, live, emit)
    return summary


def post(url: str, body: dict, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)
