"""Serving a memory over HTTP with Ray Serve.

One ``ShardSearcher`` deployment per shard and a ``Router`` with a FastAPI ingress that fans each
query out to every shard, merges the top-k exactly, votes and answers with every neighbour and
its weight. A shard that fails or times out makes the answer ``partial``: never a silent wrong
answer. Bad input gets a 4xx naming the problem, never a 500.

    api.py          the HTTP contract: typed request and response models, limits, error handlers
    images.py       base64 image files from a request, size-checked before they are decoded
    deployments.py  ShardSearcher and Router, and build_app / start, which bind and run them
    editing.py      edits applied live by the shards that own the vectors, committed by the Router
    auth.py         the bearer token that edits need
    metrics.py      the memory's own Prometheus metrics at /metrics
    page/           the page at / (index.html) and the thumbnails it shows
    client.py       a Python client of the API
    fuzzing.py      schemathesis hooks: what a fuzzer needs that the schema cannot say

HTTP API (JSON; the unversioned paths of the first three are kept as aliases):
    GET  /v1/info                 memory version, count, dim, encoder, shards
    POST /v1/search    {"images": [base64...]} or {"vectors": [[...]]}, "k": 10, "nprobe": null
    POST /v1/classify  same, plus "rule": plurality|distance|softmax|rank
    POST /v1/memory/add     {"images" or "vectors", "labels", "uris"?, "reason"?}   bearer token
    POST /v1/memory/remove  {"ids"?, "uris"?, "labels"?, "reason"?}              bearer token
    GET  /v1/memory/versions, /v1/memory/log
"""

from index.serve.api import Limits
from index.serve.deployments import Router, ShardSearcher, build_app, direct_ingress_env, free_port, start

__all__ = ["Limits", "Router", "ShardSearcher", "build_app", "direct_ingress_env", "free_port", "start"]
