"""Annotated images for ``eval.segmentation``: (image, mask) pairs on any fsspec URL, and
dead-leaves scenes whose masks the generator knows (for tests and demos, no download).

A collection is either a folder, ``ROOT/images/NAME.{png,jpg,...}`` with ``ROOT/masks/NAME.png``,
or Parquet (one file, or a folder of ``*.parquet``) with ``image`` and ``mask`` columns of encoded
bytes. A mask's pixel value is its class index; 0 is the background and 255 "ignore" (Pascal
VOC's convention). Class names come from a text file, one name per line, line i naming class i:
``classes=`` or else ``classes.txt`` beside the images (in ROOT, or beside the Parquet file).
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from encoder.embed import decode_image
from procdata.generators.dead_leaves import leaf_labels, leaf_shapes

IGNORE = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SCENE_CLASSES = ("background", "disc", "rectangle", "triangle")
SCENE_PALETTE = np.array([[0.5, 0.5, 0.5], [0.85, 0.25, 0.2], [0.2, 0.7, 0.3], [0.25, 0.35, 0.85]])


@dataclass
class Annotated:
    images: list[np.ndarray]        # uint8 [H, W, 3]
    masks: list[np.ndarray]         # uint8 [H, W]: class index, 0 background, 255 ignore
    names: list[str]                # image names (file stems or Parquet rows)
    classes: list[str]              # class index → name
    source: str

    def __len__(self) -> int:
        return len(self.images)


def decode_mask(data: bytes) -> np.ndarray:
    """A mask PNG → uint8 ``[H, W]`` of class indices (a palette image's indices, not its colours)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"a mask must be a one-channel (L or palette) image of class indices, got mode "
                             f"{img.mode}")
        mask = np.asarray(img)
    if mask.max(initial=0) > IGNORE:
        raise ValueError(f"mask values above {IGNORE} (class indices are 0-254, {IGNORE} ignore)")
    return mask.astype(np.uint8)


def read_classes(url: str) -> list[str]:
    with fsspec.open(url, "r") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"{url} names no class")
    return names


def read_annotated(url: str, classes: str | None = None, limit: int | None = None,
                   progress: bool = True) -> Annotated:
    """The (image, mask) pairs at ``url`` (see the module docstring), the first ``limit`` of them."""
    url = url.rstrip("/")
    fs, root = fsspec.core.url_to_fs(url)
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    if fs.isfile(root) or fs.glob(f"{root}/*.parquet"):
        files = [root] if fs.isfile(root) else sorted(fs.glob(f"{root}/*.parquet"))
        beside = posixpath.dirname(root) if fs.isfile(root) else root
        pairs = parquet_pairs(fs, files, limit)
    elif fs.isdir(f"{root}/images") and fs.isdir(f"{root}/masks"):
        beside, pairs = root, folder_pairs(fs, root, limit)
    else:
        raise ValueError(f"{url} is neither Parquet with image and mask columns nor a folder with images/ and "
                         f"masks/")
    images, masks, names = [], [], []
    for name, image_bytes, mask_bytes in tqdm(pairs, desc=f"read {url}", unit="img", disable=not progress):
        try:
            image, mask = decode_image(image_bytes), decode_mask(mask_bytes)
        except ValueError as e:
            raise ValueError(f"{url}: {name}: {e}") from None
        if image.shape[:2] != mask.shape:
            raise ValueError(f"{url}: {name}: image {image.shape[:2]} and mask {mask.shape} differ in size")
        images.append(image)
        masks.append(mask)
        names.append(name)
    if not images:
        raise ValueError(f"{url} holds no annotated image")
    names_url = classes or f"{protocol}{beside}/classes.txt"
    if classes is None and not fs.exists(f"{beside}/classes.txt"):
        class_names = [str(c) for c in range(int(max(m[m != IGNORE].max(initial=0) for m in masks)) + 1)]
    else:
        class_names = read_classes(names_url)
    top = max(int(m[m != IGNORE].max(initial=0)) for m in masks)
    if top >= len(class_names):
        raise ValueError(f"{url}: masks use class {top} but {names_url} names {len(class_names)} classes")
    return Annotated(images, masks, names, class_names, url)


def folder_pairs(fs, root: str, limit: int | None) -> list[tuple[str, bytes, bytes]]:
    found = sorted(p for p in fs.ls(f"{root}/images", detail=False) if p.lower().endswith(IMAGE_SUFFIXES))
    found = found[:limit] if limit else found
    stems = [posixpath.splitext(posixpath.basename(p))[0] for p in found]
    masks = [f"{root}/masks/{stem}.png" for stem in stems]
    missing = [m for m in masks if not fs.exists(m)]
    if missing:
        raise ValueError(f"{len(missing)} images have no mask, e.g. {missing[0]}")
    blobs = fs.cat(found + masks)
    return [(stem, blobs[i], blobs[m]) for stem, i, m in zip(stems, found, masks)]


def parquet_pairs(fs, files: list[str], limit: int | None) -> list[tuple[str, bytes, bytes]]:
    out = []
    for path in files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        for column in ("image", "mask"):
            if column not in table.column_names:
                raise ValueError(f"{path} has no {column!r} column (it has {table.column_names})")
        images, masks = table.column("image").to_pylist(), table.column("mask").to_pylist()
        for row, (image, mask) in enumerate(zip(images, masks)):
            image, mask = (v["bytes"] if isinstance(v, dict) else v for v in (image, mask))
            out.append((f"{posixpath.basename(path)}#{row}", image, mask))
            if limit and len(out) >= limit:
                return out
    return out


def scenes(count: int, size: int = 32, seed: int = 0, first: int = 0, shapes: int = 24) -> tuple[np.ndarray,
                                                                                               np.ndarray]:
    """Dead-leaves scenes (``procdata.generators.dead_leaves``' shapes and label maps) coloured by
    class, uint8 ``[n, S, S, 3]``, and their masks ``[n, S, S]``: a pixel's class is the kind of its
    topmost shape (1 disc, 2 rectangle, 3 triangle; 0 the background), its colour the class's
    (``SCENE_PALETTE``) moved by the shape's own random tint and a grey texture."""
    indices = list(range(first, first + count))
    shape, colours = leaf_shapes(seed, indices, shapes, 0.1, 0.6, torch.device("cpu"))
    labels = leaf_labels(shape, size).long()                                    # [n, S·S]: k+1 for shape k
    kinds = torch.cat([torch.full((count, 1), -1), shape["kind"]], 1)           # row 0: the background
    mask = (kinds.gather(1, labels) + 1).numpy().astype(np.uint8)               # [n, S·S]
    tint = (colours.numpy() - 0.5) * 0.3                                        # [n, K+1, 3], per shape
    base = SCENE_PALETTE[mask] + np.take_along_axis(tint, labels.numpy()[..., None], 1)
    texture = np.random.default_rng(seed + first).normal(0, 0.03, base.shape[:2])[..., None]
    image = np.clip(base + texture, 0, 1).reshape(count, size, size, 3)
    return (image * 255).round().astype(np.uint8), mask.reshape(count, size, size)


def write_scenes(url: str, count: int, size: int = 32, seed: int = 0, first: int = 0, parquet: bool = False) -> str:
    """``scenes`` written as an annotated collection at ``url`` (a folder, or ``url``/scenes.parquet),
    with classes.txt; returns the collection's URL."""
    images, masks = scenes(count, size, seed, first)
    fs, root = fsspec.core.url_to_fs(url.rstrip("/"))
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/classes.txt", "w") as f:
        f.write("\n".join(SCENE_CLASSES) + "\n")
    encoded = [(png(image), png(mask)) for image, mask in zip(images, masks)]
    if parquet:
        import pyarrow as pa    # here: only the Parquet form needs a table
        with fs.open(f"{root}/scenes.parquet", "wb") as f:
            pq.write_table(pa.table({"image": [i for i, _ in encoded], "mask": [m for _, m in encoded]}), f)
        return url.rstrip("/") + "/scenes.parquet"
    fs.makedirs(f"{root}/images", exist_ok=True)
    fs.makedirs(f"{root}/masks", exist_ok=True)
    for n, (image, mask) in enumerate(encoded):
        fs.pipe(f"{root}/images/{first + n:05d}.png", image)
        fs.pipe(f"{root}/masks/{first + n:05d}.png", mask)
    return url.rstrip("/")


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
