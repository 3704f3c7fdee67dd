"""The honest comparison, in one call: the procedural encoder against the same recipe trained on
real images, beside every baseline, on every evaluation set.

Both runs get the same preset, seed and budget. The procedural run never opens the control
collection (its provenance says "procedural only"); the control run reads only the collection it is
given. Each eval set is decoded once and embedded by every encoder through the pipeline's own two
steps (``Encoder.resize``, then ``Encoder.embed_pixels``), then scored with eval-knn's protocol
(softmax votes, T = 0.07, best k of the sweep) and 1-NN. For the curve of top-1 against training
steps, both runs keep every checkpoint and up to ``curve_points`` of them, log-spaced in steps, are
scored on the first eval set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

import fsspec
import numpy as np
import torch

from encoder.backbone import build_backbone
from encoder.config import TrainConfig
from encoder.embed import Encoder
from encoder.runs import checkpoints
from eval.knn import K_SWEEP, knn_sweep
from eval.readable import readable_images

log = logging.getLogger("vismem.eval.compare")

BASELINES = {"raw_pixels_32": "raw-pixels:32", "raw_pixels_8": "raw-pixels:8", "colour_histogram": "colour-histogram:4"}


@dataclass(frozen=True)
class EvalSet:
    """A labelled memory and labelled queries (any collection URL), named for the report."""

    name: str
    memory: str
    queries: str


def parse_eval_set(text: str) -> EvalSet:
    """``NAME=MEMORY,QUERIES`` or ``MEMORY,QUERIES`` (named after the memory's folder)."""
    name, sep, urls = text.partition("=")
    if not sep:
        name, urls = "", text
    parts = [u.strip() for u in urls.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--eval takes [NAME=]MEMORY_URL,QUERIES_URL, got {text!r}")
    return EvalSet(name or parts[0].rstrip("/").rsplit("/", 2)[-2 if parts[0].endswith(".parquet") else -1],
                   parts[0], parts[1])


@dataclass
class Decoded:
    """A labelled collection decoded once: RGB arrays (any sizes) and labels."""

    images: list
    labels: list

    @classmethod
    def read(cls, url: str) -> "Decoded":
        images, labels = [], []
        for _, items in readable_images(url):
            for uri, label, image in items:
                if label is None:
                    raise ValueError(f"{uri} has no label: an eval set needs a labelled collection")
                images.append(image)
                labels.append(label)
        return cls(images, labels)


def embed(encoder: Encoder, data: Decoded, batch_size: int = 1024) -> np.ndarray:
    """The pipeline's two steps: resize on the CPU to uint8, then normalise and embed on the device."""
    return encoder.embed_pixels(encoder.resize.many(data.images), batch_size)


def score(encoder: Encoder, memory: Decoded, queries: Decoded) -> dict:
    """kNN top-1 (best k of the sweep, softmax T = 0.07), 1-NN and the best k."""
    result = knn_sweep(embed(encoder, memory), memory.labels, embed(encoder, queries), queries.labels, K_SWEEP)
    return {"top1": result["top1"], "nn1": result["by_k"][1], "best_k": result["best_k"]}


def random_init(cfg: TrainConfig) -> Encoder:
    """The preset's network as the runs start it (seed ``cfg.seed``), untrained."""
    torch.manual_seed(cfg.seed)
    name = f"random-init:{cfg.preset}:{cfg.seed}"
    return Encoder(name, cfg.arch, build_backbone(cfg.arch), name)


def curve_steps(found: list[tuple[str, int]], points: int) -> list[tuple[str, int]]:
    """Up to ``points`` checkpoints, log-spaced in steps, always the last."""
    if len(found) <= points:
        return found
    steps = np.array([step for _, step in found])
    wanted = np.geomspace(max(1, steps[0]), steps[-1], points)
    chosen = sorted({int(np.abs(np.log(steps) - np.log(w)).argmin()) for w in wanted} | {len(found) - 1})
    return [found[i] for i in chosen]


def summarise(scores: dict, sets: list[str]) -> dict:
    """Per eval set: procedural / real, the gap closure (procedural − random) / (real − random), the
    best raw-pixel baseline and whether the procedural encoder beats it."""
    out = {}
    for name in sets:
        top1 = {enc: s[name]["top1"] for enc, s in scores.items()}
        pixels = max(top1["raw_pixels_32"], top1["raw_pixels_8"])
        gap = top1["real_control"] - top1["random_init"]
        out[name] = {"ratio_to_real": top1["procedural"] / top1["real_control"] if top1["real_control"] else None,
                     "gap_closure": (top1["procedural"] - top1["random_init"]) / gap if gap > 0 else None,
                     "best_raw_pixels": pixels, "beats_raw_pixels": top1["procedural"] > pixels}
    return out


def compare(cfg: TrainConfig, control: str, evals: list[EvalSet], out_url: str, train_procedural, train_control,
            curve_points: int = 6) -> dict:
    """Train both runs (``train_procedural(cfg, out)`` and ``train_control(cfg, control, out)``
    return encoder URLs), score everything, write ``OUT/compare.json`` and ``OUT/compare.png``."""
    if not evals:
        raise ValueError("compare needs at least one --eval set")
    cfg = dataclasses.replace(cfg, keep_checkpoints=0)
    out_url = out_url.rstrip("/")
    runs = {"procedural": f"{out_url}/procedural", "real_control": f"{out_url}/real_control"}
    decoded = {e.name: (Decoded.read(e.memory), Decoded.read(e.queries)) for e in evals}    # bad URLs fail first
    urls = {"procedural": train_procedural(cfg, runs["procedural"]),
            "real_control": train_control(cfg, control, runs["real_control"])}

    encoders = {name: (lambda url=url: Encoder.load(url)) for name, url in urls.items()}
    encoders["random_init"] = lambda: random_init(cfg)
    encoders.update({name: (lambda spec=spec: Encoder.load(spec)) for name, spec in BASELINES.items()})
    scores, provenance = {}, {}
    for name, make in encoders.items():
        encoder = make()
        scores[name] = {e.name: score(encoder, *decoded[e.name]) for e in evals}
        if name in urls:
            provenance[name] = encoder.provenance
        log.info("%s: %s", name, ", ".join(f"{s} top-1 {100 * r['top1']:.1f}%" for s, r in scores[name].items()))

    first = evals[0].name
    curves = {run: [{"step": step, "top1": score(Encoder.load(url), *decoded[first])["top1"]}
                    for url, step in curve_steps(checkpoints(runs[run]), curve_points)] for run in runs}
    result = {"preset": cfg.preset, "max_minutes": cfg.max_minutes, "max_steps": cfg.max_steps, "seed": cfg.seed,
              "control_collection": control, "eval_sets": [dataclasses.asdict(e) for e in evals],
              "encoders": {**urls, "random_init": f"random-init:{cfg.preset}:{cfg.seed}", **BASELINES},
              "provenance": provenance, "scores": scores, "summary": summarise(scores, [e.name for e in evals]),
              "curve_eval_set": first, "curves": curves}
    with fsspec.open(f"{out_url}/compare.json", "w") as f:
        json.dump(result, f, indent=2)
    result["plot"] = plot(result, f"{out_url}/compare.png")
    return result


def plot(result: dict, url: str) -> str:
    """Top-1 on the first eval set against training steps for both runs, the baselines as lines."""
    import matplotlib                   # here: only a comparison that draws its plot pays for matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt     # (see above)
    first = result["curve_eval_set"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for run, colour in (("procedural", "tab:blue"), ("real_control", "tab:green")):
        points = result["curves"][run]
        ax.plot([p["step"] for p in points], [100 * p["top1"] for p in points], "o-", color=colour,
                label=run.replace("_", " "))
    for name, style in (("random_init", ":"), ("raw_pixels_32", "--"), ("raw_pixels_8", "-."),
                        ("colour_histogram", (0, (1, 3)))):
        ax.axhline(100 * result["scores"][name][first]["top1"], color="grey", linestyle=style,
                   label=name.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xlabel("training steps")
    ax.set_ylabel(f"kNN top-1 on {first} (%)")
    ax.set_title(f"{result['preset']}, {result['max_minutes']} min: procedural against real data")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with fsspec.open(url, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return url
