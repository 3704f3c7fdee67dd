"""Procedural image generators: batched torch functions of (seed, indices, size, device).

Every generator draws its per-image parameters from a random stream seeded by
``(generator, seed, index)`` alone, then renders the whole batch at once. So one image's pixels
depend only on its own ``(seed, index)``: the same image comes out whatever batch it is generated
in, in any process, on the same device type. Generators return float intensities
``[n, 3, size, size]``; ``render`` clamps them to [0, 1] and ``generate`` quantises to uint8.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from procdata.allocator import keep_heap

Generator = Callable[..., torch.Tensor]
GENERATORS: dict[str, Generator] = {}


def register(name: str):
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


def grouped(kinds: torch.Tensor, count: int) -> list[tuple[int, torch.Tensor]]:
    """The rows of each kind 0..count-1, for ops that only some images of a batch need."""
    return [(kind, (kinds == kind).nonzero().flatten()) for kind in range(count)]


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
    choice = torch.stack([torch.multinomial(p, points * iterations, replacement=True, generator=g)
                          for p, g in zip(prob, rngs)]).view(n, iterations, points)
    A, b, colours, choice = A.to(device), b.to(device), colours.to(device), choice.to(device)
    rows = torch.arange(n, device=device)[:, None]
    xy = torch.zeros(n, points, 2, device=device)
    trail = []
    for t in range(iterations):
        m = choice[:, t]                                                   # [n, P] map per point
        xy = torch.einsum("npij,npj->npi", A[rows, m], xy) + b[rows, m]
        if t >= burn_in:
            trail.append((xy, m))
    pts = torch.cat([p for p, _ in trail], 1)                              # [n, T·P, 2]
    col = colours[rows, torch.cat([m for _, m in trail], 1)]               # [n, T·P, 3]
    k = max(1, pts.shape[1] // 100)                                      # 1st and 99th percentiles: robust to stray points
    lo = pts.kthvalue(k, dim=1, keepdim=True).values
    hi = pts.kthvalue(pts.shape[1] - k + 1, dim=1, keepdim=True).values
    span = (hi - lo).amax(-1, keepdim=True).clamp_min(1e-6)
    centre = (hi + lo) / 2
    pix = ((pts - centre) / span * 0.9 + 0.5) * size
    inside = ((pix >= 0) & (pix < size)).all(-1)
    flat = (pix[..., 1].long().clamp(0, size - 1) * size + pix[..., 0].long().clamp(0, size - 1))
    flat = flat + rows * size * size
    weight = inside.float()
    count = torch.zeros(n * size * size, device=device).index_add_(0, flat.flatten(), weight.flatten())
    paint = torch.zeros(n * size * size, 3, device=device).index_add_(0, flat.flatten(), (col * weight[..., None]).flatten(0, 1))
    count, paint = count.view(n, size, size, 1), paint.view(n, size, size, 3)
    image = torch.where(count > 0, paint / count.clamp_min(1), background.to(device)[:, None, None, :])
    return image.permute(0, 3, 1, 2)


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
