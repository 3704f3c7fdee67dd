"""The DINO training loop as one worker sees it, with no scheduler in it.

Ray Train runs ``train_worker`` on every worker (encoder.train); ``encoder.local`` runs it as one
process on one device, without Ray. A ``Session`` is all that differs: the worker's rank and
device, the state to resume from, how the model is wrapped, and where reports and checkpoints go.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from typing import Protocol

import torch
import torch.distributed as dist

from encoder.augment import multi_crop
from encoder.backbone import build_backbone
from encoder.checkpoint import save_train_state, write_artifact
from encoder.config import TrainConfig
from encoder.dino import (DINOHead, DINOLoss, MultiCropWrapper, check_centering, cosine, ema_update, koleo,
                          param_groups)
from procdata.stream import ProceduralStream, StreamConfig

log = logging.getLogger("vismem.encoder.train")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class Session(Protocol):
    """What the loop needs from whoever runs it (Ray Train, or one local process)."""

    rank: int
    world: int
    device: torch.device
    keeps_checkpoints: bool         # False: reports carry metrics only (a benchmark writes nothing)

    def restore(self) -> dict | None:
        """The train state to continue from (``save_train_state``'s dict), or None."""

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on the device, wrapped for data parallelism where there are several workers."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """Record ``metrics``; keep ``checkpoint_dir`` (rank 0 only, else None) as the newest
        checkpoint. Every worker calls it at the same steps."""


def provenance(cfg: TrainConfig, images_seen: int, steps: int) -> dict:
    """What the encoder was trained on: generators and seeds (or, for a control run, the real collection)."""
    data = ({"data": f"real images: {cfg.real_data}"} if cfg.real_data else
            {"data": "procedural only", "generators": list(cfg.generators), "natural_images": cfg.natural_images})
    return {**data, "seed": cfg.seed,
            "per_worker_seed_layout": "image index = ((epoch*steps_per_epoch + step)*workers + rank)*batch + i",
            "workers": cfg.workers, "batch_size_per_worker": cfg.batch_size, "steps": steps,
            "images_seen": images_seen, "preset": cfg.preset, "method": "DINO"}


def procedural_stream(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> ProceduralStream:
    """This worker's own procedural batches, made on its device (no data moves between workers)."""
    return ProceduralStream(StreamConfig(cfg.generators, cfg.seed, cfg.arch.img_size, cfg.batch_size,
                                         steps_per_epoch=10_000, natural=cfg.natural_images), rank, world, str(device))


def restore(session: Session, student, teacher, optimizer, loss_fn, device: torch.device
            ) -> tuple[int, float, int, int | None]:
    """Load the session's last checkpoint into the networks, optimiser and loss centre, if it has
    one; (step, elapsed seconds, images seen, the step resumed from or None)."""
    state = session.restore()
    if not state:
        return 0, 0.0, 0, None
    student.load_state_dict(state["student"])
    teacher.load_state_dict(state["teacher"])
    optimizer.load_state_dict(state["optimizer"])
    loss_fn.center.copy_(state["center"].to(device))
    step, elapsed = state["step"], state["elapsed"]
    if session.rank == 0:
        log.info("resumed from step %d (%.1f min in)", step, elapsed / 60)
    return step, elapsed, state["images_seen"], step


def train_worker(cfg: TrainConfig, session: Session, stream=None) -> dict:
    """Set up in phases, then ``train_one_step`` until rank 0 says stop; report checkpoints on the
    way and a final report (returned too): step, loss, images/s after warm-up, data share."""
    rank, world, device = session.rank, session.world, session.device
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    # ============ data: this worker's own batches (procedural unless the caller gives a stream) ============
    stream = stream or procedural_stream(cfg, rank, world, device)
    aug_rng = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    # ============ networks: student and EMA teacher, the same initial weights on every worker ============
    torch.manual_seed(cfg.seed)
    student = MultiCropWrapper(build_backbone(cfg.arch), DINOHead(cfg.arch.embed_dim, cfg.out_dim, cfg.head_hidden,
                                                                  cfg.head_bottleneck))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False

    # ============ loss: DINO's cross-entropy against the centred, sharpened teacher ============
    loss_fn = DINOLoss(cfg.out_dim, 2 + cfg.local_crops, cfg.student_temp, cfg.center_momentum,
                       cfg.centering).to(device)

    # ============ optimiser and precision (lr scaled by the global batch, as DINO does) ============
    optimizer = torch.optim.AdamW(param_groups(student))
    lr_peak = cfg.lr * cfg.batch_size * world / 256
    amp_dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    # ============ resume from the last checkpoint (a restarted worker group, or --resume) ============
    step, elapsed, images_seen, resumed_from = restore(session, student, teacher, optimizer, loss_fn, device)
    teacher.to(device)
    if world > 1 and device.type == "cuda":           # BatchNorm statistics over the global batch, as DINO's
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)       # (the same parameters)
        teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student = session.prepare(student)
    student_module = student.module if hasattr(student, "module") else student
    if rank == 0:
        log.info("training on %s in %s", device, str(amp_dtype or torch.float32).removeprefix("torch."))

    def checkpoint(metrics: dict) -> None:
        report(cfg, session, step, time.time() - started, images_seen, student_module, teacher, optimizer,
               loss_fn, metrics)

    # ============ train until the step or time budget is spent ============
    speed = Throughput(first_steady_step=step + 3)
    started = time.time() - elapsed
    loss = None
    while (progress := run_progress(cfg, step, started, device)) < 1.0:
        t0 = time.time()
        speed.step_starts(step, t0)
        images = stream.batch(step // 10_000, step % 10_000)
        crops = multi_crop(images, cfg.arch.img_size, cfg.global_crop_scale, cfg.local_size, cfg.local_crop_scale,
                           cfg.local_crops, cfg.arch.mean, cfg.arch.std, aug_rng)
        speed.data_made(time.time() - t0)
        loss, lr = train_one_step(cfg, student, teacher, loss_fn, optimizer, scaler, amp_dtype, crops, progress,
                                  lr_peak, step)
        step += 1
        images_seen += cfg.batch_size * world
        speed.step_ends(cfg.batch_size * world)

        if step % cfg.log_every == 0:
            images_per_s, data_share = speed.window()
            if rank == 0:
                log.info("step %d loss %.4f lr %.2e %.0f img/s data %.0f%% progress %.0f%%", step, loss.item(), lr,
                         images_per_s, 100 * data_share, 100 * progress)
        if step % cfg.checkpoint_every == 0:
            checkpoint({"step": step, "loss": loss.item()})
    images_per_s, data_share = speed.steady()
    final = {"step": step, "loss": float("nan") if loss is None else loss.item(), "final": True,
             "resumed_from": resumed_from, "images_per_s": images_per_s, "data_share": data_share}
    checkpoint(final)
    return final


def train_one_step(cfg: TrainConfig, student, teacher, loss_fn, optimizer, scaler, amp_dtype, crops: list,
                   progress: float, lr_peak: float, step: int) -> tuple[torch.Tensor, float]:
    """One DINO step on one batch of multi-crops at ``progress`` (0..1 of the run); returns the
    loss and the learning rate. ``student`` may be DDP-wrapped; ``teacher`` never is."""
    student_module = student.module if hasattr(student, "module") else student
    # schedules: cosine in the run's progress, so a time budget anneals fully too
    lr = cosine(progress, lr_peak, cfg.min_lr, cfg.warmup)
    optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = lr
    optimizer.param_groups[0]["weight_decay"] = cosine(progress, cfg.weight_decay, cfg.weight_decay_end)
    teacher_temp = (cosine(progress / cfg.teacher_temp_warmup, cfg.teacher_temp, cfg.teacher_temp, 1.0,
                           cfg.warmup_teacher_temp) if cfg.teacher_temp_warmup > 0 else cfg.teacher_temp)

    # teacher sees the two global crops, student sees every crop
    with torch.autocast(crops[0].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        teacher_out = teacher(crops[:2])
        student_out, features = student(crops, with_features=True)
    loss = loss_fn(student_out.float(), teacher_out.float(), teacher_temp)
    if cfg.koleo_weight:                             # DINOv2's KoLeo spreads the global crops' CLS tokens
        global_features = features[:2 * crops[0].shape[0]].chunk(2)
        loss = loss + cfg.koleo_weight * sum(koleo(f) for f in global_features) / 2
    if not torch.isfinite(loss):
        raise FloatingPointError(f"DINO loss is {loss.item()} at step {step}; lower the learning rate")

    # student update: clipped gradients, the head's last layer frozen at first
    optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
    if progress < cfg.freeze_last_layer:
        for p in student_module.head.last_layer.parameters():
            p.grad = None
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()

    # teacher: an EMA of the student, its momentum rising to 1
    ema_update(teacher, student_module, cosine(progress, cfg.momentum_teacher, 1.0))
    return loss, lr


def run_progress(cfg: TrainConfig, step: int, started: float, device: torch.device) -> float:
    """How far the run is, 0..1 (≥ 1: stop): the larger of its step and time fractions, as rank 0
    measures them, so every worker takes the same steps."""
    progress = max(step / cfg.max_steps if cfg.max_steps > 0 else 1.0,
                   (time.time() - started) / 60 / cfg.max_minutes if cfg.max_minutes else 0.0)
    flag = torch.tensor([progress], device=device)
    if dist.is_initialized():
        dist.broadcast(flag, 0)                        # rank 0's clock decides for everyone
    return float(flag)


def report(cfg, session: Session, step, elapsed, images_seen, student, teacher, optimizer, loss_fn, metrics) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (an encoder artifact + train state)."""
    with tempfile.TemporaryDirectory() as d:
        writes = session.rank == 0 and session.keeps_checkpoints
        if writes:
            write_artifact(d, teacher.backbone.state_dict(), cfg.arch, provenance(cfg, images_seen, step))
            save_train_state(d, {"student": student.state_dict(), "teacher": teacher.state_dict(),
                                 "optimizer": optimizer.state_dict(), "center": loss_fn.center.cpu(),
                                 "step": step, "elapsed": elapsed, "images_seen": images_seen})
        session.report(metrics, d if writes else None)


class Throughput:
    """Images/s and the share of step time spent making data: per log window, and for the whole
    run after a warm-up (``first_steady_step`` on), which benchmarks report."""

    def __init__(self, first_steady_step: int):
        self.first_steady_step, self.steady_start = first_steady_step, None
        self.steady_data = self.steady_images = 0.0
        self.window_start, self.window_data, self.window_images = time.time(), 0.0, 0

    def step_starts(self, step: int, now: float) -> None:
        if step == self.first_steady_step:
            self.steady_start = now

    def data_made(self, seconds: float) -> None:
        self.window_data += seconds
        self.steady_data += seconds if self.steady_start else 0.0

    def step_ends(self, images: int) -> None:
        self.window_images += images
        self.steady_images += images if self.steady_start else 0

    def window(self) -> tuple[float, float]:
        """(images/s, data share) since the last call, and start a new window."""
        seconds = time.time() - self.window_start
        result = self.window_images / seconds, self.window_data / seconds
        self.window_start, self.window_data, self.window_images = time.time(), 0.0, 0
        return result

    def steady(self) -> tuple[float, float]:
        """(images/s, data share) after the warm-up; NaN when the run never got past it."""
        seconds = time.time() - self.steady_start if self.steady_start else float("nan")
        return self.steady_images / seconds, self.steady_data / seconds


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32). bf16 halves a CPU
    step where oneDNN has native bf16 kernels (AVX512-BF16, AMX) and slows it elsewhere, hence auto."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16                      # the paper's mixed precision, with a GradScaler
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    check_precision(precision)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")


def check_recipe(cfg: TrainConfig) -> None:
    """The recipe's choices by name, before any worker starts (Ray Train's or the local one)."""
    check_precision(cfg.precision)
    check_centering(cfg.centering)
