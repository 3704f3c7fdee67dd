"""A training run on storage, whoever ran it: ``OUT/<name>/checkpoint_*/`` and ``OUT/encoder``.

Ray Train (encoder.train) and the local loop (encoder.local) write the same checkpoint layout, so
either can find, check and continue a run the other started, and both export the encoder the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import fsspec

from encoder.checkpoint import CONFIG, PROVENANCE, WEIGHTS
from encoder.config import TrainConfig
from procdata.storage import write_atomic

log = logging.getLogger("vismem.encoder.train")
RUN_NAME = "dino"


def checkpoints(out_url: str, name: str = RUN_NAME) -> list[tuple[str, int]]:
    """(URL, step) of every complete checkpoint of run ``name`` under ``out_url``, oldest first.
    A checkpoint is complete once its ``provenance.json`` exists: it is written last."""
    fs, root = fsspec.core.url_to_fs(out_url.rstrip("/") + "/" + name)
    found = []
    for path in fs.glob(f"{root}/checkpoint_*/{PROVENANCE}"):
        with fs.open(path) as f:
            found.append((int(json.load(f).get("steps", 0)), path.rsplit("/", 1)[0]))
    return [(checkpoint_url(out_url, fs, path), step) for step, path in sorted(found)]


def latest_checkpoint(out_url: str, name: str = RUN_NAME) -> tuple[str, int] | None:
    """(URL, step) of the newest complete checkpoint of run ``name`` under ``out_url``, if any."""
    found = checkpoints(out_url, name)
    return found[-1] if found else None


def checkpoint_url(out_url: str, fs, path: str) -> str:
    """``path`` on ``fs`` as a URL of the same kind as ``out_url`` (a local path stays a path)."""
    return fs.unstrip_protocol(path) if "://" in out_url else path


def check_new_or_resumable(out_url: str, cfg: TrainConfig, resume: bool, name: str = RUN_NAME) -> tuple[str, int] | None:
    """The checkpoint to continue from (None: a new run). A run already under ``out_url`` is
    continued only with ``resume``; without it that is an error, so a typo in ``--out`` never
    silently continues somebody else's run. Its network must match ``cfg``'s."""
    previous = latest_checkpoint(out_url, name)
    if previous and not resume:
        raise FileExistsError(f"{out_url} already holds a training run (last checkpoint at step {previous[1]}, "
                              f"{previous[0]}); pass --resume to continue it, or choose another --out")
    if previous:
        check_resumable(previous[0], cfg)
        log.info("resuming the run at %s from step %d", out_url, previous[1])
    elif resume:
        log.info("nothing to resume at %s: starting a new run", out_url)
    return previous


def check_resumable(checkpoint_url: str, cfg: TrainConfig) -> None:
    """Refuse to resume a run whose network differs from ``cfg``'s, naming the fields."""
    fs, path = fsspec.core.url_to_fs(checkpoint_url)
    with fs.open(f"{path}/{CONFIG}") as f:
        saved = json.load(f)
    mine = dataclasses.asdict(cfg.arch)
    differ = [k for k in mine if k in saved and json.dumps(saved[k]) != json.dumps(mine[k])]
    if differ:
        raise ValueError(f"cannot resume {checkpoint_url}: its network differs from preset {cfg.preset!r} in "
                         + ", ".join(f"{k} ({saved[k]} vs {mine[k]})" for k in differ))


def export(checkpoint_url: str, url: str) -> str:
    """Copy the encoder artifact (not the train state) of the checkpoint at ``checkpoint_url`` to
    ``url``, file by file (the train state, optimiser included, is most of a checkpoint's bytes and
    is not read for this); each file whole or absent, config last: it marks completeness."""
    src_fs, src = fsspec.core.url_to_fs(checkpoint_url)
    files = {name: src_fs.cat_file(f"{src}/{name}") for name in (WEIGHTS, PROVENANCE, CONFIG)}
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path, exist_ok=True)
    for name, blob in files.items():
        write_atomic(fs, f"{path}/{name}", blob)
    log.info("exported encoder to %s (%s images seen)", url, json.loads(files[PROVENANCE]).get("images_seen"))
    return url


def encoder_url(out_url: str) -> str:
    return out_url.rstrip("/") + "/encoder"
