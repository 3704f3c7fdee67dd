"""DINO's head, loss and schedules (after facebookresearch/dino's main_dino.py), with two of
DINOv2's additions as options: Sinkhorn-Knopp centring of the teacher and the KoLeo regulariser."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class DINOHead(nn.Module):
    """MLP → L2-normalised bottleneck → weight-normalised prototypes (out_dim logits)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        self.last_layer.parametrizations.weight.original0.data.fill_(1)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per crop resolution and the head on all CLS tokens together."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor], with_features: bool = False):
        """Head outputs of every crop; with ``with_features`` also the backbone's CLS tokens."""
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
        start, feats = 0, []
        for end in ends.tolist():
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        features = torch.cat(feats)
        out = self.head(features)
        return (out, features) if with_features else out


CENTERINGS = ("mean", "sinkhorn")


def check_centering(centering: str) -> None:
    if centering not in CENTERINGS:
        raise ValueError(f"unknown centering {centering!r}; choose one of: {', '.join(CENTERINGS)}")


class DINOLoss(nn.Module):
    """Cross-entropy between sharpened, centred teacher outputs on the global crops and student
    outputs on every other crop. ``centering="mean"`` subtracts an EMA of teacher outputs across
    all workers (DINO); ``"sinkhorn"`` makes the teacher's batch assignment to prototypes uniform
    with three Sinkhorn-Knopp iterations (DINOv2), which keeps small batches from collapsing onto
    a few prototypes."""

    def __init__(self, out_dim: int, n_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "mean"):
        super().__init__()
        check_centering(centering)
        self.n_crops, self.student_temp, self.center_momentum = n_crops, student_temp, center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_targets(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher_out, teacher_temp)
        return F.softmax((teacher_out - self.center) / teacher_temp, dim=-1)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        student = (student_out / self.student_temp).chunk(self.n_crops)
        teacher = self.teacher_targets(teacher_out, teacher_temp).detach().chunk(2)
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        if self.centering == "mean":
            self.update_center(teacher_out)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.sum(0, keepdim=True)
        count = torch.tensor([teacher_out.shape[0]], device=teacher_out.device, dtype=torch.float32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1 - self.center_momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_out: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets ``[B, K]`` whose prototype marginals over the global batch are uniform."""
    distributed = dist.is_available() and dist.is_initialized()
    logits = teacher_out.float() / teacher_temp
    shift = logits.max()
    if distributed:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)     # one scale on every worker
    q = torch.exp(logits - shift).t()                    # [K, B]
    prototypes, batch = q.shape[0], q.shape[1] * (dist.get_world_size() if distributed else 1)
    total = q.sum()
    if distributed:
        dist.all_reduce(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(1, keepdim=True)
        if distributed:
            dist.all_reduce(rows)
        q /= rows * prototypes
        q /= q.sum(0, keepdim=True) * batch
    return (q * batch).t()


def koleo(features: torch.Tensor) -> torch.Tensor:
    """KoLeo regulariser (DINOv2): minus the mean log distance from each L2-normalised feature to
    its nearest neighbour in the batch. It spreads the embeddings that kNN search compares."""
    x = F.normalize(features.float(), dim=-1)
    similarity = x @ x.t()
    similarity.fill_diagonal_(-2.0)
    nearest = similarity.argmax(1)
    return -torch.log(F.pairwise_distance(x, x[nearest]) + 1e-8).mean()


def cosine(progress: float, start: float, end: float, warmup: float = 0.0, warmup_start: float = 0.0) -> float:
    """Cosine from ``start`` to ``end`` over progress in [0, 1], after a linear warm-up fraction."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return warmup_start + (start - warmup_start) * progress / warmup
    t = (progress - warmup) / max(1e-8, 1 - warmup)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weights only, not on biases and norms (as DINO does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
