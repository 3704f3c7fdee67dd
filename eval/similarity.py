"""2AFC perceptual similarity (paper A's NIGHTS evaluation): for each triplet (reference,
distortion A, distortion B, the share of humans who found B closer), a method picks the
distortion it finds more similar to the reference; its agreement with the humans is DreamSim's
2AFC score, the mean of p_B where it picks B, 1 − p_B where it picks A, and ½ on a tie.

Every method goes through one path (``similarities``): an encoder (``encoder.embed.Encoder``,
any spec ``vismem encoder eval-knn`` takes: a checkpoint URL, ``random-init:PRESET``,
``raw-pixels:SIZE``) compares cosine similarities of the embeddings, ``psnr`` and ``ssim``
(``eval.image_metrics``) compare the pixels. Triplets come from NIGHTS or are made from any image
collection with distortions of known order (``eval.triplets``). Writes ``OUT/similarity.json``
and ``similarity.png``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from encoder.embed import Encoder
from eval.image_metrics import psnr, ssim
from eval.memory_eval import new_figure, rounded, save_figure, write_report
from eval.triplets import KINDS, Triplets, read_nights, synthetic_triplets

log = logging.getLogger("vismem.eval.similarity")

PIXEL_METHODS = {"psnr": psnr, "ssim": ssim}


@dataclass
class SimilarityConfig:
    out: str                                         # folder URL for similarity.json and the plot
    nights: str | None = None                        # a NIGHTS root URL, or
    synthetic: str | None = None                     # an image collection URL to make triplets from
    encoders: tuple[str, ...] = ("raw-pixels:32",)
    baselines: tuple[str, ...] = ("psnr", "ssim")
    kinds: tuple[str, ...] = KINDS                   # synthetic distortions
    limit: int | None = 1000                         # synthetic: images used; NIGHTS: triplets read (None: all)
    size: int = 64                                   # NIGHTS: images are resized to this (pixel baselines see it)
    split: str | None = "test"                       # NIGHTS split
    min_votes: int = 6                               # NIGHTS: DreamSim's filter (the unanimous triplets)
    batch_size: int = 256
    seed: int = 0
    progress: bool = True
    device: str | None = None


def check(cfg: SimilarityConfig) -> None:
    if (cfg.nights is None) == (cfg.synthetic is None):
        raise ValueError("give the triplets: a NIGHTS folder or a collection to make synthetic triplets from "
                         "(one of the two)")
    for name in cfg.baselines:
        if name not in PIXEL_METHODS:
            raise ValueError(f"unknown pixel baseline {name!r}; choose from: {', '.join(PIXEL_METHODS)}")
    if not cfg.encoders and not cfg.baselines:
        raise ValueError("nothing to evaluate: give an encoder or a pixel baseline")
    if len(set(cfg.encoders) | set(cfg.baselines)) < len(cfg.encoders) + len(cfg.baselines):
        raise ValueError("a method is named twice")


def load_triplets(cfg: SimilarityConfig) -> Triplets:
    if cfg.nights is not None:
        return read_nights(cfg.nights, cfg.size, cfg.split, cfg.min_votes, limit=cfg.limit, progress=cfg.progress)
    return synthetic_triplets(cfg.synthetic, cfg.kinds, cfg.limit, cfg.seed, cfg.progress)


def agreement(sim_a: np.ndarray, sim_b: np.ndarray, p_b: np.ndarray) -> np.ndarray:
    """Per triplet: p_b where B is the more similar, 1 − p_b where A is, ½ on a tie."""
    return np.where(sim_b > sim_a, p_b, np.where(sim_a > sim_b, 1 - p_b, 0.5))


def similarities(method: str, triplets: Triplets, batch_size: int, progress: bool,
                 device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarity of A to the reference, of B) per triplet; higher is more similar."""
    n, out_a, out_b = len(triplets), [], []
    encoder = None if method in PIXEL_METHODS else Encoder.load(method, device=device)
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc=method, unit="batch", disable=not progress):
            ref, a, b = (t[start:start + batch_size] for t in (triplets.ref, triplets.a, triplets.b))
            if encoder is None:
                score = PIXEL_METHODS[method]
                out_a.append(score(ref, a).numpy())
                out_b.append(score(ref, b).numpy())
            else:
                e_ref, e_a, e_b = (encoder.embed(x, batch_size) for x in (ref, a, b))
                out_a.append((e_ref * e_a).sum(1))
                out_b.append((e_ref * e_b).sum(1))
    return np.concatenate(out_a).astype(np.float64), np.concatenate(out_b).astype(np.float64)


def run(cfg: SimilarityConfig, emit: Callable[[dict], None] = print) -> dict:
    """Every method on the triplets; ``emit`` gets one record per method. Returns the summary."""
    check(cfg)
    triplets = load_triplets(cfg)
    methods = list(cfg.baselines) + list(cfg.encoders)
    scores, by_kind = {}, {}
    kinds = np.asarray(triplets.kinds) if triplets.kinds is not None else None
    for method in methods:
        sim_a, sim_b = similarities(method, triplets, cfg.batch_size, cfg.progress, cfg.device)
        per = agreement(sim_a, sim_b, triplets.p_b)
        scores[method] = rounded(float(per.mean()))
        record = {"method": method, "agreement": scores[method], "ties": int((sim_a == sim_b).sum())}
        if kinds is not None:
            by_kind[method] = {k: rounded(float(per[kinds == k].mean())) for k in cfg.kinds if (kinds == k).any()}
            record["by_kind"] = by_kind[method]
        emit(record)
    best = max(scores, key=scores.get)
    summary = {"evaluation": "similarity", "triplets": triplets.source, "triplet_count": len(triplets),
               "agreement": scores, "best": {"method": best, "agreement": scores[best]},
               "by_kind": by_kind or None, "config": asdict(cfg),
               "kind_counts": {k: int((kinds == k).sum()) for k in cfg.kinds} if kinds is not None else None,
               "human_ceiling": rounded(float(np.maximum(triplets.p_b, 1 - triplets.p_b).mean()))}
    summary["plots"] = {"agreement": plot(summary, cfg.out)}
    summary["report"] = write_report(cfg.out, "similarity", summary)
    return summary


def plot(summary: dict, out: str) -> str:
    """Bars of agreement per method (and per distortion, for synthetic triplets)."""
    methods = list(summary["agreement"])
    fig, ax = new_figure(f"2AFC agreement with the judgements ({summary['triplet_count']} triplets, "
                         f"{summary['triplets'].split(':')[0]})", "method", "agreement (%)")
    groups = ["all"] + (list(next(iter(summary["by_kind"].values()))) if summary["by_kind"] else [])
    width = 0.8 / len(groups)
    x = np.arange(len(methods))
    for g, group in enumerate(groups):
        values = [summary["agreement"][m] if group == "all" else summary["by_kind"][m].get(group, np.nan)
                  for m in methods]
        ax.bar(x + (g - (len(groups) - 1) / 2) * width, [100 * v for v in values], width, label=group)
    ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.axhline(100 * summary["human_ceiling"], color="black", linestyle=":", linewidth=1, label="judges' ceiling")
    ax.set_xticks(x, methods, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=3)
    return save_figure(fig, out, "similarity")
