"""A labelled grid of samples of every generator, for people to look at."""

from __future__ import annotations

import io
from typing import Sequence

import fsspec
import numpy as np
from PIL import Image, ImageDraw

from procdata.generators import GENERATORS, generate


def preview_grid(generators: Sequence[str] | None = None, per_row: int = 8, size: int = 64, seed: int = 0,
                 label_width: int = 96) -> Image.Image:
    """One row per generator: its name, then ``per_row`` samples (indices 0..per_row-1)."""
    names = list(generators or GENERATORS)
    grid = Image.new("RGB", (label_width + per_row * (size + 2), len(names) * (size + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for row, name in enumerate(names):
        images = generate(name, seed, range(per_row), size).permute(0, 2, 3, 1).numpy()
        top = row * (size + 2)
        draw.text((4, top + size // 2 - 5), name, fill="black")
        for col, image in enumerate(images):
            grid.paste(Image.fromarray(np.ascontiguousarray(image)), (label_width + col * (size + 2), top))
    return grid


def write_preview(out_url: str, **kwargs) -> str:
    buf = io.BytesIO()
    preview_grid(**kwargs).save(buf, format="PNG", optimize=True)
    with fsspec.open(out_url, "wb") as f:
        f.write(buf.getvalue())
    return out_url
