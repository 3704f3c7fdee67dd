"""Per-image random streams, seeded by (generator, seed, index) alone, and the batch helpers every
generator shares: one image's draws never depend on the batch it is rendered in."""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np
import torch

def image_rngs(name: str, seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU torch.Generator per image, seeded from (generator name, seed, index) only."""
    tag = zlib.crc32(name.encode())
    rngs = []
    for index in indices:
        state = np.random.SeedSequence([tag, int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index)])
        rngs.append(torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1)))
    return rngs


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 mixing function on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def image_uniforms(name: str, seed: int, indices: Sequence[int], count: int) -> torch.Tensor:
    """``count`` uniforms in [0, 1) per image, ``[n, count]`` float32, from a counter-based hash of
    (generator name, seed, index): a whole batch in a few numpy operations, no per-image RNG object."""
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64(zlib.crc32(name.encode())) ^ splitmix64(np.uint64(int(seed) & (2 ** 64 - 1))))
        key = splitmix64(key ^ np.asarray(indices, dtype=np.uint64))
        counters = key[:, None] + np.arange(1, count + 1, dtype=np.uint64)[None] * np.uint64(0x9E3779B97F4A7C15)
        bits = splitmix64(counters) >> np.uint64(40)                       # 24 random bits
    return torch.from_numpy((bits.astype(np.float32) / np.float32(2 ** 24)))


GOLDEN = 0x9E3779B97F4A7C15 - 2 ** 64                 # splitmix64's constants as int64 (two's complement)
MIX1, MIX2 = 0xBF58476D1CE4E5B9 - 2 ** 64, 0x94D049BB133111EB - 2 ** 64


def splitmix64_torch(x: torch.Tensor) -> torch.Tensor:
    """``splitmix64`` on int64 tensors of any device: multiplication wraps as on uint64, and the
    right shifts are made logical by masking the sign bits an arithmetic shift copies in."""
    def shift(v, bits):
        return (v >> bits) & ((1 << (64 - bits)) - 1)
    x = x + GOLDEN
    x = (x ^ shift(x, 30)) * MIX1
    x = (x ^ shift(x, 27)) * MIX2
    return x ^ shift(x, 31)


def image_normals(name: str, seed: int, indices: Sequence[int], shape: Sequence[int],
                  device: torch.device) -> torch.Tensor:
    """Standard normal draws of ``shape`` per image, ``[n, *shape]`` float32, made on ``device`` from
    a counter-based hash of (generator name, seed, index, position) and Box-Muller: per-pixel
    noise for a whole batch in a few tensor operations, the same values on CPU and GPU (per-image
    ``torch.randn`` on CPU generators capped a GPU at ~900 images/s at 224 px)."""
    count = math.prod(shape)
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64(zlib.crc32(name.encode()) ^ 0x6E6F6973) ^ splitmix64(np.uint64(int(seed) & (2 ** 64 - 1))))
        key = splitmix64(key ^ np.asarray(indices, dtype=np.uint64)).view(np.int64)
    pairs = (count + 1) // 2
    counters = torch.arange(1, 2 * pairs + 1, device=device, dtype=torch.int64).mul_(GOLDEN)
    bits = splitmix64_torch(torch.from_numpy(key).to(device)[:, None] + counters[None])
    u = ((bits >> 40) & 0xFFFFFF).float().add_(0.5).div_(2 ** 24).view(len(indices), 2, pairs)   # (0, 1)
    radius, angle = u[:, 0].log_().mul_(-2).sqrt_(), u[:, 1].mul_(2 * math.pi)
    normals = torch.cat([radius * angle.cos(), radius * angle.sin()], 1)[:, :count]
    return normals.reshape(len(indices), *shape)


def per_image(rngs: list[torch.Generator], shape: Sequence[int] = (), low: float = 0.0,
              high: float = 1.0) -> torch.Tensor:
    """Uniform draws of ``shape`` for every image, stacked to ``[n, *shape]`` (CPU, float32)."""
    return torch.stack([torch.rand(tuple(shape), generator=g) for g in rngs]) * (high - low) + low


def pixel_grid(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [0, 1), as ``[1, 1, size, size]`` y and x planes."""
    axis = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return y[None, None], x[None, None]


def grouped(kinds: torch.Tensor, count: int) -> list[tuple[int, torch.Tensor]]:
    """The rows of each kind 0..count-1, for ops that only some images of a batch need."""
    return [(kind, (kinds == kind).nonzero().flatten()) for kind in range(count)]
