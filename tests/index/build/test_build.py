"""The build answers at the recall it claims, refuses what would silently give wrong answers, and
leaves nothing behind when it fails."""

import json

import numpy as np
import pytest

from index.exact import exact_search
from index.build.build import build_memory
from index.build.recall import cheapest_setting, query_bytes, recall_at_k
from index.memory import VisualMemory
from index.store.manifest import list_versions, read_manifest
from index.synthetic import ClusteredVectors
from tests.index.test_memory import write_embeddings


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """20,000 clustered 64-d vectors as embeddings, and 300 held-out queries of the same clusters."""
    data = ClusteredVectors(dim=64, clusters=512, spread=0.8, seed=3)
    root = tmp_path_factory.mktemp("clustered")
    vectors = data.rows(0, 20_000)
    write_embeddings(str(root / "emb"), vectors, [str(i % 7) for i in range(len(vectors))])
    return str(root / "emb"), vectors, data.queries(300)


def exact_ids(vectors, queries, k):
    return exact_search(vectors, queries, k)[1]


def test_ivf_memory_answers_at_the_recall_it_claims(clustered, tmp_path):
    emb, vectors, queries = clustered
    manifest = build_memory(emb, str(tmp_path / "mem"), shards=3, factory="IVF256,SQ8")
    assert manifest.recall["k"] == 10 and manifest.recall["recall"] >= 0.95
    assert manifest.search["nprobe"] == manifest.recall["nprobe"] > 1
    truth = exact_ids(vectors, queries, 10)

    memory = VisualMemory.open(str(tmp_path / "mem"))
    at_default = recall_at_k(memory.search(queries, 10).ids, truth)
    at_one = recall_at_k(memory.search(queries, 10, nprobe=1).ids, truth)
    assert at_default >= 0.95, f"held-out recall@10 at the manifest's nprobe {manifest.search['nprobe']}: {at_default}"
    assert at_one < 0.9, f"the test must be able to fail: nprobe=1 already gives {at_one}"
    assert abs(at_default - manifest.recall["recall"]) < 0.03           # the claim holds on held-out queries

    pinned = build_memory(emb, str(tmp_path / "mem"), shards=3, factory="IVF256,SQ8", nprobe=2)
    assert pinned.search == {"nprobe": 2} and pinned.recall["nprobe"] == 2 and pinned.recall["recall"] < 0.95
    opened = VisualMemory.open(str(tmp_path / "mem"), nprobe=64)          # an override for every search
    assert recall_at_k(opened.search(queries, 10).ids, truth) >= at_default


def test_a_two_tier_memory_answers_at_the_cheapest_calibrated_setting_from_a_mapped_tier(clustered, tmp_path):
    """4-bit fast-scan codes pick candidates, the fp16 tier re-ranks them: the build records the
    cheapest (nprobe, k_factor) it measured reaching 0.95, held-out queries get that recall, the
    tier is a file mapping (not RAM) and a per-query k_factor overrides the default."""
    emb, vectors, queries = clustered
    url = str(tmp_path / "mem")
    manifest = build_memory(emb, url, shards=3, factory="IVF256,PQ32x4fs,Refine(SQfp16)")
    recall = manifest.recall
    assert manifest.search == {"nprobe": recall["nprobe"], "k_factor": recall["k_factor"]} and recall["recall"] >= 0.95
    cost = {key: query_bytes(*map(int, key.split(",")), 10, 20_000 / 256, 16, 64 * 2) for key in recall["by_setting"]}
    reaching = [key for key, r in recall["by_setting"].items() if r >= 0.95]
    assert min(reaching, key=cost.get) == f"{recall['nprobe']},{recall['k_factor']}"
    assert recall["bytes_per_query"] == round(cost[f"{recall['nprobe']},{recall['k_factor']}"])
    memory = VisualMemory.open(url)
    assert all(isinstance(p.tier, np.memmap) and p.tier.dtype == np.float16 for s in memory.shards for p in s.parts)
    assert all(entry.metadata.endswith(".arrow") for entry in manifest.shards)   # its metadata is mapped too
    assert not any(p.ids.flags.owndata for s in memory.shards for p in s.parts)  # ids: a view of the mapping
    truth = exact_ids(vectors, queries, 10)
    at_default = recall_at_k(memory.search(queries, 10).ids, truth)
    assert at_default >= 0.94 and abs(at_default - recall["recall"]) < 0.03
    assert recall_at_k(memory.search(queries, 10, k_factor=1).ids, truth) < 0.85       # the re-rank is what reaches it
    with pytest.raises(ValueError, match="k_factor must be a positive whole number, got 0"):
        memory.search(queries, 10, k_factor=0)
    found = memory.search(queries, 10)
    np.testing.assert_allclose(found.similarities, np.einsum("qd,qkd->qk", queries, vectors[found.ids]), atol=2e-3)

    tier = f"{url}/{manifest.shards[0].tier}"
    with open(tier, "r+b") as f:                       # a damaged tier is refused like a damaged index
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match=r"shard 0 of .*tier\.npy does not match its sha256"):
        VisualMemory.open(url)


def test_the_cheapest_setting_is_found_without_measuring_the_whole_grid():
    """Recall rises with nprobe and k_factor; the search finds the cheapest pair reaching the
    target (here nprobe 32 at k_factor 8, not the fewest lists, 16 at k_factor 32, nor the fewest
    candidates, 64 lists at k_factor 4)."""
    nprobes, k_factors = [1, 2, 4, 8, 16, 32, 64], (2, 4, 8, 16, 32)
    asked = []

    def curve(nprobe, k_factor):
        return min(1.0, 0.5 + 0.061 * np.log2(nprobe) + 0.05 * np.log2(k_factor))

    def recall_of(nprobe, k_factor):
        asked.append((nprobe, k_factor))
        return curve(nprobe, k_factor)

    def cost(nprobe, k_factor):
        return nprobe * 100 + k_factor * 80
    best, by = cheapest_setting(recall_of, nprobes, k_factors, cost, 0.95)
    grid = {(n, f): curve(n, f) for n in nprobes for f in k_factors}
    assert best == min((key for key, r in grid.items() if r >= 0.95), key=lambda key: cost(*key)) == (32, 8)
    assert len(asked) == len(set(asked)) == len(by) and len(by) <= 2 * len(grid) / 3          # 22 of the 35


def test_codes_too_coarse_for_the_target_are_built_with_a_warning_and_their_real_recall(clustered, tmp_path,
                                                                                        caplog):
    """PQ4 codes of 64-d vectors cannot reach recall@10 0.95 at any nprobe: the build still
    commits, warns, and the manifest records what the calibration measured, not the target."""
    emb, vectors, queries = clustered
    with caplog.at_level("WARNING", logger="vismem.index.build"):
        manifest = build_memory(emb, str(tmp_path / "mem"), shards=2, factory="IVF64,PQ4")
    assert manifest.recall["recall"] < 0.95 and manifest.search["nprobe"] == manifest.recall["nprobe"]
    assert any("below the target 0.95" in r.getMessage() and "too coarse" in r.getMessage() for r in caplog.records)
    measured = recall_at_k(VisualMemory.open(str(tmp_path / "mem")).search(queries, 10).ids,
                           exact_ids(vectors, queries, 10))
    assert measured < 0.95 and abs(measured - manifest.recall["recall"]) < 0.1


def test_flat_memory_claims_nothing_to_tune(clustered, tmp_path):
    emb, vectors, queries = clustered
    manifest = build_memory(emb, str(tmp_path / "mem"), shards=2)
    assert manifest.factory == "IDMap2,Flat" and manifest.recall is None and manifest.search == {}
    found = VisualMemory.open(str(tmp_path / "mem")).search(queries[:20], 10)
    assert recall_at_k(found.ids, exact_ids(vectors, queries[:20], 10)) == 1.0


def test_another_encoder_is_refused_unless_replace(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8)).astype(np.float32)
    write_embeddings(str(tmp_path / "a"), a / np.linalg.norm(a, axis=1, keepdims=True), ["x"] * 50)
    b = rng.normal(size=(50, 16)).astype(np.float32)
    write_embeddings(str(tmp_path / "b"), b / np.linalg.norm(b, axis=1, keepdims=True), ["y"] * 50)
    (tmp_path / "b" / "_embedding.json").write_text(json.dumps({"encoder": "runs/other", "encoder_sha256": "def"}))
    mem = str(tmp_path / "mem")
    build_memory(str(tmp_path / "a"), mem, shards=2)
    with pytest.raises(ValueError, match=r"encoder raw-pixels:4 \(sha256 \w+, 8-d\).*"
                                         r"encoder runs/other \(sha256 def, 16-d\).*--replace"):
        build_memory(str(tmp_path / "b"), mem, shards=2)
    assert list_versions(mem) == [1] and read_manifest(mem).dim == 8
    replaced = build_memory(str(tmp_path / "b"), mem, shards=2, replace=True)
    assert replaced.version == 2 and replaced.dim == 16 and replaced.encoder["name"] == "runs/other"


@pytest.mark.parametrize("kwargs, message", [
    ({"shards": 51}, "51 shards for 50 vectors"),
    ({"shards": 0}, "shards must be positive"),
    ({"factory": "IVF16,PQ7"}, "FAISS cannot build the index factory string 'IVF16,PQ7' for 8-d vectors"),
    ({"factory": "Nonsense12"}, "FAISS cannot build the index factory string 'Nonsense12'"),
    ({"factory": "IVF4,Flat", "nprobe": 5}, "nprobe must be between 1 and nlist = 4, got 5"),
    ({"factory": "IVF4,PQ4x4fs,Refine(SQfp16)", "k_factor": 0}, "k_factor must be a positive whole number, got 0"),
    ({"factory": "IVF4,PQ4x4fs,Refine(SQ8)"}, r"re-rank tier .* as float16 or float32 vectors, not "
                                              r"IndexScalarQuantizer: end the factory with Refine\(SQfp16\) or RFlat"),
])
def test_bad_build_arguments_fail_before_anything_is_written(tmp_path, kwargs, message):
    v = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    write_embeddings(str(tmp_path / "emb"), v / np.linalg.norm(v, axis=1, keepdims=True), ["x"] * 50)
    with pytest.raises(ValueError, match=message):
        build_memory(str(tmp_path / "emb"), str(tmp_path / "mem"), **{"shards": 2, **kwargs})
    assert not (tmp_path / "mem").exists() or not list((tmp_path / "mem").iterdir())


def test_failed_build_removes_its_files_and_keeps_the_current_version(tmp_path, monkeypatch):
    from index.shard.state import Shard
    v = np.random.default_rng(2).normal(size=(60, 8)).astype(np.float32)
    write_embeddings(str(tmp_path / "emb"), v / np.linalg.norm(v, axis=1, keepdims=True), ["x"] * 60)
    mem = str(tmp_path / "mem")
    build_memory(str(tmp_path / "emb"), mem, shards=2)
    real = Shard.save
    calls = []

    def dies_on_the_third_shard(shard, *args):
        calls.append(shard.number)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(shard, *args)

    monkeypatch.setattr(Shard, "save", dies_on_the_third_shard)
    with pytest.raises(OSError, match="disk full"):
        build_memory(str(tmp_path / "emb"), mem, shards=4)
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == ["manifest.json", "v1"]
    assert read_manifest(mem).version == 1 and len(VisualMemory.open(mem)) == 60
    leftover = tmp_path / "mem" / "v2" / "crashed"        # a killed build's files, never referenced
    leftover.mkdir(parents=True)
    (leftover / "shard-0000.faiss").write_bytes(b"half a file")
    monkeypatch.setattr(Shard, "save", real)
    assert build_memory(str(tmp_path / "emb"), mem, shards=2).version == 2       # writes beside them, in a folder of its own
    assert (leftover / "shard-0000.faiss").read_bytes() == b"half a file" and len(VisualMemory.open(mem)) == 60


def test_index_bench_command_measures_recall_beside_bare_faiss(tmp_path):
    """`vismem index bench` end to end at a small size: the memory's recall equals bare FAISS's at
    every nprobe (the sharded merge is exact) and the default nprobe meets the claimed recall."""
    import os
    import subprocess
    import sys
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "index", "bench", "--vectors", "20000", "--dim", "32", "--clusters", "256",
         "--held-out", "200", "--shards", "3", "--factory", "IVF128,SQ8", "--nprobes", "1,4", "--workers", "2",
         "--memories", "IVF128,PQ16x4fs,Refine(SQfp16)", "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    build = next(r for r in records if r["what"] == "build")
    assert build["factory"] == "IVF128,SQ8" and build["claimed_recall"]["recall"] >= 0.95
    assert build["load_s"] > 0 and build["mmap_load_s"] > 0 and 0 < build["bytes_per_vector"] < 32 + 16
    runs = {r["workers"]: r for r in records if r["what"] == "build_run"}
    assert set(runs) == {1, 2}                       # in one process, and on a local Ray of two CPUs
    for r in runs.values():
        assert r["build_s"] > 0 and r["wall_ratio_to_bare"] > 0 and 0 < r["driver_peak_rss_gb"] < 2
    searches = [r for r in records if r["what"] == "search"]
    assert {r["nprobe"] for r in searches} == {1, 4, build["default_nprobe"]}
    for r in searches:
        assert r["recall_at_10"] == r["bare_recall_at_10"] and r["qps"] > 0 and r["bare_qps"] > 0 and r["mmap_qps"] > 0
    default = next(r for r in searches if r["default"])
    assert default["recall_at_10"] >= 0.93
    assert min(r["recall_at_10"] for r in searches) < 0.9            # nprobe=1 would not do
    resident = {r["factory"]: r for r in records if r["what"] == "resident"}     # each opened in a fresh process
    assert set(resident) == {"IVF128,SQ8", "IVF128,PQ16x4fs,Refine(SQfp16)"}
    for r in resident.values():
        assert r["recall_at_10"] >= 0.93 and r["qps"] > 0 and r["single_p50_ms"] > 0 and r["rss_anon_bytes_per_vector"] > 0
    two = resident["IVF128,PQ16x4fs,Refine(SQfp16)"]
    assert 64 <= two["tier_file_bytes_per_vector"] < 65 and two["k_factor"] >= 1 and "qps_ratio_to_default" in two
    assert two["index_file_bytes_per_vector"] < resident["IVF128,SQ8"]["index_file_bytes_per_vector"]


def test_the_ray_or_not_rule():
    """In process when asked, or below PARALLEL_MIN vectors with no cluster named; Ray otherwise."""
    from index.build.build import PARALLEL_MIN, runs_in_process
    assert runs_in_process(10) and runs_in_process(10 * PARALLEL_MIN, local=True)
    assert not runs_in_process(PARALLEL_MIN) and not runs_in_process(10, cluster_named=True)

