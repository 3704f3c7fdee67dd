"""The Ray Serve app over real HTTP: fan-out and merge agree with the in-process memory, answers
carry their neighbours and the memory version, nprobe reaches the shards, every bad input gets a
4xx naming the problem (never a 500), and a corrupt shard stops the start with the shard's name."""

import base64
import concurrent.futures
import http.client
import io
import json
import shutil
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.build.build import build_memory
from index.ingest.job import embed_collection
from index.memory import VisualMemory


def encoded(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png(colour) -> bytes:
    return encoded(Image.new("RGB", (8, 8), colour))


def png_declaring(width: int, height: int) -> bytes:
    """A few-hundred-byte PNG whose header claims ``width``×``height``: a decompression bomb as the
    server first sees it (its pixel data is that of an 8×8 image)."""
    data = bytearray(png((0, 0, 0)))
    struct.pack_into(">II", data, 16, width, height)                  # IHDR data starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # CRC over "IHDR" and its 13 bytes
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def call(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


BODY_LIMIT = 1 << 20        # the test server's; the default (16 MiB) would only make the test slower


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from tests.conftest import free_port
    from ray import serve

    from index.serve import Limits, start
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
    serve.shutdown()                       # Serve keeps the port it first started on: start it afresh on ours
    start(str(root / "mem"), host="127.0.0.1", port=port, name="vismem-test", limits=Limits(max_body_bytes=BODY_LIMIT))
    yield f"http://127.0.0.1:{port}", str(root / "mem"), colours
    serve.shutdown()


def test_info(served):
    base, _, _ = served
    status, info = call(f"{base}/info")
    assert status == 200 and info["count"] == 36 and info["shards"] == [12, 12, 12] and info["dim"] == 48
    assert info["version"] == 1
    assert info["search"] == {} and info["recall"] is None          # Flat: exact, nothing to claim


def test_a_server_started_without_a_token_refuses_every_edit(served):
    base, mem, _ = served
    for path, body in (("remove", {"ids": [1]}), ("add", {"vectors": [[0.1] * 48], "labels": ["x"]})):
        request = urllib.request.Request(f"{base}/v1/memory/{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json", "Authorization": "Bearer anything"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 403 and "editing is off" in json.loads(refused.value.read())["detail"]
    assert call(f"{base}/info")[1]["version"] == 1                    # nothing written


def test_openapi_describes_typed_requests_and_answers(served):
    base, _, _ = served
    status, spec = call(f"{base}/openapi.json")
    schemas = spec["components"]["schemas"]
    assert status == 200 and {"SearchRequest", "ClassifyRequest", "SearchResponse", "ClassifyResponse", "Info"} <= set(schemas)
    assert schemas["SearchRequest"]["properties"]["nprobe"]["anyOf"][0]["minimum"] == 1
    assert "version" in schemas["ClassifyResponse"]["required"]


def test_classify_images_with_every_rule(served):
    base, _, colours = served
    images = [base64.b64encode(png(c)).decode() for c in colours.values()]
    for rule in ("plurality", "distance", "softmax", "rank"):
        status, answer = call(f"{base}/classify", {"images": images, "k": 5, "rule": rule})
        assert status == 200 and answer["partial"] is False and answer["missing_shards"] == []
        assert answer["version"] == 1 and answer["rule"] == rule
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
    assert status == 200 and answer["version"] == 1
    local = memory.search(queries, 7)
    assert [[n["id"] for n in r["neighbours"]] for r in answer["results"]] == local.ids.tolist()
    assert [[n["shard"] for n in r["neighbours"]] for r in answer["results"]] == local.shards.tolist()
    assert all("weight" not in n for r in answer["results"] for n in r["neighbours"])   # search does not vote


def test_vectors_are_normalised_before_the_search(served):
    base, memory_url, _ = served
    memory = VisualMemory.open(memory_url)
    query = np.random.default_rng(2).normal(size=(1, 48))
    status, answer = call(f"{base}/search", {"vectors": (query * 10).tolist(), "k": 3})
    assert status == 200
    assert [n["id"] for n in answer["results"][0]["neighbours"]] == memory.search(query, 3).ids[0].tolist()
    assert all(-1.0001 <= n["similarity"] <= 1.0001 for n in answer["results"][0]["neighbours"])


def test_classify_explains_by_counterfactual_as_the_memory_does(served):
    base, memory_url, _ = served
    queries = np.random.default_rng(3).normal(size=(5, 48)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    local = VisualMemory.open(memory_url).classify(queries, k=5, rule="softmax", counterfactual=15)
    status, answer = call(f"{base}/v1/classify", {"vectors": queries.tolist(), "k": 5, "rule": "softmax",
                                                  "counterfactual": 15})
    assert status == 200
    for row, (result, cf) in enumerate(zip(answer["results"], local.counterfactuals)):
        assert result["decision"] == local.decisions[row] and len(result["neighbours"]) == 5
        served_cf = result["counterfactual"]
        assert served_cf["flipped_to"] == cf.flipped_to and served_cf["budget"] == 15
        assert [n["id"] for n in served_cf["removals"]] == local.ranking.ids[row, cf.removed].tolist()
        assert [n["id"] for n in served_cf["entrants"]] == local.ranking.ids[row, cf.entrants].tolist()
    assert sum(r["counterfactual"]["flipped_to"] is not None for r in answer["results"]) == 5   # 15 > the 12 of a colour
    status, plain = call(f"{base}/v1/classify", {"vectors": queries.tolist(), "k": 5, "rule": "softmax"})
    assert all(r["counterfactual"] is None for r in plain["results"])


def test_vismem_classify_prints_the_counterfactual(served, tmp_path, capsys):
    from cluster.cli import main
    base, _, colours = served
    image = tmp_path / "red.png"
    image.write_bytes(png(colours["red"]))
    assert main(["classify", "--url", base, "-k", "3", "--counterfactual", "15", "--json", str(image)]) == 0
    out = capsys.readouterr().out
    answer = json.loads(out.strip().splitlines()[-1])
    cf = answer["results"][0]["counterfactual"]
    assert answer["results"][0]["decision"] == "red" and cf["flipped_to"] in ("green", "blue")
    assert 10 <= len(cf["removals"]) <= 12 and all(n["label"] == "red" for n in cf["removals"])   # of the 12 red
    assert main(["classify", "--url", base, "-k", "3", "--counterfactual", "4", str(image)]) == 0
    assert "no removal of 4 memory items or fewer changes 'red'" in capsys.readouterr().out


GOOD = [0.1] * 48
NOISE = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))


@pytest.mark.parametrize("body, status, message", [
    # images
    ({"images": ["@@not base64@@"]}, 422, "images[0] is not a base64-encoded image file: it is not valid base64"),
    ({"images": [b64(b"plain text")]}, 422, "images[0] is valid base64 but not an image file"),
    ({"images": [b64(png((1, 2, 3))), b64(NOISE[:len(NOISE) // 2])]}, 422, "images[1] could not be decoded"),
    ({"images": [b64(png_declaring(20000, 20000))]}, 400, "images[0] declares more than"),
    ({"images": [b64(png_declaring(8000, 6000))]}, 400, "images[0] is 8000×6000 = 48.0 megapixels, over the limit of 40"),
    ({"images": [b64(png_declaring(6000, 6000))] * 5}, 400, "over the limit of 160 megapixels a request"),
    ({"images": [123]}, 422, "Input should be a valid string"),
    ({"images": []}, 422, "'images' is empty"),
    # vectors
    ({"vectors": [[0.1, 0.2]]}, 422, "vectors[0] has 2 values; every vector must have 48"),
    ({"vectors": [GOOD, [0.1] * 47]}, 422, "vectors[1] has 47 values"),
    ({"vectors": [[0.0] * 48]}, 422, "vectors[0] is a zero vector"),
    ({"vectors": [GOOD, [float("nan")] * 48]}, 422, "vectors[1] has a non-finite value"),
    ({"vectors": [[float("inf")] + GOOD[1:]]}, 422, "vectors[0] has a non-finite value"),
    ({"vectors": [[1e308] + GOOD[1:]]}, 422, "vectors[0] has a non-finite value"),
    ({"vectors": "abc"}, 422, "Input should be a valid list"),
    ({"vectors": [["a"] * 48]}, 422, "Input should be a valid number"),
    ({"vectors": []}, 422, "'vectors' is empty"),
    ({"vectors": [GOOD] * 257}, 422, "257 vectors in one request, over the limit of 256"),
    # the rest of the request
    ({"vectors": [GOOD], "rule": "majority"}, 422, "unknown rule 'majority'"),
    ({}, 422, "exactly one of 'images'"),
    ({"images": [b64(png((1, 2, 3)))], "vectors": [GOOD]}, 422, "exactly one of 'images'"),
    ({"vectors": [GOOD], "k": 0}, 422, "greater than or equal to 1"),
    ({"vectors": [GOOD], "k": 10**6}, 422, "less than or equal to 1000"),
    ({"vectors": [GOOD], "k": "ten"}, 422, "valid integer"),
    ({"vectors": [GOOD], "nprobe": 0}, 422, "greater than or equal to 1"),
    ({"vectors": [GOOD], "nprobe": 10**30}, 422, "less than or equal to"),
    ({"vectors": [GOOD], "nprobes": 4}, 422, "Extra inputs are not permitted"),
    ({"vectors": [GOOD], "counterfactual": 0}, 422, "greater than or equal to 1"),
    ({"vectors": [GOOD], "counterfactual": 101}, 422, "less than or equal to 100"),
    ([GOOD], 422, "valid dictionary"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(served, body, status, message):
    base, _, _ = served
    got, answer = call(f"{base}/classify", body)
    text = json.dumps(answer, ensure_ascii=False)
    assert (got, message in text) == (status, True), text[:500]
    if isinstance(answer["detail"], list):                    # pydantic's errors, without the input echoed back
        assert all("input" not in error for error in answer["detail"])


def raw_post(base: str, path: str, headers: dict, body=b"", chunked: bool = False) -> tuple[int, str]:
    """POST with exactly these headers (http.client adds no Content-Length when one is given, or
    when ``chunked``); returns (status, body text)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_bad_bodies_get_a_4xx_naming_the_problem(served):
    base, _, _ = served
    json_type = {"Content-Type": "application/json"}
    vectors = json.dumps({"vectors": [GOOD]}).encode()

    status, text = raw_post(base, "/classify", json_type, b'{"vectors": [[0.1, 0.2')
    assert status == 422 and "JSON decode error" in text
    status, text = raw_post(base, "/classify", json_type, b"")
    assert status == 422 and "Field required" in text
    status, text = raw_post(base, "/classify", {}, vectors)               # no Content-Type
    assert 400 <= status < 500 and "detail" in json.loads(text)
    # a Content-Length shorter than the body: the HTTP server takes the rest for a next request and
    # refuses that as malformed (the first is cancelled when the connection closes)
    status, text = raw_post(base, "/classify", {**json_type, "Content-Length": "10"}, vectors)
    assert 400 <= status < 500, text
    # over the body limit, declared: refused from the header alone
    big = b" " * (BODY_LIMIT + 1)
    status, text = raw_post(base, "/classify", {**json_type, "Content-Length": str(len(big))}, big)
    assert status == 413 and f"of {BODY_LIMIT + 1} bytes is over the limit of {BODY_LIMIT} bytes" in text
    # over the body limit, chunked (no Content-Length): counted as it streams in
    chunks = (b" " * 65536 for _ in range(BODY_LIMIT // 65536 + 1))
    status, text = raw_post(base, "/classify", json_type, chunks, chunked=True)
    assert status == 413 and f"is over the limit of {BODY_LIMIT} bytes" in text
    # a chunked body within the limit is answered
    status, text = raw_post(base, "/classify", json_type, iter([vectors[:9], vectors[9:]]), chunked=True)
    assert status == 200 and json.loads(text)["results"][0]["decision"] in ("red", "green", "blue")


def test_nprobe_reaches_the_shards(served, tmp_path):
    """On an IVF memory each request's nprobe gives the in-process answer at that nprobe, also when
    requests with different nprobe arrive together (one batch, one FAISS search per nprobe)."""
    from ray import serve

    from index.build.build import build_memory
    from index.serve import start

    base, memory_url, _ = served
    ivf_url = str(tmp_path / "ivf")
    build_memory(str(Path(memory_url).parent / "emb"), ivf_url, shards=2, factory="IVF4,Flat")
    port = int(base.rsplit(":", 1)[1])
    start(ivf_url, port=port, name="ivf", route_prefix="/ivf")
    try:
        memory = VisualMemory.open(ivf_url)
        status, info = call(f"{base}/ivf/info")
        assert info["search"] == memory.manifest.search and info["recall"]["nprobe"] == info["search"]["nprobe"]
        queries = np.random.default_rng(3).normal(size=(2, 48)).astype(np.float32)

        def served_ids(nprobe):
            status, answer = call(f"{base}/ivf/search", {"vectors": queries.tolist(), "k": 20, "nprobe": nprobe})
            assert status == 200, answer
            return [[n["id"] for n in r["neighbours"]] for r in answer["results"]]

        def local_ids(nprobe):
            return [[i for i in row if i >= 0] for row in memory.search(queries, 20, nprobe=nprobe).ids.tolist()]

        assert local_ids(1) != local_ids(4)                 # else this memory could not tell them apart
        asked = [1, 4, None, 2] * 3
        with concurrent.futures.ThreadPoolExecutor(len(asked)) as pool:
            answers = list(pool.map(served_ids, asked))
        assert answers == [local_ids(nprobe) for nprobe in asked]
    finally:
        serve.delete("ivf")


def test_unexpected_error_is_a_json_500(served):
    """The catch-all handler, reached through a bug (a shard answering nonsense), not through input."""
    from ray import serve

    from index.store.manifest import read_manifest
    from index.serve import Router

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class NonsenseShard:
        async def search(self, queries, k, nprobe=None, version=None):
            return {"nonsense": np.zeros((len(queries), k))}

    base, memory_url, _ = served
    serve.run(Router.bind(memory_url, read_manifest(memory_url).version, NonsenseShard.bind()), name="nonsense",
              route_prefix="/nonsense")
    try:
        status, answer = call(f"{base}/nonsense/search", {"vectors": [GOOD]})
        assert status == 500 and "internal error (KeyError) while answering /nonsense/search" in answer["detail"]
    finally:
        serve.delete("nonsense")


def test_corrupt_shard_stops_the_start_naming_the_shard(served, tmp_path):
    from ray import serve

    from index.store.manifest import read_manifest
    from index.serve import start

    base, memory_url, _ = served
    copy = tmp_path / "mem"
    shutil.copytree(memory_url, copy)
    relative = read_manifest(str(copy)).shards[1].index
    shard = copy / relative
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"^shard 1 of .*: {relative} does not match its sha256"):
        start(str(copy), port=int(base.rsplit(":", 1)[1]), name="corrupt", route_prefix="/corrupt")
    assert "corrupt" not in serve.status().applications


def test_failed_or_slow_shard_gives_a_partial_answer(served):
    import asyncio

    from ray import serve

    from index.store.manifest import read_manifest
    from index.serve import Router, ShardSearcher

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class BrokenShard:
        async def search(self, queries, k, nprobe=None, version=None):
            raise RuntimeError("disk gone")

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class SlowShard:
        async def search(self, queries, k, nprobe=None, version=None):
            await asyncio.sleep(4)     # well past the router's 2 s shard timeout

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
        status, health = call(f"{base}/degraded/healthz")        # neither stand-in says its version
        assert status == 503 and health == {"ready": False, "version": version, "shards": [version, None, None],
                                             "missing_shards": [1, 2]}
        with urllib.request.urlopen(f"{base}/degraded/metrics", timeout=30) as response:
            text = response.read().decode()
        assert 'vismem_partial_answers_total{shard="1"} 1.0' in text and 'vismem_partial_answers_total{shard="2"} 1.0' in text
        assert 'vismem_partial_answers_total{shard="0"}' not in text
        assert 'vismem_requests_total{route="/healthz",status="503"} 1.0' in text
    finally:
        serve.delete("degraded")


def port_of(served) -> int:
    return int(served[0].rsplit(":", 1)[1])          # Serve keeps the port it started on: the module's


def test_a_killed_shard_replica_gives_exact_partial_answers_then_recovers(served):
    """Real parts: a fixed-rate load over HTTP while a real ShardSearcher replica is killed. No
    5xx; each answer is the memory's own top-k or, while the shard is down, says partial and is
    exactly the live shards' top-k; Serve replaces the replica and the answers are whole again."""
    from index.bench.serve_faults import FaultLoadConfig, run
    memory_url = served[1]
    summary = run(FaultLoadConfig(memory_url, rate=20, seconds=8, kill_at_s=1, shard=1, k=3, clients=4,
                                  shard_cpus=0), emit=lambda record: None, port=port_of(served))
    assert summary["killed"] and summary["kill_at_s"] >= 1
    assert summary["server_errors"] == 0 and summary["wrong_answers"] == 0, json.dumps(summary)
    assert summary["partial"] > 0 and summary["missing_seen"] == [(1,)], summary
    assert summary["recovered_after_s"] is not None, summary          # whole answers again before the end


def test_with_two_replicas_a_shard_a_killed_replica_costs_no_answer(served):
    from index.bench.serve_faults import FaultLoadConfig, run
    summary = run(FaultLoadConfig(served[1], replicas=2, rate=20, seconds=5, kill_at_s=1, k=3, clients=4,
                                  shard_cpus=0), emit=lambda record: None, port=port_of(served))
    assert summary["killed"] and summary["answers"] == 100
    assert summary["statuses"] == {"200": 100} and summary["partial"] == 0 and summary["wrong_answers"] == 0, summary


def test_with_every_shard_down_a_query_is_a_503_naming_them(served):
    from index.bench.serve_faults import FaultLoadConfig, run
    summary = run(FaultLoadConfig(served[1], kill="all", rate=20, seconds=4, kill_at_s=1, k=3, clients=4,
                                  shard_cpus=0), emit=lambda record: None, port=port_of(served))
    assert summary["server_errors"] > 0 and set(summary["statuses"]) <= {"200", "503"}, summary
    assert summary["wrong_answers"] == 0, summary
    assert any("no shard answered" in e and "shards [0, 1, 2] failed" in e for e in summary["errors_seen"]), summary
