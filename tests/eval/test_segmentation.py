"""``vismem eval segmentation`` on dead-leaves scenes whose masks the generator knows: R² as the
issue defines it, the scores as scikit-learn computes them, patch-kNN transfer that recovers the
labels of its own patches, and the (image, mask) reader for folders and Parquet."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, jaccard_score

from cluster.cli import main
from encoder.embed import Encoder
from eval.masks import IGNORE, SCENE_CLASSES, read_annotated, scenes, write_scenes
from eval.segmentation import cell_of, patch_labels, patch_tokens, pca_r2, scores, transfer


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    return {"memory": write_scenes(str(root / "memory"), 40, seed=1),
            "queries": write_scenes(str(root / "queries"), 12, seed=1, first=500),
            "parquet": write_scenes(str(root / "pq"), 12, seed=1, first=500, parquet=True), "root": root}


def test_r2_is_the_issues_formula():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    x = rng.standard_normal((200, 8))
    fg = labels != 0
    xf, sf = x[fg], labels[fg]
    within = sum(((xf[sf == s] - xf[sf == s].mean(0)) ** 2).sum() for s in (1, 2, 3))
    assert pca_r2(x, labels, 0) == pytest.approx(1 - within / ((xf - xf.mean(0)) ** 2).sum())
    assert pca_r2(x, labels, 0) < 0.1                                             # noise: segments explain little
    x[labels == 0] = 1e3 * rng.standard_normal((int((labels == 0).sum()), 8))     # the background is dropped
    assert pca_r2(x, labels, 0) == pytest.approx(1 - within / ((xf - xf.mean(0)) ** 2).sum())
    piecewise = np.eye(8)[labels] + 1e-3 * rng.standard_normal((200, 8))          # one token per segment
    assert pca_r2(piecewise, labels, 3) > 0.999
    assert pca_r2(x, np.zeros(200, int), 3) is None                               # no foreground


def test_a_patch_takes_its_commonest_class_and_ignore_is_not_counted():
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = [[1, 1], [1, 2]]
    mask[:2, 2:] = IGNORE
    mask[2:, :2] = [[IGNORE, IGNORE], [IGNORE, 3]]
    assert patch_labels(mask, 2, 2).tolist() == [[1, IGNORE], [3, 0]]
    assert cell_of(4, 2, 2).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_scores_agree_with_scikit_learn():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, (3, 16, 16)).astype(np.uint8)
    truth[0, :4] = IGNORE
    predicted = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, 4, truth.shape)).astype(np.uint8)
    predicted[truth == IGNORE] = 0
    found = scores(truth, predicted, 5)                                            # class 4: never seen, no IoU
    t, p = truth[truth != IGNORE], predicted[truth != IGNORE]
    assert found["pixel_accuracy"] == pytest.approx(accuracy_score(t, p))
    assert found["miou"] == pytest.approx(jaccard_score(t, p, average="macro"))
    assert found["foreground_accuracy"] == pytest.approx(accuracy_score(t[t != 0], p[t != 0]))
    assert sorted(found["iou"]) == [0, 1, 2, 3]


def test_the_reader_gives_the_generators_masks_from_folders_and_parquet(sets, tmp_path):
    images, masks = scenes(12, seed=1, first=500)
    for url in (sets["queries"], sets["parquet"]):
        data = read_annotated(url, progress=False)
        assert data.classes == list(SCENE_CLASSES) and len(data) == 12
        assert all(np.array_equal(a, b) for a, b in zip(data.masks, masks))
        assert all(np.array_equal(a, b) for a, b in zip(data.images, images))
    assert 0.1 < np.mean(masks == 0) < 0.5 and set(np.unique(masks)) == {0, 1, 2, 3}
    os.remove(os.path.join(sets["queries"], "masks", "00503.png"))
    with pytest.raises(ValueError, match="have no mask"):
        read_annotated(sets["queries"], progress=False)
    bad = tmp_path / "bad"
    write_scenes(str(bad), 2)
    (bad / "classes.txt").write_text("background\ndisc\n")
    with pytest.raises(ValueError, match="names 2 classes"):
        read_annotated(str(bad), progress=False)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bad / "masks" / "00000.png")
    with pytest.raises(ValueError, match="one-channel"):
        read_annotated(str(bad), classes=None, progress=False)


def test_transfer_from_the_same_images_recovers_their_patch_labels(sets):
    data = read_annotated(sets["memory"], progress=False)
    tokens = patch_tokens(Encoder.load("random-init:tiny-cpu"), data, 16, progress=False)
    assert tokens.tokens.shape[:3] == (40, 4, 4)
    predicted = transfer(tokens, tokens, 4, k=1, temperature=0.07)                # each patch's nearest: itself
    painted = np.stack([labels.ravel()[cell_of(32, 4, 4)] for labels in tokens.labels])
    assert np.array_equal(predicted, painted)


def test_the_command_reports_every_encoder(sets, tmp_path, capsys):
    assert main(["eval", "segmentation", "--memory", sets["memory"], "--queries", sets["parquet"], "--encoder",
                 "raw-pixels:16,random-init:tiny-cpu", "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("r2", "miou", "pixel_accuracy", "foreground_accuracy"):
        assert set(summary[key]) == {"raw-pixels:16", "random-init:tiny-cpu"}
    _, masks = scenes(12, seed=1, first=500)
    majority = max(np.mean(masks == c) for c in range(4))
    assert summary["pixel_accuracy"]["raw-pixels:16"] > majority + 0.2           # colour carries the class here
    assert summary["r2"]["raw-pixels:16"] > 0.5 and summary["encoders"]["raw-pixels:16"]["r2_images"] == 12
    for url in summary["plots"].values():
        assert open(url, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", "segmentation", "--memory", sets["memory"], "--queries", sets["parquet"], "-k", "0",
                 "--out", str(tmp_path)]) == 2
