"""``Encoder``: images in, L2-normalised embeddings out. The only face index/ sees of encoder/.

Four kinds share one interface, so baselines go through the same code path as the real thing:
a trained checkpoint URL, ``random-init:PRESET`` (the same network untrained), ``raw-pixels:SIZE``
(resized pixels, per-image centred) and ``colour-histogram:BINS`` (a joint RGB histogram of the
32-px image, no layout at all).

Embedding is two steps, which a pipeline may run in different places: ``Encoder.resize`` (a
``Resize``, small and picklable: no weights) turns one decoded image into uint8 ``[3, S, S]`` at the
encoder's input size on a CPU, and ``Encoder.embed_pixels`` normalises a uint8 batch and runs the
network on the encoder's device. ``Encoder.embed`` does both at once, resizing in float on the
device; the two ways differ only by the rounding of the resized pixels to whole uint8 levels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from encoder.backbone import build_backbone, embedding, embedding_dim, feature_map
from encoder.baselines import ColourHistogram
from encoder.checkpoint import read_artifact
from encoder.config import ArchConfig, preset


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes → uint8 RGB ``[H, W, 3]`` (any mode PIL reads: L, P, RGBA, I;16, ...).

    Bytes that are no image, or a damaged one, raise ``ValueError`` with a reason a user can read
    ("not an image file"), never PIL's message (which names an in-memory buffer); the caller adds
    the URI.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I", "F"):
                arr = np.asarray(img, dtype=np.float32)
                arr = (arr - arr.min()) / max(1e-8, float(arr.max() - arr.min())) * 255
                img = Image.fromarray(arr.astype(np.uint8))
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError("not an image file") from None
    except Image.DecompressionBombError:
        raise ValueError("image too large to decode safely (PIL's decompression-bomb limit)") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"damaged image file ({e})") from None


def to_batch(images) -> torch.Tensor:
    """uint8 ``[n, 3, H, W]`` from a tensor, an array ``[n, H, W, 3]`` / ``[n, H, W]``, or a list of
    arrays / PIL images (which may differ in size: each is resized later, one by one)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"image tensor must be [n, 3, H, W] or [n, 1, H, W], got {tuple(images.shape)}")
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    if isinstance(images, np.ndarray):
        images = list(images)
    return [image_tensor(im) for im in images]


def image_tensor(image) -> torch.Tensor:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot embed an image of shape {arr.shape}: expected H×W, H×W×1, H×W×3 or H×W×4")
    arr = arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr, 3, -1)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {arr.dtype}")
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)   # copy: inputs may be read-only


@dataclass(frozen=True)
class Resize:
    """The CPU step of preprocessing: shorter side to ``size / crop_ratio`` (bilinear, antialiased),
    then the centre ``size`` × ``size`` crop. Holds no weights, so decode tasks can carry it.

    ``Resize(...)(image)`` gives uint8 ``[3, size, size]`` (torch's uint8 resampling kernel, rounded
    to whole levels: within about one level of the float resize that ``Encoder.embed`` does on the
    device, which moves an embedding by a cosine of well under 0.001).
    """

    size: int
    crop_ratio: float = 1.0

    def shape(self, h: int, w: int) -> tuple[int, int]:
        """The resized height and width of an ``h`` × ``w`` image (before the crop)."""
        scale = round(self.size / self.crop_ratio) / min(h, w)
        return max(self.size, round(h * scale)), max(self.size, round(w * scale))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, 3, H, W]`` float or uint8 → ``[n, 3, size, size]`` of the same dtype and device."""
        nh, nw = self.shape(*x.shape[-2:])
        if (nh, nw) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        return x[..., top:top + self.size, left:left + self.size]

    def many(self, images: list[np.ndarray], chunk: int = 64) -> np.ndarray:
        """Decoded RGB arrays ``[H, W, 3]`` (``decode_image``'s) → uint8 ``[n, 3, size, size]``, equal
        to calling this on each: images of one shape are resized together, ``chunk`` at a time (one
        torch call, one copy, instead of several per image: resizing small images costs half as much)."""
        out = np.empty((len(images), 3, self.size, self.size), dtype=np.uint8)
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(np.shape(image), []).append(i)
        for shape, rows in by_shape.items():
            if len(shape) != 3 or shape[-1] != 3:
                for i in rows:
                    out[i] = self(images[i])
                continue
            for first in range(0, len(rows), chunk):
                group = rows[first:first + chunk]
                batch = torch.from_numpy(np.stack([images[i] for i in group])).permute(0, 3, 1, 2).contiguous()
                out[group] = self.apply(batch).numpy()
        return out

    def __call__(self, image) -> np.ndarray:
        """One image (an array H×W / H×W×1|3|4, a PIL image, or a uint8 tensor ``[3, H, W]``) →
        uint8 ``[3, size, size]``, contiguous."""
        x = image if isinstance(image, torch.Tensor) else image_tensor(image)
        if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"expected a uint8 [3, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
        return np.ascontiguousarray(self.apply(x[None])[0].numpy())


def whole_number(spec: str, text: str, what: str, minimum: int, example: str) -> int:
    """``text`` (a field of an encoder spec) as a whole number >= ``minimum``; an error naming the spec."""
    if not (text.isascii() and text.isdigit()) or int(text) < minimum:
        kind = "a positive whole number" if minimum > 0 else "a whole number"
        raise ValueError(f"{spec}: {what} must be {kind}, got {text!r} (e.g. {example})")
    return int(text)


def parse_random_init(spec: str) -> tuple[ArchConfig, int]:
    """The architecture and seed of ``random-init:PRESET[:SEED]``."""
    _, *fields = spec.split(":")
    if not 1 <= len(fields) <= 2:
        raise ValueError(f"{spec}: expected random-init:PRESET or random-init:PRESET:SEED")
    try:
        arch = preset(fields[0]).arch
    except ValueError as e:
        raise ValueError(f"{spec}: {e}") from None
    return arch, whole_number(spec, fields[1], "SEED", 0, f"random-init:{fields[0]}:0") if len(fields) == 2 else 0


class Encoder:
    """Embeds images with a backbone (or raw pixels). Picks the GPU when present.

    ``threads``, when given, sets torch's CPU threads for the whole process (torch has one pool):
    a Ray actor with a fraction of a CPU otherwise gets one thread. It is capped at the cores this
    process may run on.
    """

    def __init__(self, name: str, arch: ArchConfig, model: torch.nn.Module | None, sha256: str,
                 provenance: dict | None = None, device: str | None = None, threads: int | None = None):
        self.name, self.arch, self.sha256, self.provenance = name, arch, sha256, provenance or {}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval() if model is not None else None
        if threads:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, min(threads, cores)))

    # construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str, device: str | None = None, threads: int | None = None) -> "Encoder":
        """A checkpoint URL, ``random-init:PRESET[:SEED]``, ``raw-pixels:SIZE`` or ``colour-histogram:BINS``."""
        if spec.startswith("random-init:"):
            arch, seed = parse_random_init(spec)
            torch.manual_seed(seed)
            return cls(spec, arch, build_backbone(arch), hashlib.sha256(spec.encode()).hexdigest(), device=device,
                       threads=threads)
        if spec.startswith("raw-pixels:"):
            size = whole_number(spec, spec.split(":", 1)[1], "SIZE", 1, "raw-pixels:32")
            return cls(spec, ArchConfig(img_size=size, patch_size=1, embed_dim=3 * size * size, depth=0, num_heads=1),
                       None, hashlib.sha256(spec.encode()).hexdigest(), device=device, threads=threads)
        if spec.startswith("colour-histogram:"):
            bins = whole_number(spec, spec.split(":", 1)[1], "BINS", 1, "colour-histogram:4")
            arch = ArchConfig(img_size=32, patch_size=1, embed_dim=bins ** 3, depth=0, num_heads=1,
                              mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))            # the histogram takes [0, 1]
            return cls(spec, arch, ColourHistogram(bins), hashlib.sha256(spec.encode()).hexdigest(), device=device,
                       threads=threads)
        arch, state, provenance, sha = read_artifact(spec)
        model = build_backbone(arch)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights at {spec} do not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return cls(spec, arch, model, sha, provenance, device, threads)

    def with_readout(self, readout: str) -> "Encoder":
        """The same network storing another readout (encoder.backbone.embedding), e.g. a model
        trained with ``token`` read out with ``token+grid2``; the name and hash say which."""
        if self.model is None or not hasattr(self.model, "forward_features"):
            raise ValueError(f"{self.name} has one readout only")
        if readout == self.arch.readout:
            return self
        arch = dataclasses.replace(self.arch, readout=readout)
        arch.check(self.name)
        return Encoder(f"{self.name}#{readout}", arch, self.model,
                       hashlib.sha256(f"{self.sha256}#{readout}".encode()).hexdigest(), self.provenance,
                       str(self.device))

    @property
    def dim(self) -> int:
        return self.arch.embed_dim if self.model is None else embedding_dim(self.arch)

    # embedding ----------------------------------------------------------------------------
    @property
    def resize(self) -> Resize:
        """The CPU step (see ``Resize``): what a decode task applies before ``embed_pixels``."""
        return Resize(self.arch.img_size, self.arch.crop_ratio)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Intensities in [0, 1] → the network's input (raw pixels: unchanged)."""
        if self.model is None:
            return x
        mean = torch.tensor(self.arch.mean, device=x.device)[None, :, None, None]
        std = torch.tensor(self.arch.std, device=x.device)[None, :, None, None]
        return (x - mean) / std

    def preprocess(self, images) -> torch.Tensor:
        """Resize (shorter side to img_size / crop_ratio), centre-crop img_size, normalise; the
        resize runs in float on the device, one image at a time (sizes may differ)."""
        batch = to_batch(images)
        resized = [self.resize.apply((img[None] if img.ndim == 3 else img).to(self.device).float() / 255)
                   for img in (batch if isinstance(batch, list) else [batch])]
        return self.normalise(torch.cat(resized))

    def vectors(self, x: torch.Tensor) -> np.ndarray:
        """The network's input → ``[n, dim]`` float32, L2-normalised (raw pixels: centred pixels)."""
        if self.model is None:
            z = x.flatten(1)
            z = z - z.mean(1, keepdim=True)
        else:
            z = embedding(self.model, x, self.arch.readout)
        return F.normalize(z.float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def embed(self, images, batch_size: int = 256) -> np.ndarray:
        """``[n, dim]`` float32, L2-normalised: the backbone's readout (raw pixels: centred pixels)."""
        n = len(images)
        out = [self.vectors(self.preprocess(images[start:start + batch_size])) for start in range(0, n, batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def embed_pixels(self, pixels, batch_size: int = 256) -> np.ndarray:
        """The device step: uint8 ``[n, 3, S, S]`` (array or tensor, from ``self.resize``) →
        ``[n, dim]`` float32, L2-normalised. Each batch goes to the device as uint8 (a quarter of
        the bytes of float) and is normalised there."""
        size = self.arch.img_size
        if tuple(pixels.shape[1:]) != (3, size, size) or pixels.dtype not in (np.uint8, torch.uint8):
            raise ValueError(f"{self.name} embeds uint8 pixels of shape [n, 3, {size}, {size}], got "
                             f"{pixels.dtype} {tuple(pixels.shape)}: resize them with Encoder.resize first")
        with warnings.catch_warnings():         # Ray's zero-copy batches are read-only: they are only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            pixels = torch.as_tensor(pixels)
        out = [self.vectors(self.normalise(pixels[start:start + batch_size].to(self.device, non_blocking=True)
                                           .float() / 255))
               for start in range(0, len(pixels), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def embed_patches(self, images: Sequence) -> np.ndarray:
        """``[n, h, w, dim]`` float32 patch embeddings, each L2-normalised."""
        if not hasattr(self.model, "forward_features"):
            raise ValueError(f"{self.name} has no patch embeddings")
        return F.normalize(feature_map(self.model, self.preprocess(images)).float(), dim=-1).cpu().numpy()
