"""``Encoder``: images in, L2-normalised embeddings out. The only face index/ sees of encoder/.

Three kinds share one interface, so baselines go through the same code path as the real thing:
a trained checkpoint URL, ``random-init:PRESET`` (the same network untrained) and
``raw-pixels:SIZE`` (resized pixels, per-image centred).
"""

from __future__ import annotations

import hashlib
import io
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from encoder.backbone import build_backbone, patch_tokens
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
    """Embeds images with a backbone (or raw pixels). Picks the GPU when present."""

    def __init__(self, name: str, arch: ArchConfig, model: torch.nn.Module | None, sha256: str,
                 provenance: dict | None = None, device: str | None = None):
        self.name, self.arch, self.sha256, self.provenance = name, arch, sha256, provenance or {}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval() if model is not None else None

    # construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str, device: str | None = None) -> "Encoder":
        """A checkpoint URL, ``random-init:PRESET[:SEED]`` or ``raw-pixels:SIZE``."""
        if spec.startswith("random-init:"):
            arch, seed = parse_random_init(spec)
            torch.manual_seed(seed)
            return cls(spec, arch, build_backbone(arch), hashlib.sha256(spec.encode()).hexdigest(), device=device)
        if spec.startswith("raw-pixels:"):
            size = whole_number(spec, spec.split(":", 1)[1], "SIZE", 1, "raw-pixels:32")
            return cls(spec, ArchConfig(img_size=size, patch_size=1, embed_dim=3 * size * size, depth=0, num_heads=1),
                       None, hashlib.sha256(spec.encode()).hexdigest(), device=device)
        arch, state, provenance, sha = read_artifact(spec)
        model = build_backbone(arch)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights at {spec} do not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return cls(spec, arch, model, sha, provenance, device)

    @property
    def dim(self) -> int:
        return self.arch.embed_dim

    # embedding ----------------------------------------------------------------------------
    def preprocess(self, images) -> torch.Tensor:
        """Resize (shorter side to img_size / crop_ratio), centre-crop img_size, normalise."""
        batch = to_batch(images)
        size = self.arch.img_size
        resize = round(size / self.arch.crop_ratio)
        out = []
        for img in (batch if isinstance(batch, list) else [batch]):
            x = img.to(self.device).float() / 255
            x = x[None] if x.ndim == 3 else x
            h, w = x.shape[-2:]
            scale = resize / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
            top, left = (nh - size) // 2, (nw - size) // 2
            out.append(x[..., top:top + size, left:left + size])
        x = torch.cat(out)
        mean = torch.tensor(self.arch.mean, device=self.device)[None, :, None, None]
        std = torch.tensor(self.arch.std, device=self.device)[None, :, None, None]
        return x if self.model is None else (x - mean) / std

    @torch.no_grad()
    def embed(self, images, batch_size: int = 256) -> np.ndarray:
        """``[n, dim]`` float32, L2-normalised: the CLS token (raw pixels: centred pixels)."""
        n = len(images)
        out = []
        for start in range(0, n, batch_size):
            x = self.preprocess(images[start:start + batch_size])
            if self.model is None:
                z = x.flatten(1)
                z = z - z.mean(1, keepdim=True)
            else:
                z = self.model(x)
            out.append(F.normalize(z.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def embed_patches(self, images: Sequence) -> np.ndarray:
        """``[n, h, w, dim]`` float32 patch embeddings, each L2-normalised."""
        if self.model is None:
            raise ValueError("raw-pixels encoders have no patch embeddings")
        return F.normalize(patch_tokens(self.model, self.preprocess(images)).float(), dim=-1).cpu().numpy()
