"""The Ray Serve app over real HTTP: fan-out and merge agree with the in-process memory, answers
carry their neighbours, and malformed requests get a clear 422."""

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from index.build import build_memory
from index.embed_job import embed_collection
from index.memory import VisualMemory


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def call(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from conftest import free_port
    from ray import serve

    from index.serve import start
    root = tmp_path_factory.mktemp("serve")
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
    rng = np.random.default_rng(0)
    for label, base in colours.items():
        (root / "images" / label).mkdir(parents=True)
        for n in range(12):
            jitter = tuple(int(np.clip(c + rng.integers(-40, 40), 0, 255)) for c in base)
            (root / "images" / label / f"{n}.png").write_bytes(png(jitter))
    embed_collection(str(root / "images"), "raw-pixels:4", str(root / "emb"), partition_size=10)
    build_memory(str(root / "emb"), str(root / "mem"), shards=3)
    port = free_port()
    start(str(root / "mem"), host="127.0.0.1", port=port, name="vismem-test")
    yield f"http://127.0.0.1:{port}", str(root / "mem"), colours
    serve.shutdown()


def test_info(served):
    base, _, _ = served
    status, info = call(f"{base}/info")
    assert status == 200 and info["count"] == 36 and info["shards"] == [12, 12, 12] and info["dim"] == 48


def test_classify_images_with_every_rule(served):
    base, _, colours = served
    images = [base64.b64encode(png(c)).decode() for c in colours.values()]
    for rule in ("plurality", "distance", "softmax", "rank"):
        status, answer = call(f"{base}/classify", {"images": images, "k": 5, "rule": rule})
        assert status == 200 and answer["partial"] is False and answer["missing_shards"] == []
        assert [r["decision"] for r in answer["results"]] == list(colours)
        for result in answer["results"]:
            assert len(result["neighbours"]) == 5
            assert all({"id", "label", "uri", "similarity", "weight", "shard"} <= set(n) for n in result["neighbours"])
            sims = [n["similarity"] for n in result["neighbours"]]
            assert sims == sorted(sims, reverse=True)


def test_search_matches_in_process_memory(served):
    base, memory_url, _ = served
    memory = VisualMemory.open(memory_url)
    queries = np.random.default_rng(1).normal(size=(4, 48)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    status, answer = call(f"{base}/search", {"vectors": queries.tolist(), "k": 7})
    assert status == 200
    local = memory.search(queries, 7)
    assert [[n["id"] for n in r["neighbours"]] for r in answer["results"]] == local.ids.tolist()
    assert [[n["shard"] for n in r["neighbours"]] for r in answer["results"]] == local.shards.tolist()


@pytest.mark.parametrize("body, message", [
    ({"images": ["@@not base64@@"]}, "images[0] is not a base64-encoded image"),
    ({"images": [base64.b64encode(b"plain text").decode()]}, "images[0]"),
    ({"vectors": [[0.1, 0.2]]}, "48-d vectors"),
    ({"vectors": [[0.0] * 48], "rule": "majority"}, "unknown rule 'majority'"),
    ({}, "exactly one of 'images'"),
    ({"vectors": [[0.0] * 48], "k": 0}, "greater than or equal to 1"),
])
def test_malformed_requests(served, body, message):
    base, _, _ = served
    status, answer = call(f"{base}/classify", body)
    assert status == 422 and message in json.dumps(answer)


def test_failed_or_slow_shard_gives_a_partial_answer(served):
    import asyncio

    from ray import serve

    from index.manifest import read_manifest
    from index.serve import Router, ShardSearcher

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class BrokenShard:
        async def search(self, queries, k):
            raise RuntimeError("disk gone")

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class SlowShard:
        async def search(self, queries, k):
            await asyncio.sleep(8)     # well past the router's 2 s shard timeout

    base, memory_url, colours = served
    version = read_manifest(memory_url).version
    good = ShardSearcher.options(name="Good-0").bind(memory_url, version, 0)
    app = Router.bind(memory_url, version, good, BrokenShard.bind(), SlowShard.bind(), shard_timeout_s=2.0)
    serve.run(app, name="degraded", route_prefix="/degraded")
    try:
        images = [base64.b64encode(png(c)).decode() for c in colours.values()]
        status, answer = call(f"{base}/degraded/classify", {"images": images, "k": 3})
        assert status == 200
        assert answer["partial"] is True and answer["missing_shards"] == [1, 2]
        assert all(n["shard"] == 0 for r in answer["results"] for n in r["neighbours"])
        assert all(n["id"] % 3 == 0 for r in answer["results"] for n in r["neighbours"])
    finally:
        serve.delete("degraded")
