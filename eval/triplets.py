"""2AFC triplets for ``eval.similarity``: a reference, two distortions A and B, and the share of
human judges who found B the closer one.

Two sources:

- ``read_nights``: the NIGHTS dataset (Fu et al. 2023, DreamSim) as it unpacks, ``ROOT/data.csv``
  with ``ref/xxx/yyy.png``, ``distort/xxx/yyy_0.png`` (A, "left") and ``distort/xxx/yyy_1.png``
  (B, "right"), on any fsspec URL. It reads the CSV as DreamSim's own loader does: the image paths
  from the ``ref_path``, ``left_path``, ``right_path`` columns (else the 5th to 7th columns), the
  judgement from the 3rd column (DreamSim scores it as the share of judges choosing the right
  image; ``judgement=`` names another column), only rows with ``votes`` >= ``min_votes`` (DreamSim:
  6, the unanimous triplets) and of the ``split`` asked for.
- ``synthetic_triplets``: from any collection of same-size images, one distortion at two strengths
  (noise, blur, lower contrast, a grey occluding square). The weaker is the "human" choice, so a
  test needs no download and the right answer is known. Each strength draws its own noise field
  and square position, so the pair is not nested (the stronger does not contain the weaker): a
  method must judge how much of the image changed, not spot one difference.
  Kind ``class`` uses the labels instead: A and B are two other images of the collection, one of
  the reference's class and one of another class, and the same-class one is the answer (a
  semantic judgement: the pixel baselines are near chance on it, so it is the part that ranks
  encoders, where the four distortions only check that a method sees them).
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import torchvision.transforms.functional as TF
from tqdm.auto import tqdm

from encoder.embed import Resize, decode_image
from eval.readable import same_size_images
from eval.sweeps import KINDS
LEVELS = {                                           # five strengths per kind, weakest first
    "noise": (0.02, 0.05, 0.1, 0.2, 0.35),           # Gaussian noise σ (intensities in [0, 1])
    "blur": (0.5, 1.0, 1.5, 2.5, 4.0),               # Gaussian blur σ in pixels
    "contrast": (0.9, 0.75, 0.55, 0.35, 0.15),       # contrast kept around the image mean
    "occlusion": (0.1, 0.2, 0.3, 0.45, 0.6),         # side of a mean-grey square, a fraction of the image's
}


@dataclass
class Triplets:
    ref: torch.Tensor           # uint8 [n, 3, S, S]
    a: torch.Tensor             # distortion A ("left", distort_0)
    b: torch.Tensor             # distortion B ("right", distort_1)
    p_b: np.ndarray             # [n] share of judges who found B closer to the reference
    source: str
    kinds: list[str] | None = None     # synthetic: the distortion of each triplet

    def __len__(self) -> int:
        return len(self.p_b)


def read_table(url: str):
    import pandas as pd          # here: only the NIGHTS reader parses a CSV
    with fsspec.open(url, "rb") as f:
        return pd.read_csv(io.BytesIO(f.read()))


def read_nights(root: str, size: int = 64, split: str | None = "test", min_votes: int = 6,
                judgement: str | None = None, limit: int | None = None, progress: bool = True) -> Triplets:
    """The NIGHTS triplets under ``root`` (see the module docstring), resized to ``size`` px."""
    root = root.rstrip("/")
    table = read_table(f"{root}/data.csv")
    if "votes" in table.columns and min_votes:
        table = table[table["votes"] >= min_votes]
    if split is not None:
        if "split" not in table.columns:
            raise ValueError(f"{root}/data.csv has no 'split' column; pass split=None to use every row")
        table = table[table["split"] == split]
    if limit:
        table = table.iloc[:limit]
    if not len(table):
        raise ValueError(f"{root}/data.csv has no triplets with split {split!r} and votes >= {min_votes}")
    named = all(c in table.columns for c in ("ref_path", "left_path", "right_path"))
    if not named and table.shape[1] < 7:
        raise ValueError(f"{root}/data.csv has neither ref_path/left_path/right_path columns nor DreamSim's 7+ "
                         f"columns (it has {list(table.columns)})")
    paths = table[["ref_path", "left_path", "right_path"]] if named else table.iloc[:, 4:7]
    if judgement is not None and judgement not in table.columns:
        raise ValueError(f"{root}/data.csv has no judgement column {judgement!r} (it has {list(table.columns)})")
    p_b = (table[judgement] if judgement else table.iloc[:, 2]).to_numpy(dtype=np.float64)
    if p_b.min() < 0 or p_b.max() > 1:
        raise ValueError(f"{root}/data.csv: the judgement column holds values outside [0, 1] (a share of judges)")
    resize = Resize(size)
    images = []
    for column in range(3):
        urls = [posixpath.join(root, p) for p in paths.iloc[:, column]]
        images.append(read_images(urls, resize, progress, ("reference", "distortion A", "distortion B")[column]))
    return Triplets(*images, p_b=p_b, source=f"nights:{root}:{split}")


def read_images(urls: list[str], resize: Resize, progress: bool, what: str, chunk: int = 256) -> torch.Tensor:
    """uint8 ``[n, 3, S, S]`` of the images at ``urls``, fetched ``chunk`` at a time (one batched
    request on object storage); an unreadable one is an error naming it."""
    fs, _ = fsspec.core.url_to_fs(urls[0])
    out = np.empty((len(urls), 3, resize.size, resize.size), np.uint8)
    with tqdm(total=len(urls), desc=f"read {what}", unit="img", disable=not progress) as bar:
        for start in range(0, len(urls), chunk):
            group = urls[start:start + chunk]
            paths = [fsspec.core.url_to_fs(u)[1] for u in group]
            try:
                blobs = fs.cat(paths)
            except FileNotFoundError as e:
                raise ValueError(f"a triplet image is missing: {e}") from None
            for i, (url, path) in enumerate(zip(group, paths)):
                try:
                    out[start + i] = resize(decode_image(blobs[path]))
                except ValueError as e:
                    raise ValueError(f"{url}: {e}") from None
            bar.update(len(group))
    return torch.from_numpy(out)


def distort(x: torch.Tensor, kind: str, level: float, noise: torch.Tensor, box: tuple[float, float]) -> torch.Tensor:
    """One float image ``[3, H, W]`` in [0, 1] distorted by ``kind`` at ``level``, with ``noise`` (a
    unit Gaussian field) and ``box`` (the occluder's centre, fractions of height and width)."""
    if kind == "noise":
        return (x + level * noise).clamp(0, 1)
    if kind == "blur":
        width = min(2 * int(np.ceil(3 * level)) + 1, (min(x.shape[-2:]) - 1) // 2 * 2 + 1)
        return TF.gaussian_blur(x, [width, width], [level, level])
    mean = x.mean(dim=(1, 2), keepdim=True)
    if kind == "contrast":
        return mean + level * (x - mean)
    if kind == "occlusion":
        h, w = x.shape[-2:]
        side = max(1, round(level * min(h, w)))
        top = int(np.clip(round(box[0] * h - side / 2), 0, h - side))
        left = int(np.clip(round(box[1] * w - side / 2), 0, w - side))
        out = x.clone()
        out[:, top:top + side, left:left + side] = mean
        return out
    raise ValueError(f"unknown distortion {kind!r}; choose from: {', '.join(KINDS)}")


def synthetic_triplets(url: str, kinds: tuple[str, ...] = KINDS, limit: int | None = 1000, seed: int = 0,
                       progress: bool = True) -> Triplets:
    """Triplets from the images of the collection at ``url`` (``limit`` of them, seeded): each gets
    one of ``kinds``, a distortion at two distinct strengths of ``LEVELS`` or ``class`` (see the
    module docstring), in random order; p_b is 1 where B is the closer one."""
    for kind in kinds:
        if kind not in LEVELS and kind != "class":
            raise ValueError(f"unknown distortion {kind!r}; choose from: {', '.join(KINDS)}")
    images, labels = same_size_images(url, limit, seed)
    labels = np.asarray(labels, dtype=object)
    if "class" in kinds and (any(label is None for label in labels) or len(set(labels)) < 2):
        raise ValueError(f"{url}: the 'class' triplets need labelled images of at least two classes "
                         f"(leave 'class' out of the kinds for an unlabelled collection)")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    a, b, p_b, chosen = [], [], np.zeros(len(images)), []
    for n in tqdm(range(len(images)), desc="distort", unit="img", disable=not progress):
        kind = kinds[rng.integers(len(kinds))]
        same = np.flatnonzero(labels == labels[n]) if kind == "class" else None
        if kind == "class" and len(same) < 2:
            kind = next((k for k in kinds if k != "class"), None)
            if kind is None:
                raise ValueError(f"{url}: class {labels[n]!r} has one image; 'class' triplets need two a class")
        if kind == "class":
            pair = [images[rng.choice(same[same != n])], images[rng.choice(np.flatnonzero(labels != labels[n]))]]
        else:
            pair = distorted_pair(images[n], kind, rng, gen)
        if rng.random() < 0.5:               # B is the closer one
            pair.reverse()
            p_b[n] = 1.0
        a.append(pair[0])
        b.append(pair[1])
        chosen.append(kind)
    return Triplets(images, torch.stack(a), torch.stack(b), p_b, f"synthetic:{url}", chosen)


def distorted_pair(image: torch.Tensor, kind: str, rng: np.random.Generator, gen: torch.Generator) -> list:
    """[the weaker, the stronger] of two random strengths of ``kind`` applied to ``image`` (uint8)."""
    weak, strong = sorted(rng.choice(len(LEVELS[kind]), 2, replace=False))
    x = image.double() / 255
    return [to_uint8(distort(x, kind, LEVELS[kind][level], torch.randn(x.shape, generator=gen,
                                                                           dtype=torch.float64),
                                 tuple(rng.uniform(0.3, 0.7, 2)))) for level in (weak, strong)]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
