"""``vismem encoder``: train, evaluate, compare and benchmark encoders.

Imports inside the commands are on purpose: ``vismem --help`` and each command import no Ray, FAISS or
torch they do not use (see ``cluster.cli``).
"""

from __future__ import annotations

import json

from cluster.cli.common import (add_command, add_common, add_device, add_group, check_positive, parse_generators,
                                parse_ints)


def add_encoder_parsers(sub) -> None:
    # long on purpose: one declarative argparse block per command, read top to bottom like its --help
    from encoder.config import PRESETS, READOUTS
    from eval.sweeps import K_SWEEP
    from procdata.catalog import GENERATOR_NAMES as GENERATORS   # names only: no torch for --help
    enc = add_group(sub, "encoder", "train, evaluate and benchmark encoders")
    train = add_command(enc, "train", "DINO on procedural data in Ray Train (resumes from the last checkpoint)",
                        epilog="examples:\n"
                               "  vismem encoder train --max-minutes 30 --out runs/a\n"
                               "  vismem encoder train --max-minutes 40 --out runs/a --resume\n"
                               "  vismem encoder train --local --preset vit-s16 --max-minutes 60 --out runs/gpu\n"
                               "  vismem encoder train --generators shader,dead_leaves --set momentum_teacher=0.996 "
                               "--max-steps 2000 --out runs/b\n")
    train.add_argument("--preset", default="tiny-cpu", choices=sorted(PRESETS), help="encoder and DINO recipe")
    train.add_argument("--out", required=True, help="URL for checkpoints; the encoder is exported to OUT/encoder")
    train.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: the preset's)")
    train.add_argument("--gpus", action="store_true", help="one GPU per worker, NCCL")
    train.add_argument("--generators", default=None,
                       help="comma-separated procedural generators (default: the preset's), from: "
                            + ", ".join(GENERATORS))
    train.add_argument("--max-minutes", type=float, default=None, help="time budget in minutes (default: the preset's)")
    train.add_argument("--max-steps", type=int, default=None, help="step budget (default: the preset's)")
    train.add_argument("--seed", type=int, default=None, help="seed (default: 0)")
    train.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override any field of the preset's TrainConfig (repeatable), e.g. --set "
                            "momentum_teacher=0.996 --set arch.depth=6 --set centering=mean "
                            "--set precision=fp32")
    train.add_argument("--real-data", default=None, metavar="URL",
                       help="train on this real image collection instead of procedural data: the papers' "
                            "real-data control (upper reference), not the product")
    train.add_argument("--resume", action="store_true",
                       help="continue the run already in --out from its last checkpoint (without it, an --out "
                            "that holds a run is an error)")
    train.add_argument("--local", action="store_true",
                       help="train in this process on one device, without Ray (the same loop and checkpoints as "
                            "Ray Train: a run can be resumed either way); for a one-GPU box")
    add_device(train, "with --local: the device to train on, e.g. cuda, cuda:1 or cpu (default: the GPU when "
                      "there is one)")
    add_common(train)

    knn = add_command(
        enc, "eval-knn", "kNN top-1 of an encoder on a labelled memory and query collection (the papers' protocol)",
        description="Embed a labelled memory collection and a labelled query collection (folder trees "
                    "ROOT/<label>/<image> or Parquet with image and label columns, on any fsspec URL), then "
                    "classify every query by softmax-weighted votes (T = 0.07) of its k nearest memory images "
                    "for each k of the sweep, and report the best k. Baselines go through the same path: "
                    "--encoder random-init:tiny-cpu (the untrained network), --encoder raw-pixels:32 or "
                    "--encoder colour-histogram:4 (64 colour cells, no layout).",
        epilog="examples:\n"
               "  vismem encoder eval-knn --encoder runs/a/encoder --memory cifar10/train.parquet "
               "--queries cifar10/test.parquet\n"
               "  vismem encoder eval-knn --encoder raw-pixels:32 --memory train/ --queries test/ --ks 10,20 --json\n")
    knn.add_argument("--encoder", required=True, help="encoder URL, random-init:PRESET[:SEED], raw-pixels:SIZE or "
                                                         "colour-histogram:BINS")
    knn.add_argument("--memory", required=True, help="labelled collection URL: the kNN memory (e.g. a train split)")
    knn.add_argument("--queries", required=True, help="labelled collection URL: the images to classify")
    knn.add_argument("--ks", default=",".join(map(str, K_SWEEP)), help="comma-separated ks to sweep")
    knn.add_argument("--temperature", type=float, default=0.07, help="softmax voting temperature")
    knn.add_argument("--batch-size", type=int, default=512, help="images per embedding batch")
    knn.add_argument("--readout", default=None, choices=READOUTS,
                     help="what is compared (default: the encoder's own): token is the pooled feature, gridN "
                          "the mean feature of each cell of an NxN grid of the map, token+gridN both")
    add_common(knn, ray=False)

    compare = add_command(
        enc, "compare", "train the procedural encoder and a real-data control with one recipe and budget, "
                        "then score both beside every baseline",
        description="Trains the preset on procedural data (it never sees a real image; its provenance says "
                    "so) and the same recipe, seed and budget on --control (a real training collection), "
                    "then reports kNN top-1 (softmax votes, best k of the sweep) and 1-NN on every --eval set "
                    "for: procedural, real control, the same network untrained, raw pixels at 32 and 8 px and "
                    "a 64-cell colour histogram; per set the ratio procedural / real and the gap closure "
                    "(procedural - random) / (real - random). Both runs keep every checkpoint; up to "
                    "--curve-points of them are scored on the first eval set for a plot of top-1 against "
                    "steps. Writes OUT/compare.json and OUT/compare.png.",
        epilog="examples:\n"
               "  vismem encoder compare --local --device cpu --max-minutes 30 --out runs/cmp "
               "--eval cifar10=../shared/data/cifar10/train.parquet,../shared/data/cifar10/test.parquet\n"
               "  vismem encoder compare --local --device cuda --preset resnet18-cifar --max-minutes 10 "
               "--out runs/gpu --eval train/,test/ --control train/ --json\n")
    compare.add_argument("--preset", default="tiny-cpu", choices=sorted(PRESETS), help="encoder and DINO recipe")
    compare.add_argument("--eval", action="append", default=[], required=True, metavar="[NAME=]MEMORY,QUERIES",
                         help="a labelled memory and query collection to score on (repeatable)")
    compare.add_argument("--control", default=None, metavar="URL",
                         help="the real collection the control run trains on (default: the first --eval memory)")
    compare.add_argument("--out", required=True, help="URL for both runs, compare.json and compare.png")
    compare.add_argument("--max-minutes", type=float, default=None, help="each run's time budget (default: the preset's)")
    compare.add_argument("--max-steps", type=int, default=None, help="each run's step budget (default: the preset's)")
    compare.add_argument("--seed", type=int, default=None, help="seed of both runs (default: 0)")
    compare.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                         help="override a field of the preset's TrainConfig for both runs (repeatable)")
    compare.add_argument("--curve-points", type=int, default=6, help="checkpoints per run scored for the plot")
    compare.add_argument("--local", action="store_true", help="train in this process on one device, without Ray")
    add_device(compare, "with --local: the device to train on (default: the GPU when there is one)")
    add_common(compare)

    ebench = add_command(enc, "bench", "training images/s per worker (Ray Train, or --local) and embedding images/s",
                         epilog="examples:\n"
                                "  vismem encoder bench --presets tiny-cpu --worker-counts 1,2\n"
                                "  vismem encoder bench --local --presets tiny-cpu,vit-s16 --steps 40 --json\n",
                         description="Trains each preset for --steps steps at each worker count through Ray "
                                     "Train and reports images/s after warm-up, images/s per worker, the "
                                     "speed-up over the first count and the share of step time spent making "
                                     "procedural data; then the preset's embedding images/s. With --local, one "
                                     "process on one device times the same loop without Ray. JSON: one object "
                                     "per line.")
    ebench.add_argument("--presets", default="tiny-cpu", help="comma-separated presets")
    ebench.add_argument("--worker-counts", default=None,
                        help="comma-separated numbers of Ray Train workers to measure (default: 1, 2 and one per "
                             "core or GPU)")
    ebench.add_argument("--steps", type=int, default=80,
                        help="training steps per figure (the first 3 are warm-up; fewer than ~80 is noisy)")
    ebench.add_argument("--local", action="store_true",
                        help="time the training step in this process, without Ray (one worker on --device)")
    add_device(ebench, "with --local: the device to time, e.g. cuda or cpu (default: the GPU when there is one)")
    add_common(ebench)


def cmd_train(args) -> dict:
    from encoder.config import parse_settings, preset
    check_positive(args, "workers", "max_minutes", "max_steps")
    flags = dict(workers=args.workers, use_gpu=True if args.gpus else None, max_minutes=args.max_minutes,
                 generators=parse_generators(args.generators) if args.generators else None, max_steps=args.max_steps,
                 seed=args.seed)
    cfg = preset(args.preset, **{**flags, **parse_settings(args.set)})      # --set wins over the flags
    if args.local:
        return train_here(args, cfg)
    if args.device:
        raise ValueError("--device goes with --local; Ray Train places its workers itself (--gpus: one GPU each)")
    from cluster.runtime import ray_session
    from encoder.train import train
    with ray_session(args.address):
        if args.real_data:
            from eval.real_control import train_on_collection
            url = train_on_collection(cfg, args.real_data, args.out, resume=args.resume)
        else:
            url = train(cfg, args.out, resume=args.resume)
    print(f"encoder: {url}")
    return {"encoder": url}


def train_here(args, cfg) -> dict:
    """``encoder train --local``: the same loop in this process, no Ray."""
    from encoder.local import train_local
    from procdata.bench import check_device
    if args.workers not in (None, 1) or args.gpus or args.address:
        raise ValueError("--local trains in this one process: drop --workers, --gpus and --address "
                         "(or drop --local to train with Ray Train)")
    device = check_device(args.device) if args.device else None
    metrics: dict = {}
    if args.real_data:
        from eval.real_control import train_on_collection
        url = train_on_collection(cfg, args.real_data, args.out, resume=args.resume, local=True, device=device,
                                  result_metrics=metrics)
    else:
        url = train_local(cfg, args.out, resume=args.resume, device=device, result_metrics=metrics)
    print(f"encoder: {url} ({metrics['step']} steps, {metrics['images_per_s']:.0f} images/s after warm-up)")
    return {"encoder": url, **metrics}


def cmd_eval_knn(args) -> dict:
    from encoder.embed import Encoder
    from eval.knn import embed_labelled, knn_sweep
    ks = parse_ints(args.ks, "--ks")
    encoder = Encoder.load(args.encoder)
    if args.readout:
        encoder = encoder.with_readout(args.readout)
    memory, memory_labels = embed_labelled(args.memory, encoder, args.batch_size)
    queries, query_labels = embed_labelled(args.queries, encoder, args.batch_size)
    result = knn_sweep(memory, memory_labels, queries, query_labels, ks, args.temperature)
    for k, acc in result["by_k"].items():
        print(f"k={k:<4d} top-1 {100 * acc:5.1f}%")
    print(f"{args.encoder}: best top-1 {100 * result['top1']:.1f}% at k={result['best_k']} "
          f"({len(memory)} memory, {len(queries)} queries, {len(set(memory_labels))} classes)")
    return {**result, "encoder": args.encoder, "memory_images": len(memory), "query_images": len(queries)}


def cmd_compare(args) -> dict:
    from encoder.config import parse_settings, preset
    from eval.compare import compare, parse_eval_set
    from eval.real_control import train_on_collection
    check_positive(args, "max_minutes", "max_steps", "curve_points")
    evals = [parse_eval_set(text) for text in args.eval]
    if len({e.name for e in evals}) < len(evals):
        raise ValueError("two --eval sets have the same name; name them: --eval NAME=MEMORY,QUERIES")
    cfg = preset(args.preset, **{**dict(max_minutes=args.max_minutes, max_steps=args.max_steps, seed=args.seed),
                                 **parse_settings(args.set)})
    control = args.control or evals[0].memory
    if args.local:
        from encoder.local import train_local
        from procdata.bench import check_device
        if args.address:
            raise ValueError("--local trains in this one process: drop --address")
        device = check_device(args.device) if args.device else None
        result = compare(cfg, control, evals, args.out, lambda c, out: train_local(c, out, device=device),
                         lambda c, url, out: train_on_collection(c, url, out, local=True, device=device),
                         args.curve_points)
    else:
        if args.device:
            raise ValueError("--device goes with --local; Ray Train places its workers itself")
        from cluster.runtime import ray_session
        from encoder.train import train
        with ray_session(args.address):
            result = compare(cfg, control, evals, args.out, train, train_on_collection, args.curve_points)
    print(f"{'encoder':18s} " + " ".join(f"{e.name[:14]:>14s} top-1 / 1-NN" for e in evals))
    for name, by_set in result["scores"].items():
        print(f"{name:18s} " + " ".join(f"{100 * r['top1']:13.1f}% / {100 * r['nn1']:4.1f}%" for r in by_set.values()))
    for name, s in result["summary"].items():
        ratio = "n/a" if s["ratio_to_real"] is None else f"{s['ratio_to_real']:.2f}"
        gap = "n/a" if s["gap_closure"] is None else f"{s['gap_closure']:.2f}"
        print(f"{name}: procedural / real {ratio}, gap closure {gap}, "
              f"{'beats' if s['beats_raw_pixels'] else 'below'} raw pixels ({100 * s['best_raw_pixels']:.1f}%)")
    print(f"wrote {args.out.rstrip('/')}/compare.json and {result['plot']}")
    return result


def bench_ray(presets, counts, steps, address):
    from cluster.runtime import ray_session
    from encoder.bench import bench
    with ray_session(address):
        yield from bench(presets, counts, steps)


def cmd_encoder_bench(args) -> dict:
    from encoder.bench import bench_local, default_worker_counts
    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    if args.local:
        from procdata.bench import check_device
        if args.worker_counts or args.address:
            raise ValueError("--local times one process: drop --worker-counts and --address")
        runs = bench_local(presets, args.steps, check_device(args.device) if args.device else None)
    else:
        if args.device:
            raise ValueError("--device goes with --local; Ray Train places its workers itself")
        counts = parse_ints(args.worker_counts, "--worker-counts") if args.worker_counts else default_worker_counts()
        runs = bench_ray(presets, counts, args.steps, args.address)
    records = []
    for record in runs:
        records.append(record)
        print(json.dumps(record) if args.json else " ".join(f"{k}={v}" for k, v in record.items()), flush=True)
    args.json = False                      # the records are already one JSON object per line
    return {"records": records}
