"""The Serve app: a ShardSearcher deployment per shard, the Router that is the HTTP ingress, and
``build_app`` / ``start``, which bind them for a memory and run them on an HTTP port.

The Router turns a request into unit query vectors (``index.queries.check_vectors`` is the gate
for vectors and embeddings alike), fans them out to every shard concurrently through
DeploymentHandles, merges the top-k exactly and votes. A shard that fails or times out makes the
answer ``partial`` and names the missing shards. Edits go through the Router too and are applied
live by the shards that own the vectors (index.serve.editing); every answer names the version it
was computed on. The Router runs as one replica: it is the memory's one writer in this server.

A replica that cannot start (a shard whose file does not match its sha256, an encoder that
changed) fails deep inside Serve, which reports only that the deployment failed; ``start`` reads
the replica's own error from ``serve.status()`` and raises it, so the user sees which shard of
which memory is wrong.
"""

import asyncio
import logging
import os
import re
import socket
import time
import urllib.request
from types import SimpleNamespace
from typing import Annotated

import numpy as np
from fastapi import Header, HTTPException, Path, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import RayServeException
from ray.serve.schema import DeploymentStatus

from index.queries import QueryError, check_vectors
from index.serve.api import (EDIT_PROBLEMS, MAX_ID, QUERY_PROBLEMS, AddRequest, ClassifyRequest, ClassifyResponse,
                             EditResponse, Health, Info, Limits, LogResponse, RemoveRequest, RollbackRequest,
                             SearchRequest, SearchResponse, VersionsResponse, app, classify_results,
                             neighbour_list, problems, served_openapi)
from index.serve.auth import require_token
from index.serve import metrics
from index.serve.editing import EditConflict, ShardState, commit_edit, watch_storage
from index.serve.images import decode_images
from index.serve.page import page_html, thumbnail_png
from index.shard.faiss_io import check_mappable
from index.shard.placement import Placement
from index.shard.search import merge_topk
from index.store.history import log as memory_log
from index.store.manifest import list_versions, read_manifest

log = logging.getLogger("vismem.index.serve")
HEALTH_TIMEOUT_S = 2.0       # a shard slower than this to say its version is not ready


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class ShardSearcher(ShardState):
    """Holds one shard in memory; concurrent requests are batched, one FAISS search per nprobe,
    at the newest memory version any of them carries."""

    def __init__(self, memory_url: str, version: int, number: int, nprobe: int | None = None, mmap: bool = False):
        self.open_shard(memory_url, version, number, nprobe, mmap)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def search(self, queries: list[np.ndarray], ks: list[int], nprobes: list[int | None],
                     versions: list[int]) -> list[dict]:
        await self.follow(max(versions))
        return search_grouped(self.shard, queries, ks, nprobes)


class LocalShard(ShardState):
    """A shard held in the Router's own process (``build_app(colocate=True)``): the same state,
    edits and following as a ShardSearcher replica, without a hop to another process. Concurrent
    queries are batched as a replica batches them; FAISS runs in a worker thread (it releases the
    GIL), on the shard held when the batch starts: following swaps in a new Shard object and
    never changes one a search may hold."""

    def __init__(self, memory_url: str, version: int, number: int, nprobe: int | None = None, mmap: bool = False):
        self.open_shard(memory_url, version, number, nprobe, mmap)
        # serve.batch keeps one queue per decorated function, shared by every instance of a class
        # (a replica holds one); the Router holds several LocalShards, so each gets its own queue.
        try:
            serve.get_replica_context()
            self.search = serve.batch(max_batch_size=16, batch_wait_timeout_s=0)(self.search_batch)
        except RayServeException:        # a Router called outside Serve (serve bench's router_in_process)
            self.search = self.search_one

    async def search_batch(self, queries: list[np.ndarray], ks: list[int], nprobes: list[int | None],
                           versions: list[int]) -> list[dict]:
        await self.follow(max(versions))
        return await asyncio.to_thread(search_grouped, self.shard, queries, ks, nprobes)

    async def search_one(self, queries: np.ndarray, k: int, nprobe: int | None, version: int) -> dict:
        return (await self.search_batch([queries], [k], [nprobe], [version]))[0]


class LocalHandle:
    """A LocalShard called the way the Router calls a ShardSearcher's handle
    (``await shard.method.remote(...)``), so the Router has one code path for both."""

    def __init__(self, state: LocalShard):
        self.state = state

    def __getattr__(self, method: str) -> SimpleNamespace:
        return SimpleNamespace(remote=getattr(self.state, method))


def search_grouped(shard, queries: list[np.ndarray], ks: list[int], nprobes: list[int | None]) -> list[dict]:
    """The answers of several calls' ``queries`` from one FAISS search per distinct nprobe."""
    answers: list[dict | None] = [None] * len(queries)
    for nprobe in dict.fromkeys(nprobes):
        calls = [i for i, p in enumerate(nprobes) if p == nprobe]
        found = shard.query(np.concatenate([queries[i] for i in calls]), max(ks[i] for i in calls), nprobe=nprobe)
        ends = np.cumsum([len(queries[i]) for i in calls])
        for i, end in zip(calls, ends):
            answers[i] = {key: value[end - len(queries[i]):end, :ks[i]] for key, value in found.items()}
    return answers


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
@serve.ingress(app)
class Router:
    """The HTTP ingress: queries in, merged neighbours and votes out (the models are in index.serve.api)."""

    def __init__(self, memory_url: str, version: int, *shards, shard_timeout_s: float = 10.0,
                 limits: Limits = Limits(), token_digest: str | None = None, colocate: dict | None = None):
        """``shards``: a ShardSearcher handle per shard; none, with ``colocate`` (``nprobe`` and
        ``mmap`` of the shards), to hold every shard in this replica (LocalShard)."""
        from encoder import Encoder                     # imports torch: only the Router's replica needs it
        self.manifest = read_manifest(memory_url, version)
        if colocate is not None:
            shards = tuple(LocalHandle(LocalShard(memory_url, self.manifest.version, n, **colocate))
                           for n in range(len(self.manifest.shards)))
        self.memory_url, self.shards, self.timeout, self.limits = memory_url, list(shards), shard_timeout_s, limits
        self.token_digest, self.edit_lock = token_digest, asyncio.Lock()
        self.watching: asyncio.Task | None = None           # follows versions committed elsewhere (watch_storage)
        self.encoder, self.no_images = None, None
        metrics.VERSION.set_function(lambda: self.manifest.version)
        try:
            self.encoder = Encoder.load(self.manifest.encoder["name"])
        except FileNotFoundError as e:       # vectors made elsewhere (e.g. synthetic): queries by vector only
            self.no_images = f"this server cannot embed images ({e}); send 'vectors' instead"
            log.warning("memory %s: %s", memory_url, self.no_images)
        if self.encoder is not None and self.encoder.sha256 != self.manifest.encoder["sha256"]:
            raise ValueError(f"encoder {self.manifest.encoder['name']} changed since memory {memory_url} was built "
                             "(sha256 differs); rebuild the memory or point it at the original encoder")

    @app.get("/v1/info")
    @app.get("/info")
    def info(self) -> Info:
        m = self.manifest
        return Info(memory=self.memory_url, version=m.version, count=m.count, dim=m.dim, factory=m.factory,
                    encoder=m.encoder, shards=[s.count for s in m.shards], search=m.search, recall=m.recall)

    def unit_vectors(self, images: list[str] | None, vectors: list | None, limit: int) -> np.ndarray:
        """The unit vectors ``[n, dim]`` of a request's ``images`` (embedded) or ``vectors``, at
        most ``limit`` of them; a 4xx naming the field for anything else."""
        field, given = ("images", images) if images is not None else ("vectors", vectors)
        if not given:
            raise HTTPException(422, f"'{field}' is empty: give at least one")
        if len(given) > limit:
            raise HTTPException(422, f"{len(given)} {field} in one request, over the limit of {limit}: split them "
                                     "over several requests")
        try:
            if vectors is not None:
                return check_vectors(vectors, self.manifest.dim)
            if self.encoder is None:
                raise HTTPException(422, self.no_images)
            return check_vectors(self.encoder.embed(decode_images(images, self.limits)), self.manifest.dim,
                                 name="embedding of images")
        except QueryError as e:
            raise HTTPException(422, str(e)) from None

    async def fan_out(self, vectors: np.ndarray, k: int, nprobe: int | None, version: int) -> tuple[list, list[int]]:
        async def one(handle):
            try:
                return await asyncio.wait_for(handle.search.remote(vectors, k, nprobe, version), self.timeout)
            except (ActorDiedError, ActorUnavailableError):    # the replica picked had died: once more, and
                # Serve routes to another replica of the shard (or waits for the replacement of the only one)
                return await asyncio.wait_for(handle.search.remote(vectors, k, nprobe, version), self.timeout)

        results = await asyncio.gather(*(one(h) for h in self.shards), return_exceptions=True)
        missing = [n for n, r in enumerate(results) if isinstance(r, BaseException)]
        for n in missing:
            log.warning("shard %d failed: %r", n, results[n])
        return [r for r in results if not isinstance(r, BaseException)], missing

    async def neighbours(self, q: SearchRequest, depth: int | None = None) -> tuple[dict, dict]:
        """The merged top-k (``depth`` deep: default ``q.k``), and the answer's envelope: the version
        it was computed on (the one this Router answers from when the query starts) and which shards are missing."""
        depth = depth or q.k
        vectors = self.unit_vectors(q.images, q.vectors, self.limits.max_queries)
        if self.watching is None:                            # a task needs the replica's running loop
            self.watching = asyncio.create_task(watch_storage(self))
        version = self.manifest.version
        metrics.QUERIES.inc(len(vectors))
        results, missing = await self.fan_out(vectors, depth, q.nprobe, version)
        for n in missing:
            metrics.PARTIAL.labels(str(n)).inc()
        if not results:
            raise HTTPException(503, f"no shard answered within {self.timeout}s; shards {missing} failed")
        answered = [n for n in range(len(self.shards)) if n not in missing]
        envelope = {"version": version, "partial": bool(missing), "missing_shards": missing}
        return merge_topk(results, depth, answered), envelope

    @app.post("/v1/search", responses=QUERY_PROBLEMS)
    @app.post("/search", responses=QUERY_PROBLEMS)
    async def search(self, q: SearchRequest) -> SearchResponse:
        found, envelope = await self.neighbours(q)
        return SearchResponse(**envelope, results=[
            {"neighbours": neighbour_list(found, row)} for row in range(len(found["ids"]))])

    @app.post("/v1/classify", responses=QUERY_PROBLEMS)
    @app.post("/classify", responses=QUERY_PROBLEMS)
    async def classify(self, q: ClassifyRequest) -> ClassifyResponse:
        ranking, envelope = await self.neighbours(q, q.k + (q.counterfactual or 0))
        return ClassifyResponse(**envelope, rule=q.rule, results=classify_results(ranking, q.k, q.rule, q.counterfactual))

    # ---- editing -------------------------------------------------------------------------------
    @app.post("/v1/memory/add", responses=EDIT_PROBLEMS)
    async def add(self, q: AddRequest, authorization: str | None = Header(None)) -> EditResponse:
        """Add images or vectors with their labels; searchable by every query that starts after the answer."""
        require_token(authorization, self.token_digest)
        vectors = self.unit_vectors(q.images, q.vectors, self.limits.max_queries if q.images is not None
                                    else self.limits.max_added)
        uris = q.uris or [None] * len(vectors)
        added: list[np.ndarray] = []

        async def stage(m, version, folder):
            ids = np.arange(m.next_id, m.next_id + len(vectors), dtype=np.int64)
            added[:] = [ids]
            placement = Placement.of(m)
            if placement.by_lists:                   # each shard keeps the vectors of its lists
                rows = {s: np.arange(len(ids)) for s in range(placement.shards)}
            else:
                owner = placement.shard_of(ids)
                rows = {int(s): np.flatnonzero(owner == s) for s in np.unique(owner)}
            entries = await asyncio.gather(*(self.shards[s].stage_add.remote(
                version, folder, vectors[r], ids[r], [uris[i] for i in r], [q.labels[i] for i in r])
                for s, r in rows.items()))
            staged = {s: e for s, e in zip(rows, entries) if e is not None}
            return staged, {"counts": {"added": len(ids)}, "next_id": int(ids[-1]) + 1}

        new = await self.edit(stage, "add", q.reason)
        return EditResponse(version=new.version, operation="add", count=len(vectors), ids=added[0].tolist())

    @app.post("/v1/memory/remove", responses=EDIT_PROBLEMS)
    async def remove(self, q: RemoveRequest, authorization: str | None = Header(None)) -> EditResponse:
        """Remove vectors by id, URI or label, exactly: no query that starts after the answer returns them."""
        require_token(authorization, self.token_digest)
        removed: list[np.ndarray] = []

        async def stage(m, version, folder):
            owned = await self.resolve_removal(q, m.version)
            ids = np.unique(np.concatenate([np.zeros(0, np.int64), *owned.values()]))
            removed[:] = [ids]
            entries = await asyncio.gather(*(self.shards[s].stage_remove.remote(version, folder, mine.tolist())
                                             for s, mine in owned.items()))
            unknown = sorted(i for e in entries if isinstance(e, dict) for i in e["unknown"])
            if unknown:
                raise HTTPException(404, f"not in memory {self.memory_url} (version {m.version}): ids {unknown[:20]}"
                                         f"{f' and {len(unknown) - 20} more' if len(unknown) > 20 else ''}; "
                                         "nothing was removed")
            return dict(zip(owned, entries)), {"counts": {"removed": len(ids)}}

        new = await self.edit(stage, "remove", q.reason)
        return EditResponse(version=new.version, operation="remove", count=len(removed[0]), ids=removed[0].tolist())

    async def resolve_removal(self, q: RemoveRequest, version: int) -> dict[int, np.ndarray]:
        """The live ids ``q`` names at ``version``, by the shard that holds them (every shard is
        asked: where a vector is stored is the shards' knowledge, ``index.shard.placement``); a 404 naming
        whatever ``q`` names that is not there."""
        ids = np.unique(np.asarray(q.ids or [], dtype=np.int64))
        answers = await asyncio.gather(*(h.resolve.remote(version, ids.tolist(), q.uris or [], q.labels or [])
                                         for h in self.shards))
        live = {i for a in answers for i in a["live"]}
        problems = [f"ids {sorted(set(ids.tolist()) - live)[:20]}" if len(live) < len(ids) else None]
        for field, wanted in (("uris", q.uris or []), ("labels", q.labels or [])):
            seen = {v for a in answers for v in a[field]}
            missing = [w for w in dict.fromkeys(wanted) if w not in seen]
            problems.append(f"{field} {missing[:20]}" if missing else None)
        problems = [p for p in problems if p]
        if problems:
            raise HTTPException(404, f"not in memory {self.memory_url} (version {self.manifest.version}): "
                                     f"{'; '.join(problems)}; nothing was removed")
        return {n: np.asarray(a["matched"], dtype=np.int64) for n, a in enumerate(answers) if a["matched"]}

    async def edit(self, stage, operation: str, reason: str | None):
        """``commit_edit`` with a persistent conflict as a 409."""
        try:
            new = await commit_edit(self, stage, operation, reason)
        except EditConflict as e:
            raise HTTPException(409, str(e)) from None
        metrics.EDITS.labels(operation).inc()
        return new

    @app.get("/v1/memory/versions")
    def versions(self) -> VersionsResponse:
        return VersionsResponse(current=self.manifest.version, versions=list_versions(self.memory_url))

    @app.get("/v1/memory/log")
    def log(self) -> LogResponse:
        return LogResponse(log=memory_log(self.memory_url))

    @app.post("/v1/memory/rollback", responses=EDIT_PROBLEMS)
    async def rollback(self, q: RollbackRequest, authorization: str | None = Header(None)) -> EditResponse:
        """Commit a new version holding version ``q.version``'s content (``index.edit.edits.rollback``'s
        rule: only the manifest is written, ids are never handed out twice); the shards follow it."""
        require_token(authorization, self.token_digest)
        held: list[int] = []

        async def stage(m, version, folder):
            if q.version == m.version:
                raise HTTPException(409, f"version {q.version} is the current version of memory {self.memory_url}; "
                                         "nothing to roll back")
            try:
                target = read_manifest(self.memory_url, q.version)
            except FileNotFoundError as e:
                raise HTTPException(404, str(e)) from None
            if len(target.shards) != len(m.shards):
                raise HTTPException(409, f"version {q.version} has {len(target.shards)} shards and this server "
                                         f"serves {len(m.shards)}: roll back with `vismem memory rollback` and "
                                         "restart the server")
            held[:] = [target.count]
            return dict(enumerate(target.shards)), {"content": target, "next_id": max(m.next_id, target.next_id),
                                                    "counts": {"vectors": target.count}, "target": q.version}

        new = await self.edit(stage, "rollback", q.reason)
        return EditResponse(version=new.version, operation="rollback", count=held[0], ids=[])

    # ---- operations ----------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health,
             responses={503: {"model": Health, "description": "some shard did not answer"}})
    async def healthz(self) -> JSONResponse:
        """Ready (200) only when every shard answers within ``HEALTH_TIMEOUT_S``; else 503 naming the missing."""
        async def one(handle):
            return await asyncio.wait_for(handle.health.remote(), min(self.timeout, HEALTH_TIMEOUT_S))

        answers = await asyncio.gather(*(one(h) for h in self.shards), return_exceptions=True)
        held = [a if isinstance(a, int) else None for a in answers]
        missing = [n for n, a in enumerate(held) if a is None]
        health = Health(ready=not missing, version=self.manifest.version, shards=held, missing_shards=missing)
        return JSONResponse(health.model_dump(), status_code=503 if missing else 200)

    @app.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
    def prometheus(self) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # ---- the page and the API's own description -----------------------------------------------
    @app.get("/openapi.json", include_in_schema=False)
    def openapi(self) -> JSONResponse:
        """The OpenAPI document of this memory: its dimension, and images only where it can embed them."""
        return JSONResponse(served_openapi(self.manifest.dim, self.encoder is not None, self.limits))

    @app.get("/docs", include_in_schema=False)
    def docs(self, request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=f"{request.scope.get('root_path', '')}/openapi.json",
                                   title="vismem API")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(page_html())

    @app.get("/v1/thumbnail/{item_id}", response_class=Response,
             responses={200: {"content": {"image/png": {}}, "description": "a PNG of at most 160 px a side"},
                        **problems(400, 404, 422)})
    async def thumbnail(self, item_id: Annotated[int, Path(ge=0, le=MAX_ID)]) -> Response:
        """The image of live memory item ``item_id``, read from the URI the memory holds for it."""
        version = self.manifest.version
        uris = await asyncio.gather(*(h.uri_of.remote(version, item_id) for h in self.shards), return_exceptions=True)
        uri = next((u for u in uris if isinstance(u, str)), None)
        if uri is None:
            raise HTTPException(404, f"memory {self.memory_url} (version {version}) holds no item {item_id} with an "
                                     "image URI")
        png = await asyncio.to_thread(thumbnail_png, item_id, uri, self.limits)
        # no-store: a removed item's image must not outlive its removal in a cache
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


def build_app(memory_url: str, version: int | None = None, nprobe: int | None = None, shard_timeout_s: float = 10.0,
              replicas: int = 1, limits: Limits = Limits(), token_digest: str | None = None, mmap: bool = False,
              colocate: bool = False, shard_cpus: float = 0.25):
    """The Serve application for the memory at ``memory_url`` (current version by default).

    ``nprobe`` is the shards' default (a request may ask for another); ``limits`` bound what one
    request may ask; ``token_digest`` (``index.serve.auth.token_digest``) is the sha256 of the
    bearer token that edits need (None: editing is off); ``mmap``: the shard replicas map their
    IVF lists from the memory's local disk instead of loading them, so a shard larger than RAM
    can answer (the replicas must run where that disk is). ``colocate``: the Router holds every
    shard in its own process, with no ShardSearcher deployments: no hop between the Router and
    the shards (the fastest answer for a memory that fits one node), but no shard replicas and no
    shard that fails alone (docs/ARCHITECTURE.md §6). ``shard_cpus``: Ray's CPU reservation of each
    shard replica (a scheduling figure: FAISS uses the cores it finds).
    """
    if mmap:
        check_mappable(memory_url)
    manifest = read_manifest(memory_url, version)
    if colocate:
        if replicas != 1:
            raise ValueError(f"colocated shards have no replicas of their own (asked for {replicas}): serve "
                             "without colocate for shard replicas")
        return Router.bind(memory_url, manifest.version, shard_timeout_s=shard_timeout_s, limits=limits,
                           token_digest=token_digest, colocate={"nprobe": nprobe, "mmap": mmap})
    shards = [ShardSearcher.options(name=f"ShardSearcher-{n}", num_replicas=replicas,
                                    ray_actor_options={"num_cpus": shard_cpus})
              .bind(memory_url, manifest.version, n, nprobe, mmap) for n in range(len(manifest.shards))]
    return Router.bind(memory_url, manifest.version, *shards, shard_timeout_s=shard_timeout_s, limits=limits,
                       token_digest=token_digest)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for an app started on loopback (Serve's proxy binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct_ingress_env(port: int, ports: int = 1) -> dict[str, str]:
    """The environment under which Serve's direct ingress (Ray 2.60) gives the Router replica its own
    HTTP server on ``port`` (the next ``ports - 1`` for further apps, in deployment order): no proxy
    actor in a query's path (docs/ARCHITECTURE.md §6). Ray reads it as its processes start. With no
    load balancer in front, nothing needs a drain or a port quarantine: one second, and none."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + ports), "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def start(memory_url: str, host: str = "127.0.0.1", port: int = 8000, name: str = "vismem", route_prefix: str = "/",
          ingress: str = "proxy", **kwargs):
    """Start Serve and deploy the app answering HTTP on ``host:port``; returns the Router handle.

    ``ingress="proxy"``: Serve's HTTP proxy binds the port and forwards to the Router replica;
    ``"direct"``: the Router replica binds it, under a Ray started with ``direct_ingress_env(port)``
    (``vismem serve --ingress direct``); Serve's head proxy gets a free port. ``kwargs`` go to
    ``build_app``. Raises ValueError with the failing replica's own message when a deployment
    cannot start (and removes the half-deployed app, unless it replaced a running one).
    """
    if ingress not in ("proxy", "direct"):
        raise ValueError(f"unknown ingress {ingress!r}; choose 'proxy' or 'direct'")
    env = os.environ
    low, high = (int(env.get(f"RAY_SERVE_DIRECT_INGRESS_{end}_HTTP_PORT", 0)) for end in ("MIN", "MAX"))
    if ingress == "direct" and (env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1" or not low <= port < high):
        raise ValueError(f"direct ingress on port {port} needs Ray started under direct_ingress_env({port}) (as "
                         f"vismem serve --ingress direct starts it); here: direct ingress "
                         f"{env.get('RAY_SERVE_ENABLE_DIRECT_INGRESS', 'off')}, ports [{low}, {high})")
    serve.start(http_options={"host": host, "port": free_port() if ingress == "direct" else port})
    replacing = name in serve.status().applications
    try:
        handle = serve.run(build_app(memory_url, **kwargs), name=name, route_prefix=route_prefix)
    except RuntimeError:
        failure = deployment_failure(name)
        if failure is None:
            raise
        if not replacing:
            serve.delete(name)
        raise ValueError(failure) from None
    if ingress == "direct":
        check_direct_answer(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}{route_prefix}", name)
    return handle


def check_direct_answer(url: str, name: str, timeout_s: float = 30.0) -> None:
    """The app ``name`` answers at ``url`` from its own replica, else it is removed and the error says so."""
    url, deadline = url.rstrip("/") + "/v1/info", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return urllib.request.urlopen(url, timeout=2).close()
        except OSError:
            time.sleep(0.2)
    serve.delete(name)                         # Serve hands its range's ports out in deployment order
    raise ValueError(f"direct ingress: the app {name!r} was deployed but nothing answered {url} within "
                     f"{timeout_s:.0f}s (did another app take that port of the direct-ingress range?)")


def deployment_failure(app_name: str) -> str | None:
    """The error a failed deployment of ``app_name`` died with (its last ``...Error: message`` line)."""
    app = serve.status().applications.get(app_name)
    for deployment_name, deployment in (app.deployments.items() if app else ()):
        if deployment.status == DeploymentStatus.DEPLOY_FAILED:
            errors = re.findall(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception): (.+)$", deployment.message, re.MULTILINE)
            return errors[-1] if errors else f"{deployment_name} failed to start: {deployment.message}"
    return None
