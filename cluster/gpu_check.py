"""The GPU check: one command that measures what a GPU buys, with the project's own torch code.

    python -m cluster.gpu_check --out gpu_check.json

In one process and without Ray or FAISS (GPU machines for this check have torch alone), it
1. names the GPU and the library versions;
2. times every procedural generator at 64 and 224 px on the GPU (procdata.bench);
3. times the DINO training step of tiny-cpu, vit-t16 and vit-s16 in mixed precision, data
   generation included and separately (encoder.bench.local_train_throughput: the training loop);
4. trains RECIPE on procedural data only for a fixed time (encoder.local.train_local), then
   evaluates it on CIFAR-10 with eval-knn's protocol (softmax votes, T = 0.07, best k of the
   sweep) beside the same network untrained and raw pixels, and times embedding;
5. splits a training batch's data time into its parts (``data_path``: each generator of the
   mix, the multi-crop augmentation, and torch.profiler's top operators of whole batches);
6. times the embedding job's two steps as a pipeline (JPEG decode + resize on CPU worker
   processes feeding the encoder on the GPU) against the bare forward pass (``embed_pipeline``).

Every section is timed and guarded: one that fails records its error and the next one runs, and
the JSON file is rewritten after each, so a run cut short still leaves what it measured.
``--tiny`` shrinks everything so that the CPU test suite runs the whole script in seconds.

Each section imports what it uses inside, so that a module missing on the machine fails that
section alone (recorded) and not the whole check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

log = logging.getLogger("vismem.gpu_check")

# The recipe trained for the quality figure, chosen for the best CIFAR-10 kNN in ~5 GPU-minutes:
# a ViT-S at 32 px with 4 px patches (64 tokens, CIFAR's own resolution; patch 8 leaves a 4×4 grid)
# on tiny-cpu's short-run DINO settings (Sinkhorn centring, KoLeo), a batch of 512 to fill the GPU,
# the peak lr of DINO's ViT-S (1.5e-3 at this batch) and the usual teacher momentum for runs of
# thousands of steps.
RECIPE = {"preset": "tiny-cpu",
          "arch": {"patch_size": 4, "embed_dim": 384, "depth": 12, "num_heads": 6},
          "batch_size": 512, "lr": 7.5e-4, "momentum_teacher": 0.996, "warmup": 0.1}
STEP_PRESETS = ("tiny-cpu", "vit-t16", "vit-s16")
# DINO (Caron et al. 2021, Table 8): ViT-S/16, 2×224² + 10×96² crops, 100 ImageNet epochs in 24.2 h
# on two 8-GPU V100 machines.
DINO_PAPER = {"model": "ViT-S/16", "crops": "2x224 + 10x96", "gpus": "16 x V100", "hours_per_100_epochs": 24.2,
              "images_per_s": round(100 * 1_281_167 / (24.2 * 3600)),
              "images_per_s_per_gpu": round(100 * 1_281_167 / (24.2 * 3600) / 16, 1)}
TARGET_GENERATOR_RATE = 5000          # images/s at 224 px, every generator (issue 12)


@dataclasses.dataclass
class Settings:
    out: str
    cifar: str | None
    device: str
    train_minutes: float
    sizes: tuple[int, ...] = (64, 224)
    generator_seconds: float = 1.0
    generator_batch: int | None = None   # None: procdata.bench.gpu_batch (hundreds to thousands of images)
    step_counts: dict = dataclasses.field(default_factory=lambda: {"tiny-cpu": 40, "vit-t16": 25, "vit-s16": 25})
    step_overrides: dict = dataclasses.field(default_factory=dict)
    recipe: dict = dataclasses.field(default_factory=lambda: dict(RECIPE))
    recipe_steps: int | None = None      # a step budget instead of the time budget (tests)
    eval_limit: int | None = None        # at most this many memory and query images (tests)
    trained_encoder: str | None = None   # set by the training section, read by the evaluation

    @classmethod
    def tiny(cls, out: str, cifar: str | None, device: str) -> "Settings":
        """Seconds on a CPU: every section runs, on toy sizes."""
        small = {"batch_size": 2, "local_crops": 2, "local_size": 32, "arch": {"img_size": 64}}
        return cls(out, cifar, device, train_minutes=0.2, sizes=(16,), generator_seconds=0.05, generator_batch=16,
                   step_counts={p: 4 for p in STEP_PRESETS}, step_overrides=small,
                   recipe={**RECIPE, "arch": {**RECIPE["arch"], "depth": 1}, "batch_size": 8}, recipe_steps=3,
                   eval_limit=200)


class Report:
    """The JSON of figures, rewritten whole (atomically) after every section."""

    def __init__(self, path: str):
        self.path, self.data = path, {"sections": {}}

    def section(self, name: str, run) -> None:
        start = time.perf_counter()
        log.info("== %s", name)
        try:
            result = run()
            entry = {**result, "seconds": round(time.perf_counter() - start, 1)}
        except Exception as e:  # noqa: BLE001 (recorded; the other sections still run)
            log.error("%s failed: %s", name, e)
            entry = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8),
                     "seconds": round(time.perf_counter() - start, 1)}
        self.data["sections"][name] = entry
        self.write()

    def write(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(finite(self.data), f, indent=2, default=str, allow_nan=False)
        os.replace(tmp, self.path)


def finite(value):
    """``value`` with NaN and infinities as None: strict JSON (a run too short to time has none)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def environment(device: str) -> dict:
    import timm
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": device, "cpu_cores": os.cpu_count(), "git_commit": git_commit()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2 ** 30, 1),
                    compute_capability=f"{props.major}.{props.minor}", gpus_visible=torch.cuda.device_count())
    else:
        info.update(gpu=None)
    return info


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def generators(s: Settings) -> dict:
    from procdata.bench import gpu_batch, images_per_second
    from procdata.generators import GENERATORS
    records = []
    for size in s.sizes:
        batch = s.generator_batch or gpu_batch(size)
        for name in GENERATORS:
            rate = images_per_second(name, size, s.device, batch, s.generator_seconds, threads=None)
            records.append({"generator": name, "size": size, "batch": batch, "images_per_s": round(rate)})
            log.info("%-12s %4d px %10.0f images/s", name, size, rate)
    largest = max(s.sizes)
    slowest = min((r for r in records if r["size"] == largest), key=lambda r: r["images_per_s"])
    return {"records": records, "slowest_at_largest_size": slowest,
            "target": f"every generator >= {TARGET_GENERATOR_RATE} images/s at 224 px",
            "target_met": slowest["images_per_s"] >= TARGET_GENERATOR_RATE if largest == 224 else None}


def dino_steps(s: Settings) -> dict:
    from encoder.bench import local_train_throughput
    records = []
    for name in STEP_PRESETS:
        record = local_train_throughput(name, s.step_counts[name], s.device, **s.step_overrides)
        share = record["data_share"]
        record["step_only_images_per_s"] = round(record["images_per_s"] / (1 - share), 1) if share < 1 else None
        if name == "vit-s16":
            record["dino_paper_images_per_s_per_gpu"] = DINO_PAPER["images_per_s_per_gpu"]
            record["ratio_to_dino_paper_per_gpu"] = round(record["images_per_s"] / DINO_PAPER["images_per_s_per_gpu"], 1)
        records.append(record)
        log.info("%s", record)
        if s.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"records": records, "dino_paper": DINO_PAPER,
            "note": "vit-s16 here crops 2x224 + 8x96 (the source paper's recipe); DINO's Table 8 figure is 2x224 + 10x96"}


def recipe_config(s: Settings):
    from encoder.config import preset
    recipe = dict(s.recipe)
    name, arch = recipe.pop("preset"), recipe.pop("arch", {})
    return dataclasses.replace(preset(name, arch=arch, **recipe), max_minutes=s.train_minutes,
                               max_steps=s.recipe_steps or 10 ** 9, log_every=200, checkpoint_every=10 ** 9)


def train_recipe(s: Settings, work: str) -> dict:
    from encoder.local import train_local
    cfg = recipe_config(s)
    metrics: dict = {}
    start = time.perf_counter()
    url = train_local(cfg, f"{work}/run", device=s.device, result_metrics=metrics)
    seconds = time.perf_counter() - start
    with open(os.path.join(url, "provenance.json")) as f:
        images_seen = json.load(f)["images_seen"]
    s.trained_encoder = url
    return {"recipe": s.recipe, "arch": dataclasses.asdict(cfg.arch), "data": "procedural only",
            "generators": list(cfg.generators), "budget_minutes": s.train_minutes, "wall_seconds": round(seconds, 1),
            "steps": metrics["step"], "images_seen": images_seen, "images_per_s": round(metrics["images_per_s"], 1),
            "data_share": round(metrics["data_share"], 3), "final_loss": round(metrics["loss"], 4), "encoder": url}


def cifar_knn(s: Settings) -> dict:
    from encoder.backbone import build_backbone
    from encoder.embed import Encoder
    from eval.knn import K_SWEEP, knn_sweep
    from eval.readable import same_size_images
    if not s.cifar or not os.path.exists(os.path.join(s.cifar, "train.parquet")):
        raise FileNotFoundError(f"no CIFAR-10 Parquet at {s.cifar} (train.parquet, test.parquet)")
    memory, memory_labels = same_size_images(os.path.join(s.cifar, "train.parquet"), s.eval_limit)
    queries, query_labels = same_size_images(os.path.join(s.cifar, "test.parquet"), s.eval_limit)
    arch = recipe_config(s).arch
    torch.manual_seed(0)
    encoders = {"procedural": lambda: Encoder.load(s.trained_encoder, device=s.device),
                "random_init": lambda: Encoder("random-init:recipe", arch, build_backbone(arch), "random-init",
                                               device=s.device),
                "raw_pixels": lambda: Encoder.load("raw-pixels:32", device=s.device)}
    results = {}
    for name, make in encoders.items():
        if name == "procedural" and not s.trained_encoder:
            results[name] = {"error": "the training section did not produce an encoder"}
            continue
        encoder = make()
        start = time.perf_counter()
        mem = encoder.embed(memory, batch_size=1024)
        if s.device.startswith("cuda"):
            torch.cuda.synchronize()
        embed_rate = len(memory) / (time.perf_counter() - start)
        found = knn_sweep(mem, memory_labels, encoder.embed(queries, batch_size=1024), query_labels, K_SWEEP)
        results[name] = {"top1": round(found["top1"], 4), "best_k": found["best_k"],
                         "by_k": {k: round(v, 4) for k, v in found["by_k"].items()},
                         "embed_images_per_s": round(embed_rate)}
        log.info("%s: kNN top-1 %.1f%% (k=%d)", name, 100 * found["top1"], found["best_k"])
    out = {"memory_images": len(memory), "query_images": len(queries), "protocol": "eval-knn: softmax votes, "
           "T=0.07, best k of " + ",".join(map(str, K_SWEEP)), "results": results}
    trained, raw, rand = (results.get(n, {}).get("top1") for n in ("procedural", "raw_pixels", "random_init"))
    if trained is not None and raw is not None and rand:
        out["targets"] = {"beats_raw_pixels": trained > raw, "ratio_to_random_init": round(trained / rand, 2),
                          "at_least_1.5x_random_init": trained >= 1.5 * rand}
    return out


def data_path(s: Settings) -> dict:
    """Where a training step's data time goes (the DINO step on a GPU waits ~40 ms a batch for its
    data, whatever the batch size): the recipe's stream making a batch, each of its generators
    making its share alone, and ``multi_crop`` on a made batch, timed apart with the device
    synchronised, at two batch sizes; then torch.profiler's top operators over whole batches
    (stream + augmentation), by self CPU time (the host's work and kernel launches) and by self
    device time."""
    from torch.profiler import ProfilerActivity, profile

    from encoder.augment import multi_crop
    from encoder.loop import procedural_stream
    from procdata.generators import generate
    device = torch.device(s.device)
    cuda = device.type == "cuda"

    def timed(fn, repeats: int) -> float:
        """Milliseconds per call after one warm-up call, the device drained before and after."""
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        return round(1000 * (time.perf_counter() - start) / repeats, 2)

    repeats = 2 if s.eval_limit else 10
    records = []
    for batch in (8,) if s.eval_limit else (64, 512):
        cfg = dataclasses.replace(recipe_config(s), batch_size=batch)
        stream, steps, g = procedural_stream(cfg, 0, 1, device), iter(range(10 ** 6)), torch.Generator().manual_seed(0)
        images = stream.batch(0, 0)
        share = max(1, batch // len(cfg.generators))

        def crops():
            return multi_crop(images, cfg.arch.img_size, cfg.global_crop_scale, cfg.local_size, cfg.local_crop_scale,
                              cfg.local_crops, cfg.arch.mean, cfg.arch.std, g)
        records.append({"batch": batch, "image_size": cfg.arch.img_size, "local_crops": cfg.local_crops,
                        "stream_ms": timed(lambda: stream.batch(0, next(steps)), repeats),
                        "generator_share_ms": {name: timed(lambda name=name: generate(
                            name, cfg.seed, range(share), cfg.arch.img_size, device), repeats)
                            for name in cfg.generators},
                        "multi_crop_ms": timed(crops, repeats)})
        log.info("%s", records[-1])
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for i in range(repeats):
            images = stream.batch(1, i)
            crops()
        if cuda:
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    return {"records": records, "profiled_batches": repeats, "profiled_batch_size": records[-1]["batch"],
            "top_ops_by_self_cpu": averages.table(sort_by="self_cpu_time_total", row_limit=25),
            "top_ops_by_self_device": averages.table(sort_by="self_cuda_time_total", row_limit=15) if cuda else None}


def embedding_speed(s: Settings) -> dict:
    """Embedding images/s of the step presets at their own image size (random weights)."""
    from encoder.bench import embed_throughput
    images = 8 if s.eval_limit else 8192
    return {"records": [embed_throughput(name, images=images, batch_size=min(images, 1024), device=s.device)
                        for name in STEP_PRESETS]}


def embed_pipeline(s: Settings) -> dict:
    """The embedding job's two steps on this machine: JPEG decode + resize on CPU worker processes
    feeding the encoder on the device, against the bare forward on the same pixels (issue 11):
    tiny-cpu from 64 px sources, vit-s16 from ImageNet-sized ones (500×375)."""
    from encoder.bench import device_decode_throughput, pipeline_throughput
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    counts = sorted({0, 2} if s.eval_limit else {4, 8, max(1, cores - 1)})
    images = 32 if s.eval_limit else 8192
    return {"cores": cores, "records": [
        pipeline_throughput("tiny-cpu", images, (64, 64), counts, batch_size=min(images, 512), device=s.device),
        pipeline_throughput("vit-s16", images // (1 if s.eval_limit else 2), (375, 500), counts,
                            batch_size=min(images, 256), device=s.device),
        device_decode_throughput("vit-s16", images // (1 if s.eval_limit else 2), (375, 500),
                                 batch_size=min(images, 128), device=s.device),
        device_decode_throughput("tiny-cpu", images, (64, 64), batch_size=min(images, 512), device=s.device)]}


SECTIONS = ("environment", "train_recipe", "cifar10_knn", "generators", "dino_step", "data_path", "embedding",
            "embed_pipeline")


def run(s: Settings, sections: tuple[str, ...] = SECTIONS) -> dict:
    """Run ``sections`` in order (the quality figure first: it is the one a cut-short run must keep)."""
    report = Report(s.out)
    report.data["settings"] = dataclasses.asdict(s)
    with tempfile.TemporaryDirectory(prefix="vismem-gpu-check-") as work:
        steps = {"environment": lambda: environment(s.device), "train_recipe": lambda: train_recipe(s, work),
                 "cifar10_knn": lambda: cifar_knn(s), "generators": lambda: generators(s),
                 "dino_step": lambda: dino_steps(s), "data_path": lambda: data_path(s),
                 "embedding": lambda: embedding_speed(s),
                 "embed_pipeline": lambda: embed_pipeline(s)}
        for name in sections:
            report.section(name, steps[name])
    report.data["errors"] = [name for name, entry in report.data["sections"].items() if "error" in entry]
    report.write()
    return report.data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON file of figures (rewritten after every section)")
    p.add_argument("--cifar", default=os.path.join("..", "shared", "data", "cifar10"),
                   help="folder with CIFAR-10 train.parquet and test.parquet (image, label)")
    p.add_argument("--device", default=None, help="device (default: cuda when there is a GPU, else cpu)")
    p.add_argument("--train-minutes", type=float, default=4.5, help="time budget of the recipe's training run")
    p.add_argument("--recipe", default=None, metavar="JSON",
                   help="fields replacing RECIPE's for the training section, e.g. "
                        "'{\"arch\": {\"embed_dim\": 192, \"num_heads\": 3}, \"lr\": 1e-3}'")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated sections to run, in order")
    p.add_argument("--tiny", action="store_true", help="toy sizes, seconds on a CPU (the test suite's run)")
    args = p.parse_args(argv)
    sections = tuple(name.strip() for name in args.sections.split(",") if name.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = (Settings.tiny(args.out, args.cifar, device) if args.tiny else
                Settings(args.out, args.cifar, device, args.train_minutes))
    if args.recipe:
        extra = json.loads(args.recipe)
        settings.recipe = {**settings.recipe, **extra,
                           "arch": {**settings.recipe.get("arch", {}), **extra.get("arch", {})}}
    data = run(settings, sections)
    print(json.dumps({"out": args.out, "errors": data["errors"]}))
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
