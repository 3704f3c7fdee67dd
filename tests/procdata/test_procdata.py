"""Procedural data beyond determinism: image statistics, the shard writer on Ray, the preview."""

import io
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from procdata.generators import generate, two_means_mask
from procdata.shards import ShardJob, write_shards


def test_spectral_slope_follows_alpha():
    """Radially averaged power of each channel falls as f^(-2α) for the drawn α ∈ [1, 3]."""
    images = generate("spectral", 0, range(8), 128).float()
    for image in images:
        power = torch.fft.fftshift(torch.fft.fft2(image - image.mean((1, 2), keepdim=True)).abs() ** 2, dim=(-2, -1))
        power = power.mean(0).numpy()
        y, x = np.indices(power.shape) - 64
        r = np.sqrt(x * x + y * y).astype(int)
        radial = np.bincount(r.ravel(), power.ravel()) / np.bincount(r.ravel())
        f = np.arange(4, 40)
        slope = np.polyfit(np.log(f), np.log(radial[f]), 1)[0]
        assert -6.5 < slope < -1.5          # −2α for α in [1, 3], with the min–max stretch and clipping


def test_kml_mask_is_binary_ish_and_covers_both_sides():
    guide = generate("shader", 3, range(32), 64).float() / 255
    mask = two_means_mask(guide)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    cover = mask.mean((1, 2, 3))
    assert ((cover > 0.02) & (cover < 0.98)).float().mean() > 0.9


def test_same_pixels_in_another_process():
    code = ("import hashlib; from procdata.generators import generate; "
            "print(hashlib.sha256(generate('kml_mixup', 5, range(3, 7), 32).numpy().tobytes()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib
    assert other == hashlib.sha256(generate("kml_mixup", 5, range(3, 7), 32).numpy().tobytes()).hexdigest()


def test_shards_on_ray_are_complete_reproducible_and_resumable(ray_local, tmp_path):
    out = str(tmp_path / "shards")
    job = ShardJob("shader", n=25, size=16, out=out, seed=4, shard_size=10)
    manifest = write_shards(job, workers=2)
    assert manifest["shards"] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    table = pq.read_table(tmp_path / "shards" / "shard-00002.parquet")
    assert table.column("index").to_pylist() == [20, 21, 22, 23, 24]
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in table.column("image").to_pylist()])
    expected = generate("shader", 4, range(20, 25), 16).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(decoded, expected)            # PNG is lossless: the very pixels
    assert not list((tmp_path / "shards").glob("*.tmp-*"))
    (tmp_path / "shards" / "shard-00001.parquet").unlink()
    assert write_shards(job, workers=2)["written_this_run"] == 1


@pytest.mark.parametrize("job, message", [
    (ShardJob("nope", 10, 16, "OUT"), "unknown generator"),
    (ShardJob("shader", 0, 16, "OUT"), "--n must be positive"),
    (ShardJob("shader", 10, -1, "OUT"), "--size must be positive"),
    (ShardJob("shader", 10, 16, "s3://no-such-bucket-vismem/x"), "cannot write data set s3://no-such-bucket-vismem/x"),
])
def test_bad_shard_jobs_fail_before_work(s3_endpoint, job, message):
    with pytest.raises((ValueError, OSError), match=message):
        job.check()


def test_preview_grid():
    from procdata.generators import GENERATORS
    from procdata.preview import preview_grid
    grid = preview_grid(per_row=3, size=16)
    assert grid.size == (96 + 3 * 18, len(GENERATORS) * 18)
    assert np.asarray(grid).std() > 10


@pytest.mark.parametrize("size", [16, 61, 64])
def test_dead_leaves_windows_paint_the_same_pixels_as_full_frames(size):
    from procdata.generators import dead_leaves
    windowed = dead_leaves(9, range(48), size, torch.device("cpu"))
    everywhere = dead_leaves(9, range(48), size, torch.device("cpu"), windows=False)   # every shape, every pixel
    assert torch.equal(windowed, everywhere)


def test_dead_leaves_window_ladders_all_give_the_same_labels():
    """The ladder of window widths (chosen by batch size) decides the work, never the labels."""
    from procdata.generators import leaf_labels, leaf_shapes
    shape, _ = leaf_shapes(2, range(12), 128, 0.05, 1.0, torch.device("cpu"))
    exact = leaf_labels(shape, 48, windows=False)
    for ratio in (1.1, 1.25, 1.5, 2.0, 3.0, None):
        assert torch.equal(leaf_labels(shape, 48, ratio=ratio), exact), ratio
