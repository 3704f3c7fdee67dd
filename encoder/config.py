"""Encoder and DINO training configuration: one dataclass, named presets, laptop defaults.

``tiny-cpu`` is what trains in minutes on two CPU cores; ``vit-s16`` is the source paper's recipe
(DINO ViT-S/16, 224 px, 2×224 + 8×96 crops, output dimension 65536).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


# What the memory stores (encoder.backbone.embedding): "+"-joined parts, each "token" (the pooled
# feature) or "gridN" (the map averaged over an N×N grid of cells, each cell its own unit vector).
READOUTS = ("token", "token+grid2", "token+grid4", "grid2", "grid4")


def readout_parts(readout: str) -> list[int]:
    """The parts of a readout in order: 0 for the pooled feature, N for an N×N grid of the map."""
    parts = []
    for part in readout.split("+"):
        if part == "token":
            parts.append(0)
        elif part.startswith("grid") and part[4:].isdigit() and 1 <= int(part[4:]) <= 16:
            parts.append(int(part[4:]))
        else:
            raise ValueError(f"unknown readout {readout!r}; choose one of: {', '.join(READOUTS)}")
    return parts


@dataclass
class ArchConfig:
    """What ``config.json`` of an encoder checkpoint holds: enough to rebuild the backbone.

    ``arch="vit"`` uses patch_size, embed_dim, depth, num_heads, mlp_ratio and stem; ``arch="resnet"``
    uses widths and blocks (four stages of BasicBlocks) and stem_stride, and its embed_dim is the
    last stage's width. ``readout`` is what the memory stores (encoder.backbone.embedding)."""

    arch: str = "vit"
    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    stem: str = "patch"              # ViT: "patch" (one linear map a patch) or "conv" (3×3 stride-2 convolutions)
    widths: tuple[int, ...] = ()
    blocks: tuple[int, ...] = ()
    stem_stride: int = 1
    # "token": CLS / global average; "gridN": the map pooled to N×N cells; "token+gridN": both. The
    # default stays "token" so that a checkpoint written before the field existed reads as it was.
    readout: str = "token"
    crop_ratio: float = 1.0          # resize to img_size / crop_ratio, then centre-crop img_size
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "ArchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [name for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads") if name not in data]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}; is this a vismem encoder checkpoint?")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)}")
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        cfg.check(source)
        return cfg

    def check(self, source: str = "config") -> None:
        """The choices that would fail later inside timm, named here."""
        try:
            readout_parts(self.readout)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        if self.arch == "resnet":
            if len(self.widths) != 4 or len(self.blocks) != 4 or self.widths[0] % 2:
                raise ValueError(f"{source}: a resnet takes four stages: widths (the first even) and blocks, "
                                 f"got widths {list(self.widths)} and blocks {list(self.blocks)}")
            if self.embed_dim != self.widths[-1]:
                raise ValueError(f"{source}: a resnet's embed_dim is its last width {self.widths[-1]}, "
                                 f"got {self.embed_dim}")
            if self.stem_stride not in (1, 2):
                raise ValueError(f"{source}: stem_stride must be 1 or 2, got {self.stem_stride}")
            return
        if self.arch != "vit":
            raise ValueError(f"{source}: unknown architecture {self.arch!r}; choose 'vit' or 'resnet'")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"{source}: unknown stem {self.stem!r}; choose 'patch' or 'conv'")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"{source}: a conv stem needs a power-of-two patch_size, got {self.patch_size}")
        if self.img_size % self.patch_size:
            raise ValueError(f"{source}: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{source}: embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")


@dataclass
class TrainConfig:
    """DINO on procedural data. Schedules run over ``progress`` in [0, 1]: the larger of
    step / max_steps and elapsed / (max_minutes), so a time-budgeted run still anneals fully."""

    preset: str = "tiny-cpu"
    # tiny-cpu reads out its 4×4 patch grid: 55.5% CIFAR-10 kNN where its CLS token gives 38.0%
    # (eval/results/cpu_tiny_readouts_2026-12-03.json).
    arch: ArchConfig = field(default_factory=lambda: ArchConfig(readout="grid4"))
    # data
    # expression joined at no measured cost (eval/results/cpu_tiny_expression_2026-12-04.json)
    generators: tuple[str, ...] = ("kml_mixup", "shader", "dead_leaves", "fractal", "spectral", "expression")
    natural_images: bool = True           # procdata.generators.render_natural: natural colour and spectrum statistics
    real_data: str | None = None          # set by eval.real_control: the real-data control run
    seed: int = 0
    batch_size: int = 64                 # per worker
    # budget: whichever comes first
    max_steps: int = 100_000
    max_minutes: float | None = 3.0
    # DINO
    out_dim: int = 1024
    head_hidden: int = 512
    head_bottleneck: int = 128
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 4
    local_size: int = 16
    local_crop_scale: tuple[float, float] = (0.1, 0.4)
    student_temp: float = 0.1
    teacher_temp: float = 0.05
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup: float = 0.3     # fraction of the run
    center_momentum: float = 0.9
    # Batches of 64 on a CPU collapse DINO's mean centring onto a few prototypes (or to uniform);
    # Sinkhorn-Knopp keeps all 1024 in use and KoLeo spreads the CLS tokens kNN compares:
    # +4 points of CIFAR-10 kNN over mean centring in 6-minute runs (README, "encoder recipe").
    centering: str = "sinkhorn"          # "mean": DINO's EMA centre; "sinkhorn": DINOv2's Sinkhorn-Knopp
    koleo_weight: float = 0.1            # DINOv2's KoLeo regulariser on the student's global-crop CLS tokens
    momentum_teacher: float = 0.99        # short CPU runs: the teacher must follow within ~100 steps
    # optimisation
    lr: float = 2e-3                     # at batch 256; scaled by global batch / 256
    min_lr: float = 1e-6
    warmup: float = 0.2                  # fraction of the run
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer: float = 0.05      # fraction of the run
    # runtime
    precision: str = "auto"              # auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2            # the newest kept; 0 keeps all (a curve of quality against steps)
    log_every: int = 20

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        arch = ArchConfig.from_dict(data.pop("arch"), "train config")
        return cls(arch=arch, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# The source paper's recipe at 224 px (ViT-S/16); vit-t16 is the same with a ViT-Tiny backbone.
PAPER = TrainConfig(
    preset="vit-s16",
    arch=ArchConfig(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, crop_ratio=224 / 256,
                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    out_dim=65536, head_hidden=2048, head_bottleneck=256, local_crops=8, local_size=96, local_crop_scale=(0.05, 0.4),
    batch_size=64, max_minutes=None, use_gpu=True, checkpoint_every=1000, log_every=50, freeze_last_layer=0.01,
    teacher_temp=0.04, warmup_teacher_temp=0.04, centering="mean", koleo_weight=0.0, momentum_teacher=0.996,
    lr=5e-4, warmup=0.1)

# CIFAR-style ResNets (3×3 stem, no max-pool) through the same DINO loop. resnet18-cifar is the
# network of the strong public CIFAR self-supervised recipes (solo-learn, lightly: ResNet-18, two
# 32-px crops, batch 256, EMA 0.99 → 1) for a GPU; resnet-cpu is a quarter of its width with one
# block a stage, sized to train on two CPU cores.
RESNET18_CIFAR = TrainConfig(
    preset="resnet18-cifar",
    arch=ArchConfig(arch="resnet", img_size=32, patch_size=1, embed_dim=512, depth=0, num_heads=1,
                    widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)),
    out_dim=4096, head_hidden=2048, head_bottleneck=256, local_crops=0, global_crop_scale=(0.2, 1.0),
    batch_size=256, max_minutes=10.0, use_gpu=True, lr=1e-3, warmup=0.1, teacher_temp=0.07,
    warmup_teacher_temp=0.04, teacher_temp_warmup=0.3, checkpoint_every=1000, log_every=100)
RESNET_CPU = dataclasses.replace(
    RESNET18_CIFAR, preset="resnet-cpu",
    arch=dataclasses.replace(RESNET18_CIFAR.arch, embed_dim=128, widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1)),
    out_dim=1024, head_hidden=512, head_bottleneck=128, batch_size=64, max_minutes=3.0, use_gpu=False,
    checkpoint_every=200, log_every=20)

PRESETS: dict[str, TrainConfig] = {
    "tiny-cpu": TrainConfig(),
    "resnet-cpu": RESNET_CPU,
    "resnet18-cifar": RESNET18_CIFAR,
    "vit-t16": dataclasses.replace(PAPER, preset="vit-t16",
                                   arch=dataclasses.replace(PAPER.arch, embed_dim=192, num_heads=3)),
    "vit-s16": PAPER,
}


def parse_settings(pairs: list[str]) -> dict:
    """``["lr=5e-4", "local_crops=6", "arch.depth=6"]`` → overrides for ``preset``, checked against
    the dataclass fields so that a typo names itself. Values are read as JSON where they parse."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    arch_fields = {f.name for f in dataclasses.fields(ArchConfig)}
    out: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--set takes FIELD=VALUE, got {pair!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        value = tuple(value) if isinstance(value, list) else value
        if key.startswith("arch."):
            if key[5:] not in arch_fields:
                raise ValueError(f"unknown architecture field {key!r}; fields: {', '.join(sorted(arch_fields))}")
            out.setdefault("arch", {})[key[5:]] = value
        elif key in fields and key != "arch":
            out[key] = value
        else:
            raise ValueError(f"unknown training field {key!r}; fields: {', '.join(sorted(fields - {'arch'}))}")
    return out


def preset(name: str, **overrides) -> TrainConfig:
    """A copy of preset ``name`` with ``overrides`` (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(overrides.get("arch"), dict):
        overrides["arch"] = dataclasses.replace(PRESETS[name].arch, **overrides["arch"])
    return dataclasses.replace(PRESETS[name], **overrides)
