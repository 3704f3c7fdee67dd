"""The whole pipeline on the bundled digits, small and seeded: procedural data on Ray Train
workers → encoder → Ray Data embedding → 2 FAISS shards → Ray Serve → HTTP classification."""

import json
import urllib.request

import pytest

from cluster.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_end_to_end(ray_local, tmp_path):
    store = str(tmp_path / "store")
    cfg = DemoConfig(store=store, max_minutes=10, max_steps=150, workers=2, seed=0, shards=2, k=10, serve=True)
    held = {}

    def look(base):                         # what a newcomer does at the end of `vismem demo --serve`
        from index.serve.client import Client
        with urllib.request.urlopen(f"{base}/", timeout=30) as response:
            held["page"] = response.read().decode()
        with Client(base) as client:
            held["info"] = client.info()
    result = run_demo(cfg, hold=look)
    assert "<html" in held["page"].lower() and len(held["info"].shards) == 2 and held["info"].count > 0
    print("accuracy:", result["accuracy"])

    acc = result["accuracy"]
    assert set(acc) == {"procedural", "random_init", "raw_pixels"}
    for row in acc.values():
        assert set(row) == {"plurality", "distance", "softmax", "rank"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    # the encoder learned something from procedural images alone that transfers to real digits
    assert acc["procedural"]["softmax"] > acc["random_init"]["softmax"]
    assert acc["procedural"]["plurality"] > acc["random_init"]["plurality"]
    assert acc["raw_pixels"]["plurality"] > 0.9          # digits are easy in pixel space: a sanity check

    with open(f"{result['encoder']}/provenance.json") as f:
        provenance = json.load(f)
    assert provenance["data"] == "procedural only" and provenance["steps"] == 150
    assert provenance["generators"] == list(cfg.generators)
    with open(f"{store}/memory/manifest.json") as f:
        assert json.load(f)["current"] == 1
    html = open(result["report"]).read()
    assert html.count("class='q") == 12 and "data:image/png;base64," in html
    assert "decision" in html and "softmax vote" in html
