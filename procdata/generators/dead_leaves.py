"""Dead leaves: occluding shapes with a scale-invariant radius law."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from procdata.generators.registry import register
from procdata.generators.streams import grouped, image_normals, image_rngs, per_image, pixel_grid


@register("dead_leaves")
def dead_leaves(seed: int, indices: Sequence[int], size: int, device: torch.device,
                shapes: int = 48, r_min: float = 0.03, r_max: float = 1.0, texture: float = 0.15,
                full_frame: int = 8) -> torch.Tensor:
    """Occluding discs, rotated rectangles and triangles with radius density ∝ r⁻³ on
    [r_min, r_max]·size.

    Shapes are painted back to front, so each pixel shows the last shape that covers it; the
    radius law makes the image statistics scale-invariant, as in natural images. Most shapes are
    small under that law, so only each image's ``full_frame`` largest shapes are tested against
    every pixel; the rest only against a window just large enough for the largest of them. The
    pixels are the same as testing every shape everywhere.
    """
    rngs = image_rngs("dead_leaves", seed, indices)
    n = len(indices)
    u = per_image(rngs, (shapes, 8))
    params = {"radius": inverse_cdf_power3(u[..., 0], r_min, r_max),   # [n, K], fraction of size
              "cy": u[..., 1], "cx": u[..., 2], "angle": u[..., 3] * math.pi, "aspect": 0.3 + 0.7 * u[..., 4],
              "kind": (u[..., 5] * 3).long(),                           # 0 disc, 1 rectangle, 2 triangle
              "order": torch.arange(1, shapes + 1).expand(n, -1)}       # painting order, 0 = background
    colours = per_image(rngs, (shapes, 3))
    background = per_image(rngs, (3,))
    noise = image_normals("dead_leaves", seed, indices, (3, size, size), device)
    params = {k: v.to(device) for k, v in params.items()}

    by_size = params["radius"].argsort(dim=1, descending=True)
    big = {k: v.gather(1, by_size[:, :full_frame]) for k, v in params.items()}
    small = {k: v.gather(1, by_size[:, full_frame:]) for k, v in params.items()}
    y, x = pixel_grid(size, device)
    top = topmost(big, y, x).amax(dim=1).flatten(1)                     # [n, S·S]
    if small["radius"].numel():
        paint_small_shapes(top, small, size)
    palette = torch.cat([background[:, None], colours], dim=1).to(device)  # [n, K+1, 3]
    image = torch.gather(palette, 1, top[..., None].expand(-1, -1, 3))
    image = image.view(n, size, size, 3).permute(0, 3, 1, 2)
    return image + texture * 0.25 * noise


def topmost(shape: dict, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each shape's painting order where it covers pixel centres (y, x), else 0: ``[n, K, H, W]``.

    ``y`` and ``x`` are one grid for every shape (``[1, 1, H, 1|W]``) or one window per shape
    (``[n, K, H, 1|W]``). Each kind's test runs on the shapes of that kind only (a third of the
    work of testing all three kinds everywhere and selecting: this is dead leaves' hot loop)."""
    n, k = shape["radius"].shape
    flat = {key: value.reshape(n * k) for key, value in shape.items()}
    shared = y.shape[0] == 1 and y.shape[1] == 1
    y, x = (y[0], x[0]) if shared else (y.reshape(n * k, *y.shape[2:]), x.reshape(n * k, *x.shape[2:]))
    height, width = torch.broadcast_shapes(y.shape[-2:], x.shape[-2:])
    out = torch.zeros(n * k, height, width, dtype=flat["order"].dtype, device=flat["order"].device)
    for kind, rows in grouped(flat["kind"], 3):
        if not len(rows):
            continue
        radius, cy, cx, angle, aspect, order = (flat[key][rows][:, None, None] for key in
                                                ("radius", "cy", "cx", "angle", "aspect", "order"))
        dy, dx = (y if shared else y[rows]) - cy, (x if shared else x[rows]) - cx
        if kind == 0:
            covered = dx * dx + dy * dy <= radius * radius
        elif kind == 1:
            ry = (dx * torch.sin(angle) + dy * torch.cos(angle)).abs()
            rx = (dx * torch.cos(angle) - dy * torch.sin(angle)).abs()
            covered = (rx <= radius) & (ry <= radius * aspect)
        else:
            covered = triangle(dx, dy, angle, radius)
        out[rows] = covered * order
    return out.view(n, k, height, width)


def paint_small_shapes(top: torch.Tensor, shape: dict, size: int) -> None:
    """Raise ``top`` [n, S·S] to each shape's order where it covers, testing only a square window
    around each shape that holds it whole (a rectangle reaches √2·radius from its centre)."""
    half = math.ceil(math.sqrt(2) * float(shape["radius"].max()) * size) + 1
    offsets = torch.arange(-half, half + 1, device=top.device)
    py = (shape["cy"] * size).floor().long()[..., None, None] + offsets[:, None]      # [n, K, W, 1]
    px = (shape["cx"] * size).floor().long()[..., None, None] + offsets[None, :]      # [n, K, 1, W]
    # pixel centres computed exactly as pixel_grid does, so coverage matches the full-frame test
    y, x = (py.float() + 0.5) / size, (px.float() + 0.5) / size
    paint = topmost(shape, y, x)                                                       # [n, K, W, W]
    inside = (py >= 0) & (py < size) & (px >= 0) & (px < size)
    target = (py.clamp(0, size - 1) * size + px.clamp(0, size - 1)).expand_as(paint)
    top.scatter_reduce_(1, target.flatten(1), (paint * inside).flatten(1), reduce="amax")


def triangle(dx: torch.Tensor, dy: torch.Tensor, angle: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Inside an equilateral triangle of circumradius ``radius`` rotated by ``angle``: three half-planes."""
    inside = None
    for k in range(3):
        theta = angle + k * 2 * math.pi / 3
        half_plane = dx * torch.cos(theta) + dy * torch.sin(theta) <= radius / 2
        inside = half_plane if inside is None else inside & half_plane
    return inside


def inverse_cdf_power3(u: torch.Tensor, r_min: float, r_max: float) -> torch.Tensor:
    """Samples of the density p(r) ∝ r⁻³ on [r_min, r_max] from uniforms ``u``."""
    a, b = r_min ** -2, r_max ** -2
    return (a - u * (a - b)) ** -0.5
