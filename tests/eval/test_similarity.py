"""``vismem eval similarity``: SSIM and PSNR as their definitions give them, the 2AFC score as
DreamSim computes it, a NIGHTS-layout folder read as DreamSim's loader reads it, and synthetic
triplets whose right answers the pixel baselines find."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cluster.cli import main
from eval.image_metrics import gaussian_window, psnr, ssim
from eval.readable import same_size_images
from eval.similarity import SimilarityConfig, agreement, run
from eval.triplets import read_nights, synthetic_triplets
from procdata.generators.registry import generate


def write_png(path, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A folder tree of 60 dead-leaves images, 32 px."""
    root = tmp_path_factory.mktemp("scenes")
    images = generate("dead_leaves", 7, list(range(60)), 32).permute(0, 2, 3, 1).numpy()
    for n, image in enumerate(images):
        write_png(str(root / f"c{n % 3}" / f"{n:03d}.png"), image)
    return str(root)


def test_ssim_is_wang_et_al_on_one_window():
    rng = np.random.default_rng(0)
    a = rng.random((1, 1, 11, 11))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    w = gaussian_window(11).numpy()                                     # one window position: the whole image
    mu_a, mu_b = (w * a[0, 0]).sum(), (w * b[0, 0]).sum()
    var_a, var_b = (w * a[0, 0] ** 2).sum() - mu_a ** 2, (w * b[0, 0] ** 2).sum() - mu_b ** 2
    cov = (w * a[0, 0] * b[0, 0]).sum() - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    assert ssim(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(expected, rel=1e-9)
    assert abs(w.sum() - 1) < 1e-12 and w[5, 5] == w.max()


def test_ssim_and_psnr_order_distortions():
    x = generate("dead_leaves", 1, [0, 1], 32)
    noisy = [(x.double() / 255 + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(1),
                                                  dtype=torch.float64)).clamp(0, 1) for s in (0.05, 0.2)]
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert torch.all(ssim(x, noisy[0]) > ssim(x, noisy[1])) and torch.all(ssim(x, noisy[1]) < 0.9)
    assert torch.allclose(ssim(x, noisy[0]), ssim(noisy[0], x))
    mse = ((x.double() / 255 - noisy[0]) ** 2).flatten(1).mean(1)
    assert torch.allclose(psnr(x, noisy[0]), -10 * torch.log10(mse))
    with pytest.raises(ValueError, match="one shape"):
        ssim(x, x[:, :, :16])


def test_agreement_is_dreamsims_2afc_score():
    d0, d1 = np.array([0.1, 0.5, 0.3, 0.2]), np.array([0.2, 0.4, 0.3, 0.9])     # DreamSim's distances
    p = np.array([0.25, 0.9, 0.6, 0.0])
    dreamsim = (d0 < d1) * (1 - p) + (d1 < d0) * p + (d1 == d0) * 0.5
    assert np.allclose(agreement(-d0, -d1, p), dreamsim)                          # similarity = -distance


def test_a_nights_folder_is_read_as_dreamsims_loader_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for n in range(6):
        ref = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        far = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        copy_right = n % 2 == 0                                   # distortion 1 is the reference itself, or 0 is
        write_png(str(tmp_path / "ref" / "000" / f"{n:03d}.png"), ref)
        write_png(str(tmp_path / "distort" / "000" / f"{n:03d}_0.png"), far if copy_right else ref)
        write_png(str(tmp_path / "distort" / "000" / f"{n:03d}_1.png"), ref if copy_right else far)
        rows.append({"id": n, "votes": 6 if n < 5 else 4, "right_vote": 0.8 if copy_right else 1 / 6,
                     "left_vote": 0.2 if copy_right else 5 / 6, "ref_path": f"ref/000/{n:03d}.png",
                     "left_path": f"distort/000/{n:03d}_0.png", "right_path": f"distort/000/{n:03d}_1.png",
                     "prompt": "an image of a thing", "split": "test" if n != 1 else "train", "is_imagenet": False})
    pd.DataFrame(rows).to_csv(tmp_path / "data.csv", index=False)
    triplets = read_nights(str(tmp_path), size=16, progress=False)
    assert len(triplets) == 4 and triplets.ref.shape == (4, 3, 16, 16)            # row 1: train; row 5: 4 votes
    assert np.allclose(triplets.p_b, [0.8, 0.8, 1 / 6, 0.8])                       # the third column
    assert torch.equal(triplets.b[0], triplets.ref[0]) and torch.equal(triplets.a[2], triplets.ref[2])
    summary = run(SimilarityConfig(str(tmp_path / "out"), nights=str(tmp_path), encoders=("raw-pixels:8",),
                                   size=16, progress=False), lambda r: None)
    # every method picks the copy of the reference: p_b where that is B, 1 - p_b where it is A
    expected = np.mean([0.8, 0.8, 5 / 6, 0.8])
    assert summary["agreement"] == {m: pytest.approx(expected, abs=1e-4) for m in ("psnr", "ssim", "raw-pixels:8")}
    assert summary["human_ceiling"] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="no judgement column"):
        read_nights(str(tmp_path), judgement="human", progress=False)


def test_synthetic_triplets_have_the_weaker_distortion_as_the_answer(scenes):
    triplets = synthetic_triplets(scenes, ("noise", "contrast"), limit=40, seed=3, progress=False)
    assert len(triplets) == 40 and set(triplets.kinds) == {"noise", "contrast"}
    assert 5 < triplets.p_b.sum() < 35                                            # B is the weaker about half the time
    closer_b = psnr(triplets.ref, triplets.b) > psnr(triplets.ref, triplets.a)
    assert np.array_equal(closer_b.numpy(), triplets.p_b == 1)                   # the weaker is closer in pixels
    with pytest.raises(ValueError, match="unknown distortion"):
        synthetic_triplets(scenes, ("swirl",), progress=False)


def test_class_triplets_put_an_image_of_the_references_class_against_another(scenes):
    triplets = synthetic_triplets(scenes, ("class",), limit=None, seed=1, progress=False)
    images, labels = same_size_images(scenes)
    label_of = {bytes(image.numpy()): label for image, label in zip(images, labels)}
    assert len(label_of) == 60 and set(triplets.kinds) == {"class"}
    for n in range(len(triplets)):
        closer, other = (triplets.b[n], triplets.a[n]) if triplets.p_b[n] == 1 else (triplets.a[n], triplets.b[n])
        own = label_of[bytes(triplets.ref[n].numpy())]
        assert label_of[bytes(closer.numpy())] == own != label_of[bytes(other.numpy())]
        assert not torch.equal(closer, triplets.ref[n])


def test_the_command_compares_encoders_and_baselines(scenes, tmp_path, capsys):
    assert main(["eval", "similarity", "--synthetic-from", scenes, "--limit", "30", "--encoder",
                 "raw-pixels:16,random-init:tiny-cpu", "--out", str(tmp_path), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary["agreement"]) == {"psnr", "ssim", "raw-pixels:16", "random-init:tiny-cpu"}
    assert all(0.5 < v <= 1 for v in summary["agreement"].values())
    assert set(summary["by_kind"]["psnr"]) <= {"noise", "blur", "contrast", "occlusion", "class"}
    assert json.loads(lines[0])["method"] == "psnr" and summary["triplet_count"] == 30
    assert open(summary["plots"]["agreement"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(tmp_path / "similarity.json"))["agreement"] == summary["agreement"]
    assert main(["eval", "similarity", "--synthetic-from", scenes, "--baselines", "lpips", "--out", str(tmp_path)]) == 2
    assert "unknown pixel baseline 'lpips'" in capsys.readouterr().err
