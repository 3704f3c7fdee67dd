"""Every preset trains through the one DINO loop, checkpoints, resumes and embeds through the one
Encoder path; the layout-keeping readout is what its docstring says; bad architectures name themselves."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoder import Encoder
from encoder.backbone import build_backbone, embedding, embedding_dim, feature_map
from encoder.config import PRESETS, ArchConfig, preset
from encoder.local import train_local


def small(name: str, **overrides):
    """Preset ``name`` with its network unchanged and a batch small enough for a unit test."""
    return dataclasses.replace(preset(name, batch_size=4, max_steps=2, checkpoint_every=1, log_every=1000,
                                      generators=("shader", "dead_leaves"), precision="fp32", **overrides),
                               max_minutes=None)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_resumes_and_embeds_through_one_path(name, tmp_path):
    cfg = small(name)
    if cfg.arch.img_size > 64:                   # the 224-px ViT recipes: same loop, network shrunk to fit a test
        cfg = dataclasses.replace(cfg, arch=dataclasses.replace(cfg.arch, depth=1), local_crops=2, out_dim=256,
                                  head_hidden=64, head_bottleneck=32)
    out = str(tmp_path / "run")
    first: dict = {}
    train_local(cfg, out, device="cpu", result_metrics=first)
    metrics: dict = {}
    url = train_local(dataclasses.replace(cfg, max_steps=3), out, resume=True, device="cpu", result_metrics=metrics)
    assert first["step"] == 2 and metrics["resumed_from"] == 2 and metrics["step"] == 3

    with open(os.path.join(url, "provenance.json")) as f:
        provenance = json.load(f)
    assert provenance["data"] == "procedural only" and provenance["preset"] == name and provenance["steps"] == 3
    encoder = Encoder.load(url, device="cpu")
    assert encoder.arch == cfg.arch
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    vectors = encoder.embed(images)
    assert vectors.shape == (5, encoder.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.isfinite(vectors).all() and not np.allclose(vectors[0], vectors[1])


@pytest.mark.parametrize("name", ["tiny-cpu", "resnet-cpu"])
@pytest.mark.parametrize("readout, parts", [("token+grid2", (0, 2)), ("grid4", (4,)), ("token+grid4", (0, 4))])
def test_a_readout_weighs_each_of_its_parts_equally(name, readout, parts):
    """cos(embedding) = the mean over its parts of the part's cosine: the pooled feature's, or for an
    N×N grid the mean over its cells of cos(cell mean of the map)."""
    arch = dataclasses.replace(preset(name).arch, readout=readout)
    torch.manual_seed(0)
    model = build_backbone(arch).eval()
    x, y = torch.randn(2, 3, 32, 32).chunk(2)
    with torch.no_grad():
        ex, ey = (F.normalize(embedding(model, v, arch.readout), dim=-1) for v in (x, y))
        part_cos = []
        for n in parts:
            if n == 0:
                part_cos.append(F.cosine_similarity(model(x), model(y)).item())
            else:
                cells = [F.adaptive_avg_pool2d(feature_map(model, v).permute(0, 3, 1, 2), n).flatten(2) for v in (x, y)]
                part_cos.append(F.cosine_similarity(cells[0], cells[1], dim=1).mean().item())
    assert ex.shape[1] == embedding_dim(arch) == sum(n * n or 1 for n in parts) * arch.embed_dim
    assert (ex * ey).sum().item() == pytest.approx(np.mean(part_cos), abs=1e-5)


def test_tiny_cpu_stores_its_patch_grid_and_old_checkpoints_keep_their_token():
    assert preset("tiny-cpu").arch.readout == "grid4" and preset("tiny-cpu").natural_images
    assert ArchConfig.from_dict({k: v for k, v in dataclasses.asdict(preset("tiny-cpu").arch).items()
                                 if k != "readout"}).readout == "token"


def test_random_init_resnet_embeds_with_its_readout():
    encoder = Encoder.load("random-init:resnet-cpu", device="cpu")
    assert encoder.dim == 128 and encoder.embed(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 128)
    assert encoder.embed_patches(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 4, 4, 128)


@pytest.mark.parametrize("fields, message", [
    ({"arch": "resnet", "widths": [16, 32, 64], "blocks": [1, 1, 1], "embed_dim": 64}, "four stages"),
    ({"arch": "resnet", "widths": [16, 32, 64, 128], "blocks": [1, 1, 1, 1], "embed_dim": 64}, "last width 128"),
    ({"arch": "convnext"}, "unknown architecture 'convnext'"),
    ({"readout": "grid"}, "unknown readout 'grid'"),
    ({"readout": "token+grid0"}, "unknown readout 'token\\+grid0'"),
    ({"stem": "deep"}, "unknown stem 'deep'"),
    ({"stem": "conv", "patch_size": 6, "img_size": 36}, "power-of-two patch_size, got 6"),
])
def test_bad_architectures_name_the_field(fields, message):
    data = {**dataclasses.asdict(ArchConfig()), **fields}
    with pytest.raises(ValueError, match=message):
        ArchConfig.from_dict(data, "ckpt/config.json")


def test_a_trained_network_can_be_read_out_with_its_grid():
    token = Encoder.load("random-init:resnet-cpu", device="cpu")
    grid = token.with_readout("token+grid2")
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert grid.dim == 5 * token.dim and grid.sha256 != token.sha256 and grid.name.endswith("#token+grid2")
    pooled = grid.embed(images)[:, :token.dim] * np.sqrt(2)          # the pooled half, before the joint norm
    np.testing.assert_allclose(pooled, token.embed(images), atol=1e-5)
    with pytest.raises(ValueError, match="one readout only"):
        Encoder.load("raw-pixels:8").with_readout("token+grid2")


def test_a_vit_with_a_conv_stem_trains_and_keeps_the_patch_grid(tmp_path):
    cfg = small("tiny-cpu", arch={"stem": "conv", "depth": 1}, local_size=24)
    url = train_local(cfg, str(tmp_path / "run"), device="cpu")
    encoder = Encoder.load(url, device="cpu")
    assert encoder.arch.stem == "conv" and any("patch_embed.backbone" in k for k in encoder.model.state_dict())
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert encoder.embed(images).shape == (2, 16 * 192)                  # tiny-cpu's grid4 readout
    assert encoder.embed_patches(images).shape == (2, 4, 4, 192)
