"""``vismem serve bench``: what a query costs through the served app, beside the memory itself.

Against a running app (``url``), or one this process starts over ``memory`` (or over a clustered
synthetic memory it builds first, ``synthetic`` vectors): single queries one after another
(p50 / p99), ``clients`` concurrent clients for ``seconds`` (queries/s, p50 / p99), and batches of
``batch`` vectors (vectors/s), over HTTP and, when this process started the app, through a Serve
handle to the Router (no HTTP). With ``ingress="direct"`` (Ray started under
``index.serve.direct_ingress_env``) the Router replica answers HTTP itself (``http``) and Serve's
proxy still answers the same app (``http_proxy``), both in the same run. The same queries go to
the memory opened in this process (``VisualMemory``) and to bare FAISS (each shard's index searched at the same nprobe, no merge),
so every figure has its floor measured in the same run on the same (shared, noisy) machine.

Queries are drawn like the synthetic memory's vectors (held-out points of the same clusters), so
for a memory of real embeddings they are only shaped right, not distributed right; the cost of
an IVF search depends on the lists it visits, which such queries visit as real ones would.

FAISS, Ray and the modules built on them are imported where they are used: the CLI reads this
module's defaults for ``--help``, which must not wait for them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import requests

from index.bench.index_bench import write_synthetic_embeddings
from index.synthetic import ClusteredVectors

log = logging.getLogger("vismem.index.serve_bench")
APP = "vismem-serve-bench"
LAYOUTS = ("shards", "colocated")     # build_app(colocate=False / True)


@dataclass
class ServeBenchConfig:
    url: str | None = None              # a running app; else one is started over `memory`
    memory: str | None = None
    synthetic: int | None = None        # build a clustered synthetic memory of this many vectors first
    dim: int = 384                      # of the synthetic memory
    clusters: int = 32_768
    spread: float = 0.6
    shards: int = 4
    singles: int = 300                  # single queries, one after another
    clients: int = 8
    seconds: float = 10.0               # of the concurrent run
    batch: int = 256
    batches: int = 8
    k: int = 10
    workdir: str | None = None
    seed: int = 0
    layouts: tuple[str, ...] = LAYOUTS  # of an app started here: ShardSearcher deployments, or shards in the Router
    ingress: str = "proxy"              # of an app started here: Serve's proxy, or the Router replica's own HTTP
    port: int | None = None             # direct ingress: the first app's port (Ray started under direct_ingress_env)


def percentiles(seconds) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def timed(call, inputs) -> list[float]:
    """The seconds each ``call(x)`` took, one after another."""
    out = []
    for x in inputs:
        start = time.perf_counter()
        call(x)
        out.append(time.perf_counter() - start)
    return out


class Http:
    """Search over HTTP with one kept-alive connection per thread (as any real client holds)."""

    def __init__(self, url: str, k: int):
        self.url, self.k, self.local = url.rstrip("/"), k, threading.local()

    def search(self, vectors: np.ndarray) -> dict:
        session = getattr(self.local, "session", None) or requests.Session()
        self.local.session = session
        response = session.post(f"{self.url}/v1/search", json={"vectors": vectors.tolist(), "k": self.k}, timeout=120)
        response.raise_for_status()
        answer = response.json()
        if answer["partial"]:
            raise RuntimeError(f"partial answer during the benchmark: shards {answer['missing_shards']} missing")
        return answer


def concurrent(search, queries: np.ndarray, clients: int, seconds: float) -> dict:
    """``clients`` threads querying one vector at a time without pause for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def client(n: int) -> None:
        rng = np.random.default_rng(n)
        while time.perf_counter() < stop:
            q = queries[rng.integers(len(queries))][None]
            start = time.perf_counter()
            search(q)
            latencies[n].append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    begun = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [s for per in latencies for s in per]
    return {"clients": clients, "queries": len(every), "qps": round(len(every) / (time.perf_counter() - begun), 1),
            **percentiles(every)}


def batched(search, queries: np.ndarray, batch: int, batches: int) -> dict:
    """Vectors/s of ``batches`` requests of ``batch`` vectors each (the best of them: a shared machine)."""
    chunks = [queries[i * batch:(i + 1) * batch] for i in range(batches)]
    seconds = timed(search, chunks)
    return {"batch": batch, "vectors_per_s": round(batch / min(seconds), 1),
            "median_vectors_per_s": round(batch / float(np.median(seconds)), 1)}


def bare_faiss(memory, k: int):
    """One query batch against every shard's FAISS index at the memory's nprobe, no merge: the floor."""
    from index.bench.index_bench import bare_search             # FAISS: see the module docstring
    nprobe = memory.manifest.search_defaults(memory.nprobe).get("nprobe")
    searches = [bare_search(part.index, k, nprobe) for shard in memory.shards for part in shard.parts]

    def search(vectors: np.ndarray) -> None:
        for one in searches:
            one(vectors)
    return search


def build_synthetic(cfg: ServeBenchConfig, work: str, emit) -> str:
    from index.build.build import build_memory                  # FAISS: see the module docstring
    data = ClusteredVectors(cfg.dim, cfg.clusters, cfg.spread, cfg.seed)
    start = time.perf_counter()
    write_synthetic_embeddings(f"{work}/emb", data, cfg.synthetic, 100_000)
    manifest = build_memory(f"{work}/emb", f"{work}/mem", cfg.shards, replace=True)
    emit({"what": "build", "vectors": cfg.synthetic, "factory": manifest.factory, "shards": cfg.shards,
          "recall": manifest.recall, "seconds": round(time.perf_counter() - start, 1)})
    return f"{work}/mem"


def start_app(memory_url: str, cfg: ServeBenchConfig) -> dict[str, tuple[list[str], object]]:
    """Serve ``memory_url`` once per layout, a route prefix each, on one free loopback port (one
    Serve proxy); with direct ingress also on the ports from ``cfg.port`` up, one an app, in order,
    so that each app answers both ways in the same run. {layout: ([URL, ...], the Router's handle)},
    the URL its replica answers first."""
    from ray import serve                                       # Ray Serve: see the module docstring

    from index.serve import free_port, start
    direct, proxy = cfg.ingress == "direct", free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": proxy})      # start() below keeps this proxy
    apps = {}
    for n, layout in enumerate(cfg.layouts):
        at = cfg.port + n if direct else proxy
        handle = start(memory_url, port=at, name=f"{APP}-{layout}", route_prefix=f"/{layout}", ingress=cfg.ingress,
                       colocate=layout == "colocated")
        apps[layout] = ([f"http://127.0.0.1:{port}/{layout}" for port in dict.fromkeys((at, proxy))], handle)
    return apps


def run(cfg: ServeBenchConfig, emit=print) -> dict:
    """Measure; ``emit`` gets one dict per figure, the summary (with the ratios) is returned. When
    the app is started here, the caller has connected Ray with Serve (``vismem serve bench`` does)."""
    from index.memory import VisualMemory                      # FAISS: see the module docstring
    if not (cfg.url or cfg.memory or cfg.synthetic):
        raise ValueError("give the URL of a running app, a memory to serve, or a synthetic size to build")
    unknown = set(cfg.layouts) - set(LAYOUTS)
    if unknown or not cfg.layouts:
        raise ValueError(f"layouts {sorted(unknown) or '(none)'}: give some of {', '.join(LAYOUTS)}")
    with tempfile.TemporaryDirectory(prefix="vismem-serve-bench-") as tmp:
        memory_url = build_synthetic(cfg, (cfg.workdir or tmp).rstrip("/"), emit) if cfg.synthetic else cfg.memory
        if cfg.url:
            return measure(cfg, cfg.url, {"http": Http(cfg.url, cfg.k).search}, VisualMemory, emit)
        apps = {}
        try:
            apps = start_app(memory_url, cfg)
            served = {}
            for layout, (urls, handle) in apps.items():
                suffix = "" if layout == "shards" else f"_{layout}"
                for url, way in zip(urls, ("http", "http_proxy")):
                    served[f"{way}{suffix}"] = Http(url, cfg.k).search
                served[f"handle{suffix}"] = handle_search(handle, cfg.k)
            return measure(cfg, next(iter(apps.values()))[0][0], served, VisualMemory, emit)
        finally:
            from ray import serve
            for layout in apps:
                serve.delete(f"{APP}-{layout}")


class RouterInProcess:
    """The Router's own code, colocated shards, called in this process without Serve or HTTP (on an
    event loop in a thread of its own): what the Router costs beside the memory itself, so that
    the rest of a served query's time is Serve's (the handle, the replica, the proxy)."""

    def __init__(self, memory_url: str, k: int):
        from index.serve import Router                               # Ray Serve: see the module docstring
        from index.store.manifest import read_manifest
        self.k, self.loop = k, asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        cls = Router.func_or_class                                   # the class under @serve.deployment
        self.router = cls.__new__(cls)
        started = cls.__init__(self.router, memory_url, read_manifest(memory_url).version,
                               colocate={"nprobe": None, "mmap": False})
        if inspect.isawaitable(started):                             # Serve's ingress makes __init__ async
            asyncio.run_coroutine_threadsafe(started, self.loop).result()

    def search(self, vectors: np.ndarray):
        from index.serve.api import SearchRequest                    # FastAPI, pydantic: see the module docstring
        request = SearchRequest(vectors=vectors.tolist(), k=self.k)
        return asyncio.run_coroutine_threadsafe(self.router.search(request), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def handle_search(handle, k: int):
    from index.serve.api import SearchRequest                    # FastAPI, pydantic: see the module docstring
    return lambda v: handle.search.remote(SearchRequest(vectors=v.tolist(), k=k)).result()


def measure(cfg: ServeBenchConfig, url: str, served: dict, VisualMemory, emit) -> dict:
    """Every figure for the ``served`` paths ({name: search}) and this process's floors; ``url``
    (of one of them) names the memory."""
    info = requests.get(f"{url.rstrip('/')}/v1/info", timeout=60)
    info.raise_for_status()
    info = info.json()
    memory = VisualMemory.open(info["memory"])
    n = max(cfg.singles, cfg.batch * cfg.batches)
    queries = ClusteredVectors(info["dim"], cfg.clusters, cfg.spread, cfg.seed).queries(n)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    router = RouterInProcess(info["memory"], cfg.k)
    served = {**served, "router_in_process": router.search}
    paths = {**served, "in_process": lambda v: memory.search(v, cfg.k), "bare_faiss": bare_faiss(memory, cfg.k)}
    for search in paths.values():                                 # warm every path (connections, caches)
        for q in queries[:20]:
            search(q[None])
    summary = {"memory": info["memory"], "vectors": info["count"], "shards": len(info["shards"]),
               "ingress": None if cfg.url else cfg.ingress, "factory": info["factory"],
               "nprobe": info["search"].get("nprobe"), "recall": info["recall"], "k": cfg.k}
    emit({"what": "memory", **summary})
    singles = {}
    for name, search in paths.items():
        singles[name] = percentiles(timed(search, [q[None] for q in queries[:cfg.singles]]))
        emit({"what": "single_query", "path": name, **singles[name]})
    loads = {}
    for name in [*served, "in_process"]:
        loads[name] = concurrent(paths[name], queries, cfg.clients, cfg.seconds)
        emit({"what": "concurrent", "path": name, **loads[name]})
    batches = {}
    for name, search in paths.items():
        batches[name] = batched(search, queries, cfg.batch, cfg.batches)
        emit({"what": "batches", "path": name, **batches[name]})
    ratios = {}
    for name in (n for n in served if n.startswith("http")):
        ratios[f"{name}_p50_over_in_process"] = round(singles[name]["p50_ms"] / singles["in_process"]["p50_ms"], 1)
        ratios[f"{name}_batched_over_in_process"] = round(batches[name]["vectors_per_s"]
                                                          / batches["in_process"]["vectors_per_s"], 3)
    ratios["in_process_p50_over_bare_faiss"] = round(singles["in_process"]["p50_ms"]
                                                     / singles["bare_faiss"]["p50_ms"], 2)
    ratios["router_in_process_p50_over_in_process"] = round(singles["router_in_process"]["p50_ms"]
                                                            / singles["in_process"]["p50_ms"], 2)
    emit({"what": "ratios", **ratios})
    router.close()
    return {**summary, "single_query": singles, "concurrent": loads, "batches": batches, "ratios": ratios}
