"""Real labelled images that install with the project: scikit-learn's bundled handwritten digits.

1,797 8×8 grey digits (UCI optdigits test set), written once as PNG image folders
``ROOT/{memory,queries}/<label>/<id>.png`` upsampled to ``size`` px, with a fixed, class-stratified
split into memory and held-out queries.
"""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
from PIL import Image

MARKER = "_digits.json"


def write_digits(root_url: str, size: int = 32, query_fraction: float = 0.25, seed: int = 0) -> dict:
    """Write the digits under ``root_url`` unless a complete copy is already there.

    Returns ``{"memory": url, "queries": url, "counts": {...}}``. The marker file is written last,
    so an interrupted write is redone next time.
    """
    from sklearn.datasets import load_digits     # here: scikit-learn only when the digits are first written

    root_url = root_url.rstrip("/")
    fs, root = fsspec.core.url_to_fs(root_url)
    out = {"memory": f"{root_url}/memory", "queries": f"{root_url}/queries"}
    if fs.exists(f"{root}/{MARKER}"):
        with fs.open(f"{root}/{MARKER}") as f:
            previous = json.load(f)
        if previous.get("size") == size and previous.get("query_fraction") == query_fraction and previous.get("seed") == seed:
            return {**out, "counts": previous["counts"]}
    digits = load_digits()
    images = (digits.images / 16.0 * 255).round().astype(np.uint8)
    labels = digits.target
    rng = np.random.default_rng(seed)
    is_query = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        is_query[members[:round(len(members) * query_fraction)]] = True
    for n, (image, label) in enumerate(zip(images, labels)):
        split = "queries" if is_query[n] else "memory"
        buf = io.BytesIO()
        Image.fromarray(image, mode="L").resize((size, size), Image.Resampling.BICUBIC).save(buf, format="PNG")
        fs.makedirs(f"{root}/{split}/{label}", exist_ok=True)
        with fs.open(f"{root}/{split}/{label}/{n:04d}.png", "wb") as f:
            f.write(buf.getvalue())
    counts = {"memory": int((~is_query).sum()), "queries": int(is_query.sum())}
    with fs.open(f"{root}/{MARKER}", "w") as f:
        json.dump({"size": size, "query_fraction": query_fraction, "seed": seed, "counts": counts}, f)
    return {**out, "counts": counts}
