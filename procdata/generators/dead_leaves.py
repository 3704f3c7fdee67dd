"""Dead leaves: occluding shapes with a scale-invariant radius law."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from procdata.generators.registry import register
from procdata.generators.streams import image_normals, image_uniforms


@register("dead_leaves")
def dead_leaves(seed: int, indices: Sequence[int], size: int, device: torch.device,
                shapes: int = 128, r_min: float = 0.05, r_max: float = 1.0, texture: float = 0.15,
                windows: bool = True) -> torch.Tensor:
    """Occluding discs, rotated rectangles and triangles with radius density ∝ r⁻³ on
    [r_min, r_max]·size, enough of them to cover the frame (``leaf_labels``: about 3 % of pixels
    left to the flat background at the defaults, where 48 shapes from r_min 0.03 left 55 %).

    Shapes are painted back to front, so each pixel shows the last shape that covers it; the
    radius law puts the same covered area in every octave of size, so the image statistics are
    scale-invariant, as in natural images, with occlusion at object scale. Colours are uniform
    RGB (``render_natural`` desaturates them); a grey per-pixel texture of standard deviation
    ``texture / 4`` breaks the flat faces.
    """
    shape, colours = leaf_shapes(seed, indices, shapes, r_min, r_max, device)
    labels = leaf_labels(shape, size, windows)                                # [n, S·S]: 0 background
    n = len(indices)
    image = colours.transpose(1, 2).gather(2, labels.long()[:, None].expand(-1, 3, -1))   # [n, 3, S·S]
    noise = image_normals("dead_leaves", seed, indices, (1, size, size), device)
    return image.view(n, 3, size, size).add_(noise.mul_(texture * 0.25))


def leaf_shapes(seed: int, indices: Sequence[int], shapes: int, r_min: float, r_max: float,
                device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Dead leaves' shapes of each image (``[n, K]`` tensors, in painting order) and its palette
    ``[n, K+1, 3]`` (row 0 the background), from a counter-based hash of (seed, index)."""
    n = len(indices)
    u = image_uniforms("dead_leaves", seed, indices, shapes * 9 + 3).to(device)
    s = u[:, :shapes * 9].view(n, shapes, 9)
    shape = {"radius": inverse_cdf_power3(s[..., 0], r_min, r_max),          # fraction of the frame
             "cy": s[..., 1], "cx": s[..., 2], "angle": s[..., 3] * math.pi, "aspect": 0.3 + 0.7 * s[..., 4],
             "kind": (s[..., 5] * 3).long().clamp_max_(2)}                   # 0 disc, 1 rectangle, 2 triangle
    return shape, torch.cat([u[:, shapes * 9:, None].transpose(1, 2), s[..., 6:9]], 1)


def leaf_labels(shape: dict[str, torch.Tensor], size: int, windows: bool = True,
                ratio: float | None = None) -> torch.Tensor:
    """Each pixel's topmost shape, ``[n, S·S]`` (k+1 for the k-th shape painted, 0 for none).

    A shape covers only the pixels within its reach of its centre (its radius; for a rectangle
    the half-extent of the rotated box), so it is tested on a square window just wide enough for
    that, moved inside the frame, not on the whole frame. Window widths come in a ladder ``ratio``
    apart; the shapes of one (width, kind) pair across the whole batch are one tensor program,
    scattered into the label map with ``amax``. So the work is about proportional to the area the
    shapes cover, whatever their number. The ladder only decides how much is tested, never the
    labels, so by default it follows the batch: rungs 2× apart below 100k pixels (a KML slot's few
    images: each group's fixed cost dominates), 1.5× below 500k, 1.25× above. Without
    ``windows`` every shape is tested on every pixel: the same labels, slowly.
    """
    n, k = shape["radius"].shape
    device = shape["radius"].device
    dtype = torch.uint8 if k < 256 and device.type == "cpu" else torch.int32
    radius, angle, aspect, kind = (shape[key].flatten() for key in ("radius", "angle", "aspect", "kind"))
    sin, cos = angle.sin().abs(), angle.cos().abs()
    rect = torch.maximum(cos + aspect * sin, sin + aspect * cos)           # a rotated box's half-extent / radius
    reach = radius * size * torch.where(kind == 1, rect, torch.ones_like(rect)) + 1e-3   # pixels, with float slack
    if ratio is None:       # fewer, wider rungs for small batches, where each group's fixed cost dominates
        pixels = n * size * size
        ratio = 2.0 if pixels < 100_000 else 1.5 if pixels < 500_000 else 1.25
    ladder = window_ladder(size, ratio)
    if windows:     # pixel p can be covered when |p + 0.5 - c·S| <= reach: at most floor(2·reach) + 1 of them
        rung = torch.searchsorted(torch.tensor(ladder, device=device), (2 * reach).floor_().long().add_(1))
    else:
        rung = torch.full_like(kind, len(ladder))                           # past the ladder: the whole frame
    key = rung * 3 + kind
    perm = key.argsort(stable=True)
    counts = torch.bincount(key, minlength=3 * (len(ladder) + 1)).tolist()
    top = torch.zeros(n * size * size, dtype=dtype, device=device)
    table = torch.stack([shape["cy"].flatten(), shape["cx"].flatten(), radius, angle, aspect, reach])[:, perm]
    place = (perm // k) * (size * size)                                     # each shape's image in the label map
    paint_order = (perm % k + 1).to(dtype)
    start = 0
    for group, count in enumerate(counts):
        if not count:
            continue
        rows = slice(start, start + count)
        start += count
        width = ladder[group // 3] if group // 3 < len(ladder) else size
        cy, cx, r, a, aspect_, reach_ = table[:, rows]
        # first pixel of each window: the first that can be covered, moved inside the frame
        oy = (cy * size - reach_ - 0.5).ceil_().long().clamp_(0, size - width)
        ox = (cx * size - reach_ - 0.5).ceil_().long().clamp_(0, size - width)
        steps = torch.arange(width, device=device, dtype=torch.float32)[:, None]
        # Shapes run along the last dimension, so every op is one long vector loop however small
        # the window. Pixel centres exactly as pixel_grid computes them: windows and frames agree.
        dy = (steps + oy + 0.5).div_(size).sub_(cy)[:, None]                 # [W, 1, m]
        dx = (steps + ox + 0.5).div_(size).sub_(cx)[None]                    # [1, W, m]
        if group % 3 == 0:
            covered = (dy * dy) <= (r * r - dx * dx)          # one full-size op: [W, 1, m] against [1, W, m]
        elif group % 3 == 1:
            s, c = a.sin(), a.cos()
            covered = ((dx * c - dy * s).abs_() <= r) & ((dx * s + dy * c).abs_() <= r * aspect_)
        else:
            covered = triangle(dx, dy, a, r)
        paint = covered.view(torch.uint8).to(dtype).mul_(paint_order[rows])   # (torch.where: 100x slower here)
        # scattered window by window ([m, W, W]: neighbouring writes), twice as fast as [W, W, m]
        pattern = torch.arange(width, device=device)
        target = (place[rows] + oy * size + ox)[:, None, None] + (pattern[:, None] * size + pattern[None])
        top.scatter_reduce_(0, target.flatten(), paint.permute(2, 0, 1).flatten(), reduce="amax")
    return top.view(n, size * size)


@functools.cache
def window_ladder(size: int, ratio: float = 1.25) -> tuple[int, ...]:
    """Window widths for ``leaf_labels``, each about ``ratio`` × the last, below the frame's."""
    ladder, width = [], 1
    while width < size:
        ladder.append(width)
        width = max(width + 1, round(width * ratio))
    return tuple(ladder)


def triangle(dx: torch.Tensor, dy: torch.Tensor, angle: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Inside an equilateral triangle of circumradius ``radius`` rotated by ``angle``: three half-planes."""
    inside = None
    for k in range(3):
        theta = angle + k * 2 * math.pi / 3
        half_plane = dy * torch.sin(theta) <= radius / 2 - dx * torch.cos(theta)   # one full-size op
        inside = half_plane if inside is None else inside & half_plane
    return inside


def inverse_cdf_power3(u: torch.Tensor, r_min: float, r_max: float) -> torch.Tensor:
    """Samples of the density p(r) ∝ r⁻³ on [r_min, r_max] from uniforms ``u``."""
    a, b = r_min ** -2, r_max ** -2
    return (a - u * (a - b)) ** -0.5
