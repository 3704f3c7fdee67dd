"""The HTTP contract of a served memory: typed requests and answers, limits, error handlers.

Everything a client can send is bounded (body size, images' pixels, queries per request, k,
nprobe) and every bad request is answered with a 4xx whose ``detail`` names the field and what to
do; the catch-all handler is there for bugs, not for input.
"""

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from index.voting import RULES

log = logging.getLogger("vismem.index.serve")
MAX_K = 1000
MAX_NPROBE = 1 << 24        # more lists than any memory here has (nlist ≈ 16·√N); FAISS takes an int


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the Router; past these it gets a 4xx naming the limit."""

    max_body_bytes: int = 16 * 2**20          # 413 before the body is parsed
    max_pixels: int = 40_000_000              # per image, checked from its header before decoding (400)
    max_request_pixels: int = 160_000_000     # all images of one request together (400)
    max_queries: int = 256                    # images or vectors per request (422)
    max_added: int = 10_000                   # vectors per /v1/memory/add (images: max_queries)


# ---- requests --------------------------------------------------------------------------------

class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[str] | None = Field(None, description="base64-encoded image files (PNG, JPEG, ...)")
    vectors: list[list[float]] | None = Field(
        None, description="embeddings of the memory's dimension; each is L2-normalised before the search")
    k: int = Field(10, ge=1, le=MAX_K, description="neighbours per query")
    nprobe: int | None = Field(None, ge=1, le=MAX_NPROBE,
                               description="inverted lists each shard visits (IVF indexes; null: the memory's "
                                           "default; Flat ignores it). More is slower and more exact")

    @model_validator(mode="after")
    def one_kind_of_query(self):
        if (self.images is None) == (self.vectors is None):
            raise ValueError("give exactly one of 'images' (base64 image files) or 'vectors'")
        return self


class ClassifyRequest(SearchRequest):
    rule: str = Field("plurality", description=f"voting rule, one of {', '.join(RULES)}",
                      json_schema_extra={"enum": list(RULES)})

    @field_validator("rule")
    @classmethod
    def known_rule(cls, rule: str) -> str:
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of: {', '.join(RULES)}")
        return rule


class AddRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[str] | None = Field(None, description="base64-encoded image files, embedded by the memory's encoder")
    vectors: list[list[float]] | None = Field(None, description="embeddings of the memory's encoder and dimension")
    labels: list[str] = Field(description="one label per image or vector; new classes are welcome")
    uris: list[str] | None = Field(None, description="one URI per image or vector, shown with it as a neighbour")
    reason: str | None = Field(None, max_length=1000, description="why, for the memory's log")

    @model_validator(mode="after")
    def one_label_each(self):
        given = self.images if self.images is not None else self.vectors
        if (self.images is None) == (self.vectors is None):
            raise ValueError("give exactly one of 'images' (base64 image files) or 'vectors'")
        if not given:
            raise ValueError("nothing to add: 'images' or 'vectors' is empty")
        for name, values in (("labels", self.labels), ("uris", self.uris)):
            if values is not None and len(values) != len(given):
                raise ValueError(f"{len(given)} items to add but {len(values)} {name}: give one per item")
        return self


class RemoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[int] | None = Field(None, description="memory ids to remove")
    uris: list[str] | None = Field(None, description="remove the vectors with these URIs")
    labels: list[str] | None = Field(None, description="remove every vector of these labels (whole classes)")
    reason: str | None = Field(None, max_length=1000, description="why, for the memory's log")

    @model_validator(mode="after")
    def something_named(self):
        if not (self.ids or self.uris or self.labels):
            raise ValueError("name what to remove: 'ids', 'uris' or 'labels' (non-empty)")
        return self


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="the version whose content the new version holds (GET /v1/memory/versions)")
    reason: str | None = Field(None, max_length=1000, description="why, for the memory's log")


# ---- answers ---------------------------------------------------------------------------------

class EditResponse(BaseModel):
    version: int = Field(description="the memory version the edit made; answers from now on are computed on it or later")
    operation: str
    count: int = Field(description="vectors added or removed")
    ids: list[int] = Field(description="their memory ids")


class VersionsResponse(BaseModel):
    current: int = Field(description="the version this server answers from")
    versions: list[int]


class LogResponse(BaseModel):
    log: list[dict[str, Any]] = Field(description="one record per version: version, time, operation, counts, user, reason")


class Neighbour(BaseModel):
    id: int = Field(description="the memory's global id")
    label: str | None
    uri: str | None
    similarity: float = Field(description="cosine similarity to the query")
    shard: int = Field(description="the shard that holds it")


class WeightedNeighbour(Neighbour):
    weight: float = Field(description="its vote under the request's rule")


class SearchResult(BaseModel):
    neighbours: list[Neighbour]


class ClassifyResult(BaseModel):
    decision: str | None = Field(description="the winning label (null when no neighbour voted)")
    scores: dict[str, float] = Field(description="label → summed vote weight, in first-seen order")
    neighbours: list[WeightedNeighbour]


class Answer(BaseModel):
    version: int = Field(description="the memory version this answer was computed on")
    partial: bool = Field(description="true when some shards did not answer (see missing_shards)")
    missing_shards: list[int]


class SearchResponse(Answer):
    results: list[SearchResult]


class ClassifyResponse(Answer):
    rule: str
    results: list[ClassifyResult]


class Info(BaseModel):
    memory: str
    version: int
    count: int
    dim: int
    factory: str
    encoder: dict[str, Any]
    shards: list[int] = Field(description="vectors per shard")
    search: dict[str, Any] = Field(description="the defaults every query gets unless it asks otherwise (nprobe)")
    recall: dict[str, Any] | None = Field(description="recall@k against exact search measured by the build at "
                                                      "those defaults (null for exact Flat memories)")


# ---- the app, its body limit and its error handlers ------------------------------------------

def served_limits() -> Limits:
    """The limits of the Router replica answering this request."""
    return serve.get_replica_context().servable_object.limits


class BodyLimit:
    """413 for a request body over the limit, before anything parses it.

    A declared Content-Length over the limit is refused without reading the body; a body without
    one (chunked) is counted as it streams in and refused as soon as it passes the limit. A body
    within the limit is handed on whole (FastAPI reads it whole anyway).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = served_limits().max_body_bytes
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await self.too_large(limit, declared)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":          # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self.too_large(limit, None)(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        async def replay():
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        await self.app(scope, replay, send)

    @staticmethod
    def too_large(limit: int, declared: str | None) -> JSONResponse:
        size = f"of {declared} bytes " if declared else ""
        return JSONResponse({"detail": f"request body {size}is over the limit of {limit} bytes: send fewer or "
                                       "smaller images (or fewer vectors) per request"}, status_code=413)


app = FastAPI(title="vismem", description="kNN search and classification against a visual memory")
app.add_middleware(BodyLimit)


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's usual 422 ``{"detail": [{loc, msg, type}, ...]}``, without echoing the input
    (which can be the whole body)."""
    detail = [{key: value for key, value in error.items() if key in ("loc", "msg", "type", "ctx")}
              for error in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(detail)}, status_code=422)


@app.exception_handler(Exception)
async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not bad input: log it with its traceback and answer JSON rather than a bare 500."""
    log.error("%s %s failed unexpectedly", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": f"internal error ({type(exc).__name__}) while answering {request.url.path}; "
                                   "it is logged with its traceback on the server"}, status_code=500)
