"""ViT backbones from timm, sized by an ArchConfig (small patches for small images)."""

from __future__ import annotations

import timm.models.vision_transformer as vit
import torch

from encoder.config import ArchConfig


def build_backbone(arch: ArchConfig) -> vit.VisionTransformer:
    """A timm VisionTransformer whose ``forward`` gives the normalised CLS token ``[n, embed_dim]``
    and whose ``forward_features`` gives all tokens (CLS first, then the patch grid)."""
    if arch.arch != "vit":
        raise ValueError(f"unknown architecture {arch.arch!r}; only 'vit' is supported")
    return vit.VisionTransformer(
        img_size=arch.img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
        num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, num_classes=0, global_pool="token",
        dynamic_img_size=True)


def patch_tokens(model: vit.VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Patch embeddings ``[n, h, w, d]`` (prefix tokens dropped)."""
    tokens = model.forward_features(x)[:, model.num_prefix_tokens:]
    h, w = x.shape[-2] // model.patch_embed.patch_size[0], x.shape[-1] // model.patch_embed.patch_size[1]
    return tokens.reshape(x.shape[0], h, w, -1)
