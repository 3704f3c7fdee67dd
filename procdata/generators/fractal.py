"""Random affine IFS fractals (FractalDB-style)."""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np

import torch

from procdata.generators.registry import register
from procdata.generators.streams import GOLDEN, image_rngs, per_image, splitmix64, splitmix64_torch


@register("fractal")
def fractal(seed: int, indices: Sequence[int], size: int, device: torch.device, points: int = 256,
            iterations: int = 64, burn_in: int = 8) -> torch.Tensor:
    """Random affine IFS fractals (FractalDB-style), rendered by a batched chaos game.

    Each image draws 2–4 contractive maps whose σ-factor (Σ s₁ + 2·s₂ over the maps' singular
    values) lies in [(5+N)/2, (6+N)/2], the band Anderson & Farrell found to give neither dust nor
    blobs; maps are picked with probability ∝ |det|. Every point of the game is coloured by the
    last map applied, and the pixel colour is the mean colour of the points that land on it.
    """
    rngs = image_rngs("fractal", seed, indices)
    n, maps_max = len(indices), 4
    A = torch.zeros(n, maps_max, 2, 2)
    b = torch.zeros(n, maps_max, 2)
    prob = torch.zeros(n, maps_max)
    for i, g in enumerate(rngs):
        A[i], b[i], prob[i] = ifs_system(g, maps_max)
    colours = per_image(rngs, (maps_max, 3), 0.15, 1.0)
    background = per_image(rngs, (3,), 0.0, 0.35)
    # each point's map at each step, by inverse CDF on a counter-based hash (per-image torch.multinomial
    # on CPU generators was a tenth of the time); never past an image's last map, whatever the rounding
    u = map_uniforms(seed, indices, points * iterations, device)
    cdf, last = prob.cumsum(1).to(device), (prob > 0).sum(1, keepdim=True).to(device) - 1
    below = (u[..., None] > cdf[:, None, :maps_max - 1]).sum(-1)                  # maps whose CDF lies below u
    choice = torch.minimum(below, last).view(n, iterations, points)
    # the maps as six coefficients each, gathered per point: (x', y') = (a, c)·x + (b, d)·y + (e, f)
    coefficients = torch.cat([A.transpose(2, 3).flatten(2), b], 2).view(n * maps_max, 6).to(device)  # [n·M, 6]
    colours = colours.to(device)
    row_of_map = (choice + torch.arange(n, device=device)[:, None, None] * maps_max).transpose(0, 1).flatten(1)
    rows = torch.arange(n, device=device)[:, None]
    kept = iterations - burn_in
    pts = torch.empty(n, kept, points, 2, device=device)
    xy = torch.zeros(n, points, 2, device=device)
    for t in range(iterations):                                  # four tensor ops a step: launches matter here
        c = coefficients.index_select(0, row_of_map[t]).view(n, points, 6)    # the map of each point
        out = pts[:, t - burn_in] if t >= burn_in else None
        xy = torch.addcmul(c[..., 4:6], c[..., 0:2], xy[..., 0:1], out=out).addcmul_(c[..., 2:4], xy[..., 1:2])
    pts = pts.view(n, kept * points, 2)
    # 1st and 99th percentiles, robust to stray points, from every 8th point (a sixth of the time)
    sample = pts[:, ::8]
    k = max(1, sample.shape[1] // 100)
    lo = sample.kthvalue(k, dim=1, keepdim=True).values
    hi = sample.kthvalue(sample.shape[1] - k + 1, dim=1, keepdim=True).values
    span = (hi - lo).amax(-1, keepdim=True).clamp_min(1e-6)
    centre = (hi + lo) / 2
    pix = ((pts - centre) / span * 0.9 + 0.5) * size
    inside = ((pix >= 0) & (pix < size)).all(-1)
    # every point lands in one (pixel, map) bin (the points outside the frame in one more, dropped):
    # a pixel's colour is the mean colour of its points, its histogram over maps times their colours
    cell = pix[..., 1].long().clamp_(0, size - 1).mul_(size).add_(pix[..., 0].long().clamp_(0, size - 1))
    bins = cell.add_(rows * size * size).mul_(maps_max).add_(choice[:, burn_in:].reshape(n, -1))
    bins = torch.where(inside, bins, n * size * size * maps_max)
    bins = bins.flatten()
    hist = torch.zeros(n * size * size * maps_max + 1, device=device)
    hist = hist.index_add_(0, bins, torch.ones(1, device=device).expand(len(bins)))   # whole numbers: exact
    hist = hist[:-1].view(n, size * size, maps_max).transpose(1, 2)           # [n, M, S·S]
    count = hist.sum(1, keepdim=True)                                          # [n, 1, S·S]
    paint = torch.bmm(colours.transpose(1, 2), hist)                          # [n, 3, S·S]
    empty = (count == 0).float()
    image = paint.mul_(count.add_(empty).reciprocal_()).addcmul_(empty, background.to(device)[:, :, None])
    return image.view(n, 3, size, size)


def ifs_system(g: torch.Generator, maps_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One IFS of 2..maps_max affine maps (zero-padded to maps_max), by rejection on the σ-factor."""
    n_maps = int(torch.randint(2, maps_max + 1, (1,), generator=g))
    low, high = (5 + n_maps) / 2, (6 + n_maps) / 2
    for _ in range(1000):
        s = torch.rand(n_maps, 2, generator=g)
        s1, s2 = s.max(1).values, s.min(1).values
        sigma = float((s1 + 2 * s2).sum())
        if low <= sigma <= high:
            break
        # rescale towards the band: keeps the rejection loop short
        scale = (low + high) / 2 / max(sigma, 1e-6)
        s1, s2 = (s1 * scale).clamp(max=0.99), (s2 * scale).clamp(max=0.99)
        if low <= float((s1 + 2 * s2).sum()) <= high:
            break
    theta, phi = torch.rand(2, n_maps, generator=g) * 2 * math.pi
    flip = torch.where(torch.rand(n_maps, generator=g) < 0.5, -1.0, 1.0)

    def rot(a):
        return torch.stack([torch.stack([a.cos(), -a.sin()], -1), torch.stack([a.sin(), a.cos()], -1)], -2)

    sigma_mat = torch.diag_embed(torch.stack([s1, s2 * flip], -1))
    A = rot(theta) @ sigma_mat @ rot(phi)
    b = torch.rand(n_maps, 2, generator=g) * 2 - 1
    prob = torch.linalg.det(A).abs().clamp_min(1e-3)
    pad = maps_max - n_maps
    return (torch.cat([A, torch.zeros(pad, 2, 2)]), torch.cat([b, torch.zeros(pad, 2)]),
            torch.cat([prob / prob.sum(), torch.zeros(pad)]))


def map_uniforms(seed: int, indices: Sequence[int], count: int, device: torch.device) -> torch.Tensor:
    """``count`` uniforms per image on ``device``, ``[n, count]``, 16 bits each, four from every
    64-bit counter-based hash of (seed, index, position): the chaos game's map choices, which
    need many draws and little resolution (24-bit draws one per hash in numpy cost as much as
    the rest of the fractal)."""
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64(zlib.crc32(b"fractal:maps")) ^ splitmix64(np.uint64(int(seed) & (2 ** 64 - 1))))
        key = splitmix64(key ^ np.asarray(indices, dtype=np.uint64)).view(np.int64)
    hashes = (count + 3) // 4
    counters = torch.arange(1, hashes + 1, device=device, dtype=torch.int64).mul_(GOLDEN)
    bits = splitmix64_torch(torch.from_numpy(key).to(device)[:, None] + counters[None])        # [n, H]
    fields = torch.stack([(bits >> shift) & 0xFFFF for shift in (0, 16, 32, 48)], -1).flatten(1)[:, :count]
    return fields.float().add_(0.5).div_(2 ** 16)
