"""Editing a memory: exact add and remove, history, and the commit protocol under two writers and
crashes, on a local folder and on S3 (moto)."""

import json

import numpy as np
import pytest

import index.store.commit
from index.build.build import build_memory
from index.ingest.embeddings import embedding_table
from index.memory import VisualMemory
from index.store.commit import MemoryConflict
from index.store.manifest import FORMAT, list_versions, read_manifest
from index.synthetic import ClusteredVectors
from tests.index.test_memory import unit


def write_collection(url, vectors, labels, ids=None, uris=None, encoder=("raw-pixels:4", "abc")):
    """An embeddings folder as ``vismem embed`` writes it (``ids``: the collection's own)."""
    import fsspec
    from index.ingest.embeddings import JOB_FILE
    from procdata.storage import parquet_bytes
    ids = np.arange(len(vectors)) if ids is None else np.asarray(ids)
    uris = [f"mem://img/{i}.png" for i in ids] if uris is None else list(uris)
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/part-00000.parquet", parquet_bytes(embedding_table(ids.tolist(), uris, list(labels), vectors)))
    fs.pipe_file(f"{root}/{JOB_FILE}", json.dumps({"encoder": encoder[0], "encoder_sha256": encoder[1]}).encode())
    return url


@pytest.fixture(scope="module")
def data():
    """3,000 clustered 32-d vectors in 5 classes, and 150 queries (held-out and memory vectors)."""
    source = ClusteredVectors(dim=32, clusters=64, spread=0.8, seed=5)
    vectors = source.rows(0, 3000)
    labels = np.array([f"c{i % 5}" for i in range(len(vectors))], dtype=object)
    queries = np.concatenate([source.queries(100), vectors[::60]])
    return vectors, labels, queries


def same_answers(a, b, queries, k=10, id_map=None):
    """``a`` and ``b`` answer every query with the same ids (``b``'s mapped through ``id_map``)
    and the same similarities."""
    fa, fb = a.search(queries, k), b.search(queries, k)
    ids_b = fb.ids if id_map is None else np.where(fb.ids >= 0, id_map[np.maximum(fb.ids, 0)], -1)
    np.testing.assert_array_equal(fa.ids, ids_b)
    np.testing.assert_allclose(fa.similarities, fb.similarities, rtol=0, atol=1e-6)


FACTORIES = ["IDMap2,Flat", "IVF64,SQ8", "IVF64,PQ8np",          # np: no polysemous training (seconds saved)
             "IVF64,PQ16x4fs,Refine(SQfp16)"]                   # two tiers: fast-scan codes, fp16 re-rank file


@pytest.mark.parametrize("factory", FACTORIES)
def test_remove_equals_a_build_without_them(data, tmp_path, factory):
    vectors, labels, queries = data
    mem = str(tmp_path / "mem")
    build_memory(write_collection(str(tmp_path / "all"), vectors, labels), mem, shards=3, factory=factory, nprobe=8)
    memory = VisualMemory.open(mem)
    rng = np.random.default_rng(0)
    gone = np.sort(rng.choice(len(vectors), 300, replace=False))
    first_hits = memory.search(queries, 10).ids[:, 0]
    gone[:20] = np.unique(first_hits)[:20]                    # some removed ids are certainly answers now
    gone = np.unique(gone)
    version, removed = memory.remove(ids=gone, reason="unlearn")
    assert version == 2 and removed.tolist() == gone.tolist() and len(memory) == len(vectors) - len(gone)

    kept = np.setdiff1d(np.arange(len(vectors)), gone)       # rebuilt over the same trained index, without them
    rebuilt = str(tmp_path / "rebuilt")
    build_memory(write_collection(str(tmp_path / "kept"), vectors[kept], labels[kept], ids=kept), rebuilt, shards=2,
                 factory=factory, nprobe=8, trained=memory.trained_index())
    for answering in (memory, VisualMemory.open(mem)):        # in process at once, and read back from storage
        same_answers(answering, VisualMemory.open(rebuilt), queries, id_map=kept)
        assert not np.isin(answering.search(queries, 50).ids, gone).any()


@pytest.mark.parametrize("factory", FACTORIES)
def test_add_equals_a_build_of_the_whole(data, tmp_path, factory):
    vectors, labels, queries = data
    whole = str(tmp_path / "whole")
    build_memory(write_collection(str(tmp_path / "all"), vectors, labels), whole, shards=3, factory=factory, nprobe=8)
    trained = VisualMemory.open(whole).trained_index()
    part = str(tmp_path / "part")
    build_memory(write_collection(str(tmp_path / "first"), vectors[:2000], labels[:2000]), part, shards=3,
                 factory=factory, nprobe=8, trained=trained)
    memory = VisualMemory.open(part)
    version, ids = memory.add(vectors[2000:2600], labels[2000:2600], [f"mem://img/{i}.png" for i in range(2000, 2600)])
    assert version == 2 and ids.tolist() == list(range(2000, 2600))
    rest = write_collection(str(tmp_path / "rest"), vectors[2600:], labels[2600:], ids=np.arange(500, 900),
                            uris=[f"mem://img/{i}.png" for i in range(2600, 3000)])
    version, ids = memory.add_embeddings(rest, reason="the rest")
    assert version == 3 and ids.tolist() == list(range(2600, 3000)) and len(memory) == 3000
    for answering in (memory, VisualMemory.open(part)):
        same_answers(answering, VisualMemory.open(whole), queries)
        found = answering.search(queries, 10)                  # metadata of base and segments alike
        assert found.uris.tolist() == [[f"mem://img/{i}.png" for i in row] for row in found.ids.tolist()]
        assert found.labels.tolist() == [[f"c{i % 5}" for i in row] for row in found.ids.tolist()]
    entry = read_manifest(part).shards[0]
    assert len(entry.segments) == 2 and entry.count == entry.base_count + sum(s.count for s in entry.segments)


@pytest.fixture
def small(tmp_path):
    """A 2-shard Flat memory of 200 vectors in 4 classes; returns (url, vectors, labels)."""
    rng = np.random.default_rng(3)
    vectors = unit(rng.normal(size=(200, 16)))
    labels = np.array([f"c{i % 4}" for i in range(200)], dtype=object)
    build_memory(write_collection(str(tmp_path / "emb"), vectors, labels), str(tmp_path / "mem"), shards=2)
    return str(tmp_path / "mem"), vectors, labels


def test_bad_edits_name_the_problem_and_write_nothing(small, tmp_path):
    mem, vectors, labels = small
    memory = VisualMemory.open(mem)
    memory.remove(ids=[5])
    cases = [
        (lambda: memory.remove(ids=[3, 5, 1000, -2]), r"\[-2, 5, 1000\] not in memory .* nothing was removed"),
        (lambda: memory.remove(labels=["c1", "zebra"]), r"labels \['zebra'\] not in memory"),
        (lambda: memory.remove(uris=["mem://img/nope.png"]), r"uris \['mem://img/nope.png'\] not in memory"),
        (lambda: memory.remove(), "name what to remove"),
        (lambda: memory.remove(ids=[]), "nothing to remove"),
        (lambda: memory.rollback(2), "version 2 is the current version"),
        (lambda: memory.add(np.ones((2, 8), np.float32), ["a", "b"], ["u", "v"]), "dimension 8; the memory holds dimension 16"),
        (lambda: memory.add(vectors[:2], ["a"], ["u", "v"]), "2 vectors to add but 1 labels"),
        (lambda: memory.add_embeddings(write_collection(str(tmp_path / "other"), vectors[:3], ["a"] * 3,
                                                        encoder=("runs/other", "def"))),
         r"encoder raw-pixels:4 \(sha256 abc, 16-d\); .* encoder runs/other \(sha256 def, 16-d\)"),
        (lambda: memory.add_embeddings(write_collection(str(tmp_path / "wide"), unit(np.ones((3, 8))), ["a"] * 3)),
         r"\(sha256 abc, 16-d\); .*\(sha256 abc, 8-d\)"),
        (lambda: memory.rollback(9), "has no version 9"),
    ]
    for edit, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            edit()
    assert list_versions(mem) == [1, 2] and memory.version == 2 and len(memory) == 199
    with pytest.raises(FileNotFoundError, match="has no version 7"):
        VisualMemory.open(mem, version=7)


def test_versions_diff_log_and_rollback(small):
    mem, vectors, labels = small
    memory = VisualMemory.open(mem)
    before = memory.search(vectors[:30], 5)
    _, added = memory.add(vectors[:10] * -1, ["new"] * 10, [f"mem://new/{i}" for i in range(10)])
    _, removed = memory.remove(labels=["c3"], reason="class c3 withdrawn")
    assert memory.classify(vectors[3:4], k=1).decisions != ["c3"] and len(memory) == 200 + 10 - 50
    version = memory.rollback(1, reason="undo")
    assert (version, memory.versions()) == (4, [1, 2, 3, 4]) and len(memory) == 200
    for answering in (memory, VisualMemory.open(mem)):
        after = answering.search(vectors[:30], 5)
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_array_equal(after.similarities, before.similarities)

    assert memory.diff(1, 2)["added"].tolist() == added.tolist() and memory.diff(1, 2)["removed"].size == 0
    assert memory.diff(2, 3)["removed"].tolist() == removed.tolist() == list(range(3, 200, 4))
    assert all(v.size == 0 for v in memory.diff(1, 4).values())
    log = memory.log()
    assert [(r["version"], r["operation"]) for r in log] == [(1, "build"), (2, "add"), (3, "remove"), (4, "rollback")]
    assert log[1]["counts"] == {"added": 10} and log[2]["counts"] == {"removed": 50}
    assert log[2]["reason"] == "class c3 withdrawn" and log[3]["target"] == 1 and log[0]["user"] == log[3]["user"]
    _, fresh = memory.add(vectors[:1], ["x"], ["u"])          # ids are never handed out twice, even after a rollback
    assert fresh.tolist() == [210]
    build_memory(mem.rsplit("/", 1)[0] + "/emb", mem, shards=2)              # a rebuild numbers its vectors afresh
    with pytest.raises(ValueError, match="either side of the build of version 6"):
        memory.diff(1, 6)


def test_two_writers_one_wins_and_nothing_is_lost(small):
    mem, vectors, _ = small
    a, b = VisualMemory.open(mem), VisualMemory.open(mem)
    a.add(vectors[:3] * -1, ["new"] * 3, ["u1", "u2", "u3"])
    with pytest.raises(MemoryConflict, match="version 2 was written by another writer; re-open the memory and retry"):
        b.remove(ids=[7])
    assert b.version == 1 and len(b) == 200 and b.live([7]).all()       # the loser's object is unchanged
    b = VisualMemory.open(mem)
    assert b.remove(ids=[7])[0] == 3
    now = VisualMemory.open(mem)
    assert len(now) == 202 and not now.live([7]).any() and now.live([200, 201, 202]).all()


def test_the_pointer_is_a_hint_rolled_forward(small):
    """A writer that dies after its commit but before moving the pointer has still committed."""
    mem, vectors, _ = small
    memory = VisualMemory.open(mem)
    memory.remove(ids=[1, 2])
    pointer = mem + "/manifest.json"
    with open(pointer, "w") as f:
        json.dump({"current": 1, "path": "v1/manifest.json"}, f)
    assert read_manifest(mem).version == 2 and len(VisualMemory.open(mem)) == 198
    memory.remove(ids=[3])                                     # the next edit moves the pointer
    with open(pointer) as f:
        assert json.load(f)["current"] == 3


def test_remove_writes_only_deletion_files(small, monkeypatch):
    mem, _, _ = small
    memory = VisualMemory.open(mem)
    written = []
    real = index.store.commit.write
    monkeypatch.setattr(index.store.commit, "write", lambda fs, path, data, mode="new": (written.append(path),
                                                                                  real(fs, path, data, mode)))
    memory.remove(ids=[0, 1, 2])
    names = [p.rsplit("/", 1)[-1] for p in written]
    assert names == ["shard-0000-deleted.npy", "shard-0001-deleted.npy", "manifest.json", "manifest.json"]


class Injected(OSError):
    pass


def fail_at(monkeypatch, n):
    """Make the ``n``-th storage write from now on fail (counting from 0)."""
    real, calls = index.store.commit.write, []

    def write(fs, path, data, mode="new"):
        calls.append(path)
        if len(calls) == n + 1:
            raise Injected(f"injected failure writing {path}")
        return real(fs, path, data, mode)
    monkeypatch.setattr(index.store.commit, "write", write)
    return calls


def crash_each_write(url, edit, monkeypatch, queries):
    """Run ``edit(memory)`` with a failure injected at each of its writes in turn: until the edit
    succeeds, the memory must still open at the previous version with the same answers. Returns
    the number of writes the edit makes and the memory after it."""
    before = VisualMemory.open(url)
    expected = before.search(queries, 5)
    n = 0
    while True:
        memory = VisualMemory.open(url)
        calls = fail_at(monkeypatch, n)
        try:
            edit(memory)
        except Injected:
            monkeypatch.undo()
            again = VisualMemory.open(url)
            assert again.version == memory.version == before.version, f"failure at write {n} ({calls[-1]})"
            found = again.search(queries, 5)
            np.testing.assert_array_equal(found.ids, expected.ids)
            np.testing.assert_array_equal(found.similarities, expected.similarities)
            n += 1
            continue
        monkeypatch.undo()                                    # only the pointer's write may fail after the commit
        assert calls[-1].endswith("mem/manifest.json"), calls
        return n, memory


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_crash_at_any_write_leaves_the_previous_version_and_a_rerun_completes(store, tmp_path, monkeypatch,
                                                                               request):
    url = (request.getfixturevalue("s3_bucket") + "/mem") if store == "s3" else str(tmp_path / "mem")
    rng = np.random.default_rng(4)
    vectors = unit(rng.normal(size=(120, 16)))
    build_memory(write_collection(str(tmp_path / "emb"), vectors, ["a", "b", "c"] * 40), url, shards=2)
    queries = vectors[:12]

    writes, memory = crash_each_write(url, lambda m: m.add(-vectors[:4], ["new"] * 4, list("wxyz")), monkeypatch, queries)
    assert writes == 6 - 1 and memory.version == 2                   # 2 segments × (index, metadata), manifest, pointer
    assert len(VisualMemory.open(url)) == 124 and VisualMemory.open(url).search(-vectors[:1], 1).ids[0, 0] == 120

    writes, memory = crash_each_write(url, lambda m: m.remove(ids=[0, 1, 120]), monkeypatch, queries)
    assert writes == 4 - 1 and memory.version == 3                   # 2 deletion files, manifest, pointer
    final = VisualMemory.open(url)
    assert final.version == 3 and len(final) == 121 and not np.isin(final.search(queries, 20).ids, [0, 1, 120]).any()
    if store == "local":                              # both pointer moves failed: readers rolled forward past it
        assert json.loads((tmp_path / "mem" / "manifest.json").read_text())["current"] == 1


def test_two_writers_on_s3(s3_bucket, tmp_path):
    """S3's conditional put (If-None-Match) is the compare-and-swap."""
    url = s3_bucket + "/mem"
    vectors = unit(np.random.default_rng(6).normal(size=(40, 8)))
    build_memory(write_collection(str(tmp_path / "emb"), vectors, ["a"] * 40), url, shards=2)
    a, b = VisualMemory.open(url), VisualMemory.open(url)
    a.remove(ids=[1])
    with pytest.raises(MemoryConflict, match="version 2 was written by another writer"):
        b.add(vectors[:1], ["b"], ["u"])
    assert VisualMemory.open(url).version == 2 and len(VisualMemory.open(url)) == 39


def test_format_1_memories_are_read_and_edited_and_newer_formats_refused(small):
    mem, vectors, _ = small
    path = f"{mem}/v1/manifest.json"
    with open(path) as f:
        m = json.load(f)
    for key in ("operation", "counts", "user", "reason", "target", "placement"):
        del m[key]
    for s in m["shards"]:
        for key in ("segments", "deleted", "deleted_count", "deleted_sha256", "base_count"):
            del s[key]
    m["format"] = "vismem-memory/1"
    with open(path, "w") as f:
        json.dump(m, f)
    memory = VisualMemory.open(mem)
    assert memory.manifest.format == "vismem-memory/1" and memory.manifest.user is None and len(memory) == 200
    memory.remove(ids=[4])
    assert read_manifest(mem).format == FORMAT and len(VisualMemory.open(mem)) == 199

    with open(f"{mem}/v2/manifest.json") as f:
        m = json.load(f)
    m["format"] = "vismem-memory/99"
    with open(f"{mem}/v2/manifest.json", "w") as f:
        json.dump(m, f)
    with pytest.raises(ValueError, match="'vismem-memory/99' manifest, which this vismem cannot read or edit"):
        VisualMemory.open(mem)


def test_live_ids_and_labels_follow_the_deletion_set(data, tmp_path):
    """The live-id rule, asked of the shard (``live_ids``, ``live_labels``) and of the memory
    (``labels``), and the history's ids read from the files (``diff``), agree after a remove."""
    vectors, labels, _ = data
    mem = str(tmp_path / "mem")
    build_memory(write_collection(str(tmp_path / "all"), vectors[:300], labels[:300]), mem, shards=2)
    memory = VisualMemory.open(mem)
    assert memory.labels() == {f"c{i}" for i in range(5)}
    memory.remove(labels=["c3"])
    memory.remove(ids=[0, 1])
    assert memory.labels() == {"c0", "c1", "c2", "c4"}
    live = np.sort(np.concatenate([shard.live_ids(part) for shard in memory.shards for part in shard.parts]))
    assert len(live) == len(memory) == 300 - 60 - 2 and memory.live(live).all()
    assert set().union(*(shard.live_labels() for shard in memory.shards)) == memory.labels()
    assert memory.diff(1, 3)["removed"].tolist() == np.setdiff1d(np.arange(300), live).tolist()


def test_a_served_shard_stages_an_add_to_a_two_tier_memory(data, tmp_path):
    """The served add path (``index.serve.editing.ShardState.stage_add``, what a shard replica runs)
    hands a two-tier shard the new vectors' re-rank rows: every shard stages its share, the shares
    hold each added id once, live, with its URI, and its re-rank row is the vector as the tier keeps it."""
    import asyncio

    from index.serve.editing import ShardState
    from index.store.commit import new_folder
    vectors, labels, _ = data
    mem = str(tmp_path / "mem")
    build_memory(write_collection(str(tmp_path / "all"), vectors[:1500], labels[:1500]), mem, shards=2,
                 factory="IVF64,PQ16x4fs,Refine(SQfp16)", nprobe=8)
    new, ids = vectors[1500:1520], np.arange(1500, 1520)
    owned = []
    for number in range(2):
        state = ShardState()
        state.open_shard(mem, 1, number, None)
        asyncio.run(state.stage_add(2, new_folder(2), new, ids, [f"new://{i}" for i in ids], ["added"] * len(ids)))
        if 2 in state.staged:
            shard = state.staged[2][0]
            mine = ids[shard.live(ids)]
            assert shard.describe(mine)[0].tolist() == [f"new://{i}" for i in mine]
            segment = shard.parts[-1]
            np.testing.assert_array_equal(segment.tier, shard.tier_rows(new[mine - 1500]))
            owned.extend(mine.tolist())
    assert sorted(owned) == ids.tolist()
