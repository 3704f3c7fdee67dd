"""The two deployments: a ShardSearcher per shard, and the Router that is the HTTP ingress.

The Router turns a request into unit query vectors (``index.queries.check_vectors`` is the gate
for vectors and embeddings alike), fans them out to every shard concurrently through
DeploymentHandles, merges the top-k exactly and votes. A shard that fails or times out makes the
answer ``partial`` and names the missing shards.
"""

import asyncio
import logging

import numpy as np
from fastapi import HTTPException
from ray import serve

from index.manifest import read_manifest
from index.queries import QueryError, check_vectors
from index.serve.api import (ClassifyRequest, ClassifyResponse, Info, Limits, SearchRequest, SearchResponse, app)
from index.serve.images import decode_images
from index.shards import Shard, merge_topk
from index.voting import vote

log = logging.getLogger("vismem.index.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class ShardSearcher:
    """Holds one shard in memory; concurrent requests are batched, one FAISS search per nprobe."""

    def __init__(self, memory_url: str, version: int, number: int, nprobe: int | None = None):
        manifest = read_manifest(memory_url, version)
        self.shard = Shard.load(memory_url, manifest.shards[number], number, manifest.search_defaults(nprobe))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def search(self, queries: list[np.ndarray], ks: list[int], nprobes: list[int | None]) -> list[dict]:
        answers: list[dict | None] = [None] * len(queries)
        for nprobe in dict.fromkeys(nprobes):
            calls = [i for i, p in enumerate(nprobes) if p == nprobe]
            found = self.shard.query(np.concatenate([queries[i] for i in calls]), max(ks[i] for i in calls),
                                     nprobe=nprobe)
            ends = np.cumsum([len(queries[i]) for i in calls])
            for i, end in zip(calls, ends):
                answers[i] = {key: value[end - len(queries[i]):end, :ks[i]] for key, value in found.items()}
        return answers


def neighbour_list(found: dict, row: int, weights: np.ndarray | None = None) -> list[dict]:
    """Row ``row`` of a merged answer as a list of neighbours (with their vote weight if given)."""
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


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
@serve.ingress(app)
class Router:
    """The HTTP ingress: queries in, merged neighbours and votes out (the models are in index.serve.api)."""

    def __init__(self, memory_url: str, version: int, *shards, shard_timeout_s: float = 10.0,
                 limits: Limits = Limits()):
        from encoder import Encoder
        self.manifest = read_manifest(memory_url, version)
        self.memory_url, self.shards, self.timeout, self.limits = memory_url, list(shards), shard_timeout_s, limits
        self.encoder = Encoder.load(self.manifest.encoder["name"])
        if self.encoder.sha256 != self.manifest.encoder["sha256"]:
            raise ValueError(f"encoder {self.manifest.encoder['name']} changed since memory {memory_url} was built "
                             "(sha256 differs); rebuild the memory or point it at the original encoder")

    @app.get("/info")
    def info(self) -> Info:
        m = self.manifest
        return Info(memory=self.memory_url, version=m.version, count=m.count, dim=m.dim, factory=m.factory,
                    encoder=m.encoder, shards=[s.count for s in m.shards], search=m.search, recall=m.recall)

    def queries(self, q: SearchRequest) -> np.ndarray:
        """The request's unit query vectors ``[n, dim]``; a 4xx naming the field for anything else."""
        field, given = ("images", q.images) if q.images is not None else ("vectors", q.vectors)
        if not given:
            raise HTTPException(422, f"'{field}' is empty: give at least one query")
        if len(given) > self.limits.max_queries:
            raise HTTPException(422, f"{len(given)} {field} in one request, over the limit of "
                                     f"{self.limits.max_queries}: split them over several requests")
        try:
            if q.vectors is not None:
                return check_vectors(q.vectors, self.manifest.dim)
            return check_vectors(self.encoder.embed(decode_images(q.images, self.limits)), self.manifest.dim,
                                 name="embedding of images")
        except QueryError as e:
            raise HTTPException(422, str(e)) from None

    async def fan_out(self, vectors: np.ndarray, k: int, nprobe: int | None) -> tuple[list, list[int]]:
        async def one(handle):
            return await asyncio.wait_for(handle.search.remote(vectors, k, nprobe), self.timeout)

        results = await asyncio.gather(*(one(h) for h in self.shards), return_exceptions=True)
        missing = [n for n, r in enumerate(results) if isinstance(r, BaseException)]
        for n in missing:
            log.warning("shard %d failed: %r", n, results[n])
        return [r for r in results if not isinstance(r, BaseException)], missing

    async def neighbours(self, q: SearchRequest) -> tuple[dict, list[int]]:
        vectors = self.queries(q)
        results, missing = await self.fan_out(vectors, q.k, q.nprobe)
        if not results:
            raise HTTPException(503, f"no shard answered within {self.timeout}s; shards {missing} failed")
        answered = [n for n in range(len(self.shards)) if n not in missing]
        return merge_topk(results, q.k, answered), missing

    def envelope(self, missing: list[int]) -> dict:
        return {"version": self.manifest.version, "partial": bool(missing), "missing_shards": missing}

    @app.post("/search")
    async def search(self, q: SearchRequest) -> SearchResponse:
        found, missing = await self.neighbours(q)
        return SearchResponse(**self.envelope(missing), results=[
            {"neighbours": neighbour_list(found, row)} for row in range(len(found["ids"]))])

    @app.post("/classify")
    async def classify(self, q: ClassifyRequest) -> ClassifyResponse:
        found, missing = await self.neighbours(q)
        v = vote(found["labels"], found["similarities"], q.rule, ids=found["ids"])
        return ClassifyResponse(**self.envelope(missing), rule=q.rule, results=[
            {"decision": v.decisions[row], "scores": v.scores[row],
             "neighbours": neighbour_list(found, row, v.weights[row])} for row in range(len(v.decisions))])
