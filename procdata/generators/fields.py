"""Fields computed at every pixel at once: 1/f^α spectral noise and random shader programs."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from procdata.generators.registry import register
from procdata.generators.streams import grouped, image_normals, image_rngs, image_uniforms, per_image, pixel_grid


@register("spectral")
def spectral(seed: int, indices: Sequence[int], size: int, device: torch.device,
             alpha_range: tuple[float, float] = (1.0, 3.0)) -> torch.Tensor:
    """Colour noise with amplitude spectrum 1/f^α, α drawn per image from ``alpha_range``."""
    rngs = image_rngs("spectral", seed, indices)
    alpha = per_image(rngs, (), *alpha_range).to(device)
    white = image_normals("spectral", seed, indices, (3, size, size), device)
    fy = torch.fft.fftfreq(size, device=device)[:, None]
    fx = torch.fft.fftfreq(size, device=device)[None, :]
    freq = torch.sqrt(fx * fx + fy * fy).clamp_min(1.0 / size)
    amplitude = freq[None, None] ** -alpha[:, None, None, None]
    field = torch.fft.ifft2(torch.fft.fft2(white) * amplitude).real
    lo = field.amin(dim=(2, 3), keepdim=True)
    hi = field.amax(dim=(2, 3), keepdim=True)
    return (field - lo) / (hi - lo + 1e-8)


@register("shader")
def shader(seed: int, indices: Sequence[int], size: int, device: torch.device, warps: int = 3,
           waves: int = 4) -> torch.Tensor:
    """Random shader-like programs: domain-warped periodic fields through a cosine palette.

    Each image's program is drawn from a small grammar: a coordinate field (cartesian, polar or
    radial), ``warps`` sine domain warps of random frequency and strength, a sum of ``waves``
    oriented waves, a shaping op (identity, |·|, fract bands, tanh bands), and a palette
    ``a + b·cos(2π(c·v + d))``. The batch runs as one tensor program over ``[n, pixels]``: per-image
    constants broadcast, fused multiply-adds work in place, and the ops that only some programs use
    run on those images alone. This is the hot loop of ``kml_mixup``, hence the care.
    """
    n = len(indices)
    p = image_uniforms("shader", seed, indices, 64).to(device)
    take = iter(range(64))

    def nxt(low=0.0, high=1.0):                                         # [n, 1]: one constant per image
        return p[:, next(take), None] * (high - low) + low

    y, x = pixel_grid(size, device)
    y, x = (y.flatten(1) - 0.5) * 2, (x.flatten(1) - 0.5) * 2          # [1, S·S] in [-1, 1]
    zoom, rot = nxt(0.5, 2.0), nxt(0, 2 * math.pi)
    cos_z, sin_z = torch.cos(rot) * zoom, torch.sin(rot) * zoom
    u = (x * cos_z).sub_(y * sin_z)                             # rotate and zoom
    v = (x * sin_z).add_(y * cos_z)
    coord_kind, polar_turns = (nxt() * 3).long().flatten(), nxt(1, 4).round()
    for kind, rows in grouped(coord_kind, 3):
        if kind and len(rows):
            radius, theta = torch.hypot(u[rows], v[rows]), torch.atan2(v[rows], u[rows])
            u[rows], v[rows] = (radius, theta * polar_turns[rows]) if kind == 1 else (theta, radius * 3)
    du, dv = torch.empty_like(u), torch.empty_like(v)                  # scratch, reused by every op below
    for _ in range(warps):
        strength, freq, phase = nxt(0, 1.0), nxt(0.5, 4), nxt(0, 2 * math.pi)
        torch.mul(v, freq, out=du).add_(phase).sin_()
        torch.mul(u, freq, out=dv).sub_(phase).cos_()
        u.addcmul_(strength, du), v.addcmul_(strength, dv)
    value = torch.zeros_like(u)
    for _ in range(waves):
        angle, freq, phase, weight = nxt(0, math.pi), nxt(1, 6), nxt(0, 2 * math.pi), nxt(0.2, 1)
        torch.mul(u, freq * torch.cos(angle), out=du).addcmul_(v, freq * torch.sin(angle)).add_(phase).sin_()
        value.addcmul_(du, weight / waves)
    shape_kind, bands = (nxt() * 4).long().flatten(), nxt(2, 8)
    for kind, rows in grouped(shape_kind, 4):
        if kind and len(rows):
            part = value[rows]
            value[rows] = (part.abs_().mul_(2).sub_(1) if kind == 1 else
                           part.mul_(bands[rows]).frac_().mul_(2).sub_(1) if kind == 2 else
                           part.mul_(bands[rows]).tanh_())
    a, b, c, d = (torch.cat([nxt(*span) for _ in range(3)], 1)[..., None]      # [n, 3, 1] per channel
                  for span in ((0.3, 0.7), (0.2, 0.5), (0.3, 1.5), (0, 1)))
    image = (value[:, None] * (2 * math.pi * c)).add_(2 * math.pi * d).cos_().mul_(b).add_(a)   # [n, 3, S·S]
    return image.view(n, 3, size, size)
