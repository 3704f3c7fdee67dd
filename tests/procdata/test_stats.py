"""procdata.stats measures what it says, and render_natural moves generators toward natural statistics."""

import math

import numpy as np
import pytest
import torch

from procdata.generators import generate, render_natural
from procdata.stats import NATURAL, image_stats, outside_natural


def power_law_noise(n: int, size: int, alpha: float, seed: int = 0) -> torch.Tensor:
    """Grey noise whose power spectrum falls as 1/f^alpha: [n, 3, size, size] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    white = torch.randn(n, size, size, generator=g, dtype=torch.float64)
    f = torch.fft.fftfreq(size, dtype=torch.float64)
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2).clamp_min(1 / size)
    field = torch.fft.ifft2(torch.fft.fft2(white) * radius ** (-alpha / 2)).real
    field = (field - field.mean()) / field.std() * 0.1 + 0.5
    return field[:, None].expand(-1, 3, -1, -1).clamp(0, 1)


def test_statistics_of_known_images():
    grey = power_law_noise(64, 32, alpha=2.0)
    stats = image_stats(grey)
    assert stats.saturation == pytest.approx(0.0, abs=1e-9)
    assert stats.luminance_share == pytest.approx(1.0, abs=1e-6)
    assert stats.spectral_slope == pytest.approx(-2.0, abs=0.25)
    assert image_stats(power_law_noise(64, 32, alpha=3.0)).spectral_slope == pytest.approx(-3.0, abs=0.3)
    white = image_stats(power_law_noise(64, 32, alpha=0.0))
    assert white.spectral_slope == pytest.approx(0.0, abs=0.2)
    # white noise: power is flat, so the share above 0.25 cycles/px is the share of those frequencies
    assert white.high_freq_power == pytest.approx(1 - math.pi / 16 * 4 * 0.25 ** 2 / 0.25, abs=0.08)
    independent = image_stats(torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    # independent channels of equal variance: var(Y) / var(channel) = the sum of the squared luma weights
    assert independent.luminance_share == pytest.approx(sum(w * w for w in (0.299, 0.587, 0.114)), abs=0.03)


def test_uint8_and_bad_shapes():
    x = generate("shader", 0, range(8), 16)
    assert image_stats(x).images == 8
    with pytest.raises(ValueError, match=r"\[n, 3, H, W\]"):
        image_stats(np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="at least one image"):
        image_stats(torch.zeros(0, 3, 8, 8))


@pytest.mark.parametrize("name", ["shader", "expression", "dead_leaves", "spectral", "fractal", "kml_mixup"])
def test_natural_rendering_puts_the_variance_in_luminance(name):
    """Independent per-channel palettes put 0.44 of the variance in luminance; photographs about
    0.9. After render_natural every generator is inside the natural colour ranges."""
    plain = image_stats(generate(name, 0, range(96), 32))
    natural = image_stats(render_natural(name, 0, range(96), 32, supersample=2))
    assert natural.luminance_share >= NATURAL["luminance_share"][0] > plain.luminance_share - 0.4
    assert natural.saturation <= NATURAL["saturation"][1]
    assert natural.high_freq_power <= plain.high_freq_power + 0.02


def test_natural_rendering_of_dead_leaves_fractal_expression_and_kml_mixup_is_natural():
    """Four pass every range (expression trees draw most leaves at low frequency; kml_mixup mixes
    every family since its sources span them). Not yet the others: spectral's 1/f^alpha amplitudes
    with alpha up to 3 fall more steeply than photographs, and the shader's own high frequencies
    stay above 0.2 after the box filter: see the perception issue."""
    for name in ("dead_leaves", "fractal", "expression", "kml_mixup"):
        stats = image_stats(render_natural(name, 0, range(256), 32, supersample=2))
        assert outside_natural(stats) == {}, name
    assert set(outside_natural(image_stats(render_natural("spectral", 0, range(256), 32, supersample=2)))) == {
        "spectral_slope"}
    assert "high_freq_power" in outside_natural(image_stats(render_natural("shader", 0, range(256), 32, supersample=2)))


def test_natural_rendering_is_a_function_of_seed_and_index():
    a = render_natural("dead_leaves", 3, range(6), 16, supersample=2)
    b = render_natural("dead_leaves", 3, [4, 1], 16, supersample=2)
    torch.testing.assert_close(a[[4, 1]], b)
    with pytest.raises(ValueError, match="supersample"):
        render_natural("shader", 0, range(2), 16, supersample=0)


def test_stream_renders_natural_images_when_asked():
    from procdata.stream import ProceduralStream, StreamConfig
    cfg = StreamConfig(generators=("shader", "dead_leaves"), seed=2, size=16, batch_size=8, natural=True)
    batch = ProceduralStream(cfg).batch(0, 1)
    assert batch.dtype == torch.uint8
    torch.testing.assert_close(batch[0].float() / 255, render_natural("shader", 2, [8], 16, supersample=2)[0],
                               atol=0.5 / 255 + 1e-6, rtol=0)
    plain = ProceduralStream(StreamConfig(generators=("shader", "dead_leaves"), seed=2, size=16, batch_size=8))
    assert image_stats(batch).luminance_share > image_stats(plain.batch(0, 1)).luminance_share + 0.2


def test_cli_stats_reports_generators_and_a_reference_collection(tmp_path, capsys):
    import json

    from PIL import Image

    from cluster.cli import main
    for n in range(6):
        (tmp_path / "grey").mkdir(exist_ok=True)
        Image.fromarray(np.full((40, 48, 3), 20 * n + 30, np.uint8)).save(tmp_path / "grey" / f"{n}.png")
    assert main(["procdata", "stats", "--generators", "dead_leaves", "--images", "16", "--size", "16", "--natural",
                 "--reference", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]
    assert [(r["source"], r["rendering"], r["images"]) for r in rows] == [
        ("dead_leaves", "plain", 16), ("dead_leaves", "natural", 16), (str(tmp_path), "reference", 6)]
    assert rows[2]["saturation"] == 0.0 and rows[0]["saturation"] > rows[1]["saturation"]
