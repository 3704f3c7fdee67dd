"""Training runs through real Ray Train: resume across runs, a killed worker, the benchmark."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import fsspec
import numpy as np
import pytest

from encoder.config import ArchConfig, TrainConfig
from encoder.runs import latest_checkpoint
from encoder.train import train

TINY = TrainConfig(preset="test-tiny", arch=ArchConfig(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2),
                   generators=("shader",), batch_size=8, local_crops=2, local_size=8, out_dim=64, head_hidden=64,
                   head_bottleneck=32, max_minutes=None, workers=2, checkpoint_every=3, log_every=1000)


def test_resume_continues_a_finished_run_on_s3_on_every_worker_and_refuses_by_default(ray_local, s3_bucket):
    """A finished run continues with resume (both ranks read the train state from S3), is refused
    without it, and is refused with another network."""
    out = f"{s3_bucket}/run"
    first: dict = {}
    encoder = train(dataclasses.replace(TINY, max_steps=3), out, result_metrics=first)
    assert first["step"] == 3 and first["resumed_from"] is None and encoder == f"{out}/encoder"
    assert latest_checkpoint(out)[1] == 3

    with pytest.raises(FileExistsError, match="--resume"):
        train(dataclasses.replace(TINY, max_steps=6), out)

    wider = dataclasses.replace(TINY, arch=dataclasses.replace(TINY.arch, embed_dim=48))
    with pytest.raises(ValueError, match="embed_dim"):
        train(dataclasses.replace(wider, max_steps=6), out, resume=True)

    second: dict = {}
    encoder = train(dataclasses.replace(TINY, max_steps=6), out, resume=True, result_metrics=second)
    assert second["resumed_from"] == 3 and second["step"] == 6      # both ranks read the S3 train state
    with fsspec.open(f"{encoder}/provenance.json") as f:
        assert json.load(f)["steps"] == 6


def train_worker_pids() -> list[int]:
    """Processes whose title Ray set to ``ray::RayTrainWorker...`` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if entry.isdigit() and b"RayTrainWorker" in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def test_killed_worker_loses_only_the_steps_since_the_last_checkpoint(ray_local, tmp_path):
    out = str(tmp_path / "run")
    cfg = dataclasses.replace(TINY, max_steps=150, checkpoint_every=5)
    metrics: dict = {}
    errors: list = []

    def run_training():
        try:
            train(cfg, out, result_metrics=metrics)
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            errors.append(e)

    run = threading.Thread(target=run_training, daemon=True)
    run.start()
    deadline = time.time() + 180
    while (latest_checkpoint(out) or (None, 0))[1] < 10:
        assert time.time() < deadline and run.is_alive(), "no checkpoint at step 10 in time"
        time.sleep(0.2)
    # Ray Train registers a checkpoint when its controller next polls the workers (every 2 s);
    # one seen in storage 5 s before the kill is registered, so the restart must use it or a later one
    before_kill = latest_checkpoint(out)[1]
    time.sleep(5)
    assert run.is_alive(), "training ended before the kill"
    pids = train_worker_pids()
    assert pids, "found no Ray Train worker process to kill"
    os.kill(pids[-1], signal.SIGKILL)
    run.join(300)
    assert not run.is_alive() and not errors, errors
    assert metrics["step"] == 150
    assert metrics["resumed_from"] is not None, "the run finished without restarting: the kill came too late"
    assert metrics["resumed_from"] >= before_kill and metrics["resumed_from"] % 5 == 0


def test_bench_reports_throughput_and_data_share(ray_local):
    from encoder.bench import embed_throughput, train_throughput
    record = train_throughput("tiny-cpu", workers=1, steps=6)
    assert record["images_per_s"] > 0 and 0 < record["data_share"] < 1
    assert record["images_per_s_per_worker"] == record["images_per_s"]
    embed = embed_throughput("tiny-cpu", images=64, batch_size=32)
    assert embed["images_per_s"] > 0 and embed["image_size"] == 32


def test_real_data_stream_gives_workers_disjoint_passes(tmp_path):
    """The control run's stream: each pass is a permutation, split between workers without overlap."""
    from PIL import Image

    from eval.real_control import CollectionStream
    for i in range(12):
        (tmp_path / "c" / str(i % 3)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), i * 20, np.uint8)).save(tmp_path / "c" / str(i % 3) / f"{i}.png")
    workers = [CollectionStream(str(tmp_path / "c"), size=8, batch_size=3, seed=1, rank=r, world_size=2,
                                steps_per_epoch=100) for r in range(2)]
    assert workers[0].images.shape == (12, 3, 8, 8)
    seen = [int(img[0, 0, 0]) // 20 for step in (0, 1) for w in workers for img in w.batch(0, step)]
    assert sorted(seen) == list(range(12))                        # one pass: every image exactly once
    again = CollectionStream(str(tmp_path / "c"), size=8, batch_size=3, seed=1, rank=1, world_size=2)
    assert again.batch(0, 1).equal(workers[1].batch(0, 1))


def test_real_data_control_trains_through_the_same_loop(ray_local, tmp_path):
    from PIL import Image

    from eval.real_control import train_on_collection
    rng = np.random.default_rng(0)
    for i in range(24):
        (tmp_path / "c" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "c" / str(i % 2) / f"{i}.png")
    metrics: dict = {}
    encoder = train_on_collection(dataclasses.replace(TINY, max_steps=3), str(tmp_path / "c"), str(tmp_path / "run"),
                                  result_metrics=metrics)
    assert metrics["step"] == 3
    with open(os.path.join(encoder, "provenance.json")) as f:
        assert json.load(f)["data"] == f"real images: {tmp_path / 'c'}"
    with pytest.raises(FileNotFoundError, match="no collection"):
        train_on_collection(TINY, str(tmp_path / "missing"), str(tmp_path / "run2"))
