"""``vismem memory bench`` on a small memory: every figure it reports is measured, and the served
part shows no removed id after its acknowledgement."""

import pytest

from index.bench.memory_bench import MemoryBenchConfig, run
from index.memory import VisualMemory

REMOVE_FIGURES = {"what", "vectors", "ids_per_remove", "p50_ms", "p95_ms", "per_id_ms", "bare_faiss_remove_ids_ms"}


def test_memory_bench_reports_every_figure(ray_local, tmp_path):
    from ray import serve
    serve.shutdown()                       # the bench starts Serve on a port of its own
    records = []
    try:
        run(MemoryBenchConfig(sizes=(2000, 4000), dim=32, clusters=64, repeats=2, add=300, http_removes=5,
                              workdir=str(tmp_path)), records.append)
    finally:
        serve.shutdown()                   # and the next module starts it on another
    removes = [r for r in records if r["what"] == "remove"]
    assert sorted({(r["vectors"], r["ids_per_remove"]) for r in removes}) == [
        (n, b) for n in (2000, 4000) for b in (1, 100, 1000)]
    assert all(r["p50_ms"] > 0 and r["bare_faiss_remove_ids_ms"] >= 0 for r in removes)
    for r in removes:                      # every figure there, and related as they must be
        assert set(r) == REMOVE_FIGURES and r["p50_ms"] <= r["p95_ms"]
        batch = r["ids_per_remove"]        # per id: the median over the batch (both rounded)
        assert r["per_id_ms"] == pytest.approx(r["p50_ms"] / batch, abs=0.006 / batch + 1e-4)
    adds = [r for r in records if r["what"] == "add"]
    assert [r["next_query_finds_them"] for r in adds] == [1.0, 1.0]
    assert [(r["vectors"], r["added"]) for r in adds] == [(2000, 300), (4000, 300)]
    assert all(abs(r["vectors_per_s"] * r["seconds"] - 300) <= 0.0006 * r["vectors_per_s"] + 0.5 * r["seconds"]
               for r in adds)         # 300 vectors over the seconds (each figure rounded)
    (alone,) = [r for r in records if r["what"] == "http_remove_alone"]
    (http,) = [r for r in records if r["what"] == "http_remove_under_query_load"]
    assert alone["removes"] == 2 and alone["first_query_returned_the_id"] == 0
    assert http["removes"] == 3 and http["ack"]["p50_ms"] > 0
    assert http["first_query_returned_the_id"] == 0 and http["queries_after_an_ack_returning_that_id"] == 0
    assert http["concurrent_queries"] > 0
    for r in (alone, http):
        assert r["ack"]["p50_ms"] <= r["ack"]["p95_ms"]
        assert 0 < r["first_query_after_ack"]["p50_ms"] <= r["first_query_after_ack"]["p95_ms"]
    # each remove and the add committed one version on the memory the bench built; the ids are taken
    # in order without reuse, so 2 × (1 + 100 + 1000) removes use up the 2,000-vector memory; the
    # HTTP removes (5) go to the largest one
    for n, http_removes in ((2000, 0), (4000, 5)):
        memory = VisualMemory.open(str(tmp_path / f"mem-{n}"))
        assert memory.versions() == list(range(1, 1 + 6 + 1 + http_removes + 1))
        assert len(memory) == n - min(n, 2 * 1101) + 300 - http_removes
        assert [e["operation"] for e in memory.log()][1:] == ["remove"] * 6 + ["add"] + ["remove"] * http_removes
