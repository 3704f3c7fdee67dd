"""Image statistics that separate natural photographs from procedural images.

Four numbers per set of images, all measured on the images as a training stream renders them:

- ``saturation``: mean HSV saturation, (max − min) / max of each pixel's RGB.
- ``luminance_share``: the share of colour variance carried by luminance, var(Y) / mean_c var(c)
  with Y the Rec. 601 luma and variances over each image's pixels (summed over images). 1.0 for
  grey images, about 0.45 for independent R, G, B channels.
- ``high_freq_power``: the share of the luminance power spectrum (mean removed) above 0.25
  cycles per pixel.
- ``spectral_slope``: the slope of log power against log radial frequency (natural images fall
  about as 1/f², a slope near −2; steeper at low resolution, where downsampling filters).

Reference sets (a real collection) are for reporting only: a generator's parameters are never fit
to an evaluation set, and no real image enters a procedural run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from procdata.stream import ProceduralStream, StreamConfig

LUMA = (0.299, 0.587, 0.114)
HIGH_FREQUENCY = 0.25                      # cycles per pixel; Nyquist is 0.5


@dataclass(frozen=True)
class ImageStats:
    images: int
    saturation: float
    luminance_share: float
    high_freq_power: float
    spectral_slope: float

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def as_float(images) -> torch.Tensor:
    """uint8 or float ``[n, 3, H, W]`` (tensor or array) → float64 intensities in [0, 1]."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"image statistics need RGB batches [n, 3, H, W], got {tuple(x.shape)}")
    return x.double() / 255 if x.dtype == torch.uint8 else x.double().clamp(0, 1)


def luminance(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nchw,c->nhw", x, torch.tensor(LUMA, dtype=x.dtype))


def radial_power(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(radial frequency in cycles/px, mean power spectrum) of luminance ``[n, H, W]``, DC dropped."""
    h, w = y.shape[-2:]
    spectrum = torch.fft.fft2(y - y.mean((-2, -1), keepdim=True)).abs().pow(2).mean(0)
    fy, fx = torch.fft.fftfreq(h, dtype=y.dtype)[:, None], torch.fft.fftfreq(w, dtype=y.dtype)[None, :]
    radius = torch.sqrt(fy * fy + fx * fx)
    keep = radius > 0
    return radius[keep], spectrum[keep]


def spectral_slope(radius: torch.Tensor, power: torch.Tensor, bins: int = 12) -> float:
    """Least-squares slope of log power against log frequency, over log-spaced rings up to Nyquist
    (each ring's mean power, so the many high-frequency coefficients do not outweigh the few low)."""
    edges = np.geomspace(float(radius.min()), 0.5, bins + 1)
    centres, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        ring = (radius >= lo) & (radius < hi)
        if ring.any():
            centres.append(np.sqrt(lo * hi))
            means.append(float(power[ring].mean()))
    means = np.maximum(np.asarray(means), 1e-30)
    return float(np.polyfit(np.log(centres), np.log(means), 1)[0])


def image_stats(images) -> ImageStats:
    """The four statistics of a batch of RGB images (uint8 or float in [0, 1])."""
    x = as_float(images)
    if len(x) == 0:
        raise ValueError("image statistics need at least one image")
    top, bottom = x.amax(1), x.amin(1)
    saturation = torch.where(top > 0, (top - bottom) / top.clamp_min(1e-12), torch.zeros_like(top)).mean()
    y = luminance(x)
    channel_var = x.flatten(2).var(2).mean(1).sum()
    share = y.flatten(1).var(1).sum() / channel_var if channel_var > 0 else torch.tensor(1.0)
    radius, power = radial_power(y)
    high = float(power[radius > HIGH_FREQUENCY].sum() / power.sum()) if power.sum() > 0 else 0.0
    return ImageStats(len(x), float(saturation), float(share), high, spectral_slope(radius, power))


def generator_stats(name: str, images: int = 768, size: int = 32, seed: int = 0, natural: bool = False,
                    batch: int = 256) -> ImageStats:
    """Statistics of ``images`` images of generator ``name`` rendered at ``size`` as the stream
    makes them (uint8; with ``natural``, through ``render_natural`` as ``StreamConfig.natural`` does)."""
    stream = ProceduralStream(StreamConfig((name,), seed, size, batch, natural=natural))
    rendered = [stream.images(name, list(range(start, min(images, start + batch)))) for start in range(0, images, batch)]
    return image_stats(torch.cat(rendered))


# What natural photographs are known to have (van der Schaaf & van Hateren 1996: power spectra
# fall as 1/f^α, α ≈ 1.9 ± 0.4; Ruderman et al. 1998: the achromatic axis carries most of the
# variance of natural colour images). The bounds are loose on purpose: they separate natural
# statistics from independent-channel, white-spectrum ones, not one photo collection from another.
NATURAL = {"saturation": (0.0, 0.45), "luminance_share": (0.75, 1.0), "high_freq_power": (0.0, 0.2),
           "spectral_slope": (-3.6, -1.6)}


def outside_natural(stats: ImageStats | dict) -> dict[str, float]:
    """The statistics of ``stats`` (or its ``to_dict()``) outside the NATURAL ranges, by name."""
    values = stats.to_dict() if isinstance(stats, ImageStats) else stats
    return {k: values[k] for k, (lo, hi) in NATURAL.items() if not lo <= values[k] <= hi}
