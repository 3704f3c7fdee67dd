"""Generators made of other generators' images: K-means leaves (KML), its mixup, and Dirichlet mixup."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from procdata.generators.registry import register, render
from procdata.generators.streams import image_uniforms

DEFAULT_SOURCES = ("shader", "dead_leaves", "spectral")
# Every family: each KML image draws its mask guide and its two fills per image from these, so it
# composites, say, an expression tree and spectral noise through a dead-leaves mask. The paper's
# best set used shaders alone ("Shaders KML Mixup"); vismem's default mix then held nothing but
# sinusoid shaders and dead leaves.
KML_SOURCES = ("shader", "expression", "dead_leaves", "spectral", "fractal")
# Families whose images are mostly one flat background: a KML guide (a fractal's 2-means mask is
# its attractor's silhouette, an object-shaped occluder) but not a fill (a flat region with dust).
GUIDE_ONLY = frozenset({"fractal"})


def child_seed(seed: int, slot: int) -> int:
    """A seed for the ``slot``-th source image of a mixer, distinct from ``seed`` and other slots."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, 7919, slot])
               .generate_state(1, np.uint64)[0] >> 1)


def mixed_sources(name: str, seed: int, indices: Sequence[int], size: int, device: torch.device,
                  slots: int | Sequence[Sequence[str]], sources: Sequence[str] = ()) -> list[torch.Tensor]:
    """Float source batches for a mixer's slots: ``slots`` of them drawn from ``sources``, or one per
    source list when ``slots`` is a list of lists. Each image picks each slot's generator from
    the slot's list at random. Source image ``slot`` of mixer image ``i`` is image
    ``i·slots + slot`` of its generator under ``child_seed(seed, 0)``, so each generator renders
    once for all the slots of a batch (a call per slot and generator made a KML batch of a few
    images two dozen small calls, fixed costs mostly)."""
    lists = [list(sources)] * slots if isinstance(slots, int) else [list(s) for s in slots]
    count, n = len(lists), len(indices)
    families = list(dict.fromkeys(name for names in lists for name in names))
    table = torch.tensor([[families.index(name) for name in names] + [0] * (len(families) - len(names))
                          for names in lists])                               # [slots, families]: each list's ids
    sizes = torch.tensor([len(names) for names in lists])
    pick = (image_uniforms(name, seed, indices, count) * sizes).long().minimum(sizes - 1)   # [n, slots]
    family = table.gather(1, pick.T).T                                         # [n, slots]: a generator id each
    source = torch.as_tensor(list(indices), dtype=torch.int64)[:, None] * count + torch.arange(count)
    out = torch.empty(count, n, 3, size, size, device=device)
    for k, generator in enumerate(families):
        row, slot = (family == k).nonzero(as_tuple=True)
        if len(row):
            images = render(generator, child_seed(seed, 0), source[row, slot], size, device)
            out[slot.to(device), row.to(device)] = images
    return list(out.unbind(0))


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
    the mask 3×3, resize it to the output size and blur again. Each image draws its guide's
    generator from ``sources`` (default ``KML_SOURCES``, every family; the paper used shaders
    alone) and each fill's from the same less ``GUIDE_ONLY``.
    """
    guide, a, b = mixed_sources("kml", seed, indices, size, device, kml_slots(sources))
    return kml_composite(guide, a, b, mask_size)


def kml_slots(sources: Sequence[str]) -> list[list[str]]:
    """The source lists of a KML image's slots: the guide from ``sources``, the fills from the same
    less ``GUIDE_ONLY``."""
    fills = [name for name in sources if name not in GUIDE_ONLY] or list(sources)
    return [list(sources), fills, fills]


def kml_composite(guide: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask_size: int = 256) -> torch.Tensor:
    """``a·m + b·(1−m)`` with ``m`` the blurred 2-means mask of ``guide`` (made at ``mask_size`` at most)."""
    size = guide.shape[-1]
    work = min(mask_size, size)
    if work != size:
        guide = F.interpolate(guide, size=(work, work), mode="bilinear", antialias=True, align_corners=False)
    mask = blur3(two_means_mask(guide))
    if work != size:
        mask = F.interpolate(mask, size=(size, size), mode="bilinear", align_corners=False)
    return a.sub_(b).mul_(blur3(mask)).add_(b)                            # a·m + b·(1−m)


@register("kml_mixup")
def kml_mixup(seed: int, indices: Sequence[int], size: int, device: torch.device,
              sources: Sequence[str] = KML_SOURCES, max_gain: float = 2.0) -> torch.Tensor:
    """The source paper's best data ("Shaders KML Mixup"): the mean of two KML images, its
    contrast restored. Averaging two unrelated images cancels much of their variation (per-image
    standard deviation 0.148 against the shader's 0.258), so each mean is stretched about its own
    mean colour to the mean standard deviation of its two parts, by at most ``max_gain`` (one
    gain for all three channels: hue and the image's layout stay as mixed)."""
    slots = mixed_sources("kml_mixup", seed, indices, size, device, kml_slots(sources) * 2)   # both KMLs at once
    first, second = kml_composite(*slots[:3]), kml_composite(*slots[3:])
    target = (first.flatten(1).std(1) + second.flatten(1).std(1)) / 2
    mixed = first.add_(second).mul_(0.5)
    centre = mixed.mean((2, 3), keepdim=True)
    gain = (target / mixed.flatten(1).std(1).clamp_min(1e-6)).clamp_(1.0, max_gain)
    return mixed.sub_(centre).mul_(gain[:, None, None, None]).add_(centre)


@register("mixup")
def mixup(seed: int, indices: Sequence[int], size: int, device: torch.device, k: int = 3,
          concentration: float = 1.0, sources: Sequence[str] = DEFAULT_SOURCES) -> torch.Tensor:
    """Mix of ``k`` source images with Dirichlet(concentration) weights drawn per image."""
    images = torch.stack(mixed_sources("mixup", seed, indices, size, device, k, sources), 1)
    weights = torch.tensor(np.stack([np.random.default_rng(child_seed(seed, 1000 + i)).dirichlet([concentration] * k)
                                     for i in indices]), dtype=torch.float32, device=device)
    return (images * weights[:, :, None, None, None]).sum(1)
