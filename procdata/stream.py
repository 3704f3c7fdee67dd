"""Streaming procedural data for training: batches generated on the fly, no storage.

Each (worker, epoch) reads a disjoint, reproducible slice of one endless index space, so two
Ray Train workers never see the same image and a resumed run regenerates exactly the batches it
would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from procdata.generators import generate, get_generator, grouped, quantise, render_natural


@dataclass
class StreamConfig:
    generators: tuple[str, ...] = ("kml_mixup", "shader", "dead_leaves")
    seed: int = 0
    size: int = 32
    batch_size: int = 64
    steps_per_epoch: int = 1000
    natural: bool = False               # render_natural: supersampled ×2, chroma scaled toward natural statistics

    def __post_init__(self):
        for name in self.generators:
            get_generator(name)
        if self.size <= 0 or self.batch_size <= 0 or self.steps_per_epoch <= 0:
            raise ValueError("size, batch_size and steps_per_epoch must be positive")


@dataclass
class ProceduralStream:
    """Iterates ``[batch, 3, size, size]`` uint8 batches for one worker of ``world_size``.

    Batch ``step`` of ``epoch`` on ``rank`` holds images ``base .. base+batch`` with ``base``
    unique to (epoch, step, rank); image ``i`` comes from ``generators[i % len(generators)]``, so
    every batch mixes the generators evenly. (Single-generator batches make DINO's batch
    statistics, the teacher centre above all, swing from batch to batch.)
    """

    config: StreamConfig = field(default_factory=StreamConfig)
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    def batch(self, epoch: int, step: int) -> torch.Tensor:
        cfg = self.config
        global_batch = (epoch * cfg.steps_per_epoch + step) * self.world_size + self.rank
        indices = torch.arange(global_batch * cfg.batch_size, (global_batch + 1) * cfg.batch_size)
        images = torch.empty(cfg.batch_size, 3, cfg.size, cfg.size, dtype=torch.uint8, device=self.device)
        for k, rows in grouped(indices % len(cfg.generators), len(cfg.generators)):
            if len(rows):
                images[rows.to(self.device)] = self.images(cfg.generators[k], indices[rows].tolist())
        return images

    def images(self, name: str, indices: list[int]) -> torch.Tensor:
        cfg = self.config
        if cfg.natural:
            return quantise(render_natural(name, cfg.seed, indices, cfg.size, self.device, supersample=2))
        return generate(name, cfg.seed, indices, cfg.size, self.device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        for step in range(start_step, self.config.steps_per_epoch):
            yield self.batch(epoch, step)

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            yield from self.epoch(epoch)
            epoch += 1
