"""DINO's loss pieces: Sinkhorn-Knopp centring, KoLeo, and the precision choice of the trainer."""

import pytest
import torch
import torch.nn.functional as F

from encoder.dino import DINOLoss, koleo, sinkhorn_knopp
from encoder.loop import autocast_dtype


def collapsing_teacher(batch=32, prototypes=64, seed=0):
    """Teacher logits (cosines) that all favour prototype 0: the collapse DINO must avoid."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(batch, prototypes, generator=g) * 0.2
    logits[:, 0] += 0.5
    return logits


def test_sinkhorn_spreads_a_collapsing_teacher_over_the_prototypes():
    logits = collapsing_teacher()
    softmax = F.softmax(logits / 0.05, dim=-1)
    balanced = sinkhorn_knopp(logits, 0.05)
    batch, prototypes = logits.shape
    assert torch.allclose(balanced.sum(1), torch.ones(batch), atol=1e-5)      # one target per image
    assert softmax.sum(0)[0] > 0.9 * batch                                     # softmax: all on one
    mass = balanced.sum(0)
    assert mass.max() < 2.5 * batch / prototypes                               # Sinkhorn: near uniform
    assert (mass > 0.2 * batch / prototypes).all()


def test_loss_uses_the_chosen_centering():
    logits = collapsing_teacher(batch=16, prototypes=32)
    student = torch.randn(4 * 16, 32)
    teacher = torch.cat([logits, logits.flip(0)])
    mean = DINOLoss(32, 4, centering="mean")(student, teacher, 0.05)
    sinkhorn = DINOLoss(32, 4, centering="sinkhorn")(student, teacher, 0.05)
    assert torch.isfinite(mean) and torch.isfinite(sinkhorn) and not torch.isclose(mean, sinkhorn)
    with pytest.raises(ValueError, match="unknown centering 'sk'"):
        DINOLoss(32, 4, centering="sk")


def test_koleo_is_lower_for_spread_features():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 16, generator=g)
    clumped = torch.randn(1, 16, generator=g) + 0.01 * torch.randn(64, 16, generator=g)
    assert koleo(spread) < koleo(clumped)
    spread.requires_grad_(True)
    koleo(spread).backward()
    assert torch.isfinite(spread.grad).all()


def test_precision_choice():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None)
    assert autocast_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        autocast_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        autocast_dtype("half", cpu)


def test_saturation_jitter_keeps_the_luma_of_the_image_it_is_given():
    """The saturation step blends toward the grey of the brightened image, not of the input: the
    output's luma is the brightness factor times the input's (no hue, no contrast, no clamping)."""
    from encoder.augment import colour_jitter, luminance
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.1
    out = colour_jitter(x, torch.Generator().manual_seed(0), p=1.0, brightness=0.4, contrast=0.0, saturation=0.2,
                        hue_shift=0.0)
    brightness = 1 + torch.empty(16).uniform_(-0.4, 0.4, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out, x)
    torch.testing.assert_close(luminance(out), luminance(x) * brightness[:, None, None, None], atol=1e-5, rtol=1e-5)
