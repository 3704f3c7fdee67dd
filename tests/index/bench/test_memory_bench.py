"""``vismem memory bench`` on a small memory: every figure it reports is measured, and the served
part shows no removed id after its acknowledgement."""

from index.bench.memory_bench import MemoryBenchConfig, run


def test_memory_bench_reports_every_figure(ray_local):
    from ray import serve
    serve.shutdown()                       # the bench starts Serve on a port of its own
    records = []
    try:
        run(MemoryBenchConfig(sizes=(2000, 4000), dim=32, clusters=64, repeats=2, add=300, http_removes=5),
            records.append)
    finally:
        serve.shutdown()                   # and the next module starts it on another
    removes = [r for r in records if r["what"] == "remove"]
    assert sorted({(r["vectors"], r["ids_per_remove"]) for r in removes}) == [
        (n, b) for n in (2000, 4000) for b in (1, 100, 1000)]
    assert all(r["p50_ms"] > 0 and r["bare_faiss_remove_ids_ms"] >= 0 for r in removes)
    adds = [r for r in records if r["what"] == "add"]
    assert [r["next_query_finds_them"] for r in adds] == [1.0, 1.0]
    (alone,) = [r for r in records if r["what"] == "http_remove_alone"]
    (http,) = [r for r in records if r["what"] == "http_remove_under_query_load"]
    assert alone["removes"] == 2 and alone["first_query_returned_the_id"] == 0
    assert http["removes"] == 3 and http["ack"]["p50_ms"] > 0
    assert http["first_query_returned_the_id"] == 0 and http["queries_after_an_ack_returning_that_id"] == 0
    assert http["concurrent_queries"] > 0
