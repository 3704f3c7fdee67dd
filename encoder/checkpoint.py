"""Encoder checkpoint I/O on any fsspec URL: weights.safetensors, config.json, provenance.json.

A training checkpoint is the same directory plus ``train_state.pt`` (student, teacher, optimiser,
DINO centre, progress), so any training checkpoint is also a usable encoder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from encoder.config import ArchConfig

WEIGHTS, CONFIG, PROVENANCE, TRAIN_STATE = "weights.safetensors", "config.json", "provenance.json", "train_state.pt"
FORMAT = "vismem-encoder/1"


def write_artifact(directory: str, backbone_state: dict, arch: ArchConfig, provenance: dict) -> None:
    """Write an encoder artifact to a local ``directory``."""
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone_state.items()}
    save_file(state, os.path.join(directory, WEIGHTS), metadata={"format": FORMAT})
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump({"format": FORMAT, **asdict(arch)}, f, indent=2)
    with open(os.path.join(directory, PROVENANCE), "w") as f:
        json.dump(provenance, f, indent=2)


def read_artifact(url: str) -> tuple[ArchConfig, dict, dict, str]:
    """(arch, backbone state dict, provenance, sha256 of the weights) of the encoder at ``url``."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"no encoder checkpoint at {url}: the directory does not exist")
    for name in (CONFIG, WEIGHTS):
        if not fs.exists(f"{root}/{name}"):
            raise FileNotFoundError(f"encoder checkpoint {url} has no {name}; expected {WEIGHTS}, {CONFIG}, {PROVENANCE}")
    with fs.open(f"{root}/{CONFIG}") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{url}/{CONFIG} is not valid JSON: {e}") from None
    if config.pop("format", None) != FORMAT:
        raise ValueError(f"{url}/{CONFIG} is not a {FORMAT} config (field 'format')")
    arch = ArchConfig.from_dict(config, f"{url}/{CONFIG}")
    with fs.open(f"{root}/{WEIGHTS}") as f:
        blob = f.read()
    provenance = {}
    if fs.exists(f"{root}/{PROVENANCE}"):
        with fs.open(f"{root}/{PROVENANCE}") as f:
            provenance = json.load(f)
    return arch, load_safetensors(blob), provenance, hashlib.sha256(blob).hexdigest()


def save_train_state(directory: str, state: dict) -> None:
    torch.save(state, os.path.join(directory, TRAIN_STATE))


def load_train_state(blob: bytes) -> dict:
    """The train state from the bytes of a checkpoint's ``train_state.pt`` (tensors only)."""
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
