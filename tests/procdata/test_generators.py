import numpy as np
import pytest
import torch

from procdata.generators import GENERATORS, generate, inverse_cdf_power3, leaf_labels, leaf_shapes, pixel_grid
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


@pytest.mark.parametrize("size", [32, 64, 224])
def test_dead_leaves_cover_the_frame_at_every_scale(size):
    """Little flat background (48 shapes from r_min 0.03 left 56 % of pixels to it), and the
    visible pixels shared about evenly by every octave of shape radius: occlusion at object scale
    as well as in the small (the r⁻³ law puts the same area in every octave)."""
    n = 256 if size < 100 else 32
    shape, _ = leaf_shapes(0, range(n), 128, 0.05, 1.0, torch.device("cpu"))
    labels = leaf_labels(shape, size).long()
    assert (labels == 0).float().mean() < 0.06
    visible = torch.cat([torch.zeros(n, 1), shape["radius"]], 1).gather(1, labels)     # radius of the shape seen
    edges = [0.05, 0.1, 0.2, 0.4, 1.0 + 1e-6]
    shares = [float(((visible >= lo) & (visible < hi)).float().mean()) for lo, hi in zip(edges[:-1], edges[1:])]
    assert all(0.12 < share < 0.4 for share in shares), shares
    assert sum(shares[1:]) > 0.6                        # most pixels lie on shapes of radius >= 0.1 of the frame


def test_dead_leaves_labels_are_the_painters_algorithm():
    """The windowed label painter against the plainest reference: paint every shape over the whole
    frame, back to front, with the textbook inside tests (a disc, a rotated box, three half-planes)."""
    import math
    n, k, size = 6, 128, 40
    shape, _ = leaf_shapes(5, range(n), k, 0.05, 1.0, torch.device("cpu"))
    y, x = (t[0, 0].double() for t in pixel_grid(size, torch.device("cpu")))
    expected = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for j in range(k):
            r, a, aspect = (float(shape[key][i, j]) for key in ("radius", "angle", "aspect"))
            dx, dy = x - float(shape["cx"][i, j]), y - float(shape["cy"][i, j])
            kind = int(shape["kind"][i, j])
            if kind == 0:
                inside = dx ** 2 + dy ** 2 <= r ** 2
            elif kind == 1:
                inside = ((dx * math.cos(a) - dy * math.sin(a)).abs() <= r) & \
                         ((dx * math.sin(a) + dy * math.cos(a)).abs() <= r * aspect)
            else:
                inside = torch.stack([dx * math.cos(a + m * 2 * math.pi / 3) + dy * math.sin(a + m * 2 * math.pi / 3)
                                      <= r / 2 for m in range(3)]).all(0)
            expected[i][inside] = j + 1
    got = leaf_labels(shape, size).long().view(n, size, size)
    assert (got != expected).float().mean() < 1e-3          # float32 against float64: a rare edge pixel apart
    assert len(got.unique()) > 100                          # many shapes visible, not a handful


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


def test_expression_trees_vary_across_images():
    """Every image runs its own random expression tree: the programs differ in ops, leaves and
    shape (one-child nodes drop subtrees), and so do the pictures."""
    from procdata.generators.expression import LEAF_KINDS, NODE_OPS, expression_programs
    programs = expression_programs(0, range(64))
    assert programs[5] == expression_programs(0, [5])[0]                     # a function of (seed, index)
    assert len(set(programs)) >= 60
    leaf_counts = [sum(p.count(kind) for kind in LEAF_KINDS) for p in programs]
    assert min(leaf_counts) <= 6 and max(leaf_counts) >= 12       # heavily pruned trees and near-complete ones
    text = " ".join(programs)
    assert all(f"{op}(" in text for op in NODE_OPS if op != "left") and all(kind in text for kind in LEAF_KINDS)
    images = generate("expression", 0, range(64), 32).float()
    luma = (images * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1).flatten(1)
    corr = torch.corrcoef(luma).abs()
    off_diagonal = corr[~torch.eye(64, dtype=torch.bool)]
    assert off_diagonal.median() < 0.3 and off_diagonal.max() < 0.99


def test_expression_values_stay_in_range():
    from procdata.generators import expression
    raw = expression(3, range(32), 24, torch.device("cpu"))
    assert torch.isfinite(raw).all() and raw.min() >= -0.2 and raw.max() <= 1.2    # the palette's span
    assert (raw.flatten(1).std(1) > 0.02).float().mean() > 0.9                  # hardly any flat image
    shallow = expression(3, range(4), 16, torch.device("cpu"), depth=1)
    assert shallow.shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        expression(3, range(4), 16, torch.device("cpu"), depth=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("name", ["expression", "dead_leaves", "fractal", "kml_mixup"])
def test_gpu_renders_the_cpu_images(name):
    """The same programs on the GPU: equal up to float rounding at the shapes' and bands' edges."""
    cpu = generate(name, 4, range(16), 32).float()
    gpu = generate(name, 4, range(16), 32, "cuda").cpu().float()
    assert (cpu - gpu).abs().mean() < 2.0


def test_kml_mixes_images_of_every_family():
    """Each KML image draws its mask guide from KML_SOURCES, all the families, and its two fills
    from those less GUIDE_ONLY (fractals: mostly flat background): the slots hold those
    generators' very images, and the composite is made of them."""
    from procdata.generators import KML_SOURCES, child_seed, image_uniforms, mixed_sources, render
    from procdata.generators.mixers import GUIDE_ONLY, kml_composite, kml_slots
    assert {"shader", "expression", "dead_leaves", "spectral", "fractal"} <= set(KML_SOURCES)
    fills = [name for name in KML_SOURCES if name not in GUIDE_ONLY]
    assert kml_slots(KML_SOURCES) == [list(KML_SOURCES), fills, fills]
    indices = list(range(5, 35))
    slots = mixed_sources("kml", 3, indices, 16, torch.device("cpu"), kml_slots(KML_SOURCES))
    u = image_uniforms("kml", 3, indices, 3)
    picked = [[KML_SOURCES[int(u[row, 0] * len(KML_SOURCES))]] + [fills[int(u[row, s] * len(fills))] for s in (1, 2)]
              for row in range(len(indices))]
    assert {row[0] for row in picked} == set(KML_SOURCES) and {row[s] for row in picked for s in (1, 2)} == set(fills)
    for row in (0, 7, 19):
        for slot in range(3):
            source = render(picked[row][slot], child_seed(3, 0), [indices[row] * 3 + slot], 16)[0]
            assert torch.equal(slots[slot][row], source)
    images = render("kml", 3, indices, 16)
    torch.testing.assert_close(images, kml_composite(*slots).clamp(0, 1))
    assert (images.flatten(1).std(1) > 0.03).float().mean() > 0.9


def test_kml_mixup_keeps_the_contrast_of_its_parts():
    """The mean of two unrelated images has about 1/√2 of their contrast (0.148 against 0.258 for
    shaders); kml_mixup stretches each mean back to the contrast of its two KML parts, gain <= 2."""
    from procdata.generators import KML_SOURCES, mixed_sources, render
    from procdata.generators.mixers import kml_composite, kml_slots
    indices = range(48)
    mixed = render("kml_mixup", 1, indices, 32).flatten(1).std(1)
    slots = mixed_sources("kml_mixup", 1, indices, 32, torch.device("cpu"), kml_slots(KML_SOURCES) * 2)
    first, second = kml_composite(*slots[:3]), kml_composite(*slots[3:])
    target = (first.flatten(1).std(1) + second.flatten(1).std(1)) / 2
    plain_mean = ((first + second) / 2).flatten(1).std(1)
    assert float(mixed.mean()) > 0.85 * float(target.mean()) > float(plain_mean.mean())
    assert (mixed <= 2 * plain_mean + 1e-4).all() and (mixed >= plain_mean.clamp(max=0.5) * 0.9).all()


def test_the_catalog_names_every_registered_generator_in_order():
    """The CLI reads generator names from procdata.catalog (no torch); the registry holds exactly
    those, in that order, and refuses to register one the catalog does not name."""
    from procdata.catalog import GENERATOR_NAMES
    from procdata.generators import GENERATORS, register
    assert tuple(GENERATORS) == GENERATOR_NAMES
    with pytest.raises(ValueError, match="not in procdata.catalog.GENERATOR_NAMES"):
        register("unlisted")
