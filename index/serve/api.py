"""The HTTP contract of a served memory: typed requests and answers, limits, error handlers.

Everything a client can send is bounded (body size, images' pixels, queries per request, k,
nprobe) and every bad request is answered with a 4xx whose ``detail`` names the field and what to
do; the catch-all handler is there for bugs, not for input.
"""

import copy
import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

import numpy as np

from index.counterfactual import explain
from index.queries import FLOAT32_MAX
from index.serve.metrics import RequestMetrics
from index.voting import RULES, vote

log = logging.getLogger("vismem.index.serve")
MAX_K = 1000
MAX_COUNTERFACTUAL = 100    # removals a counterfactual may try (its search goes k + this deep)
MAX_ID = 2**53 - 1          # ids count up from 0; the largest integer every JSON client (JavaScript too) reads exactly
MAX_NPROBE = 1 << 24        # more lists than any memory here has (nlist ≈ 16·√N); FAISS takes an int
# an embedding: finite float32 numbers, not all zero (no direction to compare); served_openapi adds its length
Vector = Annotated[list[Annotated[float, Field(json_schema_extra={"minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX})]],
                   Field(json_schema_extra={"not": {"items": {"const": 0}}})]


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the Router; past these it gets a 4xx naming the limit."""

    max_body_bytes: int = 16 * 2**20          # 413 before the body is parsed
    max_pixels: int = 40_000_000              # per image, checked from its header before decoding (400)
    max_request_pixels: int = 160_000_000     # all images of one request together (400)
    max_queries: int = 256                    # images or vectors per request (422)
    max_added: int = 10_000                   # vectors per /v1/memory/add (images: max_queries)


# ---- requests --------------------------------------------------------------------------------
# The JSON Schema of each request states what its validators enforce (exactly one of images or
# vectors, nothing empty, no zero vector), so that generated clients and fuzzers agree with the
# server; ``served_openapi`` adds what only the served memory knows (its dimension, whether it can
# embed images). Equal lengths of ``labels`` and the items to add cannot be said in JSON Schema.

def exactly_one_list_of(*fields: str):
    """A ``json_schema_extra`` making ``fields`` non-empty arrays (or null) of which exactly one is given."""
    def extra(schema: dict) -> None:
        for name in fields:
            for variant in schema["properties"][name].get("anyOf", []):
                if variant.get("type") == "array":
                    variant["minItems"] = 1
        schema["oneOf"] = [{"required": [name], "properties": {name: {"type": "array"}}} for name in fields]
    return extra


def some_list_of(*fields: str):
    """A ``json_schema_extra`` requiring at least one of ``fields`` to be a non-empty array."""
    def extra(schema: dict) -> None:
        schema["anyOf"] = [{"required": [name], "properties": {name: {"type": "array", "minItems": 1}}}
                           for name in fields]
    return extra


IMAGE_FORMAT = "base64-image"    # a base64-encoded image file; index.serve.fuzzing tells a fuzzer how to make one


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=exactly_one_list_of("images", "vectors"))

    images: list[Annotated[str, Field(json_schema_extra={"format": IMAGE_FORMAT})]] | None = Field(
        None, description="base64-encoded image files (PNG, JPEG, ...)")
    vectors: list[Vector] | None = Field(
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
    counterfactual: int | None = Field(
        None, ge=1, le=MAX_COUNTERFACTUAL,
        description="also explain each decision: the fewest memory items (at most this many) whose removal would "
                    "change it, and the neighbours that would enter in their place; the search goes k + this "
                    "deep. null: no explanation")

    @field_validator("rule")
    @classmethod
    def known_rule(cls, rule: str) -> str:
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of: {', '.join(RULES)}")
        return rule


class AddRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=exactly_one_list_of("images", "vectors"))

    images: list[Annotated[str, Field(json_schema_extra={"format": IMAGE_FORMAT})]] | None = Field(
        None, description="base64-encoded image files, embedded by the memory's encoder")
    vectors: list[Vector] | None = Field(None, description="embeddings of the memory's encoder and dimension")
    labels: list[str] = Field(description="one label per image or vector (as many as those); new classes are welcome")
    uris: list[str] | None = Field(None, description="one URI per image or vector (as many as those), shown with it "
                                                     "as a neighbour")
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
    model_config = ConfigDict(extra="forbid", json_schema_extra=some_list_of("ids", "uris", "labels"))

    ids: list[Annotated[int, Field(ge=0, le=MAX_ID)]] | None = Field(None, description="memory ids to remove")
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

class Problem(BaseModel):
    detail: str | list[dict[str, Any]] = Field(
        description="what is wrong and what to do; for a body that does not parse or match the schema, FastAPI's "
                    "list of {loc, msg, type}")


def problems(*codes: int) -> dict:
    """The ``responses=`` of a route that can answer these 4xx/5xx codes, each with a ``Problem``."""
    words = {400: "an image over the pixel limits", 401: "no or wrong bearer token", 403: "editing is off",
             404: "not in the memory", 409: "a conflicting or empty edit", 413: "the body is over the size limit",
             422: "a request the memory cannot answer (see detail)", 503: "no shard answered"}
    return {code: {"model": Problem, "description": words[code]} for code in codes}


QUERY_PROBLEMS = problems(400, 413, 422, 503)
EDIT_PROBLEMS = problems(400, 401, 403, 404, 409, 413, 422, 503)

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


class CounterfactualResult(BaseModel):
    flipped_to: str | None = Field(description="the decision once 'removals' are gone (null: no set of at most "
                                               "'budget' removals changes it)")
    removals: list[Neighbour] = Field(description="the fewest memory items whose removal changes the decision")
    entrants: list[Neighbour] = Field(description="the neighbours that would enter the top k in their place")
    scores: dict[str, float] = Field(description="the new vote: label → summed weight")
    budget: int = Field(description="the most removals tried (the request's 'counterfactual')")


class ClassifyResult(BaseModel):
    decision: str | None = Field(description="the winning label (null when no neighbour voted)")
    scores: dict[str, float] = Field(description="label → summed vote weight, in first-seen order")
    neighbours: list[WeightedNeighbour]
    counterfactual: CounterfactualResult | None = Field(None, description="with the request's 'counterfactual'")


class Answer(BaseModel):
    version: int = Field(description="the memory version this answer was computed on")
    partial: bool = Field(description="true when some shards did not answer (see missing_shards)")
    missing_shards: list[int]


class SearchResponse(Answer):
    results: list[SearchResult]


class ClassifyResponse(Answer):
    rule: str
    results: list[ClassifyResult]


def neighbour_list(found: dict, row: int, weights: np.ndarray | None = None, columns=None) -> list[dict]:
    """Row ``row`` of a merged answer as a list of neighbours (with their vote weight if given);
    ``columns``: only those, in that order."""
    out = []
    for col in range(len(found["ids"][row])) if columns is None else columns:
        nid = found["ids"][row, col]
        if nid < 0:
            continue
        item = {"id": int(nid), "label": found["labels"][row, col], "uri": found["uris"][row, col],
                "similarity": float(found["similarities"][row, col]), "shard": int(found["shards"][row, col])}
        if weights is not None:
            item["weight"] = float(weights[col])
        out.append(item)
    return out


def classify_results(ranking: dict, k: int, rule: str, counterfactual: int | None = None) -> list[dict]:
    """Each query's decision, scores and weighted neighbours from the first ``k`` of a merged
    ``ranking``, with its counterfactual (index.counterfactual) when asked: the ranking is then
    ``k + counterfactual`` deep."""
    top = {key: value[:, :k] for key, value in ranking.items()}
    v = vote(top["labels"], top["similarities"], rule, sample_weights=top.get("sample_weights"), ids=top["ids"])
    results = [{"decision": v.decisions[row], "scores": v.scores[row],
                "neighbours": neighbour_list(top, row, v.weights[row])} for row in range(len(v.decisions))]
    if counterfactual is not None:
        explained = explain(ranking["labels"], ranking["similarities"], ranking["ids"], k, rule,
                            ranking.get("sample_weights"))
        for row, (result, cf) in enumerate(zip(results, explained)):
            result["counterfactual"] = {"flipped_to": cf.flipped_to, "scores": cf.scores, "budget": counterfactual,
                                        "removals": neighbour_list(ranking, row, columns=cf.removed),
                                        "entrants": neighbour_list(ranking, row, columns=cf.entrants)}
    return results


class Health(BaseModel):
    ready: bool = Field(description="true when every shard answered within the health timeout")
    version: int = Field(description="the memory version the Router answers from")
    shards: list[int | None] = Field(description="the version each shard holds (null: it did not answer)")
    missing_shards: list[int]


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


# /openapi.json and /docs are the Router's own routes: the document names the served memory's dimension
app = FastAPI(title="vismem", description="kNN search and classification against a visual memory",
              openapi_url=None, docs_url=None, redoc_url=None)
app.add_middleware(BodyLimit)
app.add_middleware(RequestMetrics)         # outermost: the 413s BodyLimit answers are counted too


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


def served_openapi(dim: int, embeds_images: bool, limits: Limits) -> dict:
    """The app's OpenAPI document for one served memory: every vector has exactly ``dim`` numbers,
    lists are capped at ``limits``, and a server that cannot embed images takes no ``images``."""
    schema = copy.deepcopy(app.openapi())
    models = schema["components"]["schemas"]
    for name, most in (("SearchRequest", limits.max_queries), ("ClassifyRequest", limits.max_queries),
                       ("AddRequest", limits.max_added)):
        model = models[name]
        vectors = array_variant(model["properties"]["vectors"])
        vectors.update(maxItems=most)
        vectors["items"].update(minItems=dim, maxItems=dim)
        if embeds_images:
            array_variant(model["properties"]["images"]).update(maxItems=limits.max_queries)
        else:
            del model["properties"]["images"]
            model["oneOf"] = [branch for branch in model["oneOf"] if "vectors" in branch["required"]]
    return schema


def array_variant(prop: dict) -> dict:
    """The array schema inside a nullable property's ``anyOf``."""
    return next(variant for variant in prop["anyOf"] if variant.get("type") == "array")
