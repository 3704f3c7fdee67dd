"""`vismem encoder compare`: both runs with one recipe, every baseline scored the same way, the
summary computed from the scores, the curve from kept checkpoints, and the plot written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cluster.cli import main
from eval.compare import curve_steps, parse_eval_set


@pytest.fixture(scope="module")
def toy_sets(tmp_path_factory):
    """Three colour classes of noisy 24-px images: 8 memory and 4 query images each."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for split, count in (("memory", 8), ("queries", 4)):
        for label, colour in colours.items():
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return str(root / "memory"), str(root / "queries")


def test_compare_trains_both_runs_and_scores_every_baseline(toy_sets, tmp_path, capsys):
    memory, queries = toy_sets
    out = tmp_path / "cmp"
    rc = main(["encoder", "compare", "--local", "--device", "cpu", "--preset", "resnet-cpu", "--max-steps", "4",
               "--set", "batch_size=8", "--set", "checkpoint_every=1", "--set", "precision=fp32",
               "--curve-points", "3", "--out", str(out), "--eval", f"toy={memory},{queries}", "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(out / "compare.json") as f:
        result = json.load(f)
    assert printed["scores"] == result["scores"]

    assert set(result["scores"]) == {"procedural", "real_control", "random_init", "raw_pixels_32", "raw_pixels_8",
                                     "colour_histogram"}
    for by_set in result["scores"].values():
        assert set(by_set) == {"toy"} and 0 <= by_set["toy"]["nn1"] <= 1 and 0 <= by_set["toy"]["top1"] <= 1
    assert result["scores"]["colour_histogram"]["toy"]["top1"] == 1.0          # the classes differ by colour alone
    top1 = {name: s["toy"]["top1"] for name, s in result["scores"].items()}
    summary = result["summary"]["toy"]
    assert summary["ratio_to_real"] == pytest.approx(top1["procedural"] / top1["real_control"])
    assert summary["best_raw_pixels"] == max(top1["raw_pixels_32"], top1["raw_pixels_8"])

    assert result["provenance"]["procedural"]["data"] == "procedural only"
    assert memory in result["provenance"]["real_control"]["data"]
    for run in ("procedural", "real_control"):
        steps = [p["step"] for p in result["curves"][run]]
        assert len(steps) == 3 and steps[-1] == 4 and steps == sorted(steps)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_steps_are_log_spaced_and_end_at_the_last():
    found = [(f"ckpt{s}", s) for s in range(200, 10_001, 200)]
    chosen = [step for _, step in curve_steps(found, 5)]
    assert chosen[0] == 200 and chosen[-1] == 10_000 and len(chosen) == 5
    assert np.all(np.diff(np.log(chosen)) > 0.5)                              # spread in log steps
    assert curve_steps(found[:3], 5) == found[:3]


def test_eval_sets_are_named_and_checked():
    assert parse_eval_set("c10=a/train.parquet,a/test.parquet").name == "c10"
    assert parse_eval_set("data/cifar10/train.parquet,data/cifar10/test.parquet").name == "cifar10"
    with pytest.raises(ValueError, match="MEMORY_URL,QUERIES_URL"):
        parse_eval_set("only-one-url")
