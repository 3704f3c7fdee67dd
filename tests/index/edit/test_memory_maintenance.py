"""Maintaining a memory: compact (same answers, removed vectors gone from the new files), vacuum
(old versions and orphans deleted, kept versions whole), prune (hard and soft, leave-one-out),
purge (no file holds a removed vector), each crash-safe, on a local folder and on S3 (moto)."""

import json
import os
import shutil
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import index.store.commit
from index.build.build import build_memory
from index.edit import prune as pruning
from index.memory import VisualMemory
from index.store.manifest import list_versions, read_manifest
from index.synthetic import ClusteredVectors
from index.voting import neighbour_weights
from tests.index.edit.test_memory_edits import Injected, crash_each_write, write_collection
from tests.index.test_memory import unit


def answers(memory, queries, k=10):
    found = memory.search(queries, k)
    return found.ids, found.similarities


def assert_same(memory, expected, queries, k=10):
    ids, sims = answers(memory, queries, k)
    np.testing.assert_array_equal(ids, expected[0])
    np.testing.assert_array_equal(sims, expected[1])             # the very codes: bit-identical scores


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)


@pytest.fixture(scope="module")
def clustered():
    source = ClusteredVectors(dim=32, clusters=48, spread=0.8, seed=11)
    vectors = source.rows(0, 1500)
    labels = np.array([f"c{i % 5}" for i in range(len(vectors))], dtype=object)
    return vectors, labels, np.concatenate([source.queries(60), vectors[::50]])


def edited_memory(tmp_path, url, clustered, factory, shards=3):
    """A memory built from 1,200 vectors, given 300 more (segments) and 215 removals (deletion sets)."""
    vectors, labels, _ = clustered
    build_memory(write_collection(str(tmp_path / "emb"), vectors[:1200], labels[:1200]), url, shards=shards,
                 factory=factory, nprobe=4)
    memory = VisualMemory.open(url)
    memory.add(vectors[1200:], labels[1200:], [f"mem://img/{i}.png" for i in range(1200, 1500)])
    memory.remove(ids=np.arange(0, 1500, 7), reason="unlearn")
    return memory


# compact ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF16,SQ8", "IVF16,PQ8np", "IVF16,PQ16x4fs,Refine(SQfp16)"])
def test_compact_answers_exactly_as_before_and_drops_removed_vectors(clustered, tmp_path, factory):
    _, _, queries = clustered
    url = str(tmp_path / "mem")
    memory = edited_memory(tmp_path, url, clustered, factory)
    expected, before = answers(memory, queries), memory.classify(queries, k=10, rule="softmax").decisions
    version = memory.compact(reason="tidy")
    assert version == 4 and len(memory) == 1500 - 215
    for answering in (memory, VisualMemory.open(url)):
        assert_same(answering, expected, queries)
        assert answering.classify(queries, k=10, rule="softmax").decisions == before
    m = read_manifest(url)
    assert all(not s.segments and s.deleted is None and s.count == s.base_count for s in m.shards)
    record = memory.log()[-1]
    assert (record["operation"], record["reason"]) == ("compact", "tidy")
    assert record["counts"] == {"shards": 3, "segments": 3, "dropped": 215, "vectors": 1285}
    removed = np.arange(0, 1500, 7)
    for entry in m.shards:                                        # the new files hold no removed id
        index = faiss.read_index(str(tmp_path / "mem" / entry.index))
        ivf = faiss.try_extract_index_ivf(index)
        stored = (faiss.vector_to_array(faiss.downcast_index(index).id_map) if ivf is None else
                  np.concatenate([faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy()
                                  for i in range(ivf.nlist)]))
        assert len(stored) == entry.count and not np.isin(stored, removed).any()


def test_compact_rewrites_only_touched_shards_and_refuses_nothing_to_do(small_memory):
    url, vectors = small_memory
    memory = VisualMemory.open(url)
    memory.remove(ids=[0, 2, 4])                                 # all in shard 0 of 2
    untouched = read_manifest(url).shards[1]
    assert memory.compact() == 3
    shards = read_manifest(url).shards
    assert shards[1] == untouched and shards[0].index.startswith("v3/") and len(memory) == 197
    files = files_under(url)
    with pytest.raises(ValueError, match=f"nothing to compact in memory {url} \\(version 3\\)"):
        memory.compact()
    assert list_versions(url) == [1, 2, 3] and files_under(url) == files


@pytest.fixture
def small_memory(tmp_path):
    """A 2-shard Flat memory of 200 16-d vectors in 4 classes; returns (url, vectors)."""
    vectors = unit(np.random.default_rng(3).normal(size=(200, 16)))
    labels = [f"c{i % 4}" for i in range(200)]
    build_memory(write_collection(str(tmp_path / "emb"), vectors, labels), str(tmp_path / "mem"), shards=2)
    return str(tmp_path / "mem"), vectors


# vacuum ----------------------------------------------------------------------------------------
def history_of_edits(memory, vectors):
    """Versions 2..5: add, remove, compact, soft prune; returns each version's answers."""
    queries = vectors[:25]
    seen = {1: answers(memory, queries)}
    _, added = memory.add(-vectors[:6], ["new"] * 6, [f"mem://new/{i}" for i in range(6)])
    seen[2] = answers(memory, queries)
    memory.remove(ids=[1, 3, added[1]])
    seen[3] = answers(memory, queries)
    memory.compact()
    seen[4] = answers(memory, queries)
    memory.prune(mode="soft", k=5)
    seen[5] = answers(memory, queries)
    return seen, queries


@pytest.mark.parametrize("store", ["local", "s3"])
def test_vacuum_deletes_old_versions_and_kept_versions_answer_as_before(store, tmp_path, request):
    url = (request.getfixturevalue("s3_bucket") + "/mem") if store == "s3" else str(tmp_path / "mem")
    vectors = unit(np.random.default_rng(8).normal(size=(120, 16)))
    build_memory(write_collection(str(tmp_path / "emb"), vectors, ["a", "b", "c"] * 40), url, shards=2)
    memory = VisualMemory.open(url)
    seen, queries = history_of_edits(memory, vectors)
    fs, root = index.store.commit.filesystem(url)

    def listing():
        fs.invalidate_cache(root)
        return {p[len(root) + 1:]: i["size"] for p, i in fs.find(root, detail=True).items()}

    before = listing()
    planned = memory.vacuum(keep_last=2, dry_run=True)
    assert listing() == before and planned["dry_run"]
    report = memory.vacuum(keep_last=2)
    assert report == {**planned, "dry_run": False}
    assert report["deleted_versions"] == [1, 2, 3] and report["kept_versions"] == [4, 5]
    assert report["freed_bytes"] == sum(before[f] for f in report["deleted_files"]) > 0
    after = listing()
    assert set(after) == set(before) - set(report["deleted_files"])
    kept = {"manifest.json"} | {f"v{v}/manifest.json" for v in (4, 5)}
    kept |= read_manifest(url, 4).files() | read_manifest(url, 5).files()
    assert set(after) == kept                                     # nothing else is left
    assert memory.versions() == [4, 5]
    for v in (4, 5):
        assert_same(VisualMemory.open(url, version=v), seen[v], queries)
    for edit in (lambda: memory.rollback(2), lambda: VisualMemory.open(url, version=1)):
        with pytest.raises(FileNotFoundError, match=r"version \d of memory .*mem was deleted by vacuum "
                                                    r"\(versions: \[4, 5\]\)"):
            edit()
    assert memory.rollback(4) == 6                               # a kept version still rolls back, weights and all
    assert_same(memory, seen[4], queries)
    assert (memory.search(queries, 10).sample_weights == 1.0).all()


def test_vacuum_keeps_versions_by_age_and_by_default_deletes_only_old_orphans(small_memory):
    url, vectors = small_memory
    memory = VisualMemory.open(url)
    seen, queries = history_of_edits(memory, vectors)
    for v in (1, 2):                                              # versions 1 and 2 made an hour ago
        path = f"{url}/v{v}/manifest.json"
        with open(path) as f:
            m = json.load(f)
        m["created"] -= 3600
        with open(path, "w") as f:
            json.dump(m, f)
    in_flight = f"{url}/v6/0123456789ab/shard-0000.faiss"         # an edit of the next version, writing now
    crashed = f"{url}/v6/ba9876543210/shard-0001.faiss"           # one that died an hour ago
    lost = f"{url}/v3/ffffffffffff/shard-0000.faiss"              # a writer that lost the race for version 3
    for path in (in_flight, crashed, lost):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x" * 100)
    os.utime(crashed, (time.time() - 3600, time.time() - 3600))

    report = memory.vacuum()                                      # no rule: every version kept, orphans go
    assert report["deleted_versions"] == [] and report["freed_bytes"] == 200
    assert report["deleted_files"] == ["v3/ffffffffffff/shard-0000.faiss", "v6/ba9876543210/shard-0001.faiss"]
    assert report["kept_recent"] == ["v6/0123456789ab/shard-0000.faiss"] and os.path.exists(in_flight)
    assert not os.path.exists(os.path.dirname(crashed))           # its emptied folder went too
    report = memory.vacuum(older_than_s=600)
    assert report["deleted_versions"] == [1, 2] and report["kept_versions"] == [3, 4, 5]
    assert os.path.exists(in_flight)
    for v in (3, 4, 5):
        assert_same(VisualMemory.open(url, version=v), seen[v], queries)
    assert memory.vacuum(older_than_s=0)["kept_versions"] == [5]   # the current version is always kept
    assert memory.vacuum(grace_s=0)["deleted_files"] == ["v6/0123456789ab/shard-0000.faiss"]
    assert sorted(os.listdir(url)) == ["manifest.json", "v1", "v4", "v5"]  # the trained index, compacted shards
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        memory.vacuum(keep_last=0)


def test_a_vacuum_that_dies_part_way_leaves_kept_versions_whole_and_a_rerun_finishes(small_memory, tmp_path,
                                                                                   monkeypatch):
    url, vectors = small_memory
    memory = VisualMemory.open(url)
    seen, queries = history_of_edits(memory, vectors)
    planned = memory.vacuum(keep_last=1, dry_run=True)["deleted_files"]
    real = index.store.commit.delete
    for n in range(len(planned)):                                 # die after deleting n files
        copy = str(tmp_path / f"copy-{n}")
        shutil.copytree(url, copy)
        done = []

        def delete(fs, paths):
            for p in paths:
                if len(done) == n:
                    raise Injected(f"injected failure deleting {p}")
                real(fs, [p])
                done.append(p)
        monkeypatch.setattr(index.store.commit, "delete", delete)
        with pytest.raises(Injected):
            VisualMemory.open(copy).vacuum(keep_last=1)
        monkeypatch.undo()
        for v in list_versions(copy):                             # every version that has a manifest is whole
            assert_same(VisualMemory.open(copy, version=v), seen[v], queries)
        VisualMemory.open(copy).vacuum(keep_last=1)               # the re-run finishes the job
        assert list_versions(copy) == [5]
        assert sorted(set(files_under(copy))) == sorted(set(files_under(url)) - set(planned))


def test_a_writer_based_on_a_vacuumed_version_gets_a_conflict(small_memory):
    url, _ = small_memory
    stale = VisualMemory.open(url)
    memory = VisualMemory.open(url)
    memory.remove(ids=[1])
    memory.remove(ids=[2])
    memory.vacuum(keep_last=1)                                    # v2's manifest is gone: v2 must not be re-made
    with pytest.raises(index.store.commit.MemoryConflict, match="version 2 was written by another writer"):
        stale.remove(ids=[5])
    assert list_versions(url) == [3] and VisualMemory.open(url).live([5]).all()


# crash safety of compact and prune ----------------------------------------------------------------
@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_crash_at_any_write_of_compact_or_prune_leaves_the_previous_version(store, tmp_path, monkeypatch, request):
    url = (request.getfixturevalue("s3_bucket") + "/mem") if store == "s3" else str(tmp_path / "mem")
    vectors = unit(np.random.default_rng(4).normal(size=(120, 16)))
    build_memory(write_collection(str(tmp_path / "emb"), vectors, ["a", "b", "c"] * 40), url, shards=2)
    memory = VisualMemory.open(url)
    memory.add(-vectors[:4], ["new"] * 4, list("wxyz"))
    memory.remove(ids=[0, 1, 121])
    queries = vectors[:12]
    expected = answers(VisualMemory.open(url), queries, 5)

    writes, memory = crash_each_write(url, lambda m: m.compact(), monkeypatch, queries)
    assert writes == 6 - 1 and memory.version == 4               # 2 shards × (index, metadata), manifest, pointer
    assert_same(VisualMemory.open(url), expected, queries, 5)
    writes, memory = crash_each_write(url, lambda m: m.prune(mode="soft", k=5), monkeypatch, queries)
    assert writes == 4 - 1 and memory.version == 5               # 2 weights files, manifest, pointer
    writes, memory = crash_each_write(url, lambda m: m.prune(mode="hard", k=5, threshold=2), monkeypatch, queries)
    assert writes == 4 - 1 and memory.version == 6               # 2 deletion files, manifest, pointer
    assert [r["operation"] for r in VisualMemory.open(url).log()][-3:] == ["compact", "prune", "prune"]


# prune -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def noisy():
    """4 well-separated classes of 100 16-d vectors with 12 labels flipped, and 200 held-out queries."""
    rng = np.random.default_rng(21)
    centres = unit(rng.normal(size=(4, 16)))

    def draw(n):
        classes = rng.integers(0, 4, n)
        return unit(centres[classes] + 0.12 * rng.normal(size=(n, 16))), classes
    vectors, classes = draw(400)
    labels = np.array([f"c{c}" for c in classes], dtype=object)
    flipped = rng.choice(400, 12, replace=False)
    labels[flipped] = [f"c{(classes[i] + 1) % 4}" for i in flipped]
    queries, query_classes = draw(200)
    return vectors, labels, np.sort(flipped), queries, np.array([f"c{c}" for c in query_classes], dtype=object)


def brute_force_counts(vectors, labels, k, queries=None, query_labels=None):
    """Wrong-label neighbour counts by exhaustive search (leave-one-out when no queries)."""
    loo = queries is None
    queries, query_labels = (vectors, labels) if loo else (queries, query_labels)
    sims = queries @ vectors.T
    if loo:
        np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    wrong = top[labels[top] != query_labels[:, None]]
    return np.bincount(wrong, minlength=len(vectors))


@pytest.fixture
def noisy_memory(noisy, tmp_path):
    vectors, labels, *_ = noisy
    url = str(tmp_path / "mem")
    build_memory(write_collection(str(tmp_path / "emb"), vectors, labels), url, shards=3)
    return url


def test_counts_match_an_exhaustive_search(noisy, noisy_memory):
    vectors, labels, _, queries, query_labels = noisy
    memory = VisualMemory.open(noisy_memory)
    for args in ((None, None), (queries, query_labels)):
        ids, counts, nq = pruning.wrong_label_counts(memory, *args, k=10)
        expected = brute_force_counts(vectors, labels, 10, *args)
        assert ids.tolist() == np.flatnonzero(expected).tolist() and counts.tolist() == expected[ids].tolist()
        assert nq == (400 if args[0] is None else 200)


def test_hard_prune_removes_the_wrong_label_neighbours(noisy, noisy_memory):
    vectors, labels, flipped, queries, query_labels = noisy
    memory = VisualMemory.open(noisy_memory)
    accuracy_before = np.mean(np.array(memory.classify(queries, k=10).decisions, dtype=object) == query_labels)
    counts = brute_force_counts(vectors, labels, 10)
    version, summary = memory.prune(threshold=5, mode="hard", reason="noisy labels")
    pruned = np.flatnonzero(counts >= 5)
    assert version == 2 and summary == {"mode": "hard", "threshold": 5, "k": 10, "queries": 400,
                                        "leave_one_out": True, "flagged": int((counts > 0).sum()),
                                        "max_count": int(counts.max()), "pruned": len(pruned), "changed": True}
    assert len(pruned) >= 5 and np.isin(pruned, flipped).all()     # only items whose label was flipped
    assert len(memory) == 400 - len(pruned)
    assert not VisualMemory.open(noisy_memory).live(pruned).any()
    accuracy_after = np.mean(np.array(memory.classify(queries, k=10).decisions, dtype=object) == query_labels)
    assert accuracy_after >= accuracy_before
    record = memory.log()[-1]
    assert record["operation"] == "prune" and record["reason"] == "noisy labels"
    assert record["counts"] == {"mode": "hard", "pruned": len(pruned), "threshold": 5, "k": 10, "queries": 400}
    assert memory.diff(1, 2)["removed"].tolist() == pruned.tolist()


def test_nothing_to_prune_writes_nothing_and_bad_arguments_are_named(noisy_memory):
    memory = VisualMemory.open(noisy_memory)
    version, summary = memory.prune(threshold=10_000)
    assert (version, summary["pruned"], summary["changed"]) == (1, 0, False) and list_versions(noisy_memory) == [1]
    cases = [(dict(mode="medium"), "unknown pruning mode 'medium'"),
             (dict(queries=np.ones((2, 16))), "give queries and query_labels together"),
             (dict(k=0), "k must be a positive whole number"),
             (dict(threshold=0), "threshold must be a positive whole number"),
             (dict(queries=np.ones((2, 8)), query_labels=["a", "b"]), "dimension 8"),
             (dict(queries=np.ones((2, 16)), query_labels=["a"]), "2 pruning queries but 1 query labels")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            memory.prune(**kwargs)
    assert list_versions(noisy_memory) == [1]


def test_soft_prune_weights_every_vote_and_follows_edits(noisy, noisy_memory):
    vectors, labels, flipped, queries, query_labels = noisy
    memory = VisualMemory.open(noisy_memory)
    counts = brute_force_counts(vectors, labels, 10)
    version, summary = memory.prune(mode="soft")
    assert version == 2 and summary["reweighted"] == int((counts > 0).sum()) and "pruned" not in summary
    expected = np.where(counts > 0, 1.75 / (1 + counts), 1.0)
    for answering in (memory, VisualMemory.open(noisy_memory)):
        found = answering.search(queries, 10)
        np.testing.assert_array_equal(found.sample_weights, expected[found.ids])
        shard_answer = answering.shards[0].query(queries, 10)      # what a served shard sends its router
        np.testing.assert_array_equal(shard_answer["sample_weights"], expected[shard_answer["ids"]])
        for rule in ("plurality", "distance", "softmax", "rank"):
            voted = answering.classify(queries, k=10, rule=rule)
            np.testing.assert_allclose(voted.weights, neighbour_weights(found.similarities, rule) * expected[found.ids])
    assert sum(e.weights_count for e in read_manifest(noisy_memory).shards) == (counts > 0).sum()
    assert memory.log()[-1]["counts"] == {"mode": "soft", "reweighted": int((counts > 0).sum()), "k": 10,
                                          "queries": 400}
    assert memory.prune(mode="soft")[1]["changed"] is False        # the same weights again: no new version

    heavy = int(np.argmax(counts))                                 # weights follow remove, add and compact
    memory.remove(ids=[heavy])
    memory.add(vectors[:2], ["c0", "c1"], ["u0", "u1"])
    memory.compact()
    for answering in (memory, VisualMemory.open(noisy_memory)):
        found = answering.search(queries, 10)
        weights = np.where(found.ids < 400, expected[np.minimum(found.ids, 399)], 1.0)
        np.testing.assert_array_equal(found.sample_weights, weights)
    assert memory.rollback(1) == 6 and (memory.search(queries, 10).sample_weights == 1.0).all()


# purge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("store,factory", [("local", None), ("s3", None), ("local", "IVF4,PQ8x4fs,Refine(SQfp16)"),
                                           ("s3", "IVF4,PQ8x4fs,Refine(SQfp16)")])
def test_purge_leaves_no_trace_of_the_removed_vectors(store, factory, tmp_path, request):
    url = (request.getfixturevalue("s3_bucket") + f"/mem-{bool(factory)}") if store == "s3" else str(tmp_path / "mem")
    vectors = unit(np.random.default_rng(9).normal(size=(150, 16)))
    uris = [f"mem://secret/{i:04d}.png" for i in range(150)]
    build_memory(write_collection(str(tmp_path / "emb"), vectors, ["a", "b", "c"] * 50, uris=uris), url, shards=2,
                 factory=factory)
    memory = VisualMemory.open(url)
    memory.add(-vectors[:5], ["new"] * 5, [f"mem://secret/new-{i}.png" for i in range(5)])
    gone = [3, 80, 151]                                           # two from the build, one added
    stored = np.float16 if factory else np.float32                # a two-tier memory keeps them in its fp16 tier
    traces = [vectors[3].astype(stored).tobytes(), vectors[80].astype(stored).tobytes(),
              (-vectors[1]).astype(stored).tobytes(), uris[3], uris[80], "mem://secret/new-1.png"]
    fs, root = index.store.commit.filesystem(url)

    def holding():
        """The traces in some file's bytes, or among the values of some Parquet file (compressed)."""
        fs.invalidate_cache(root)
        found = set()
        for path, blob in fs.cat(fs.find(root)).items():
            values = set()
            if path.endswith(".parquet"):
                values = {v for column in pq.read_table(pa.BufferReader(blob)).columns for v in column.to_pylist()}
            found |= {t for t in traces if (t if isinstance(t, bytes) else t.encode()) in blob or t in values}
        return found

    assert holding() == set(traces)                               # the scan can see them before
    out = memory.purge(ids=gone, reason="unlearn request 42")
    assert out["removed"] == gone and (out["remove_version"], out["compact_version"], out["version"]) == (3, 4, 4)
    assert out["vacuum"]["deleted_versions"] == [1, 2, 3] and list_versions(url) == [4]
    assert holding() == set()                                     # no file under the root holds them
    assert not np.isin(VisualMemory.open(url).search(vectors, 20).ids, gone).any()
    assert [r["operation"] for r in memory.log()] == ["compact"] and len(memory) == 152
    finished = memory.purge()                                     # nothing named: finishes (here: nothing to do)
    assert finished["compact_version"] is None and finished["vacuum"]["deleted_files"] == []
