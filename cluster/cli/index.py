"""``vismem index``: build, tune and benchmark a memory.

Imports inside the commands are on purpose: ``vismem --help`` and each command import no Ray, FAISS or
torch they do not use (see ``cluster.cli``).
"""

from __future__ import annotations

import sys

from cluster.cli.common import (add_command, add_common, add_group, add_k, add_nprobe, check_positive, parse_ints,
                                record_printer)


def add_index_parsers(sub) -> None:
    idx = add_group(sub, "index", "build memories")
    build = add_command(idx, "build", "embedding Parquet → sharded FAISS memory with a manifest",
                        epilog="examples:\n"
                               "  vismem index build --embeddings emb --memory mem --shards 4\n"
                               "  vismem index build --embeddings emb2 --memory mem --replace --nprobe 32\n")
    build.add_argument("--embeddings", required=True, help="URL written by `vismem embed`")
    build.add_argument("--memory", required=True,
                       help="memory root URL (a new version if one exists; one of another encoder needs --replace)")
    build.add_argument("--shards", type=int, default=2, help="number of shards")
    build.add_argument("--factory", default=None,
                       help="FAISS factory string (default: exact Flat below 100k vectors, IVF with 8-bit scalar "
                            "codes above, e.g. IVF8192,SQ8 at 1M; see README 'Recall'). Two tiers: "
                            "IVF8192,PQ48x4fs,Refine(SQfp16) keeps 4-bit fast-scan codes in RAM and re-ranks "
                            "k·k_factor candidates from fp16 vectors memory-mapped from local disk")
    build.add_argument("--replace", action="store_true",
                       help="let the new version replace a memory that holds another encoder's vectors (without "
                            "it, that is an error: their vectors cannot be compared)")
    add_nprobe(build, "the IVF lists a query visits unless it asks for another number, recorded in the manifest "
                      "(default: the smallest nprobe whose recall@10, measured by the build against exact search "
                      "on the collection's own vectors, reaches 0.95)")
    build.add_argument("--k-factor", type=int, default=None, metavar="F",
                       help="two-tier factories: candidates re-ranked per answer (k·F), recorded in the manifest "
                            "(default: calibrated with nprobe, the cheapest pair whose recall@10 reaches 0.95)")
    build.add_argument("--local", action="store_true",
                       help="build in this process, one file after another, without Ray (default from 100,000 "
                            "vectors, or with --address: Ray tasks encode the embedding files in parallel and merge "
                            "each shard; the driver holds only the training sample)")
    add_common(build)

    tune = add_command(
        idx, "tune", "set a memory's default nprobe to the cheapest one that reaches a target recall",
        description="Measures recall@k of the memory across nprobe = 1, 2, 4, ... (each query through the shards "
                    "and the exact merge, against exact search over the vectors the memory stores) on held-out "
                    "vectors, and commits a new version whose default nprobe is the first that reaches the target, "
                    "with the recall measured. Queries: --queries (embeddings of the memory's encoder that are not in "
                    "it, e.g. a test split), or by default a sample of the memory's own vectors, each left out of "
                    "its own answers.",
        epilog="examples:\n"
               "  vismem index tune --memory mem --target-recall 0.95\n"
               "  vismem index tune --memory s3://bucket/mem --target-recall 0.9 --queries s3://bucket/test-emb\n")
    tune.add_argument("--memory", required=True, help="memory root URL")
    tune.add_argument("--target-recall", type=float, required=True, help="recall@k to reach, e.g. 0.95")
    tune.add_argument("--queries", default=None,
                      help="held-out query embeddings (`vismem embed` output with the memory's encoder; default: a "
                           "sample of the memory's own vectors, leave-one-out)")
    tune.add_argument("--held-out", type=int, default=1000, help="memory vectors to sample without --queries")
    add_k(tune, 10)
    tune.add_argument("--reason", default=None, metavar="TEXT", help="why: recorded in the memory's log")
    add_common(tune, ray=False)

    add_bench_parser(idx)


def add_bench_parser(idx) -> None:
    bench = add_command(
        idx, "bench", "recall@10 and queries/s of a memory across nprobe, beside bare FAISS (synthetic vectors)",
        description="Writes clustered synthetic vectors as embedding Parquet, builds a memory from them with "
                    "`index build`'s code (default factory, nprobe calibrated), then measures recall@10 against "
                    "exact search and batched queries/s for each nprobe, through the sharded memory and through "
                    "one bare FAISS index of the same factory over the same vectors. JSON: one object per line.",
        epilog="examples:\n"
               "  vismem index bench --vectors 100000 --dim 64 --json\n"
               "  vismem index bench --also IVF8192,PQ64          # the 1M figure in README\n")
    from index.bench.index_bench import IndexBenchConfig
    d = IndexBenchConfig()
    bench.add_argument("--vectors", type=int, default=d.vectors, help="vectors in the memory")
    bench.add_argument("--dim", type=int, default=d.dim, help="vector dimension")
    bench.add_argument("--clusters", type=int, default=d.clusters, help="Gaussian clusters the vectors come from")
    bench.add_argument("--spread", type=float, default=d.spread,
                       help="within-cluster spread relative to the spread of the centres (larger: harder)")
    bench.add_argument("--shards", type=int, default=d.shards, help="shards of the memory")
    bench.add_argument("--held-out", type=int, default=d.queries, help="held-out queries per figure")
    bench.add_argument("--factory", default=None, help="FAISS factory string (default: the build's choice)")
    bench.add_argument("--nprobes", default=",".join(map(str, d.nprobes)), help="comma-separated nprobes to sweep")
    bench.add_argument("--also", default=None, help="semicolon-separated factory strings measured with bare FAISS too")
    bench.add_argument("--memories", default=None,
                       help="semicolon-separated factory strings also built as memories and measured beside the "
                            "default in fresh processes: resident RAM per vector (RssAnon), recall@10, batched "
                            "queries/s, single-query latency; e.g. 'IVF4096,PQ48x4fs,Refine(SQfp16)'")
    bench.add_argument("--workdir", default=None,
                       help="folder or URL for the embeddings and the memory (default: a temporary folder, removed)")
    bench.add_argument("--workers", type=int, default=None,
                       help="CPUs of the local Ray that runs the parallel build (default: all); the build also runs "
                            "with one worker in one process, and bare FAISS trains and adds in one process, for the ratio")
    add_common(bench, ray=False)


def cmd_build(args) -> dict:
    from dataclasses import asdict

    from tqdm import tqdm

    from cluster.runtime import named_cluster, ray_session
    from index.build.build import build_memory, runs_in_process
    from index.build.parallel_add import plan_files
    check_positive(args, "shards", "nprobe", "k_factor")
    options = {}                                     # only what was asked for: build_memory's defaults otherwise
    if args.replace:
        options["replace"] = True
    for name in ("nprobe", "k_factor"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    bars = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            unit = {"sample": "file", "train": "index", "encode": "file", "merge": "shard"}.get(stage, "task")
            bars[stage] = tqdm(total=total, unit=unit, desc=f"build: {stage}", file=sys.stderr)
        bars[stage].update(done - bars[stage].n)

    plan = plan_files(args.embeddings)               # footers read once, here and for the build
    if runs_in_process(sum(f.rows for f in plan[0]), args.local, named_cluster(args.address) is not None):
        manifest = build_memory(args.embeddings, args.memory, args.shards, args.factory, progress=progress,
                                use_ray=False, plan=plan, **options)
    else:
        with ray_session(args.address):
            manifest = build_memory(args.embeddings, args.memory, args.shards, args.factory, progress=progress,
                                    use_ray=True, plan=plan, **options)
    for bar in bars.values():
        bar.close()
    print(f"memory {args.memory}: version {manifest.version}, {manifest.count} vectors, {manifest.factory}, "
          f"shards {[s.count for s in manifest.shards]}")
    return {**asdict(manifest), "count": manifest.count}


def cmd_tune(args) -> dict:
    from index.memory import VisualMemory
    from index.build.tune import tune
    check_positive(args, "held_out", "k")
    memory = VisualMemory.open(args.memory)
    queries = None
    if args.queries:
        from index.ingest.embeddings import read_memory_embeddings
        queries = read_memory_embeddings(memory.manifest, memory.url, args.queries)[1]
    before = memory.manifest.search.get("nprobe")
    version, result = tune(memory, args.target_recall, queries, args.held_out, args.k, args.reason)
    k_factor = f", k_factor {result['k_factor']}" if "k_factor" in result else ""     # a two-tier memory
    print(f"memory {args.memory}: version {version}, nprobe {before} -> {result['nprobe']}{k_factor}: "
          f"recall@{result['k']} {result['recall']:.4f} on {result['queries']} {result['held_out']} (target "
          f"{result['target']}; by {'nprobe' if 'by_nprobe' in result else 'nprobe,k_factor'} "
          f"{result.get('by_nprobe') or result['by_setting']})")
    return {"memory": args.memory, "version": version, **result}


def cmd_index_bench(args) -> dict:
    from index.bench.index_bench import IndexBenchConfig, run
    check_positive(args, "vectors", "dim", "clusters", "shards", "held_out")
    cfg = IndexBenchConfig(vectors=args.vectors, dim=args.dim, clusters=args.clusters, spread=args.spread,
                           shards=args.shards, queries=args.held_out, factory=args.factory,
                           nprobes=tuple(parse_ints(args.nprobes, "--nprobes")),
                           also=tuple(f for f in (args.also or "").split(";") if f.strip()), workdir=args.workdir,
                           memories=tuple(f for f in (args.memories or "").split(";") if f.strip()),
                           workers=args.workers)
    from cluster.runtime import init_ray
    return run(cfg, record_printer(args), start_ray=init_ray)
