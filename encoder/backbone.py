"""Backbones from timm, sized by an ArchConfig: a ViT with small patches (or a small convolutional
stem in their place), or a CIFAR-style ResNet.

Every backbone's ``forward`` gives the pooled feature DINO trains on (the normalised CLS token of
a ViT, the global average of a ResNet's last map); ``feature_map`` gives the spatial features
(patch tokens, or the last map) ``[n, h, w, d]``; ``embedding`` is what the memory stores: the
pooled feature, the mean feature of each cell of an N×N grid of the map (``readout="grid4"``), or
both (``"token+grid2"``), so that kNN sees where things are and not only what is there.
"""

from __future__ import annotations

import math

import timm.models.resnet as resnet
import timm.models.vision_transformer as vit
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, HybridEmbed, PatchEmbed

from encoder.config import ArchConfig, readout_parts


def build_backbone(arch: ArchConfig) -> nn.Module:
    """The timm network that ``arch`` describes (``arch.arch``: "vit" or "resnet")."""
    if arch.arch == "vit":
        return vit.VisionTransformer(
            img_size=arch.img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
            num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, num_classes=0, global_pool="token",
            dynamic_img_size=True, embed_layer=ConvStemEmbed if arch.stem == "conv" else PatchEmbed)
    if arch.arch == "resnet":
        return cifar_resnet(arch)
    raise ValueError(f"unknown architecture {arch.arch!r}; choose 'vit' or 'resnet'")


def ConvStemEmbed(img_size, patch_size: int, in_chans: int, embed_dim: int, **kwargs) -> HybridEmbed:
    """A ViT's patch embedding as a small convolutional stem (Xiao et al. 2021, "Early convolutions
    help transformers see better"): log2(patch_size) 3×3 stride-2 convolutions with BatchNorm and
    ReLU, widening to embed_dim / 2, then timm's 1×1 projection to embed_dim: the same token grid
    as patches of ``patch_size``, each token seeing its neighbours' pixels."""
    steps = int(math.log2(patch_size))
    if 2 ** steps != patch_size:
        raise ValueError(f"a conv stem needs a power-of-two patch_size, got {patch_size}")
    widths = [max(16, embed_dim // 2 ** (steps - i)) for i in range(1, steps + 1)]
    layers, channels = [], in_chans
    for width in widths:
        layers.append(ConvNormAct(channels, width, kernel_size=3, stride=2))
        channels = width
    return HybridEmbed(nn.Sequential(*layers), img_size=img_size, patch_size=1, in_chans=in_chans,
                       embed_dim=embed_dim, **kwargs)


def cifar_resnet(arch: ArchConfig) -> resnet.ResNet:
    """timm's ResNet of BasicBlocks with a CIFAR stem: one 3×3 convolution of stride
    ``arch.stem_stride`` and no max-pool, so that a 32-px image keeps a 4×4 map after four stages.
    Residual branches keep their random init (``zero_init_last=False``): a zeroed last BN makes
    every block the identity at first, and the kNN readout of a short run suffers from it."""
    widths, blocks = tuple(arch.widths), tuple(arch.blocks)
    net = resnet.ResNet(resnet.BasicBlock, layers=blocks, channels=widths, num_classes=0, global_pool="avg",
                        stem_type="deep", stem_width=widths[0] // 2, zero_init_last=False)
    # The deep stem makes bn1 and layer1 take widths[0] channels; one 3×3 convolution replaces its three.
    net.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=arch.stem_stride, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net


def pooled_and_map(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: the pooled feature ``[n, d]`` and the spatial features ``[n, d, h, w]``
    (a ViT's patch tokens with the prefix tokens dropped, or a ResNet's last map)."""
    if isinstance(model, vit.VisionTransformer):
        tokens = model.forward_features(x)
        h, w = model.patch_embed.dynamic_feat_size(x.shape[-2:])
        grid = tokens[:, model.num_prefix_tokens:].reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return model.forward_head(tokens, pre_logits=True), grid
    grid = model.forward_features(x)
    return model.forward_head(grid, pre_logits=True), grid


def feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Spatial features ``[n, h, w, d]`` (``pooled_and_map``'s map, channels last)."""
    return pooled_and_map(model, x)[1].permute(0, 2, 3, 1)


def embedding(model: nn.Module, x: torch.Tensor, readout: str) -> torch.Tensor:
    """What the memory stores for input ``x`` (``encoder.config.readout_parts``): ``"token"`` is the
    pooled feature as the network gives it; otherwise each part, the L2-normalised pooled feature
    or the N×N cell means of the map each L2-normalised, is scaled to unit length (a grid by 1/N)
    and the parts are concatenated, so that every part weighs the same in a cosine."""
    parts = readout_parts(readout)
    if parts == [0]:
        return model(x)
    pooled, grid = pooled_and_map(model, x)
    out = []
    for n in parts:
        if n == 0:
            out.append(F.normalize(pooled.float(), dim=-1))
        else:
            cells = F.normalize(F.adaptive_avg_pool2d(grid.float(), n).flatten(2), dim=1)     # [b, d, n·n]
            out.append(cells.transpose(1, 2).flatten(1) / n)
    return torch.cat(out, dim=1)


def embedding_dim(arch: ArchConfig) -> int:
    """The length of ``embedding``'s vectors for ``arch``."""
    return arch.embed_dim * sum(n * n if n else 1 for n in readout_parts(arch.readout))
