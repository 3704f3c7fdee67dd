"""DINO training as one process on one device, without Ray: the loop Ray Train runs
(``encoder.loop.train_worker``), in a ``LocalSession`` that keeps checkpoints itself.

For any one-GPU box (and the GPU check, whose machines have no Ray). Checkpoints go to the same
``OUT/dino/checkpoint_*`` layout as Ray Train's, so a run started here can be resumed here or
under Ray, and the other way round.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import fsspec
import torch

from encoder.checkpoint import CONFIG, PROVENANCE, TRAIN_STATE, WEIGHTS, load_train_state
from encoder.config import TrainConfig
from encoder.loop import check_recipe, train_worker
from encoder.runs import RUN_NAME, check_new_or_resumable, encoder_url, export, latest_checkpoint
from procdata.bench import available_cores
from procdata.storage import write_atomic

log = logging.getLogger("vismem.encoder.train")


class LocalSession:
    """``encoder.loop.Session`` for a single process: rank 0 of 1, checkpoints written to
    ``out_url`` file by file (provenance last: it marks a checkpoint complete) and all but the
    newest ``keep`` deleted (``keep=0``: none deleted). Without ``out_url`` nothing is written (benchmarks)."""

    rank, world = 0, 1

    def __init__(self, device: torch.device, out_url: str | None, state: dict | None = None, keep: int = 2,
                 name: str = RUN_NAME):
        self.device, self.out_url, self.state, self.keep, self.name = device, out_url, state, keep, name
        self.keeps_checkpoints = out_url is not None

    def restore(self) -> dict | None:
        return self.state

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            return
        fs, root = fsspec.core.url_to_fs(f"{self.out_url.rstrip('/')}/{self.name}")
        target = f"{root}/checkpoint_{metrics['step']:06d}"
        fs.makedirs(target, exist_ok=True)
        for name in (WEIGHTS, CONFIG, TRAIN_STATE, PROVENANCE):
            with open(os.path.join(checkpoint_dir, name), "rb") as f:
                write_atomic(fs, f"{target}/{name}", f.read())
        if self.keep:
            for old in sorted(fs.glob(f"{root}/checkpoint_*"))[:-self.keep]:
                fs.rm(old, recursive=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_local(cfg: TrainConfig, out_url: str, resume: bool = False, device: str | None = None,
                result_metrics: dict | None = None, stream=None) -> str:
    """Train ``cfg`` in this process on ``device`` (default: the GPU when there is one); return
    the exported encoder's URL (``out_url/encoder``). ``resume`` as in ``encoder.train.train``;
    ``result_metrics`` receives the final report; ``stream`` replaces the procedural batches."""
    check_recipe(cfg)
    torch_device = torch.device(device) if device else default_device()
    cfg = local_config(cfg, torch_device)
    previous = check_new_or_resumable(out_url, cfg, resume)
    state = None
    if previous:
        fs, path = fsspec.core.url_to_fs(previous[0])
        state = load_train_state(fs.cat_file(f"{path}/{TRAIN_STATE}"))
    session = LocalSession(torch_device, out_url, state, keep=cfg.keep_checkpoints)
    final = train_worker(cfg, session, stream)
    if result_metrics is not None:
        result_metrics.update(final)
    return export(latest_checkpoint(out_url)[0], encoder_url(out_url))


def local_config(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``cfg`` as one worker on ``device`` runs it: every core of the machine on a CPU."""
    cpus = available_cores() if device.type == "cpu" else cfg.cpus_per_worker
    return dataclasses.replace(cfg, workers=1, use_gpu=device.type == "cuda", cpus_per_worker=cpus)
