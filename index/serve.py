"""The Ray Serve app: one ShardSearcher deployment per shard and a Router with an HTTP ingress.

The Router embeds images (or takes vectors), fans each query batch out to every shard
concurrently through DeploymentHandles, merges the top-k exactly, votes and returns every
neighbour with its weight. A shard that fails or times out makes the answer ``partial`` and names
the missing shards: never a silent wrong answer.

HTTP API (JSON):
    GET  /info                    memory version, count, dim, encoder, shards
    POST /search    {"images": [base64...]} or {"vectors": [[...]]}, "k": 10
    POST /classify  same, plus "rule": plurality|distance|softmax|rank
"""


import asyncio
import base64
import binascii
import logging

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve

from index.manifest import read_manifest
from index.shards import Shard, merge_topk
from index.voting import RULES, vote

log = logging.getLogger("vismem.index.serve")
MAX_K = 1000


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class ShardSearcher:
    """Holds one shard in memory; concurrent requests are batched into one FAISS search."""

    def __init__(self, memory_url: str, version: int, number: int, nprobe: int | None = None):
        manifest = read_manifest(memory_url, version)
        self.shard = Shard.load(memory_url, manifest.shards[number], number, nprobe)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def search(self, queries: list[np.ndarray], ks: list[int]) -> list[dict]:
        k = max(ks)
        found = self.shard.query(np.concatenate(queries), k)
        ends = np.cumsum([len(q) for q in queries])
        return [{key: value[end - len(q):end, :want] for key, value in found.items()}
                for q, end, want in zip(queries, ends, ks)]


def neighbour_list(found: dict, row: int, weights: np.ndarray | None = None) -> list[dict]:
    out = []
    for col, nid in enumerate(found["ids"][row]):
        if nid < 0:
            continue
        item = {"id": int(nid), "label": found["labels"][row, col], "uri": found["uris"][row, col],
                "similarity": float(found["similarities"][row, col]), "shard": int(found["shards"][row, col])}
        if weights is not None:
            item["weight"] = float(weights[col])
        out.append(item)
    return out


class Query(BaseModel):
    images: list[str] | None = Field(None, description="base64-encoded image files (PNG, JPEG, ...)")
    vectors: list[list[float]] | None = Field(None, description="embeddings, already L2-normalised")
    k: int = Field(10, ge=1, le=MAX_K)
    rule: str = Field("plurality", description=f"one of {', '.join(RULES)}")


app = FastAPI(title="vismem", description="kNN search and classification against a visual memory")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
@serve.ingress(app)
class Router:
    def __init__(self, memory_url: str, version: int, *shards, shard_timeout_s: float = 10.0):
        from encoder import Encoder
        self.manifest = read_manifest(memory_url, version)
        self.memory_url, self.shards, self.timeout = memory_url, list(shards), shard_timeout_s
        self.encoder = Encoder.load(self.manifest.encoder["name"])
        if self.encoder.sha256 != self.manifest.encoder["sha256"]:
            raise ValueError(f"encoder {self.manifest.encoder['name']} changed since memory {memory_url} was built "
                             "(sha256 differs); rebuild the memory or point it at the original encoder")

    @app.get("/info")
    def info(self) -> dict:
        m = self.manifest
        return {"memory": self.memory_url, "version": m.version, "count": m.count, "dim": m.dim, "factory": m.factory,
                "encoder": m.encoder, "shards": [s.count for s in m.shards]}

    def queries(self, q: Query) -> np.ndarray:
        from encoder.embed import decode_image
        if (q.images is None) == (q.vectors is None):
            raise HTTPException(422, "give exactly one of 'images' (base64 image files) or 'vectors'")
        if q.vectors is not None:
            vectors = np.asarray(q.vectors, dtype=np.float32)
            if vectors.ndim != 2 or vectors.shape[1] != self.manifest.dim:
                raise HTTPException(422, f"'vectors' must be a list of {self.manifest.dim}-d vectors, "
                                         f"got shape {list(vectors.shape)}")
            return vectors
        images = []
        for n, data in enumerate(q.images):
            try:
                images.append(decode_image(base64.b64decode(data, validate=True)))
            except (binascii.Error, ValueError, OSError) as e:
                raise HTTPException(422, f"images[{n}] is not a base64-encoded image file: {e}") from None
        return self.encoder.embed(images)

    async def fan_out(self, vectors: np.ndarray, k: int) -> tuple[list, list[int]]:
        async def one(handle):
            return await asyncio.wait_for(handle.search.remote(vectors, k), self.timeout)

        results = await asyncio.gather(*(one(h) for h in self.shards), return_exceptions=True)
        missing = [n for n, r in enumerate(results) if isinstance(r, BaseException)]
        for n in missing:
            log.warning("shard %d failed: %r", n, results[n])
        return [r for r in results if not isinstance(r, BaseException)], missing

    async def neighbours(self, q: Query) -> tuple[dict, list[int]]:
        vectors = self.queries(q)
        results, missing = await self.fan_out(vectors, q.k)
        if not results:
            raise HTTPException(503, f"no shard answered within {self.timeout}s; shards {missing} failed")
        answered = [n for n in range(len(self.shards)) if n not in missing]
        return merge_topk(results, q.k, answered), missing

    def envelope(self, missing: list[int]) -> dict:
        return {"version": self.manifest.version, "partial": bool(missing), "missing_shards": missing}

    @app.post("/search")
    async def search(self, q: Query) -> dict:
        found, missing = await self.neighbours(q)
        return {**self.envelope(missing), "results": [
            {"neighbours": neighbour_list(found, row)} for row in range(len(found["ids"]))]}

    @app.post("/classify")
    async def classify(self, q: Query) -> dict:
        if q.rule not in RULES:
            raise HTTPException(422, f"unknown rule {q.rule!r}; choose one of: {', '.join(RULES)}")
        found, missing = await self.neighbours(q)
        v = vote(found["labels"], found["similarities"], q.rule, ids=found["ids"])
        return {**self.envelope(missing), "rule": q.rule, "results": [
            {"decision": v.decisions[row], "scores": v.scores[row],
             "neighbours": neighbour_list(found, row, v.weights[row])} for row in range(len(v.decisions))]}


def build_app(memory_url: str, version: int | None = None, nprobe: int | None = None, shard_timeout_s: float = 10.0,
              replicas: int = 1):
    """The Serve application for the memory at ``memory_url`` (current version by default)."""
    manifest = read_manifest(memory_url, version)
    shards = [ShardSearcher.options(name=f"ShardSearcher-{n}", num_replicas=replicas)
              .bind(memory_url, manifest.version, n, nprobe) for n in range(len(manifest.shards))]
    return Router.bind(memory_url, manifest.version, *shards, shard_timeout_s=shard_timeout_s)


def start(memory_url: str, host: str = "127.0.0.1", port: int = 8000, name: str = "vismem", **kwargs):
    """Start Serve's HTTP proxy on ``host:port`` and deploy the app; returns the Router handle."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(memory_url, **kwargs), name=name, route_prefix="/")
