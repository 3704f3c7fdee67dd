"""kNN evaluation: the k sweep agrees with the voting module, collections in either format, CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.cli import main
from eval.knn import knn_sweep
from index.ingest.collections import list_partitions, read_partition
from index.voting import vote


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sweep_equals_softmax_votes_for_every_k():
    rng = np.random.default_rng(0)
    memory, queries = unit(rng.normal(size=(300, 16))), unit(rng.normal(size=(80, 16)))
    memory_labels = rng.choice(["cat", "dog", "eel"], 300)
    query_labels = rng.choice(["cat", "dog", "eel"], 80)
    result = knn_sweep(memory, memory_labels, queries, query_labels, ks=(1, 5, 20, 1000))
    assert sorted(result["by_k"]) == [1, 5, 20]                 # k above the memory size is dropped
    sims = queries @ memory.T
    order = np.argsort(-sims, axis=1)
    for k, accuracy in result["by_k"].items():
        ids = order[:, :k]
        decided = vote(memory_labels[ids], np.take_along_axis(sims, ids, 1), "softmax").decisions
        assert accuracy == pytest.approx(np.mean(np.asarray(decided) == query_labels))
    assert result["top1"] == max(result["by_k"].values())
    assert result["by_k"][result["best_k"]] == result["top1"]


def test_sweep_separates_clusters():
    rng = np.random.default_rng(1)
    centres = unit(rng.normal(size=(4, 32)))
    labels = np.repeat(np.array(["a", "b", "c", "d"]), 50)
    points = unit(centres[np.repeat(np.arange(4), 50)] + 0.05 * rng.normal(size=(200, 32)))
    result = knn_sweep(points[::2], labels[::2], points[1::2], labels[1::2], ks=(1, 10))
    assert result["top1"] == 1.0


def test_sweep_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="dimension"):
        knn_sweep(unit(np.ones((5, 4))), list("abcde"), unit(np.ones((2, 3))), list("ab"))
    with pytest.raises(ValueError, match="label"):
        knn_sweep(unit(np.ones((5, 4))), list("abc"), unit(np.ones((2, 4))), list("ab"))


def png(value: int, size: int = 12, vertical: bool | None = None) -> bytes:
    """A flat image of grey ``value``, or (``vertical`` given) a ramp from dark to ``value``."""
    ramp = np.linspace(0, 1, size)[:, None] * np.ones(size)[None]
    pixels = np.full((size, size), value) if vertical is None else value * (ramp if vertical else ramp.T)
    buf = io.BytesIO()
    Image.fromarray(np.repeat(pixels[..., None], 3, -1).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_parquet(path, values, labels, row_group_size, vertical=None):
    vertical = [None] * len(values) if vertical is None else vertical
    table = pa.table({"image": [png(v, vertical=d) for v, d in zip(values, vertical)], "label": labels,
                      "filename": [f"{i}.png" for i in range(len(values))]})
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_partitions_read_their_rows_only(tmp_path):
    values = list(range(0, 250, 10))                               # 25 images
    write_parquet(tmp_path / "c.parquet", values, [str(v) for v in values], row_group_size=4)
    parts = list_partitions(str(tmp_path / "c.parquet"), partition_size=7)
    rows = [item for part in parts for item in read_partition(part)]
    assert [r[0] for r in rows] == list(range(25))
    assert [r[2] for r in rows] == [str(v) for v in values]
    assert [int(np.asarray(Image.open(io.BytesIO(r[3])))[0, 0, 0]) for r in rows] == values


def test_cli_on_parquet_and_folder_collections(tmp_path, capsys):
    """Vertical vs horizontal ramps of random contrast: raw pixels classify them perfectly,
    whatever the format of memory and queries."""
    contrast = np.random.default_rng(0).integers(60, 256, 80)
    write_parquet(tmp_path / "memory.parquet", contrast[:60], ["v"] * 30 + ["h"] * 30, 16,
                  vertical=[True] * 30 + [False] * 30)
    for label, values in (("v", contrast[60:70]), ("h", contrast[70:])):
        (tmp_path / "queries" / label).mkdir(parents=True)
        for i, v in enumerate(values):
            (tmp_path / "queries" / label / f"{i}.png").write_bytes(png(int(v), vertical=label == "v"))
    (tmp_path / "queries" / "v" / "broken.png").write_bytes(b"not an image")
    code = main(["encoder", "eval-knn", "--encoder", "raw-pixels:8", "--memory", str(tmp_path / "memory.parquet"),
                 "--queries", str(tmp_path / "queries"), "--ks", "1,5,200", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["by_k"] == {"1": 1.0, "5": 1.0}                # 200 > 60 memory images: dropped
    assert result["top1"] == 1.0 and result["best_k"] == 1
    assert result["memory_images"] == 60 and result["query_images"] == 20    # the broken file is skipped


def test_cli_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(png(5))
    assert main(["encoder", "eval-knn", "--encoder", "raw-pixels:8", "--memory", str(tmp_path / "flat"),
                 "--queries", str(tmp_path / "flat")]) == 2
    assert "has no label" in capsys.readouterr().err
    assert main(["encoder", "eval-knn", "--encoder", "raw-pixels:8", "--memory", str(tmp_path / "nowhere"),
                 "--queries", str(tmp_path / "flat")]) == 2
    assert "no collection at" in capsys.readouterr().err
    assert main(["encoder", "eval-knn", "--encoder", "raw-pixels:8", "--memory", str(tmp_path / "flat"),
                 "--queries", str(tmp_path / "flat"), "--ks", "0,x"]) == 2
    assert "--ks" in capsys.readouterr().err
