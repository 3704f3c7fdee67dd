import numpy as np
import pytest
import torch

from procdata.generators import GENERATORS, generate, inverse_cdf_power3
from procdata.stream import ProceduralStream, StreamConfig


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_same_seed_same_pixels_whatever_the_batch(name):
    a = generate(name, seed=7, indices=range(0, 6), size=24)
    b = generate(name, seed=7, indices=[4, 5, 2], size=24)
    assert a.dtype == torch.uint8 and a.shape == (6, 3, 24, 24)
    assert torch.equal(a[[4, 5, 2]], b)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_other_seed_or_index_other_pixels(name):
    a = generate(name, seed=1, indices=range(4), size=24)
    b = generate(name, seed=2, indices=range(4), size=24)
    assert not torch.equal(a, b)
    assert all(not torch.equal(a[i], a[j]) for i in range(4) for j in range(i + 1, 4))
    assert a.float().std() > 5, "images should not be flat"


def test_dead_leaves_radius_law():
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    r = inverse_cdf_power3(u, 0.03, 1.0)
    assert r.min() >= 0.03 - 1e-6 and r.max() <= 1.0 + 1e-6
    counts, edges = np.histogram(r.numpy(), bins=np.geomspace(0.03, 0.3, 8))
    centres = np.sqrt(edges[1:] * edges[:-1])
    density = counts / np.diff(edges)
    slope = np.polyfit(np.log(centres), np.log(density), 1)[0]
    assert slope == pytest.approx(-3, abs=0.15)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown generator 'nope'"):
        generate("nope", 0, range(2), 16)
    with pytest.raises(ValueError, match="size must be positive"):
        generate("shader", 0, range(2), 0)


def test_stream_workers_get_disjoint_reproducible_batches():
    cfg = StreamConfig(generators=("shader",), seed=3, size=16, batch_size=4, steps_per_epoch=5)
    w0, w1 = ProceduralStream(cfg, 0, 2), ProceduralStream(cfg, 1, 2)
    first = next(iter(w0))
    assert torch.equal(first, ProceduralStream(cfg, 0, 2).batch(0, 0))
    assert not torch.equal(first, next(iter(w1)))
    assert not torch.equal(w0.batch(0, 0), w0.batch(1, 0))


def test_stream_batches_mix_the_generators():
    """Image i of the stream comes from generators[i % G]: every batch holds all of them."""
    cfg = StreamConfig(generators=("shader", "dead_leaves", "spectral"), seed=3, size=16, batch_size=6)
    batch = ProceduralStream(cfg, rank=1, world_size=2).batch(0, 2)
    base = (2 * 2 + 1) * 6
    for i, image in enumerate(batch):
        name = cfg.generators[(base + i) % 3]
        assert torch.equal(image, generate(name, 3, [base + i], 16)[0])
