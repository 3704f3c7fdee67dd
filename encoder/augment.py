"""DINO multi-crop augmentation, done for the whole batch at once on the training device.

torchvision's v2 transforms draw one set of random parameters per call; here every image gets
its own crop box (batched through ``torchvision.ops.roi_align``), flip, colour jitter,
grey-scale, blur and solarisation, as ``main_dino.py``'s DataAugmentationDINO does per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def random_boxes(n: int, height: int, width: int, scale: tuple[float, float], g: torch.Generator,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop boxes ``[n, 4]`` (x1, y1, x2, y2) in pixels, one per image."""
    area = torch.empty(n).uniform_(*scale, generator=g) * height * width
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).clamp(1, width)
    h = torch.sqrt(area / aspect).clamp(1, height)
    x1 = torch.rand(n, generator=g) * (width - w)
    y1 = torch.rand(n, generator=g) * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], 1)


def resized_crops(images: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    n, _, height, width = images.shape
    boxes = random_boxes(n, height, width, scale, g).to(images.device)
    rois = torch.cat([torch.arange(n, device=images.device, dtype=images.dtype)[:, None], boxes], 1)
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def chance(n: int, p: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g) < p).to(device)[:, None, None, None]


def luminance(x: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma ``[n, 1, H, W]`` of RGB ``[n, 3, H, W]`` (torchvision's grey-scale weights)."""
    return x.mul(torch.tensor([0.299, 0.587, 0.114], device=x.device)[None, :, None, None]).sum(1, keepdim=True)


def colour_jitter(x: torch.Tensor, g: torch.Generator, p: float = 0.8, brightness: float = 0.4,
                  contrast: float = 0.4, saturation: float = 0.2, hue_shift: float = 0.1) -> torch.Tensor:
    """Brightness, contrast, saturation and a hue-like channel rotation, per image, with prob p;
    DINO's strengths (ColorJitter(0.4, 0.4, 0.2, 0.1)). Each step works on the image the previous
    step made: saturation blends toward the grey of the brightened, contrasted image."""
    n, device = x.shape[0], x.device

    def factor(s):
        return (1 + torch.empty(n).uniform_(-s, s, generator=g)).to(device)[:, None, None, None]

    y = x * factor(brightness)
    y = (y - y.mean((1, 2, 3), keepdim=True)) * factor(contrast) + y.mean((1, 2, 3), keepdim=True)
    grey = luminance(y)
    y = (y - grey) * factor(saturation) + grey
    theta = (torch.empty(n).uniform_(-hue_shift, hue_shift, generator=g) * 2 * math.pi).to(device)
    y = rotate_hue(y, theta)
    return torch.where(chance(n, p, g, device), y.clamp(0, 1), x)


def rotate_hue(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate colours about the grey axis by ``theta`` radians per image (a YIQ-space hue shift)."""
    cos, sin = torch.cos(theta), torch.sin(theta)
    k = 1 / 3
    s3 = math.sqrt(1 / 3)
    # Rodrigues rotation about (1,1,1)/√3, batched: [n, 3, 3]
    m = torch.stack([
        torch.stack([cos + (1 - cos) * k, (1 - cos) * k - s3 * sin, (1 - cos) * k + s3 * sin], -1),
        torch.stack([(1 - cos) * k + s3 * sin, cos + (1 - cos) * k, (1 - cos) * k - s3 * sin], -1),
        torch.stack([(1 - cos) * k - s3 * sin, (1 - cos) * k + s3 * sin, cos + (1 - cos) * k], -1),
    ], 1)
    return torch.einsum("nij,njhw->nihw", m, x)


def gaussian_blur(x: torch.Tensor, g: torch.Generator, p: float, sigma: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    n, c, h, w = x.shape
    if p <= 0:
        return x
    radius = max(1, min(h, w) // 8)
    # sigma is in 224-px pixels, as in DINO; smaller crops get proportionally less blur
    s = torch.empty(n).uniform_(*sigma, generator=g).to(x.device) * min(1.0, h / 224)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * s[:, None].clamp_min(0.1) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)                                   # [n, K]
    flat = x.reshape(1, n * c, h, w)
    k = kernel.repeat_interleave(c, 0)
    y = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * c)
    return torch.where(chance(n, p, g, x.device), y.view(n, c, h, w), x)


def view(images: torch.Tensor, size: int, scale, g: torch.Generator, blur: float, solarize: float) -> torch.Tensor:
    n, device = images.shape[0], images.device
    x = resized_crops(images, size, scale, g)
    x = torch.where(chance(n, 0.5, g, device), x.flip(-1), x)
    x = colour_jitter(x, g)
    x = torch.where(chance(n, 0.2, g, device), luminance(x).expand_as(x), x)
    x = gaussian_blur(x, g, blur)
    x = torch.where(chance(n, solarize, g, device) & (x >= 0.5), 1 - x, x)
    return x


def multi_crop(images: torch.Tensor, global_size: int, global_scale, local_size: int, local_scale,
               local_crops: int, mean, std, g: torch.Generator) -> list[torch.Tensor]:
    """DINO's views of a uint8 batch: 2 global crops (blur 1.0 / 0.1, solarise 0 / 0.2), then
    ``local_crops`` local crops (blur 0.5); each normalised by ``mean`` and ``std``."""
    x = images.float() / 255
    mean = torch.tensor(mean, device=x.device)[None, :, None, None]
    std = torch.tensor(std, device=x.device)[None, :, None, None]
    views = [view(x, global_size, global_scale, g, 1.0, 0.0), view(x, global_size, global_scale, g, 0.1, 0.2)]
    views += [view(x, local_size, local_scale, g, 0.5, 0.0) for _ in range(local_crops)]
    return [(v - mean) / std for v in views]
