"""DINO training on procedural data in Ray Train's TorchTrainer (gloo on CPU, NCCL on GPUs).

The loop itself is ``encoder.loop.train_worker``, shared with the Ray-free ``encoder.local``; this
module adapts it to Ray Train (a ``RaySession``) and drives the run. Every worker streams its own
procedural batches (procdata.stream), so no data moves between processes. Rank 0 decides when to
stop (step or time budget) and broadcasts it, so all workers take the same number of steps.
Checkpoints are Ray Train checkpoints on any fsspec URL; a restarted run (or one with
``--resume``) continues from the latest.
"""

from __future__ import annotations

import logging
import os

import fsspec
import fsspec.implementations.local
import pyarrow.fs
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from encoder.checkpoint import TRAIN_STATE, load_train_state
from encoder.config import TrainConfig
from encoder.loop import check_recipe, train_worker
from encoder.runs import RUN_NAME, check_new_or_resumable, checkpoint_url, encoder_url, export

log = logging.getLogger("vismem.encoder.train")


class RaySession:
    """``encoder.loop.Session`` for one Ray Train worker."""

    keeps_checkpoints = True

    def __init__(self, resume_from: str | None = None):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.resume_from = resume_from

    def restore(self) -> dict | None:
        """The train state to continue from: Ray's latest checkpoint of this run (a restarted
        worker group, or a run Ray restored), else ``resume_from`` (the checkpoint URL of a run Ray
        has no record of, e.g. one encoder.local wrote; Ray's ``resume_from_checkpoint`` is
        deprecated, ray-project/ray#49454). Read in place, never through ``Checkpoint.as_directory``:
        ranks on one node share its download folder, and a rank that starts after another has
        finished downloads again over the file the other is reading (ray-project/ray#48726)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{TRAIN_STATE}") as f:
                return load_train_state(f.read())
        if self.resume_from:
            fs, path = fsspec.core.url_to_fs(self.resume_from)
            return load_train_state(fs.cat_file(f"{path}/{TRAIN_STATE}"))
        return None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: the shared loop in a ``RaySession``."""
    config = dict(config)
    stream_factory = config.pop("stream_factory", None)
    session = RaySession(config.pop("resume_from", None))
    cfg = TrainConfig.from_dict(config)
    stream = stream_factory(session.rank, session.world, str(session.device)) if stream_factory else None
    train_worker(cfg, session, stream)


def storage_for(url: str) -> tuple[str, pyarrow.fs.FileSystem]:
    """(path, pyarrow filesystem) for an fsspec URL, as Ray Train's RunConfig takes them."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):     # Ray wants absolute local paths
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def train(cfg: TrainConfig, out_url: str, name: str = RUN_NAME, max_failures: int = 1, resume: bool = False,
          result_metrics: dict | None = None, stream_factory=None) -> str:
    """Run DINO training; return the URL of the exported encoder (``out_url/encoder``).

    A run that already has checkpoints under ``out_url`` continues from the latest only with
    ``resume`` (``encoder.runs.check_new_or_resumable``), whether Ray Train or ``encoder.local``
    wrote it. Within one call, a failed worker restarts the group from the last checkpoint
    (``max_failures`` times). ``result_metrics``, when given, receives the final report (step,
    images/s, resumed_from). ``stream_factory(rank, world_size, device)`` replaces the procedural
    stream (control runs).
    """
    check_recipe(cfg)                                # before Ray starts, not in every worker
    if cfg.real_data and stream_factory is None:
        raise ValueError("a real-data run needs its stream: use eval.real_control.train_on_collection")
    previous = check_new_or_resumable(out_url, cfg, resume, name)
    storage_path, storage_fs = storage_for(out_url)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={**cfg.to_dict(), "stream_factory": stream_factory,
                                                  "resume_from": previous[0] if previous else None},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training under {out_url}/{name} produced no checkpoint")
    if result_metrics is not None:
        result_metrics.update(result.metrics or {})
    fs, _ = fsspec.core.url_to_fs(out_url)
    return export(checkpoint_url(out_url, fs, result.checkpoint.path), encoder_url(out_url))
