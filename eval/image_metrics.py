"""Full-reference image similarity without a network: PSNR and SSIM, the pixel baselines of the
2AFC similarity evaluation (``eval.similarity``).

SSIM is written out here because no library in the project's environment has it (no
scikit-image, torchmetrics, kornia or pytorch-msssim). It is Wang et al. 2004's index as they
define it: an 11 × 11 Gaussian window with σ = 1.5, C1 = (0.01 L)², C2 = (0.03 L)² for the data
range L = 1, computed per channel over the window positions that fit inside the image ("valid",
no padding, as pytorch-msssim does), then averaged over positions and channels. Images smaller
than the window use the largest odd window that fits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, 3, H, W]`` → float64 in [0, 1] (float input is taken as already in [0, 1])."""
    return x.double() / 255 if x.dtype == torch.uint8 else x.double()


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image ``[n]``, intensities in [0, 1]."""
    return ((as_float(a) - as_float(b)) ** 2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB (data range 1; identical images give inf)."""
    return 10 * torch.log10(1 / mse(a, b))


def gaussian_window(size: int, sigma: float = SIGMA) -> torch.Tensor:
    """The normalised ``size`` × ``size`` Gaussian window, float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """Mean SSIM per image ``[n]`` of two batches ``[n, C, H, W]`` (uint8, or float in [0, 1])."""
    a, b = as_float(a), as_float(b)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"SSIM compares two batches of one shape [n, C, H, W], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    size = min(window, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2                                   # odd, so the window has a centre
    channels = a.shape[1]
    w = gaussian_window(size).to(a.device)[None, None].expand(channels, 1, size, size)

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=channels)

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a ** 2
    var_b = local_mean(b * b) - mu_b ** 2
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = K1 ** 2, K2 ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(1)
