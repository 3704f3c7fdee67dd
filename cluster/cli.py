"""``vismem``: the command line, thin over the Python API.

Every command prints progress as it goes; with ``--json`` its last line is one JSON object.
Errors print one line naming what was wrong and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

DESCRIPTION = """\
vismem: a visual memory. An encoder trained on procedural images only (it never sees a real
image) turns real images into vectors; the vectors live in a sharded FAISS memory; images are
classified by k-nearest-neighbour search plus a vote, with the neighbours that made each answer.

Storage arguments are fsspec URLs: a local path, file://, s3://bucket/prefix, memory://.
Ray: a local Ray on 127.0.0.1 is started unless --address or RAY_ADDRESS names a cluster
(under `ray job submit` the job joins its cluster by itself).
"""

EPILOG = """\
examples:
  vismem demo                                     # the whole pipeline on the bundled digits
  vismem demo --train-minutes 10 --store s3://bucket/vismem
  vismem encoder train --minutes 5 --out runs/enc1
  vismem embed --collection s3://bucket/images --encoder runs/enc1/encoder --out s3://bucket/emb
  vismem index build --embeddings s3://bucket/emb --memory s3://bucket/mem --shards 4
  vismem serve --memory s3://bucket/mem --port 8000
  vismem classify --url http://127.0.0.1:8000 --rule softmax cat.jpg dog.png
"""


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where there is one worth reading (not None, False or [])."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def add_common(p: argparse.ArgumentParser, ray: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    if ray:
        p.add_argument("--address", default=None,
                       help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)")


def parser() -> argparse.ArgumentParser:
    from cluster.demo import DemoConfig
    from encoder.config import PRESETS
    from eval.knn import K_SWEEP
    from index.voting import RULES
    from procdata.generators import GENERATORS

    d = DemoConfig()
    top = argparse.ArgumentParser(prog="vismem", description=DESCRIPTION, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", help="run the main job end to end on the embedded defaults",
        formatter_class=DefaultsHelp,
        description="Stream procedural images from Ray Train workers and train a small DINO ViT on them only; "
                    "batch-embed the real images (scikit-learn's digits) with Ray Data; build a sharded FAISS "
                    "memory; serve it with Ray Serve on 127.0.0.1; classify the held-out images through the router "
                    "with four voting rules; print kNN accuracy for the procedural encoder, the same network "
                    "untrained, and raw pixels; write an HTML report. Re-running reuses the trained encoder and "
                    "embeddings under --store unless --fresh.")
    demo.add_argument("--store", default=d.store, help="object store URL for every artefact (local folder or s3://)")
    demo.add_argument("--train-minutes", type=float, default=d.train_minutes, help="training time budget")
    demo.add_argument("--train-steps", type=int, default=None,
                      help="stop training after this many steps (reproducible runs; the time budget still applies)")
    demo.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="encoder and DINO recipe")
    demo.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (processes) for training")
    demo.add_argument("--generators", default=",".join(d.generators),
                      help=f"comma-separated procedural generators, from: {', '.join(GENERATORS)}")
    demo.add_argument("--seed", type=int, default=d.seed, help="seed of data, initialisation and split")
    demo.add_argument("--shards", type=int, default=d.shards, help="number of FAISS shards in the memory")
    demo.add_argument("-k", type=int, default=d.k, help="neighbours per query")
    demo.add_argument("--port", type=int, default=d.port, help="HTTP port of the router on 127.0.0.1 (0: a free port)")
    demo.add_argument("--fresh", action="store_true", help="retrain and re-embed even if outputs exist in --store")
    add_common(demo)

    proc = sub.add_parser("procdata", help="procedural images: write shards, preview, benchmark").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    gen = proc.add_parser("generate", help="write a procedural data set as Parquet shards with Ray actors (resumable)",
                          formatter_class=DefaultsHelp)
    gen.add_argument("--generator", required=True, help=f"one of: {', '.join(GENERATORS)}")
    gen.add_argument("--n", type=int, required=True, help="number of images")
    gen.add_argument("--size", type=int, default=64, help="image side in pixels")
    gen.add_argument("--out", required=True, help="output URL: shard-NNNNN.parquet files and manifest.json")
    gen.add_argument("--seed", type=int, default=0, help="data set seed: image i is a function of (generator, seed, i)")
    gen.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    gen.add_argument("--format", default="png", choices=("png", "jpeg"), help="image encoding")
    gen.add_argument("--workers", type=int, default=None, help="writer actors (default: one per CPU, or per GPU)")
    add_common(gen)
    prev = proc.add_parser("preview", help="a labelled grid of samples of every generator (PNG)",
                           formatter_class=DefaultsHelp)
    prev.add_argument("--out", required=True, help="PNG file URL")
    prev.add_argument("--size", type=int, default=64, help="sample side in pixels")
    prev.add_argument("--per-row", type=int, default=8, help="samples per generator")
    prev.add_argument("--seed", type=int, default=0, help="seed")
    add_common(prev, ray=False)
    bench = proc.add_parser("bench", help="images/s of every generator, one core and all cores (and GPU)",
                            formatter_class=DefaultsHelp)
    bench.add_argument("--sizes", default="64,224", help="comma-separated image sizes")
    bench.add_argument("--generators", default=",".join(GENERATORS), help="comma-separated generators")
    bench.add_argument("--seconds", type=float, default=2.0, help="measuring time per figure")
    add_common(bench, ray=False)

    enc = sub.add_parser("encoder", help="train, evaluate and benchmark encoders").add_subparsers(dest="action", metavar="ACTION", required=True)
    train = enc.add_parser("train", help="DINO on procedural data in Ray Train (resumes from the last checkpoint)",
                           formatter_class=DefaultsHelp)
    train.add_argument("--preset", default="tiny-cpu", choices=sorted(PRESETS), help="encoder and DINO recipe")
    train.add_argument("--out", required=True, help="URL for checkpoints; the encoder is exported to OUT/encoder")
    train.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: the preset's)")
    train.add_argument("--gpus", action="store_true", help="one GPU per worker, NCCL")
    train.add_argument("--data", default=None, help="comma-separated generators (default: the preset's)")
    train.add_argument("--max-minutes", type=float, default=None, help="time budget (default: the preset's)")
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
    add_common(train)

    knn = enc.add_parser(
        "eval-knn", formatter_class=DefaultsHelp,
        help="kNN top-1 of an encoder on a labelled memory and query collection (the papers' protocol)",
        description="Embed a labelled memory collection and a labelled query collection (folder trees "
                    "ROOT/<label>/<image> or Parquet with image and label columns, on any fsspec URL), then "
                    "classify every query by softmax-weighted votes (T = 0.07) of its k nearest memory images "
                    "for each k of the sweep, and report the best k. Baselines go through the same path: "
                    "--encoder random-init:tiny-cpu (the untrained network) or --encoder raw-pixels:32.")
    knn.add_argument("--encoder", required=True, help="encoder URL, random-init:PRESET[:SEED] or raw-pixels:SIZE")
    knn.add_argument("--memory", required=True, help="labelled collection URL: the kNN memory (e.g. a train split)")
    knn.add_argument("--queries", required=True, help="labelled collection URL: the images to classify")
    knn.add_argument("--k", default=",".join(map(str, K_SWEEP)), help="comma-separated ks to sweep")
    knn.add_argument("--temperature", type=float, default=0.07, help="softmax voting temperature")
    knn.add_argument("--batch-size", type=int, default=512, help="images per embedding batch")
    add_common(knn, ray=False)

    ebench = enc.add_parser("bench", help="training images/s per worker (Ray Train) and embedding images/s",
                            formatter_class=DefaultsHelp,
                            description="Trains each preset for --steps steps at each worker count through Ray "
                                        "Train and reports images/s after warm-up, images/s per worker, the "
                                        "speed-up over the first count and the share of step time spent making "
                                        "procedural data; then the preset's embedding images/s. JSON: one object "
                                        "per line.")
    ebench.add_argument("--presets", default="tiny-cpu", help="comma-separated presets")
    ebench.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1, 2 and one per "
                                                         "core or GPU)")
    ebench.add_argument("--steps", type=int, default=80,
                        help="training steps per figure (the first 3 are warm-up; fewer than ~80 is noisy)")
    add_common(ebench)

    embed = sub.add_parser("embed", help="embed a real image collection into Parquet with Ray Data (resumable)",
                           formatter_class=DefaultsHelp)
    embed.add_argument("--collection", required=True,
                       help="folder tree ROOT/<label>/<image> or Parquet with an 'image' column, any fsspec URL")
    embed.add_argument("--encoder", required=True,
                       help="encoder checkpoint URL, random-init:PRESET, or raw-pixels:SIZE")
    embed.add_argument("--out", required=True, help="output URL: part-NNNNN.parquet per partition + errors.jsonl")
    embed.add_argument("--partition-size", type=int, default=512, help="images per output file")
    embed.add_argument("--concurrency", type=int, default=2, help="encoder actors in the pool")
    add_common(embed)

    idx = sub.add_parser("index", help="build memories").add_subparsers(dest="action", metavar="ACTION", required=True)
    build = idx.add_parser("build", help="embedding Parquet → sharded FAISS memory with a manifest",
                           formatter_class=DefaultsHelp)
    build.add_argument("--embeddings", required=True, help="URL written by `vismem embed`")
    build.add_argument("--memory", required=True, help="memory root URL (a new version if one exists)")
    build.add_argument("--shards", type=int, default=2, help="number of shards")
    build.add_argument("--factory", default=None,
                       help="FAISS factory string (default: Flat below 100k vectors, IVF-PQ above)")
    add_common(build, ray=False)

    mem = sub.add_parser("memory", help="inspect memories").add_subparsers(dest="action", metavar="ACTION", required=True)
    info = mem.add_parser("info", help="what a memory holds: version, count, encoder, shards")
    info.add_argument("--memory", required=True, help="memory root URL")
    info.add_argument("--version", type=int, default=None, help="a past version (default: current)")
    add_common(info, ray=False)

    serve = sub.add_parser("serve", help="serve a memory over HTTP with Ray Serve (until Ctrl-C)",
                           formatter_class=DefaultsHelp)
    serve.add_argument("--memory", required=True, help="memory root URL")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port")
    serve.add_argument("--replicas", type=int, default=1, help="replicas per shard searcher")
    serve.add_argument("--shard-timeout", type=float, default=10.0, help="seconds before a shard counts as failed")
    add_common(serve)

    for name, what in (("classify", "classify images through a running router"),
                       ("query", "nearest neighbours of images through a running router")):
        q = sub.add_parser(name, help=what, formatter_class=DefaultsHelp)
        q.add_argument("images", nargs="+", help="image files (any fsspec URL)")
        q.add_argument("--url", default="http://127.0.0.1:8000", help="router base URL")
        q.add_argument("-k", type=int, default=10, help="neighbours per query")
        if name == "classify":
            q.add_argument("--rule", default="plurality", choices=RULES, help="voting rule")
        add_common(q, ray=False)
    return top


def main(argv: list[str] | None = None) -> int:
    from cluster.runtime import loopback_only
    args = parser().parse_args(argv)
    loopback_only(getattr(args, "address", None))          # before anything imports ray
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        result = COMMANDS[(args.command, getattr(args, "action", None))](args)
    except KeyboardInterrupt:
        print("vismem: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 (one line for people; -v shows the traceback)
        if args.verbose:
            raise
        print(f"vismem {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, default=str))
    return 0


def one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 400 else text[:400] + " ... (run with -v for the whole error)"


def cmd_demo(args) -> dict:
    from cluster.demo import DemoConfig, run_demo
    cfg = DemoConfig(store=args.store, train_minutes=args.train_minutes, train_steps=args.train_steps,
                     preset=args.preset, workers=args.workers, generators=tuple(args.generators.split(",")),
                     seed=args.seed, shards=args.shards, k=args.k, port=args.port, address=args.address,
                     fresh=args.fresh)
    validate_demo(cfg)
    return run_demo(cfg)


def validate_demo(cfg) -> None:
    """Bad options fail before Ray starts."""
    from encoder.config import preset
    from procdata.generators import get_generator
    for name in cfg.generators:
        get_generator(name)
    preset(cfg.preset)
    for field in ("workers", "shards", "k"):
        if getattr(cfg, field) <= 0:
            raise ValueError(f"--{field} must be positive")
    if cfg.train_minutes <= 0:
        raise ValueError("--train-minutes must be positive")


def cmd_generate(args) -> dict:
    from tqdm import tqdm

    from cluster.runtime import ray_session
    from procdata.shards import ShardJob, write_shards
    job = ShardJob(args.generator, args.n, args.size, args.out, args.seed, args.shard_size, args.format)
    job.check()
    bar = tqdm(total=args.n, unit="img", desc=f"{args.generator} → {args.out}", file=sys.stderr)

    def progress(done, total, rate):
        bar.total = total
        bar.n = done
        bar.set_postfix_str(f"{rate:.0f} img/s")
        bar.refresh()

    with ray_session(args.address):
        manifest = write_shards(job, args.workers, progress)
    bar.close()
    print(f"{job.shards} shards at {args.out} ({manifest['written_this_run']} written now, the rest existed)")
    return manifest


def cmd_preview(args) -> dict:
    from procdata.preview import write_preview
    if args.size <= 0 or args.per_row <= 0:
        raise ValueError("--size and --per-row must be positive")
    write_preview(args.out, size=args.size, per_row=args.per_row, seed=args.seed)
    print(f"preview grid: {args.out}")
    return {"preview": args.out}


def cmd_bench(args) -> dict:
    from procdata.bench import bench
    from procdata.generators import get_generator
    names = args.generators.split(",")
    for name in names:
        get_generator(name)
    records = []
    for record in bench(names, parse_ints(args.sizes, "--sizes"), seconds=args.seconds):
        records.append(record)
        print(json.dumps(record) if args.json else
              f"{record['generator']:12s} {record['size']:4d}px {record['device']:5s} x{record['workers']:<3d} "
              f"{record['images_per_s']:10.1f} images/s", flush=True)
    args.json = False                      # the records are already one JSON object per line
    return {"results": records}


def cmd_train(args) -> dict:
    from cluster.runtime import ray_session
    from encoder.config import parse_settings, preset
    from encoder.train import train
    flags = dict(workers=args.workers, use_gpu=True if args.gpus else None, max_minutes=args.max_minutes,
                 generators=tuple(args.data.split(",")) if args.data else None, max_steps=args.max_steps,
                 seed=args.seed)
    cfg = preset(args.preset, **{**flags, **parse_settings(args.set)})      # --set wins over the flags
    with ray_session(args.address):
        if args.real_data:
            from eval.real_control import train_on_collection
            url = train_on_collection(cfg, args.real_data, args.out, resume=args.resume)
        else:
            url = train(cfg, args.out, resume=args.resume)
    print(f"encoder: {url}")
    return {"encoder": url}


def cmd_eval_knn(args) -> dict:
    from encoder.embed import Encoder
    from eval.knn import embed_labelled, knn_sweep
    ks = parse_ints(args.k, "--k")
    encoder = Encoder.load(args.encoder)
    memory, memory_labels = embed_labelled(args.memory, encoder, args.batch_size)
    queries, query_labels = embed_labelled(args.queries, encoder, args.batch_size)
    result = knn_sweep(memory, memory_labels, queries, query_labels, ks, args.temperature)
    for k, acc in result["by_k"].items():
        print(f"k={k:<4d} top-1 {100 * acc:5.1f}%")
    print(f"{args.encoder}: best top-1 {100 * result['top1']:.1f}% at k={result['best_k']} "
          f"({len(memory)} memory, {len(queries)} queries, {len(set(memory_labels))} classes)")
    return {**result, "encoder": args.encoder, "memory_images": len(memory), "query_images": len(queries)}


def cmd_encoder_bench(args) -> dict:
    from cluster.runtime import ray_session
    from encoder.bench import bench, default_worker_counts
    workers = parse_ints(args.workers, "--workers") if args.workers else default_worker_counts()
    records = []
    with ray_session(args.address):
        for record in bench(args.presets.split(","), workers, args.steps):
            records.append(record)
            print(json.dumps(record) if args.json else " ".join(f"{k}={v}" for k, v in record.items()), flush=True)
    args.json = False                      # the records are already one JSON object per line
    return {"records": records}


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{option} needs positive numbers, got {text!r}")
    return values


def cmd_embed(args) -> dict:
    from dataclasses import asdict

    from cluster.runtime import ray_session
    from index.embed_job import plan_embedding, run_embedding
    plan = plan_embedding(args.collection, args.encoder, args.out, args.partition_size)
    with ray_session(args.address):
        summary = run_embedding(plan, args.concurrency)
    print(f"{summary.images} vectors in {summary.partitions} partitions at {summary.out}; {summary.errors} unreadable")
    return asdict(summary)


def cmd_build(args) -> dict:
    from dataclasses import asdict

    from index.build import build_memory
    manifest = build_memory(args.embeddings, args.memory, args.shards, args.factory)
    print(f"memory {args.memory}: version {manifest.version}, {manifest.count} vectors, {manifest.factory}, "
          f"shards {[s.count for s in manifest.shards]}")
    return asdict(manifest)


def cmd_info(args) -> dict:
    from dataclasses import asdict

    from index.manifest import list_versions, read_manifest
    m = read_manifest(args.memory, args.version)
    print(f"memory {args.memory}, version {m.version} (versions {list_versions(args.memory)})\n"
          f"  {m.count} vectors of dim {m.dim}, {m.metric}, {m.factory}\n  encoder {m.encoder['name']}\n"
          f"  shards: {[s.count for s in m.shards]}")
    return asdict(m)


def cmd_serve(args) -> dict:
    import time

    from cluster.runtime import ray_session
    from index.serve import start
    with ray_session(args.address, serve_too=True):
        start(args.memory, host=args.host, port=args.port, replicas=args.replicas, shard_timeout_s=args.shard_timeout)
        print(f"serving {args.memory} on http://{args.host}:{args.port} (POST /classify, /search; GET /info, /docs); "
              "Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)


def cmd_client(args) -> dict:
    import base64

    import fsspec

    from cluster.demo import post
    images = []
    for uri in args.images:
        with fsspec.open(uri, "rb") as f:
            images.append(base64.b64encode(f.read()).decode())
    body = {"images": images, "k": args.k}
    if args.command == "classify":
        body["rule"] = args.rule
    answer = post(f"{args.url.rstrip('/')}/{args.command if args.command == 'classify' else 'search'}", body)
    for uri, result in zip(args.images, answer["results"]):
        head = f"{uri}: {result['decision']}" if "decision" in result else f"{uri}:"
        print(head + ("  (PARTIAL: shards %s missing)" % answer["missing_shards"] if answer["partial"] else ""))
        for n in result["neighbours"]:
            print(f"    {n['similarity']:.3f}  {n['label']!s:12s} {n['uri']}" + (f"  w={n['weight']:.3g}" if "weight" in n else ""))
    return answer


COMMANDS = {("demo", None): cmd_demo, ("procdata", "generate"): cmd_generate, ("procdata", "preview"): cmd_preview,
            ("procdata", "bench"): cmd_bench, ("encoder", "train"): cmd_train,
            ("encoder", "eval-knn"): cmd_eval_knn, ("encoder", "bench"): cmd_encoder_bench, ("embed", None): cmd_embed,
            ("index", "build"): cmd_build, ("memory", "info"): cmd_info, ("serve", None): cmd_serve,
            ("classify", None): cmd_client, ("query", None): cmd_client}

if __name__ == "__main__":
    sys.exit(main())
