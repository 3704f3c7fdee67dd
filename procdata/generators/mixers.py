"""Generators made of other generators' images: K-means leaves (KML), its mixup, and Dirichlet mixup."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from procdata.generators.registry import register, render
from procdata.generators.streams import grouped, image_uniforms

DEFAULT_SOURCES = ("shader", "dead_leaves", "spectral")
KML_SOURCES = ("shader",)                      # the paper's best data set is "Shaders KML Mixup"


def child_seed(seed: int, slot: int) -> int:
    """A seed for the ``slot``-th source image of a mixer, distinct from ``seed`` and other slots."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, 7919, slot])
               .generate_state(1, np.uint64)[0] >> 1)


def mixed_sources(name: str, seed: int, indices: Sequence[int], size: int, device: torch.device,
                  slots: int, sources: Sequence[str]) -> list[torch.Tensor]:
    """``slots`` float source batches for a mixer; each image picks each slot's generator at random."""
    if len(sources) == 1:
        return [render(sources[0], child_seed(seed, slot), indices, size, device) for slot in range(slots)]
    choice = (image_uniforms(name, seed, indices, slots) * len(sources)).long().clamp_max(len(sources) - 1)
    out = []
    for slot in range(slots):
        batch = torch.empty(len(indices), 3, size, size, device=device)
        for k, rows in grouped(choice[:, slot], len(sources)):
            if len(rows):
                batch[rows] = render(sources[k], child_seed(seed, slot), [indices[r] for r in rows.tolist()], size,
                                     device)
        out.append(batch)
    return out


def two_means_mask(images: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Mask in {0, 1} from 2-means clustering of each image's RGB pixels (the KML mask).

    With two centres the nearest-centre test is one half-space, p·(c₁−c₀) > (|c₁|²−|c₀|²)/2, and
    the first cluster's sum is the total minus the second's, so an iteration is two batched
    matrix-vector products.
    """
    n, pixel_count = images.shape[0], images.shape[2] * images.shape[3]
    pixels = images.flatten(2)                                           # [n, 3, P]
    total = pixels.sum(2)
    brightness = images.sum(1).flatten(1)
    rows = torch.arange(n, device=images.device)
    centres = torch.stack([pixels[rows, :, brightness.argmin(1)], pixels[rows, :, brightness.argmax(1)]], 1)  # [n, 2, 3]

    def nearer_to_second(c: torch.Tensor) -> torch.Tensor:
        normal = c[:, 1] - c[:, 0]
        offset = ((c[:, 1] ** 2).sum(-1) - (c[:, 0] ** 2).sum(-1)) / 2
        return torch.bmm(normal[:, None], pixels)[:, 0] > offset[:, None]

    for _ in range(iterations):
        second = nearer_to_second(centres).float()                         # [n, P]
        count = second.sum(1, keepdim=True)
        sums = torch.bmm(pixels, second[..., None])[..., 0]                 # [n, 3]
        means = ((total - sums) / (pixel_count - count).clamp_min(1), sums / count.clamp_min(1))
        empty = (pixel_count - count == 0, count == 0)
        centres = torch.stack([torch.where(empty[k], centres[:, k], means[k]) for k in range(2)], 1)
    return nearer_to_second(centres).float().view(n, 1, *images.shape[2:])


def blur3(mask: torch.Tensor) -> torch.Tensor:
    """3×3 box blur with replicated edges, as two separable sums of shifted views
    (several times faster than ``avg_pool2d`` on CPU)."""
    p = F.pad(mask, (1, 1, 1, 1), mode="replicate")
    rows = p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]
    return (rows[..., :-2] + rows[..., 1:-1]).add_(rows[..., 2:]).div_(9)


@register("kml")
def kml(seed: int, indices: Sequence[int], size: int, device: torch.device,
        sources: Sequence[str] = KML_SOURCES, mask_size: int = 256) -> torch.Tensor:
    """K-means leaves: a 2-means mask of one image composites two others, ``a·m + b·(1−m)``.

    As in the source paper: cluster the first image's RGB at ``mask_size`` (3 iterations), blur
    the mask 3×3, resize it to the output size and blur again. Sources default to shaders, the
    paper's best choice ("Shaders KML"); any generators can be given.
    """
    guide, a, b = mixed_sources("kml", seed, indices, size, device, 3, sources)
    work = min(mask_size, size)
    if work != size:
        guide = F.interpolate(guide, size=(work, work), mode="bilinear", antialias=True, align_corners=False)
    mask = blur3(two_means_mask(guide))
    if work != size:
        mask = F.interpolate(mask, size=(size, size), mode="bilinear", align_corners=False)
    return a.sub_(b).mul_(blur3(mask)).add_(b)                            # a·m + b·(1−m)


@register("kml_mixup")
def kml_mixup(seed: int, indices: Sequence[int], size: int, device: torch.device,
              sources: Sequence[str] = KML_SOURCES) -> torch.Tensor:
    """The source paper's best data ("Shaders KML Mixup"): the mean of two KML images."""
    first = kml(child_seed(seed, 101), indices, size, device, sources)
    return first.add_(kml(child_seed(seed, 102), indices, size, device, sources)).mul_(0.5)


@register("mixup")
def mixup(seed: int, indices: Sequence[int], size: int, device: torch.device, k: int = 3,
          concentration: float = 1.0, sources: Sequence[str] = DEFAULT_SOURCES) -> torch.Tensor:
    """Mix of ``k`` source images with Dirichlet(concentration) weights drawn per image."""
    images = torch.stack(mixed_sources("mixup", seed, indices, size, device, k, sources), 1)
    weights = torch.tensor(np.stack([np.random.default_rng(child_seed(seed, 1000 + i)).dirichlet([concentration] * k)
                                     for i in indices]), dtype=torch.float32, device=device)
    return (images * weights[:, :, None, None, None]).sum(1)
