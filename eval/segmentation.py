"""Zero-shot segmentation from patch tokens (paper A): how well an encoder's patch tokens follow an
image's segments, with no training on masks.

- **PCA R²**: per held-out image, its patch tokens are projected on their own first
  ``components`` principal components (the per-image PCA), and R² = 1 − mean over images of
  Σ_k Σ_{i∈segment k} ‖x_i − μ_k‖² / Σ_i ‖x_i − x̄‖², over the foreground patches only (the
  background, class 0, and ignored patches are dropped; x̄ is the foreground mean). An image with
  fewer than two foreground patches, or none that differ, is skipped.
- **Patch-kNN label transfer**: every patch of the memory images (``--memory``) is stored with its
  label; each patch of a held-out image (``--queries``) takes the softmax-weighted vote (T = 0.07,
  as ``eval.knn``) of its k most similar memory patches (cosine, ``index.exact``'s exact search).
  Predictions are painted back at the encoder's input resolution and scored against the mask
  resized the same way: mIoU (over every class present in the truth or the prediction, background
  included, as Pascal VOC), pixel accuracy, and foreground accuracy (pixels whose true class is
  not the background).

A patch's label is the commonest class of the mask pixels it covers (ignore, 255, not counted).
Tokens: a network's (``Encoder.embed_patches``, the map its readout pools); for ``raw-pixels:SIZE``
every pixel of the SIZE × SIZE input is a token, its RGB minus mid-grey (the raw-RGB baseline).
Writes ``OUT/segmentation.json``, ``segmentation.png`` and ``segmentation_examples.png``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from encoder.embed import Encoder, Resize
from eval.masks import IGNORE, Annotated, read_annotated
from eval.memory_eval import new_figure, rounded, save_figure, write_report
from index.exact import exact_search
from index.voting import neighbour_weights

log = logging.getLogger("vismem.eval.segmentation")

METRICS = ("r2", "miou", "pixel_accuracy", "foreground_accuracy")


@dataclass
class SegmentationConfig:
    memory: str                                  # annotated images the labels are transferred from
    queries: str                                 # held-out annotated images (R² and the transfer's scores)
    out: str
    encoders: tuple[str, ...] = ("raw-pixels:32",)
    classes: str | None = None                   # class-names file (default: classes.txt beside the images)
    k: int = 10
    temperature: float = 0.07
    components: int = 3                          # per-image PCA components of R² (0: the tokens themselves)
    memory_limit: int | None = None
    query_limit: int | None = None
    batch_size: int = 64
    examples: int = 4
    progress: bool = True
    device: str | None = None


@dataclass
class Tokens:
    tokens: np.ndarray           # float32 [n, h, w, d]
    labels: np.ndarray           # uint8 [n, h, w]: each patch's class (IGNORE: none)
    masks: np.ndarray            # uint8 [n, S, S]: the masks at the encoder's input geometry


def input_mask(mask: np.ndarray, resize: Resize) -> np.ndarray:
    """A mask ``[H, W]`` put through the encoder's resize and centre crop, nearest-neighbour."""
    nh, nw = resize.shape(*mask.shape)
    x = torch.from_numpy(mask)[None, None].float()
    if (nh, nw) != mask.shape:
        x = F.interpolate(x, size=(nh, nw), mode="nearest")
    top, left = (nh - resize.size) // 2, (nw - resize.size) // 2
    return x[0, 0, top:top + resize.size, left:left + resize.size].to(torch.uint8).numpy()


def cell_of(size: int, h: int, w: int) -> np.ndarray:
    """``[S, S]``: the patch (row-major over the h × w grid) each input pixel lies in."""
    ys, xs = np.meshgrid(np.arange(size) * h // size, np.arange(size) * w // size, indexing="ij")
    return ys * w + xs


def patch_labels(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """``[h, w]``: the commonest non-ignored class of the mask pixels under each patch (IGNORE if none)."""
    cells = cell_of(mask.shape[0], h, w).ravel()
    counts = np.bincount(cells * 256 + mask.ravel(), minlength=h * w * 256).reshape(h * w, 256)
    counts[:, IGNORE] = 0
    return np.where(counts.any(1), counts.argmax(1), IGNORE).astype(np.uint8).reshape(h, w)


def patch_tokens(encoder: Encoder, data: Annotated, batch_size: int, progress: bool) -> Tokens:
    """The tokens of every image of ``data`` and their patches' labels (see the module docstring)."""
    out = []
    for start in tqdm(range(0, len(data), batch_size), desc=f"tokens {encoder.name}", unit="batch",
                      disable=not progress):
        batch = data.images[start:start + batch_size]
        with torch.no_grad():
            if encoder.model is None:
                out.append((encoder.preprocess(batch) - 0.5).permute(0, 2, 3, 1).float().cpu().numpy())
            else:
                out.append(encoder.embed_patches(batch))
    tokens = np.concatenate(out)
    masks = np.stack([input_mask(m, encoder.resize) for m in data.masks])
    h, w = tokens.shape[1:3]
    return Tokens(tokens, np.stack([patch_labels(m, h, w) for m in masks]), masks)


def pca_r2(tokens: np.ndarray, labels: np.ndarray, components: int) -> float | None:
    """One image's R² (see the module docstring); tokens ``[P, d]``, labels ``[P]``."""
    x = tokens.astype(np.float64)
    if components:
        x = x - x.mean(0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        x = x @ vt[:components].T
    keep = (labels != 0) & (labels != IGNORE)
    x, seg = x[keep], labels[keep]
    if len(x) < 2:
        return None
    total = ((x - x.mean(0)) ** 2).sum()
    if total <= 1e-12 * max(1.0, float((x ** 2).sum())):
        return None
    within = sum(((x[seg == s] - x[seg == s].mean(0)) ** 2).sum() for s in np.unique(seg))
    return float(1 - within / total)


def transfer(memory: Tokens, queries: Tokens, classes: int, k: int, temperature: float) -> np.ndarray:
    """Predicted classes ``[n, S, S]`` of the query images, by patch-kNN from the memory's patches."""
    d = memory.tokens.shape[-1]
    flat, flat_labels = memory.tokens.reshape(-1, d), memory.labels.ravel()
    keep = flat_labels != IGNORE
    bank = np.ascontiguousarray(F.normalize(torch.from_numpy(flat[keep]), dim=-1).numpy(), dtype=np.float32)
    bank_labels = flat_labels[keep].astype(np.int64)
    n, h, w = queries.labels.shape
    asked = np.ascontiguousarray(F.normalize(torch.from_numpy(queries.tokens.reshape(-1, d)), dim=-1).numpy(),
                                 dtype=np.float32)
    sims, ids = exact_search(bank, asked, k)
    weights = neighbour_weights(sims, "softmax", temperature)
    scores = np.zeros((len(asked), classes))
    np.add.at(scores, (np.repeat(np.arange(len(asked)), ids.shape[1]), bank_labels[ids].ravel()), weights.ravel())
    patches = scores.argmax(1).reshape(n, h * w)
    cells = cell_of(queries.masks.shape[1], h, w)
    return np.stack([p[cells] for p in patches]).astype(np.uint8)


def scores(truth: np.ndarray, predicted: np.ndarray, classes: int) -> dict:
    """mIoU, pixel and foreground accuracy over the non-ignored pixels, and each class's IoU."""
    valid = truth != IGNORE
    t, p = truth[valid].astype(np.int64), predicted[valid].astype(np.int64)
    conf = np.bincount(t * classes + p, minlength=classes * classes).reshape(classes, classes)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = {c: inter[c] / union[c] for c in range(classes) if union[c] > 0}
    foreground = conf[1:].sum()
    return {"miou": float(np.mean(list(iou.values()))), "pixel_accuracy": float(inter.sum() / conf.sum()),
            "foreground_accuracy": float(inter[1:].sum() / foreground) if foreground else None, "iou": iou}


def evaluate(spec: str, cfg: SegmentationConfig, memory: Annotated, queries: Annotated) -> tuple[dict, tuple]:
    """One encoder's record, and (its predicted masks, the true ones) at its input geometry."""
    encoder = Encoder.load(spec, device=cfg.device)
    mem, asked = (patch_tokens(encoder, data, cfg.batch_size, cfg.progress) for data in (memory, queries))
    per_image = [pca_r2(t.reshape(-1, t.shape[-1]), l.ravel(), cfg.components)
                 for t, l in zip(asked.tokens, asked.labels)]
    used = [r for r in per_image if r is not None]
    predicted = transfer(mem, asked, len(memory.classes), cfg.k, cfg.temperature)
    found = scores(asked.masks, predicted, len(memory.classes))
    record = {"encoder": spec, "r2": rounded(float(np.mean(used))) if used else None, "r2_images": len(used),
              "miou": rounded(found["miou"]), "pixel_accuracy": rounded(found["pixel_accuracy"]),
              "foreground_accuracy": rounded(found["foreground_accuracy"]),
              "iou": {memory.classes[c]: rounded(v) for c, v in found["iou"].items()},
              "grid": list(asked.labels.shape[1:]), "input_size": int(asked.masks.shape[1]),
              "memory_patches": int((mem.labels != IGNORE).sum())}
    return record, (predicted, asked.masks)


def run(cfg: SegmentationConfig, emit: Callable[[dict], None] = print) -> dict:
    """Every encoder on the annotated sets; ``emit`` gets one record per encoder."""
    if not cfg.encoders:
        raise ValueError("give at least one encoder")
    if cfg.k < 1 or cfg.temperature <= 0 or cfg.components < 0:
        raise ValueError("k must be positive, the temperature above 0 and components 0 or more")
    memory = read_annotated(cfg.memory, cfg.classes, cfg.memory_limit, cfg.progress)
    queries = read_annotated(cfg.queries, cfg.classes, cfg.query_limit, cfg.progress)
    if queries.classes != memory.classes:
        raise ValueError(f"the memory's classes {memory.classes} and the queries' {queries.classes} differ")
    records, predictions = {}, {}
    for spec in cfg.encoders:
        records[spec], predictions[spec] = evaluate(spec, cfg, memory, queries)
        emit(records[spec])
    summary = {"evaluation": "segmentation", "memory": cfg.memory, "queries": cfg.queries,
               "memory_images": len(memory), "query_images": len(queries), "classes": memory.classes,
               **{m: {spec: r[m] for spec, r in records.items()} for m in METRICS},
               "encoders": records, "config": asdict(cfg)}
    summary["plots"] = {"scores": plot_scores(summary, cfg.out),
                        "examples": plot_examples(queries, predictions, cfg.examples, cfg.out)}
    summary["report"] = write_report(cfg.out, "segmentation", summary)
    return summary


def plot_scores(summary: dict, out: str) -> str:
    """Grouped bars: the four figures for each encoder."""
    fig, ax = new_figure(f"zero-shot segmentation ({summary['memory_images']} memory, {summary['query_images']} "
                         f"held-out images)", "figure", "value")
    encoders = list(summary["encoders"])
    width = 0.8 / len(encoders)
    for e, spec in enumerate(encoders):
        values = [summary[m][spec] if summary[m][spec] is not None else np.nan for m in METRICS]
        ax.bar(np.arange(len(METRICS)) + (e - (len(encoders) - 1) / 2) * width, values, width, label=spec)
    ax.set_xticks(np.arange(len(METRICS)), ["PCA R²", "mIoU", "pixel acc.", "foreground acc."])
    ax.set_ylim(0, 1.25)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    return save_figure(fig, out, "segmentation")


def plot_examples(queries: Annotated, predictions: dict, count: int, out: str) -> str:
    """Rows of held-out images: the image, its mask, and each encoder's transferred labels."""
    import matplotlib                   # here: only drawing needs matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt     # (see above)
    count = max(1, min(count, len(queries)))
    columns = 2 + len(predictions)
    fig, axes = plt.subplots(count, columns, figsize=(1.6 * columns, 1.6 * count), dpi=110, squeeze=False)
    classes = len(queries.classes)
    for row in range(count):
        truth = next(iter(predictions.values()))[1][row]
        panels = [(queries.images[row], "image"), (truth, "mask")]
        panels += [(pred[row], spec) for spec, (pred, _) in predictions.items()]
        for col, (panel, title) in enumerate(panels):
            ax = axes[row, col]
            if panel.ndim == 3:
                ax.imshow(panel)
            else:
                ax.imshow(np.where(panel == IGNORE, 0, panel), cmap="tab10", vmin=0, vmax=max(9, classes - 1),
                          interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=6)
    return save_figure(fig, out, "segmentation_examples")
