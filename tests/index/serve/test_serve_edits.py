"""A served memory follows its edits live: adds and removes through HTTP (with the bearer token)
are exact, answered by every query that starts after the acknowledgement, under concurrent query
load, and the server follows an edit made by another writer."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from index.build.build import build_memory
from index.memory import VisualMemory
from index.queries import check_vectors
from index.shard.faiss_io import load_trained
from index.shard.placement import Placement
from index.store.manifest import read_manifest
from index.synthetic import ClusteredVectors
from tests.index.edit.test_memory_edits import write_collection

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo
TOKEN = "s3cret-token"
ENCODER = ("raw-pixels:4", hashlib.sha256(b"raw-pixels:4").hexdigest())     # 48-d, loadable by the Router


def call(url, body=None, token=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, None if body is None else json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from tests.conftest import free_port
    from ray import serve

    from index.serve import start
    root = tmp_path_factory.mktemp("serve-edits")
    source = ClusteredVectors(dim=48, clusters=32, spread=0.8, seed=3)
    vectors = source.rows(0, 900)
    labels = [f"c{i % 4}" for i in range(len(vectors))]
    build_memory(write_collection(str(root / "emb"), vectors, labels, encoder=ENCODER), str(root / "mem"), shards=3)
    port = free_port()
    serve.shutdown()                       # Serve keeps the port it first started on: start it afresh on ours
    start(str(root / "mem"), host="127.0.0.1", port=port, name="vismem-edits",
          token_digest=hashlib.sha256(TOKEN.encode()).hexdigest())
    yield f"http://127.0.0.1:{port}", str(root / "mem"), vectors
    serve.shutdown()                       # the next module starts Serve on its own port


def nearest(base, vectors, k=5):
    status, answer = call(f"{base}/v1/search", {"vectors": np.asarray(vectors).tolist(), "k": k})
    assert status == 200, answer
    return answer["version"], [[n["id"] for n in r["neighbours"]] for r in answer["results"]], answer


def test_edits_need_the_token(served):
    """Both mutations, over HTTP: no token, a wrong one and a non-Bearer scheme are 401 and write nothing."""
    base, mem, vectors = served
    before = call(f"{base}/v1/memory/versions")[1]
    for path, body in (("remove", {"ids": [1]}), ("add", {"vectors": [[0.1] * 48], "labels": ["intruder"]})):
        status, answer = call(f"{base}/v1/memory/{path}", body)
        assert status == 401 and "Authorization: Bearer" in answer["detail"], (path, answer)
        status, answer = call(f"{base}/v1/memory/{path}", body, token="wrong")
        assert status == 401 and "wrong editing token" in answer["detail"], (path, answer)
        request = urllib.request.Request(f"{base}/v1/memory/{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json", "Authorization": f"Basic {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as basic:
            urllib.request.urlopen(request, timeout=60)
        assert basic.value.code == 401 and basic.value.headers["WWW-Authenticate"] == "Bearer"
    assert call(f"{base}/v1/memory/versions")[1] == before          # nothing written
    assert before["current"] == VisualMemory.open(mem).version


def test_remove_is_exact_and_answered_from_the_next_query(served):
    base, mem, vectors = served
    version, ids, _ = nearest(base, vectors[10:12])
    assert ids[0][0] == 10 and ids[1][0] == 11
    status, answer = call(f"{base}/v1/memory/remove", {"ids": [10, 11], "reason": "test"}, token=TOKEN)
    assert status == 200 and answer["count"] == 2 and answer["version"] == version + 1, answer
    after, ids, found = nearest(base, vectors[10:12])
    assert after == version + 1 and 10 not in ids[0] + ids[1] and 11 not in ids[0] + ids[1]
    expected = VisualMemory.open(mem).search(vectors[10:12], 5)         # the committed version, from storage
    assert ids == expected.ids.tolist()
    np.testing.assert_allclose([[n["similarity"] for n in r["neighbours"]] for r in found["results"]],
                               expected.similarities, atol=1e-6)
    log = call(f"{base}/v1/memory/log")[1]["log"]
    assert log[-1]["operation"] == "remove" and log[-1]["counts"] == {"removed": 2} and log[-1]["reason"] == "test"


def test_add_is_searchable_by_the_next_query(served):
    base, mem, vectors = served
    new = np.random.default_rng(9).standard_normal((3, 48)).astype(np.float32)
    status, answer = call(f"{base}/v1/memory/add", {"vectors": new.tolist(), "labels": ["new-class"] * 3,
                                                    "uris": ["a", "b", "c"]}, token=TOKEN)
    assert status == 200 and answer["count"] == 3, answer
    status, found = call(f"{base}/v1/classify", {"vectors": new.tolist(), "k": 1})
    assert found["version"] == answer["version"]
    assert [r["neighbours"][0]["id"] for r in found["results"]] == answer["ids"]
    assert [r["decision"] for r in found["results"]] == ["new-class"] * 3
    status, again = call(f"{base}/v1/memory/remove", {"labels": ["new-class"]}, token=TOKEN)   # a whole class
    assert status == 200 and sorted(again["ids"]) == sorted(answer["ids"])
    assert all(r["neighbours"][0]["label"] != "new-class"
               for r in call(f"{base}/v1/classify", {"vectors": new.tolist(), "k": 1})[1]["results"])


def test_the_python_client_reads_searches_and_edits_the_served_memory(served, tmp_path, monkeypatch, capsys):
    """index.serve.client.Client against the real app: typed answers equal to the raw HTTP ones,
    images as bytes, paths and PIL images, edits by label and URI with the token, 4xx as exceptions."""
    import base64
    import io

    from PIL import Image

    from index.serve.client import Client, RequestRejected
    monkeypatch.delenv("VISMEM_TOKEN", raising=False)
    base, mem, vectors = served
    with Client(base, token=TOKEN) as client:
        info = client.info()
        assert info.dim == 48 and info.version == client.versions().current == VisualMemory.open(mem).version
        found = client.search(vectors=vectors[20:22], k=5)
        assert found.version == info.version and not found.partial
        assert [[n.id for n in r.neighbours] for r in found.results] == nearest(base, vectors[20:22])[1]

        picture = Image.fromarray(np.random.default_rng(4).integers(0, 255, (16, 16, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        picture.save(tmp_path / "q.png")
        status, raw = call(f"{base}/v1/classify", {"images": [base64.b64encode(buffer.getvalue()).decode()], "k": 3})
        assert status == 200, raw
        answers = client.classify(images=[buffer.getvalue(), str(tmp_path / "q.png"), picture], k=3, rule="distance")
        ids = [[n.id for n in r.neighbours] for r in answers.results]
        assert ids == [[n["id"] for n in raw["results"][0]["neighbours"]]] * 3
        assert all(r.decision in r.scores and r.neighbours[0].weight > 0 for r in answers.results)
        from cluster.cli import main                                  # `vismem classify` is this client
        capsys.readouterr()
        assert main(["classify", "--url", base, "-k", "3", "--rule", "distance", str(tmp_path / "q.png")]) == 0
        printed = capsys.readouterr().out
        assert printed.startswith(f"{tmp_path / 'q.png'}: {answers.results[0].decision}")
        assert len([line for line in printed.splitlines() if "w=" in line]) == 3

        new = np.random.default_rng(21).standard_normal((2, 48)).astype(np.float32)
        added = client.add(["client-class"] * 2, vectors=new, uris=["client://a", "client://b"], reason="client")
        decided = client.classify(vectors=new, k=1)
        assert decided.version == added.version and [r.decision for r in decided.results] == ["client-class"] * 2
        by_uri = client.remove(uris=["client://a"])
        assert by_uri.ids == added.ids[:1] and by_uri.version == added.version + 1
        by_label = client.remove(labels=["client-class"], reason="client cleanup")
        assert by_label.ids == added.ids[1:]
        pictured = client.add(["pictured"], images=[picture], uris=["client://picture"])   # embedded by the server
        assert client.classify(images=[picture], k=1).results[0].decision == "pictured"
        by_label = client.remove(labels=["pictured"], reason="client cleanup")
        assert by_label.ids == pictured.ids
        assert client.log().log[-1]["operation"] == "remove" and client.log().log[-1]["reason"] == "client cleanup"
        before_client = added.version - 1                              # the same content as now: later tests see no change
        rolled = client.rollback(before_client, reason="client rollback")
        assert rolled.operation == "rollback" and rolled.count == read_manifest(mem, before_client).count
        assert client.log().log[-1]["target"] == before_client and client.versions().current == rolled.version
        with pytest.raises(RequestRejected) as current:
            client.rollback(rolled.version)
        assert current.value.status == 409 and "nothing to roll back" in str(current.value)
        with pytest.raises(RequestRejected) as missing:
            client.rollback(10 ** 6)
        assert missing.value.status == 404
        by_label = rolled

    with Client(base) as anonymous:                                   # no token given, none in the environment
        with pytest.raises(RequestRejected) as refused:
            anonymous.remove(ids=[1])
        assert refused.value.status == 401 and "Bearer" in str(refused.value)
        with pytest.raises(RequestRejected) as wrong:
            anonymous.search(vectors=[[0.1] * 7])
        assert wrong.value.status == 422 and "dimension" in str(wrong.value)
        assert anonymous.versions().current == by_label.version          # nothing written by the refusals


def test_an_add_may_carry_more_vectors_than_a_query(served):
    """An add takes up to Limits.max_added vectors (10,000), a query at most max_queries (256)."""
    base, mem, vectors = served
    many = np.random.default_rng(11).standard_normal((300, 48)).astype(np.float32)
    status, answer = call(f"{base}/v1/memory/add", {"vectors": many.tolist(), "labels": ["bulk"] * 300}, token=TOKEN)
    assert status == 200 and answer["count"] == 300, answer
    assert call(f"{base}/v1/search", {"vectors": many.tolist(), "k": 1})[0] == 422
    status, answer = call(f"{base}/v1/memory/remove", {"labels": ["bulk"]}, token=TOKEN)
    assert status == 200 and answer["count"] == 300


def test_bad_edits_name_the_problem_and_write_nothing(served):
    base, mem, vectors = served
    before = call(f"{base}/v1/memory/versions")[1]
    status, answer = call(f"{base}/v1/memory/remove", {"ids": [5, 10 ** 9]}, token=TOKEN)
    assert status == 404 and "1000000000" in answer["detail"]
    status, answer = call(f"{base}/v1/memory/remove", {"labels": ["no-such-class"]}, token=TOKEN)
    assert status == 404 and "no-such-class" in answer["detail"]
    status, answer = call(f"{base}/v1/memory/add", {"vectors": [[0.1] * 7], "labels": ["x"]}, token=TOKEN)
    assert status == 422 and "dimension" in json.dumps(answer)
    status, answer = call(f"{base}/v1/memory/add", {"vectors": [[0.1] * 48], "labels": []}, token=TOKEN)
    assert status == 422
    assert call(f"{base}/v1/memory/versions")[1] == before


def test_no_removed_id_after_the_acknowledgement_under_query_load(served):
    """Queries run without pause in threads while ids are removed one at a time; a query that
    started after a remove was acknowledged never returns that id."""
    base, mem, vectors = served
    targets = list(range(100, 112))
    acked: dict[int, float] = {}
    seen: list[tuple[float, list[int]]] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            started = time.monotonic()
            _, ids, _ = nearest(base, vectors[targets], k=3)
            seen.append((started, [i for row in ids for i in row]))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for target in targets:
            time.sleep(0.05)
            status, answer = call(f"{base}/v1/memory/remove", {"ids": [target]}, token=TOKEN)
            assert status == 200, answer
            acked[target] = time.monotonic()
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    late = [(started, ids) for started, ids in seen if started > min(acked.values())]
    assert len(late) > 20, "too few queries overlapped the removes"
    for started, ids in late:
        stale = [t for t, when in acked.items() if when < started and t in ids]
        assert not stale, f"a query started after removing {stale} returned them"


def test_follows_an_edit_made_elsewhere(served):
    base, mem, vectors = served
    nearest(base, vectors[:1])                            # the server is up and watching its storage
    version, _ = VisualMemory.open(mem).remove(ids=[202], reason="from the CLI")
    committed = time.monotonic()
    while (answer := nearest(base, vectors[202:203]))[0] < version:
        assert time.monotonic() - committed < 2.0, "the server did not adopt a version committed elsewhere within 2 s"
        time.sleep(0.05)
    assert 202 not in answer[1][0]

    version, _ = VisualMemory.open(mem).remove(ids=[200], reason="from the CLI")
    status, answer = call(f"{base}/v1/memory/remove", {"ids": [201]}, token=TOKEN)
    assert status == 200 and answer["version"] == version + 1          # the server adopted it, then edited
    _, ids, _ = nearest(base, vectors[200:202])
    assert 200 not in ids[0] and 201 not in ids[1]


def test_edits_of_a_memory_on_s3(served, s3_bucket):
    """The same live edits when the memory lives on S3 (moto): the commit is S3's conditional put."""
    from ray import serve

    from index.serve import build_app
    base = served[0]
    url = f"{s3_bucket}/mem"
    vectors = ClusteredVectors(dim=48, clusters=8, spread=0.8, seed=4).rows(0, 120)
    build_memory(write_collection(f"{s3_bucket}/emb", vectors, [f"c{i % 3}" for i in range(120)], encoder=ENCODER),
                 url, shards=2)
    serve.run(build_app(url, token_digest=hashlib.sha256(TOKEN.encode()).hexdigest()), name="s3", route_prefix="/s3")
    try:
        status, removed = call(f"{base}/s3/v1/memory/remove", {"ids": [7]}, token=TOKEN)
        assert status == 200, removed
        status, added = call(f"{base}/s3/v1/memory/add", {"vectors": [vectors[7].tolist()], "labels": ["again"]},
                             token=TOKEN)
        assert status == 200 and added["version"] == removed["version"] + 1, added
        status, found = call(f"{base}/s3/v1/search", {"vectors": [vectors[7].tolist()], "k": 2})
        assert found["version"] == added["version"]
        assert [n["id"] for n in found["results"][0]["neighbours"]][0] == added["ids"][0]
        assert 7 not in [n["id"] for n in found["results"][0]["neighbours"]]
        assert VisualMemory.open(url).version == added["version"]
        assert [r["operation"] for r in call(f"{base}/s3/v1/memory/log")[1]["log"]] == ["build", "remove", "add"]
    finally:
        serve.delete("s3")



def test_a_colocated_router_answers_and_edits_as_the_shard_deployments_do(served):
    """``build_app(colocate=True)``: every shard in the Router's process, no ShardSearcher. Over the
    same memory it gives the same neighbours, similarities and shards as the deployed shards, its
    edits are exact and followed by the other app, and it follows theirs."""
    from ray import serve

    from index.serve import build_app
    base, mem, vectors = served
    with pytest.raises(ValueError, match="colocated shards have no replicas"):
        build_app(mem, colocate=True, replicas=2)
    serve.run(build_app(mem, colocate=True, token_digest=hashlib.sha256(TOKEN.encode()).hexdigest()),
              name="colocated", route_prefix="/colocated")
    near = f"{base}/colocated"
    try:
        status, health = call(f"{near}/healthz")
        assert status == 200 and health["ready"] and len(health["shards"]) == 3, health
        queries = vectors[300:340] + 0.05
        version, ids, answer = nearest(near, queries, k=10)
        assert (version, ids) == nearest(base, queries, k=10)[:2]
        expected = VisualMemory.open(mem).search(queries, 10)
        assert ids == expected.ids.tolist() and not answer["partial"]
        assert [[n["shard"] for n in r["neighbours"]] for r in answer["results"]] == expected.shards.tolist()

        status, removed = call(f"{near}/v1/memory/remove", {"ids": [ids[0][0]]}, token=TOKEN)
        assert status == 200 and removed["count"] == 1, removed
        assert ids[0][0] not in nearest(near, queries[:1])[1][0]          # the next query, same app
        status, added = call(f"{base}/v1/memory/add", {"vectors": [queries[1].tolist()], "labels": ["near"]},
                             token=TOKEN)                                   # an edit through the other app
        assert status == 200 and added["version"] == removed["version"] + 1, added
        deadline = time.monotonic() + 15
        while (found := nearest(near, queries[1:2], k=1))[0] < added["version"]:
            assert time.monotonic() < deadline, "the colocated Router did not follow the other app's add"
            time.sleep(0.2)
        assert found[1] == [added["ids"]]
        assert VisualMemory.open(mem).search(queries, 10).ids.tolist() == nearest(near, queries, k=10)[1]
    finally:
        serve.delete("colocated")

# ---- an IVF memory, placed by inverted lists (index.shard.placement) ------------------------------------
# Defined after the S3 test: the module's Ray has 2 CPUs, the Flat app holds 1 and this one 1 more,
# so the S3 app (deployed and deleted inside its test) must have come and gone before this one starts.

@pytest.fixture(scope="module")
def served_ivf(served, tmp_path_factory):
    """A 3-shard ``IVF16,Flat`` memory of 3,000 clustered vectors, each shard owning a range of the
    16 lists, served beside the Flat memory at ``/ivf``: (base URL, memory URL, vectors, source)."""
    from ray import serve

    from index.serve import build_app
    root = tmp_path_factory.mktemp("serve-ivf")
    source = ClusteredVectors(dim=48, clusters=24, spread=0.8, seed=7)
    vectors = source.rows(0, 3000)
    url = str(root / "mem")
    build_memory(write_collection(str(root / "emb"), vectors, [f"c{i % 4}" for i in range(len(vectors))],
                                  encoder=ENCODER), url, shards=3, factory="IVF16,Flat")
    serve.run(build_app(url, token_digest=hashlib.sha256(TOKEN.encode()).hexdigest()), name="ivf",
              route_prefix="/ivf")
    yield f"{served[0]}/ivf", url, vectors, source
    serve.delete("ivf")


def owning_shards(url, vectors):
    """(the shard that owns each vector's inverted list, the list) at the memory's current version."""
    m = read_manifest(url)
    placement = Placement.of(m)
    lists = placement.assign(load_trained(url, m), check_vectors(vectors, m.dim))
    return placement.shard_of(np.zeros(len(lists), np.int64), lists), lists


def spread_over_shards(source, per_shard, url, skip=0):
    """``per_shard`` held-out unit vectors of each shard's lists (different clusters, so different shards)."""
    candidates = check_vectors(source.queries(400 + skip)[skip:], 48)
    owner, _ = owning_shards(url, candidates)
    picked = [candidates[owner == s][:per_shard] for s in range(3)]
    assert all(len(p) == per_shard for p in picked), "some shard owns too few of the clusters"
    return np.concatenate(picked)


def top1(base, vectors, nprobe=None, k=1):
    status, answer = call(f"{base}/v1/search", {"vectors": np.asarray(vectors).tolist(), "k": k, "nprobe": nprobe})
    assert status == 200 and not answer["partial"], answer
    return answer


def test_ivf_memory_is_placed_by_lists(served_ivf):
    """The build put every vector in the shard owning its list, and every shard holds some."""
    base, url, vectors, _ = served_ivf
    m = read_manifest(url)
    assert m.placement["by"] == "lists" and len(m.placement["bounds"]) == 4 and m.placement["bounds"][-1] == 16
    owner, _ = owning_shards(url, vectors)
    memory = VisualMemory.open(url)
    for s, shard in enumerate(memory.shards):
        mine = np.flatnonzero(owner == s)
        assert len(mine) > 100 and len(shard) == len(mine) and shard.held(mine).all()
    assert call(f"{base}/v1/info")[1]["shards"] == [e.count for e in m.shards]


def test_ivf_add_lands_in_the_shard_of_each_vectors_list(served_ivf):
    base, url, vectors, source = served_ivf
    before = read_manifest(url)
    new = spread_over_shards(source, 2, url)
    owner, lists = owning_shards(url, new)
    status, answer = call(f"{base}/v1/memory/add", {"vectors": new.tolist(), "labels": ["fresh"] * 6,
                                                    "uris": [f"new://{i}" for i in range(6)]}, token=TOKEN)
    assert status == 200 and answer["version"] == before.version + 1 and answer["count"] == 6, answer
    ids = np.asarray(answer["ids"])
    assert ids.tolist() == list(range(before.next_id, before.next_id + 6))
    for nprobe in (16, None):                    # all lists, and the memory's default (the own list is probed first)
        found = top1(base, new, nprobe)
        assert found["version"] == answer["version"]
        assert [r["neighbours"][0]["id"] for r in found["results"]] == ids.tolist()
        assert [r["neighbours"][0]["shard"] for r in found["results"]] == owner.tolist()
        assert [r["neighbours"][0]["uri"] for r in found["results"]] == [f"new://{i}" for i in range(6)]
        assert all(r["neighbours"][0]["similarity"] > 0.999 for r in found["results"])

    after = read_manifest(url)
    assert after.version == answer["version"] and after.placement == before.placement
    assert sum(e.count for e in after.shards) == sum(e.count for e in before.shards) + 6
    memory = VisualMemory.open(url)
    assert len(memory) == sum(e.count for e in before.shards) + 6 and memory.live(ids).all()
    held = np.array([shard.held(ids) for shard in memory.shards])               # [shard, added]
    assert (held.sum(axis=0) == 1).all(), held
    bounds = np.asarray(Placement.of(after).bounds)
    holder = held.argmax(axis=0)
    assert ((bounds[holder] <= lists) & (lists < bounds[holder + 1])).all()
    assert sorted(set(holder.tolist())) == [0, 1, 2]

    # one vector: only its shard stages a segment; the others return None and keep their entries
    one = spread_over_shards(source, 1, url, skip=400)[2:3]
    status, answer = call(f"{base}/v1/memory/add", {"vectors": one.tolist(), "labels": ["fresh"]}, token=TOKEN)
    assert status == 200, answer
    latest = read_manifest(url)
    assert [len(e.segments) - len(a.segments) for e, a in zip(latest.shards, after.shards)] == [0, 0, 1]
    assert latest.shards[0] == after.shards[0] and latest.shards[1] == after.shards[1]
    assert VisualMemory.open(url).shards[2].held(np.asarray(answer["ids"])).all()
    assert top1(base, one)["results"][0]["neighbours"][0]["id"] == answer["ids"][0]


def test_ivf_remove_by_ids_and_by_label(served_ivf):
    base, url, vectors, source = served_ivf
    memory = VisualMemory.open(url)
    count, kept = len(memory), 120                          # kept: an original vector no test removes
    targets = [int(np.flatnonzero(shard.held(np.arange(50)))[0]) for shard in memory.shards]  # one per shard
    assert [r["neighbours"][0]["id"] for r in top1(base, vectors[targets], 16)["results"]] == targets
    doomed = spread_over_shards(source, 2, url, skip=800)
    status, added = call(f"{base}/v1/memory/add", {"vectors": doomed.tolist(), "labels": ["doomed"] * 6}, token=TOKEN)
    assert status == 200, added

    status, answer = call(f"{base}/v1/memory/remove", {"ids": targets, "reason": "by id"}, token=TOKEN)
    assert status == 200 and answer["ids"] == sorted(targets) and answer["version"] == added["version"] + 1, answer
    status, again = call(f"{base}/v1/memory/remove", {"labels": ["doomed"]}, token=TOKEN)
    assert status == 200 and again["ids"] == added["ids"] and again["version"] == answer["version"] + 1, again
    gone = set(targets) | set(added["ids"])
    for nprobe in (16, None):
        found = top1(base, np.concatenate([vectors[targets], doomed]), nprobe, k=10)
        assert found["version"] == again["version"]
        assert not gone & {n["id"] for r in found["results"] for n in r["neighbours"]}
        assert all(n["label"] != "doomed" for r in found["results"] for n in r["neighbours"])

    reopened = VisualMemory.open(url)
    assert reopened.version == again["version"] and len(reopened) == count - 3              # 6 added, those 6 and 3 more removed
    assert not reopened.live(sorted(gone)).any() and reopened.live([kept]).all()
    assert sum(e.count for e in read_manifest(url).shards) == count - 3

    for body, named in (({"ids": [kept, 10 ** 9]}, "1000000000"),     # unknown
                        ({"ids": [targets[1]]}, str(targets[1])),                # removed, still held by its shard
                        ({"labels": ["doomed"]}, "doomed")):
        status, answer = call(f"{base}/v1/memory/remove", body, token=TOKEN)
        assert status == 404 and named in answer["detail"] and "nothing was removed" in answer["detail"], answer
    assert call(f"{base}/v1/memory/versions")[1]["current"] == again["version"]
    assert read_manifest(url).version == again["version"] and VisualMemory.open(url).live([kept]).all()


def test_ivf_served_answers_equal_the_memory_in_process(served_ivf):
    base, url, vectors, source = served_ivf
    status, added = call(f"{base}/v1/memory/add", {"vectors": spread_over_shards(source, 1, url, skip=1200).tolist(),
                                                   "labels": ["late"] * 3}, token=TOKEN)
    assert status == 200, added
    status, removed = call(f"{base}/v1/memory/remove", {"ids": [added["ids"][0], 60, 61, 62]}, token=TOKEN)
    assert status == 200, removed
    queries = np.concatenate([source.queries(1600)[1500:], vectors[55:70]])
    memory = VisualMemory.open(url)
    assert memory.version == removed["version"]
    for nprobe in (None, 2, 16):
        found = top1(base, queries, nprobe, k=10)
        expected = memory.search(queries, 10, nprobe)
        assert found["version"] == memory.version
        assert [[n["id"] for n in r["neighbours"]] for r in found["results"]] == expected.ids.tolist()
        assert [[n["shard"] for n in r["neighbours"]] for r in found["results"]] == expected.shards.tolist()
        np.testing.assert_allclose([[n["similarity"] for n in r["neighbours"]] for r in found["results"]],
                                   expected.similarities, atol=1e-6)


def metric_values(base) -> dict:
    """``{(name, (label, value), ...): value}`` of the server's /metrics, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(sample.name, *sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_healthz_and_metrics_count_what_was_answered(served_ivf):
    base, url, vectors, _ = served_ivf
    status, health = call(f"{base}/healthz")
    version = read_manifest(url).version
    assert status == 200 and health == {"ready": True, "version": version, "shards": [version] * 3,
                                        "missing_shards": []}
    before = metric_values(base)
    assert before[("vismem_served_version",)] == version
    nearest(base, vectors[:3])                                            # 3 query vectors, one request
    nearest(base, vectors[3:4])
    assert call(f"{base}/v1/search", {"vectors": [[0.0] * 48]})[0] == 422
    status, added = call(f"{base}/v1/memory/add", {"vectors": [vectors[5].tolist()], "labels": ["counted"]}, token=TOKEN)
    assert status == 200
    assert call(f"{base}/v1/memory/remove", {"ids": added["ids"]}, token=TOKEN)[0] == 200
    after = metric_values(base)

    def key(name, **labels):
        return (name, *sorted(labels.items()))

    def grew(name, **labels):
        return after.get(key(name, **labels), 0) - before.get(key(name, **labels), 0)

    assert grew("vismem_requests_total", route="/v1/search", status="200") == 2
    assert grew("vismem_requests_total", route="/v1/search", status="422") == 1
    assert grew("vismem_query_vectors_total") == 4          # neither the refused zero vector nor the add's vector
    assert grew("vismem_edits_total", operation="add") == 1 and grew("vismem_edits_total", operation="remove") == 1
    assert grew("vismem_request_seconds_count", route="/v1/search") == 3
    assert (after[key("vismem_request_seconds_bucket", route="/v1/search", le="+Inf")]
            == after[key("vismem_request_seconds_count", route="/v1/search")])
    assert after[key("vismem_served_version")] == version + 2


def test_serve_bench_measures_every_path_against_a_running_app(served_ivf, capsys):
    """``vismem serve bench --url``: single, concurrent and batched figures over HTTP beside the
    memory opened in process and bare FAISS, with their ratios (a handle only for an app it starts)."""
    from cluster.cli import main
    base = served_ivf[0]
    assert main(["serve", "bench", "--url", base, "--singles", "5", "--clients", "2", "--seconds", "0.5",
                 "--batch", "4", "--batches", "2", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by = {(r["what"], r.get("path")): r for r in records}
    assert by[("memory", None)]["factory"] == "IVF16,Flat" and by[("memory", None)]["shards"] == 3
    for path in ("http", "router_in_process", "in_process", "bare_faiss"):
        single = by[("single_query", path)]
        assert 0 < single["p50_ms"] <= single["p99_ms"]
        assert by[("batches", path)]["vectors_per_s"] > 0
        batches = by[("batches", path)]           # the best batch is at least as fast as the median one
        assert batches["batch"] == 4 and batches["vectors_per_s"] >= batches["median_vectors_per_s"] > 0
    for path in ("http", "router_in_process", "in_process"):
        assert by[("concurrent", path)]["clients"] == 2 and by[("concurrent", path)]["queries"] > 0
        load = by[("concurrent", path)]           # over at least the 0.5 s asked (the last queries end after it)
        assert 0 < load["qps"] <= load["queries"] / 0.49 and 0 < load["p50_ms"] <= load["p99_ms"]
    assert ("single_query", "handle") not in by                       # not started here: no handle
    ratios = by[("ratios", None)]
    assert ratios["http_p50_over_in_process"] == round(by[("single_query", "http")]["p50_ms"]
                                                       / by[("single_query", "in_process")]["p50_ms"], 1)
    assert ratios["router_in_process_p50_over_in_process"] == round(
        by[("single_query", "router_in_process")]["p50_ms"] / by[("single_query", "in_process")]["p50_ms"], 2)


def test_schemathesis_with_all_checks_finds_no_failure(served_ivf):
    """Every endpoint fuzzed from the served memory's own OpenAPI document (which names its
    dimension): no 5xx, no undocumented status, no answer off its schema, every schema-valid
    request accepted and every invalid one refused. Last in the module: the fuzzer edits with the token."""
    base = served_ivf[0]
    status, spec = call(f"{base}/openapi.json")
    vectors = spec["components"]["schemas"]["SearchRequest"]["properties"]["vectors"]["anyOf"][0]
    assert status == 200 and vectors["items"]["minItems"] == vectors["items"]["maxItems"] == 48
    assert {"oneOf"} <= set(spec["components"]["schemas"]["AddRequest"]) and "anyOf" in spec["components"]["schemas"]["RemoveRequest"]
    st = shutil.which("st", path=os.path.dirname(sys.executable))
    assert st, "schemathesis's st not found: install the project's dev extra (make setup)"
    run = subprocess.run([st, "run", f"{base}/openapi.json", "--url", base, "--checks", "all", "--max-examples", "12",
                          "--seed", "1", "-H", f"Authorization: Bearer {TOKEN}", "--no-color"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "SCHEMATHESIS_HOOKS": "index.serve.fuzzing", "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"(\d+) generated, \1 passed", run.stdout), run.stdout[-3000:]
    assert call(f"{base}/v1/info")[0] == 200                       # and the memory still answers
