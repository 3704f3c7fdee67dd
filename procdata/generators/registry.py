"""The registry of generators by name, and the calls every user makes: ``generate`` (uint8),
``render`` (float in [0, 1]: mixers compose these) and ``render_natural`` (toward natural image
statistics)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from procdata.allocator import keep_heap
from procdata.catalog import GENERATOR_NAMES
from procdata.generators.streams import image_uniforms

Generator = Callable[..., torch.Tensor]
GENERATORS: dict[str, Generator] = {}


def register(name: str):
    if name not in GENERATOR_NAMES:
        raise ValueError(f"generator {name!r} is not in procdata.catalog.GENERATOR_NAMES (the CLI reads names there)")

    def wrap(fn: Generator) -> Generator:
        GENERATORS[name] = fn
        fn.generator_name = name
        return fn

    return wrap


def get_generator(name: str) -> Generator:
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}; choose one of: {', '.join(sorted(GENERATORS))}")
    return GENERATORS[name]


def generate(name: str, seed: int, indices: Sequence[int] | torch.Tensor, size: int = 32,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """Images ``indices`` of generator ``name`` under ``seed``: uint8 ``[n, 3, size, size]``."""
    return quantise(render(name, seed, indices, size, device))


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Float intensities in [0, 1] → uint8, rounded to the nearest level."""
    return images.mul_(255).add_(0.5).to(torch.uint8)


def render(name: str, seed: int, indices: Sequence[int] | torch.Tensor, size: int = 32,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """Images as float32 intensities in [0, 1], not yet quantised: mixers compose these."""
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    indices = [int(i) for i in indices]
    if any(i < 0 for i in indices):
        raise ValueError("image indices must be non-negative")
    keep_heap()
    return get_generator(name)(seed, indices, size, torch.device(device)).clamp_(0, 1)


def render_natural(name: str, seed: int, indices: Sequence[int] | torch.Tensor, size: int = 32,
                   device: str | torch.device = "cpu", supersample: int = 4,
                   saturation: tuple[float, float] = (0.0, 0.5)) -> torch.Tensor:
    """``render`` with two steps toward natural image statistics (``vismem procdata stats``):
    drawn at ``supersample`` × ``size`` and box-filtered down (no aliasing: the shader's power
    above 0.25 cycles/px falls from about 0.5 to natural levels), then each image's chroma scaled
    by a factor drawn from ``saturation`` around its Rec. 601 luma (most variance in luminance,
    low saturation, as in photographs). Pixels still depend only on (generator, seed, index)."""
    if supersample < 1:
        raise ValueError(f"supersample must be a whole number >= 1, got {supersample}")
    images = render(name, seed, indices, size * supersample, device)
    if supersample > 1:
        images = F.avg_pool2d(images, supersample)
    low, high = saturation
    chroma = image_uniforms(f"{name}:saturation", seed, [int(i) for i in indices], 1).to(images.device)
    factor = (low + (high - low) * chroma)[:, :, None, None]
    luma = torch.einsum("nchw,c->nhw", images, torch.tensor(LUMA, device=images.device))[:, None]
    return images.sub_(luma).mul_(factor).add_(luma).clamp_(0, 1)


LUMA = (0.299, 0.587, 0.114)                   # Rec. 601, as procdata.stats and the augmentation use
