"""``vismem embed``: batch-embed a collection with Ray Data (or benchmark the pipeline).

Imports inside the commands are on purpose: ``vismem --help`` and each command import no Ray, FAISS or
torch they do not use (see ``cluster.cli``).
"""

from __future__ import annotations

import sys

from cluster.cli.common import add_command, add_common, check_positive, record_printer


def add_embed_parser(sub) -> None:
    from index.bench.embed_bench import EmbedBenchConfig
    d = EmbedBenchConfig()
    embed = add_command(
        sub, "embed", "embed a real image collection into Parquet with Ray Data (resumable)",
        description="A streaming Ray Data pipeline: each partition's images are read, decoded and resized, "
                    "then a pool of encoder actors embeds them and writes one Parquet file per partition. With "
                    "GPUs, CPU tasks decode while one actor per GPU embeds; on CPUs only, one actor per CPU "
                    "decodes and embeds its own partitions (--decode). With --bench: the pipeline's images/s "
                    "beside the bare encoder's forward pass on the same images (JSON: one object per line).",
        epilog="examples:\n"
               "  vismem embed --collection s3://bucket/images --encoder runs/enc1/encoder --out s3://bucket/emb\n"
               "  vismem embed --bench --json\n"
               "  vismem embed --bench --encoder random-init:vit-s16 --images 256 --json\n")
    embed.add_argument("--collection", default=None,
                       help="collection URL (any fsspec URL: a folder or one file): a folder tree "
                            "ROOT/<label>/<image>, Parquet with an 'image' column, or WebDataset .tar shards "
                            "(<key>.jpg|png|... with an optional <key>.cls/.label/.json label; uncompressed) "
                            "(required, except with --bench: default synthetic images)")
    embed.add_argument("--encoder", default=None,
                       help="encoder checkpoint URL, random-init:PRESET, or raw-pixels:SIZE (required, except with "
                            f"--bench: default {d.encoders[0]}; there a comma-separated list)")
    embed.add_argument("--out", default=None,
                       help="output URL: part-NNNNN.parquet per partition + errors.jsonl (required, except with "
                            "--bench)")
    embed.add_argument("--partition-size", type=int, default=None,
                       help="images per output file (default: 512; with --bench: a sixteenth of the collection)")
    embed.add_argument("--concurrency", type=int, default=None,
                       help="encoder actors in the pool (default: one per GPU, or one per CPU on a CPU-only "
                            "cluster; at most one per GPU)")
    embed.add_argument("--decode", default=d.decode, choices=("auto", "tasks", "actors"),
                       help="where images are decoded: 'tasks' (a CPU stage of its own feeding the encoder actors), "
                            "'actors' (each encoder actor decodes its own partitions), or 'auto': tasks with GPUs, "
                            "actors on a CPU-only cluster, where both steps share the same cores")
    embed.add_argument("--batch-size", type=int, default=d.batch_size, help="images per forward pass of the encoder")
    bench = embed.add_argument_group("benchmark (--bench)")
    bench.add_argument("--bench", action="store_true",
                       help="time the pipeline on a fresh output folder, then the bare encoder on the same images")
    bench.add_argument("--images", type=int, default=d.images, help="synthetic images (without --collection)")
    bench.add_argument("--source-size", type=int, default=None,
                       help="synthetic image width in px, height 3/4 of it (default: twice the encoder's input, at "
                            "most 320); PNG below 128 px, JPEG above")
    bench.add_argument("--layout", default=d.layout, choices=("parquet", "folder"),
                       help="synthetic collection: Parquet files of image bytes, or one file per image")
    bench.add_argument("--repeats", type=int, default=d.repeats, help="bare forward passes timed; the best counts")
    bench.add_argument("--workdir", default=None,
                       help="folder or URL for the collection and the embeddings (default: a temporary folder, "
                            "removed; on a cluster, storage every node reads)")
    add_common(embed)


def cmd_embed(args) -> dict:
    from dataclasses import asdict

    from tqdm import tqdm

    from cluster.runtime import ray_session
    from index.bench.embed_bench import EmbedBenchConfig
    check_positive(args, "partition_size", "concurrency", "batch_size", "images", "source_size", "repeats")
    d = EmbedBenchConfig()
    if args.bench:
        return embed_bench(args, d)
    bench_only = [option for option, value, default in (("--images", args.images, d.images),
                                                        ("--source-size", args.source_size, None),
                                                        ("--layout", args.layout, d.layout),
                                                        ("--repeats", args.repeats, d.repeats),
                                                        ("--workdir", args.workdir, None)) if value != default]
    if bench_only:
        raise ValueError(f"{', '.join(bench_only)}: only with --bench")
    missing = [option for option in ("--collection", "--encoder", "--out") if getattr(args, option[2:]) is None]
    if missing:
        raise ValueError(f"vismem embed needs {', '.join(missing)} (or --bench)")
    from index.ingest.job import plan_embedding, run_embedding
    plan = plan_embedding(args.collection, args.encoder, args.out, args.partition_size or 512)
    with ray_session(args.address), tqdm(total=plan.pending_images, unit="img", desc=f"embed → {args.out}",
                                         file=sys.stderr, disable=not plan.pending) as bar:
        summary = run_embedding(plan, args.concurrency, args.batch_size, progress=bar.update, decode=args.decode)
    print(f"{summary.images} vectors in {summary.partitions} partitions at {summary.out} ({summary.computed} "
          f"partitions embedded by this run); {summary.errors} unreadable")
    return asdict(summary)


def embed_bench(args, defaults) -> dict:
    """``vismem embed --bench``: one record per encoder (index.bench.embed_bench)."""
    from dataclasses import replace

    from cluster.runtime import ray_session
    from index.bench.embed_bench import run
    if args.out:
        raise ValueError("--bench embeds into a fresh folder under --workdir (default: a temporary one): drop --out")
    encoders = tuple(e.strip() for e in (args.encoder or ",".join(defaults.encoders)).split(",") if e.strip())
    cfg = replace(defaults, encoders=encoders, images=args.images, collection=args.collection,
                  source_size=args.source_size, layout=args.layout, partition_size=args.partition_size,
                  batch_size=args.batch_size, concurrency=args.concurrency, decode=args.decode, repeats=args.repeats,
                  workdir=args.workdir)
    with ray_session(args.address):
        return run(cfg, record_printer(args))
