"""Baselines that learn nothing, as modules the ``Encoder`` runs like any backbone.

``ColourHistogram`` is the floor a learned encoder must clear by more than colour: a joint RGB
histogram carries no layout and no shape at all.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ColourHistogram(nn.Module):
    """Intensities in [0, 1] ``[n, 3, H, W]`` → the joint RGB histogram with ``bins`` levels a
    channel (``bins**3`` cells), as the square roots of the cell frequencies: the cosine of two
    such vectors is the Bhattacharyya coefficient of the two colour distributions."""

    def __init__(self, bins: int = 4):
        super().__init__()
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = (x.clamp(0, 1) * self.bins).long().clamp(max=self.bins - 1)          # [n, 3, H, W]
        cells = (levels[:, 0] * self.bins + levels[:, 1]) * self.bins + levels[:, 2]
        counts = F.one_hot(cells.flatten(1), self.bins ** 3).sum(1).float()
        return (counts / cells[0].numel()).sqrt()
