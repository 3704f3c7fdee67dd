"""``vismem``: the command line, thin over the Python API.

Every command prints progress as it goes; with ``--json`` its last line is one JSON object.
Errors print one line naming what was wrong and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
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
  vismem demo --max-minutes 10 --store s3://bucket/vismem
  vismem procdata preview --out grid.png          # one row of samples per generator
  vismem procdata stats --natural                 # how natural the generators' statistics are
  vismem encoder train --max-minutes 5 --out runs/enc1
  vismem embed --collection s3://bucket/images --encoder runs/enc1/encoder --out s3://bucket/emb
  vismem index build --embeddings s3://bucket/emb --memory s3://bucket/mem --shards 4
  vismem memory info --memory s3://bucket/mem
  vismem serve --memory s3://bucket/mem --port 8000
  vismem classify --url http://127.0.0.1:8000 --rule softmax -k 10 cat.jpg dog.png
  vismem COMMAND --help                           # every option of a command, with its default
"""


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where there is one worth reading (not None, False or []),
    and an ``examples:`` epilog as written, one command a line."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A sub-command that takes options only by their full names (``--max-min`` is not
    ``--max-minutes``: one name per option, so a renamed option fails loudly)."""
    return sub.add_parser(name, help=help, formatter_class=DefaultsHelp, allow_abbrev=False, **kwargs)


def add_group(sub, name: str, help: str) -> argparse._SubParsersAction:
    """A command group (``vismem encoder ...``) and the sub-parsers of its actions."""
    group = sub.add_parser(name, help=help, allow_abbrev=False)
    return group.add_subparsers(dest="action", metavar="ACTION", required=True)


def add_common(p: argparse.ArgumentParser, ray: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
    if ray:
        p.add_argument("--address", default=None,
                       help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)")


def add_k(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("-k", "--k", type=int, default=default, help="neighbours per query")


def add_device(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--device", default=None, metavar="DEVICE", help=help)


def add_nprobe(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--nprobe", type=int, default=None, metavar="N",
                   help=help + "; more lists is slower and closer to exact search (a Flat memory ignores it)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vismem", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_demo_parser(sub)
    add_procdata_parsers(sub)
    add_encoder_parsers(sub)
    add_embed_parser(sub)
    add_index_parsers(sub)
    add_memory_parsers(sub)
    add_serve_parser(sub)
    add_client_parsers(sub)
    return top


def add_demo_parser(sub) -> None:
    from cluster.demo import DemoConfig
    from encoder.config import PRESETS
    from procdata.generators import GENERATORS
    d = DemoConfig()
    demo = add_command(
        sub, "demo", "run the main job end to end on the embedded defaults",
        description="Stream procedural images from Ray Train workers and train a small DINO ViT on them only; "
                    "batch-embed the real images (scikit-learn's digits) with Ray Data; build a sharded FAISS "
                    "memory; serve it with Ray Serve on 127.0.0.1; classify the held-out images through the router "
                    "with four voting rules; print kNN accuracy for the procedural encoder, the same network "
                    "untrained, and raw pixels; write an HTML report. Re-running reuses the trained encoder and "
                    "embeddings under --store unless --fresh.")
    demo.add_argument("--store", default=d.store, help="object store URL for every artefact (local folder or s3://)")
    demo.add_argument("--max-minutes", type=float, default=d.max_minutes, help="training time budget in minutes")
    demo.add_argument("--max-steps", type=int, default=None,
                      help="stop training after this many steps (reproducible runs; the time budget still applies)")
    demo.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="encoder and DINO recipe")
    demo.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (processes) for training")
    demo.add_argument("--generators", default=",".join(d.generators),
                      help=f"comma-separated procedural generators, from: {', '.join(GENERATORS)}")
    demo.add_argument("--seed", type=int, default=d.seed, help="seed of data, initialisation and split")
    demo.add_argument("--shards", type=int, default=d.shards, help="number of FAISS shards in the memory")
    add_k(demo, d.k)
    demo.add_argument("--port", type=int, default=d.port, help="HTTP port of the router on 127.0.0.1 (0: a free port)")
    demo.add_argument("--fresh", action="store_true", help="retrain and re-embed even if outputs exist in --store")
    add_common(demo)


def add_procdata_parsers(sub) -> None:
    from procdata.generators import GENERATORS
    proc = add_group(sub, "procdata", "procedural images: write shards, preview, benchmark")
    gen = add_command(proc, "generate", "write a procedural data set as Parquet shards with Ray actors (resumable)",
                      epilog="examples:\n"
                             "  vismem procdata generate --generator shader --n 2000 --size 32 --out shader32\n")
    gen.add_argument("--generator", required=True,
                     help="the one generator of the data set (run once per generator), one of: "
                          + ", ".join(GENERATORS))
    gen.add_argument("--n", type=int, required=True, help="number of images")
    gen.add_argument("--size", type=int, default=64, help="image side in pixels")
    gen.add_argument("--out", required=True, help="output URL: shard-NNNNN.parquet files and manifest.json")
    gen.add_argument("--seed", type=int, default=0, help="data set seed: image i is a function of (generator, seed, i)")
    gen.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    gen.add_argument("--format", default="png", choices=("png", "jpeg"), help="image encoding")
    gen.add_argument("--workers", type=int, default=None, help="writer actors (default: one per CPU, or per GPU)")
    add_common(gen)

    prev = add_command(proc, "preview", "a labelled grid of samples of every generator (PNG)")
    prev.add_argument("--out", required=True, help="PNG file URL")
    prev.add_argument("--size", type=int, default=64, help="sample side in pixels")
    prev.add_argument("--per-row", type=int, default=8, help="samples per generator")
    prev.add_argument("--seed", type=int, default=0, help="seed")
    add_common(prev, ray=False)

    bench = add_command(proc, "bench", "images/s of every generator, one core and all cores (and GPU)",
                        epilog="examples:\n"
                               "  vismem procdata bench --sizes 64 --generators shader,kml_mixup\n"
                               "  vismem procdata bench --device cuda --sizes 224 --json\n")
    bench.add_argument("--sizes", default="64,224", help="comma-separated image sizes")
    bench.add_argument("--generators", default=",".join(GENERATORS), help="comma-separated generators")
    bench.add_argument("--seconds", type=float, default=2.0, help="measuring time per figure")
    add_device(bench, "the device to time: cpu (one core, then every core) or cuda (cuda:N) (default: the CPU, and "
                      "the GPU when there is one)")
    add_common(bench, ray=False)


    stats = add_command(proc, "stats", "how natural the generators' images are: saturation, luminance share of "
                                       "variance, power above 0.25 cycles/px, spectral slope",
                        epilog="examples:\n"
                               "  vismem procdata stats --generators shader,dead_leaves\n"
                               "  vismem procdata stats --natural --reference ../shared/data/cifar10/test.parquet --json\n"
                               "\nA collection is measured for reference only: no generator is fit to it.\n")
    stats.add_argument("--generators", default="kml_mixup,shader,dead_leaves,fractal,spectral",
                       help="comma-separated generators")
    stats.add_argument("--reference", action="append", default=[], metavar="URL",
                       help="a real image collection (folder tree or Parquet, any URL) to measure beside them; repeatable")
    stats.add_argument("--images", type=int, default=768, help="images measured per generator or collection")
    stats.add_argument("--size", type=int, default=32, help="image side in pixels, as the training stream renders it")
    stats.add_argument("--natural", action="store_true",
                       help="also measure render_natural (supersampled x2, natural colour) for every generator")
    stats.add_argument("--seed", type=int, default=0, help="seed")
    add_common(stats, ray=False)


def add_encoder_parsers(sub) -> None:
    from encoder.config import PRESETS
    from eval.knn import K_SWEEP
    from procdata.generators import GENERATORS
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
                    "--encoder random-init:tiny-cpu (the untrained network) or --encoder raw-pixels:32.",
        epilog="examples:\n"
               "  vismem encoder eval-knn --encoder runs/a/encoder --memory cifar10/train.parquet "
               "--queries cifar10/test.parquet\n"
               "  vismem encoder eval-knn --encoder raw-pixels:32 --memory train/ --queries test/ --ks 10,20 --json\n")
    knn.add_argument("--encoder", required=True, help="encoder URL, random-init:PRESET[:SEED] or raw-pixels:SIZE")
    knn.add_argument("--memory", required=True, help="labelled collection URL: the kNN memory (e.g. a train split)")
    knn.add_argument("--queries", required=True, help="labelled collection URL: the images to classify")
    knn.add_argument("--ks", default=",".join(map(str, K_SWEEP)), help="comma-separated ks to sweep")
    knn.add_argument("--temperature", type=float, default=0.07, help="softmax voting temperature")
    knn.add_argument("--batch-size", type=int, default=512, help="images per embedding batch")
    add_common(knn, ray=False)

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


def add_embed_parser(sub) -> None:
    from index.embed_bench import EmbedBenchConfig
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
                            "codes above, e.g. IVF8192,SQ8 at 1M; see README 'Recall')")
    build.add_argument("--replace", action="store_true",
                       help="let the new version replace a memory that holds another encoder's vectors (without "
                            "it, that is an error: their vectors cannot be compared)")
    add_nprobe(build, "the IVF lists a query visits unless it asks for another number, recorded in the manifest "
                      "(default: the smallest nprobe whose recall@10, measured by the build against exact search "
                      "on the collection's own vectors, reaches 0.95)")
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

    bench = add_command(
        idx, "bench", "recall@10 and queries/s of a memory across nprobe, beside bare FAISS (synthetic vectors)",
        description="Writes clustered synthetic vectors as embedding Parquet, builds a memory from them with "
                    "`index build`'s code (default factory, nprobe calibrated), then measures recall@10 against "
                    "exact search and batched queries/s for each nprobe, through the sharded memory and through "
                    "one bare FAISS index of the same factory over the same vectors. JSON: one object per line.",
        epilog="examples:\n"
               "  vismem index bench --vectors 100000 --dim 64 --json\n"
               "  vismem index bench --also IVF8192,PQ64          # the 1M figure in README\n")
    from index.bench import IndexBenchConfig
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
    bench.add_argument("--workdir", default=None,
                       help="folder or URL for the embeddings and the memory (default: a temporary folder, removed)")
    bench.add_argument("--workers", type=int, default=None,
                       help="CPUs of the local Ray that runs the parallel build (default: all); the build also runs "
                            "with one worker in one process, and bare FAISS trains and adds in one process, for the ratio")
    add_common(bench, ray=False)


def add_memory_parsers(sub) -> None:
    mem = add_group(sub, "memory", "inspect and edit memories: add, remove, prune, history, rollback, clean-up")

    def command(name: str, help: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
        p = add_command(mem, name, help, description=description,
                        epilog="examples:\n" + "".join(f"  vismem memory {name} {e}\n" for e in examples))
        p.add_argument("--memory", required=True, help="memory root URL")
        return p

    def add_reason(p: argparse.ArgumentParser) -> None:
        p.add_argument("--reason", default=None, metavar="TEXT", help="why: recorded in the memory's log")

    info = command("info", "what a memory holds: version, count, encoder, shards",
                   "The current (or a past) version's vector count, dimension, index, encoder, shards and search "
                   "defaults, read from its manifest.",
                   ["--memory s3://bucket/mem", "--memory mem --version 2 --json"])
    info.add_argument("--version", type=int, default=None, help="a past version (default: current)")
    add_common(info, ray=False)

    add = command("add", "add the vectors of `vismem embed` (new classes welcome) as a new version",
                  "Add every vector of an embeddings folder written by `vismem embed` with the memory's encoder: "
                  "they get new memory ids, are encoded with the memory's trained index (no retraining) and are "
                  "returned by the next search. Labels the memory does not hold yet become new classes. Vectors "
                  "of another encoder or dimension are refused.",
                  ["--memory mem --embeddings emb-new --reason 'ninco classes'",
                   "--memory s3://bucket/mem --embeddings s3://bucket/emb2 --json"])
    add.add_argument("--embeddings", required=True, help="URL written by `vismem embed` with the memory's encoder")
    add_reason(add)
    add_common(add, ray=False)

    remove = command("remove", "remove vectors by id, image URI or label as a new version (--purge: unlearn)",
                     "Remove exactly the vectors named: no search of the new version returns them, and the "
                     "answers equal those of a memory built without them. Every id, URI and label given must be "
                     "in the memory, else nothing is written. The removed vectors stay in the files of older "
                     "versions until `vismem memory compact` and `vismem memory vacuum`; --purge does all three, "
                     "and only then is unlearning complete.",
                     ["--memory mem --ids 17,42 --reason 'consent withdrawn'",
                      "--memory mem --uris s3://bucket/images/cat/1.png --uris s3://bucket/images/cat/2.png",
                      "--memory s3://bucket/mem --label zebra --label okapi --purge --json"])
    remove.add_argument("--ids", default=None, help="comma-separated memory ids (as search answers name them)")
    remove.add_argument("--uris", action="append", default=None, metavar="URIS",
                        help="image URIs whose vectors to remove, comma-separated (repeatable)")
    remove.add_argument("--label", action="append", default=None,
                        help="remove every vector of this label (repeatable)")
    add_reason(remove)
    remove.add_argument("--purge", action="store_true",
                        help="also compact and vacuum (keeping only the new version), so that the vectors are gone "
                             "from every file: complete unlearning, but no rollback past it")
    add_common(remove, ray=False)

    prune = command("prune", "hard or soft pruning of memory items that mislead queries, as a new version",
                    "Count how often each memory item is a wrong-class neighbour among the k nearest of labelled "
                    "queries (by default the memory's own vectors, each leaving itself out). Hard pruning removes "
                    "the items counted at least --threshold times (exactly, like `vismem memory remove`); soft "
                    "pruning keeps every item and gives each one counted at all the vote weight 1.75/(1+count), "
                    "which every voting rule applies. Where nothing changes, no version is written.",
                    ["--memory mem --mode hard --threshold 5",
                     "--memory mem --queries emb-val --mode soft -k 20 --json"])
    prune.add_argument("--queries", default=None, metavar="URL",
                       help="labelled embeddings written by `vismem embed` with the memory's encoder (default: the "
                            "memory itself, leave-one-out)")
    prune.add_argument("--mode", required=True, choices=("hard", "soft"),
                       help="hard: remove the items counted --threshold times; soft: down-weight every item counted")
    prune.add_argument("--threshold", type=int, default=None, metavar="N",
                       help="with --mode hard (needed there): the wrong-class neighbour count from which an item is "
                            "removed")
    add_k(prune, 10)
    add_reason(prune)
    add_common(prune, ray=False)

    versions = command("versions", "the memory's versions, the current one marked",
                       "Every committed version, oldest first, with its time (UTC) and the operation that made it; "
                       "* marks the current one.",
                       ["--memory mem", "--memory s3://bucket/mem --json"])
    add_common(versions, ray=False)

    log = command("log", "the audit trail: who changed what, when and why",
                  "One line per version: its number, time (UTC), operation, counts, user and reason (and the "
                  "version a rollback restored).",
                  ["--memory mem", "--memory s3://bucket/mem --json"])
    add_common(log, ray=False)

    diff = command("diff", "the ids added and removed between two versions",
                   "The ids in version --to but not in --from (added) and the other way round (removed); the "
                   "first ids of each side are printed, --json gives them all. Versions on either side of a "
                   "build are refused (a build numbers its vectors afresh).",
                   ["--memory mem --from 1 --to 3", "--memory mem --from 3 --to 1 --json"])
    diff.add_argument("--from", dest="from_version", type=int, required=True, help="the older version")
    diff.add_argument("--to", dest="to_version", type=int, required=True, help="the newer version")
    add_common(diff, ray=False)

    rollback = command("rollback", "a new version whose content is a past version's",
                       "Commit a new version equal in content to version --to. History is kept: the versions in "
                       "between stay, so a later rollback can go forward again. Ids are never handed out twice.",
                       ["--memory mem --to 2 --reason 'bad add'"])
    rollback.add_argument("--to", dest="to_version", type=int, required=True, help="the version to restore")
    add_reason(rollback)
    add_common(rollback, ray=False)

    compact = command("compact", "rewrite shards without their removed vectors, as a new version",
                      "Rewrite every shard that has added segments or removed vectors as one index of exactly its "
                      "live vectors (same answers), so that the current version's files no longer hold removed "
                      "vectors; older versions' files still do until `vismem memory vacuum`. A memory with "
                      "nothing to compact is an error.",
                      ["--memory mem", "--memory s3://bucket/mem --reason 'after unlearning' --json"])
    add_reason(compact)
    add_common(compact, ray=False)

    vacuum = command("vacuum", "delete old versions and the files no kept version references",
                     "Delete the versions that neither --keep-last nor --older-than-days keeps (the current "
                     "version is always kept; with neither option every version is kept), then every file that no "
                     "kept version references: the deleted versions' files, and those of failed edits once they "
                     "are 15 minutes old (younger ones may belong to an edit in flight). No rollback to a deleted "
                     "version is possible. With --dry-run, only say what would be deleted.",
                     ["--memory mem --keep-last 5", "--memory s3://bucket/mem --older-than-days 30 --dry-run"])
    vacuum.add_argument("--keep-last", type=int, default=None, metavar="N",
                        help="keep the newest N versions")
    vacuum.add_argument("--older-than-days", type=float, default=None, metavar="DAYS",
                        help="keep the versions younger than this many days")
    vacuum.add_argument("--dry-run", action="store_true", help="delete nothing; print what would be deleted")
    add_common(vacuum, ray=False)

    from index.memory_bench import MemoryBenchConfig
    d = MemoryBenchConfig()
    bench = add_command(
        mem, "bench", "what editing costs: remove and add latency in process and through HTTP (synthetic vectors)",
        description="For each size, writes clustered synthetic vectors, builds a memory with the default factory, "
                    "then times removes of 1, 100 and 1,000 ids (each a committed version) beside bare FAISS "
                    "remove_ids on a shard's index, and an add; then serves the largest memory and removes single "
                    "ids through HTTP under concurrent query load: acknowledgement latency, the first query after "
                    "it, and whether any query that started after an acknowledgement returned the removed id. "
                    "JSON: one object per line.",
        epilog="examples:\n"
               "  vismem memory bench --sizes 20000 --dim 64 --no-http --json\n"
               "  vismem memory bench                     # 100k and 1M vectors of d=384: the README figures\n")
    bench.add_argument("--sizes", default=",".join(map(str, d.sizes)), help="comma-separated memory sizes")
    bench.add_argument("--dim", type=int, default=d.dim, help="vector dimension")
    bench.add_argument("--shards", type=int, default=d.shards, help="shards of each memory")
    bench.add_argument("--repeats", type=int, default=d.repeats, help="removes timed per batch size")
    bench.add_argument("--add", type=int, default=d.add, help="vectors added in the timed add")
    bench.add_argument("--http-removes", type=int, default=d.http_removes, help="single-id removes through HTTP")
    bench.add_argument("--no-http", action="store_true", help="skip the served part (no Ray)")
    bench.add_argument("--workdir", default=None, help="where the memories go (default: a temporary folder)")
    add_common(bench, ray=False)


def add_serve_parser(sub) -> None:
    serve = add_command(sub, "serve", "serve a memory over HTTP with Ray Serve (until Ctrl-C or SIGTERM)",
                        description="Deploy the memory's shard searchers and the router with Ray Serve and answer "
                                    "HTTP until stopped. Ctrl-C (SIGINT) or SIGTERM shuts Serve and Ray down and "
                                    "exits with status 130 or 0 respectively.")
    serve.add_argument("--memory", required=True, help="memory root URL")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port")
    serve.add_argument("--replicas", type=int, default=1, help="replicas per shard searcher")
    serve.add_argument("--shard-timeout", type=float, default=10.0, help="seconds before a shard counts as failed")
    serve.add_argument("--mmap", action="store_true",
                       help="memory-map the shards' IVF lists from the memory's local disk instead of loading them: "
                            "a shard larger than RAM can answer, paged in as queries visit its lists (a memory on "
                            "a local disk only; the shard replicas must run on that machine)")
    serve.add_argument("--token-file", default=None, metavar="PATH",
                       help="file holding the bearer token that /v1/memory/add and /v1/memory/remove need "
                            "(default: $VISMEM_TOKEN; with neither, editing over HTTP is off)")
    add_common(serve)


def add_client_parsers(sub) -> None:
    from index.voting import RULES
    for name, what in (("classify", "classify images through a running router"),
                       ("query", "nearest neighbours of images through a running router")):
        q = add_command(sub, name, what, epilog="examples:\n"
                        f"  vismem {name} --url http://127.0.0.1:8000 -k 5 cat.jpg dog.png\n")
        q.add_argument("images", nargs="+", help="image files (any fsspec URL)")
        q.add_argument("--url", default="http://127.0.0.1:8000", help="router base URL")
        add_k(q, 10)
        if name == "classify":
            q.add_argument("--rule", default="plurality", choices=RULES, help="voting rule")
        add_nprobe(q, "IVF lists to visit in each shard (default: the memory's, set by `vismem index build`)")
        add_common(q, ray=False)


def main(argv: list[str] | None = None) -> int:
    from cluster.runtime import loopback_only
    args = parser().parse_args(argv)
    loopback_only(getattr(args, "address", None))          # before anything imports ray
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        result = COMMANDS[(args.command, getattr(args, "action", None))](args)
    except Stopped as e:
        print(f"vismem {args.command}: stopped ({e})", file=sys.stderr)
        return 130 if e.signum == signal.SIGINT else 0
    except KeyboardInterrupt:
        print(f"vismem {args.command}: interrupted", file=sys.stderr)
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


class Stopped(Exception):
    """SIGINT or SIGTERM asked a long-running command to stop; raised in the main thread."""

    def __init__(self, signum: int, cleanup: str):
        super().__init__(f"{signal.Signals(signum).name}; {cleanup}")
        self.signum = signum


def stop_on_signals(cleanup: str) -> None:
    """Turn the first SIGINT or SIGTERM into ``Stopped``, so ``with`` blocks shut down what they
    started (``cleanup`` says what, for the last line); a second signal while that runs exits at
    once. Call it after Ray is up: ``ray.init`` installs its own SIGTERM handler."""
    def first(signum, frame):
        signal.signal(signal.SIGINT, again)
        signal.signal(signal.SIGTERM, again)
        raise Stopped(signum, cleanup)

    def again(signum, frame):
        print(f"vismem: {signal.Signals(signum).name} again: exiting before the shutdown finished", file=sys.stderr)
        os._exit(130 if signum == signal.SIGINT else 1)

    signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{option} needs positive numbers, got {text!r}")
    return values


def parse_generators(text: str, option: str = "--generators") -> tuple[str, ...]:
    """Comma-separated generator names, each checked (an unknown name fails before Ray starts)."""
    from procdata.generators import get_generator
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError(f"{option} needs at least one generator, got {text!r}")
    for name in names:
        get_generator(name)
    return names


def check_positive(args, *options: str) -> None:
    """Each named option, when given, is a positive number (``max_minutes`` is ``--max-minutes``)."""
    for dest in options:
        value = getattr(args, dest)
        if value is not None and value <= 0:
            raise ValueError(f"--{dest.replace('_', '-')} must be positive, got {value}")


def cmd_demo(args) -> dict:
    from cluster.demo import DemoConfig, run_demo
    check_positive(args, "max_minutes", "max_steps", "workers", "shards", "k")    # bad options fail before Ray starts
    cfg = DemoConfig(store=args.store, max_minutes=args.max_minutes, max_steps=args.max_steps, preset=args.preset,
                     workers=args.workers, generators=parse_generators(args.generators), seed=args.seed,
                     shards=args.shards, k=args.k, port=args.port, address=args.address, fresh=args.fresh)
    return run_demo(cfg)


def cmd_generate(args) -> dict:
    from tqdm import tqdm

    from cluster.runtime import ray_session
    from procdata.shards import ShardJob, write_shards
    if "," in args.generator:
        raise ValueError(f"--generator takes one generator, got {args.generator!r}: a data set holds one generator's "
                         "images; run once per generator")
    job = ShardJob(args.generator, args.n, args.size, args.out, args.seed, args.shard_size, args.format)
    job.check()
    bar = tqdm(total=args.n, unit="img", desc=f"{args.generator} → {args.out}", file=sys.stderr)

    def progress(done, total, rate):
        bar.total = total
        bar.update(done - bar.n)

    with ray_session(args.address):
        manifest = write_shards(job, args.workers, progress)
    bar.close()
    print(f"{job.shards} shards at {args.out} ({manifest['written_this_run']} written now, the rest existed)")
    return manifest


def cmd_preview(args) -> dict:
    from procdata.preview import write_preview
    check_positive(args, "size", "per_row")
    write_preview(args.out, size=args.size, per_row=args.per_row, seed=args.seed)
    print(f"preview grid: {args.out}")
    return {"preview": args.out}


def cmd_bench(args) -> dict:
    from procdata.bench import bench, check_device
    names = parse_generators(args.generators)
    devices = [check_device(args.device)] if args.device else None
    records = []
    for record in bench(list(names), parse_ints(args.sizes, "--sizes"), seconds=args.seconds, devices=devices):
        records.append(record)
        print(json.dumps(record) if args.json else
              f"{record['generator']:12s} {record['size']:4d}px {record['device']:5s} x{record['workers']:<3d} "
              f"{record['images_per_s']:10.1f} images/s", flush=True)
    args.json = False                      # the records are already one JSON object per line
    return {"results": records}


def reference_stats(url: str, images: int, size: int):
    """procdata.stats of the first ``images`` readable images of a real collection, resized as an
    encoder of input ``size`` resizes them: a reference, never an input to a generator."""
    import numpy as np

    from encoder.embed import Resize
    from eval.readable import readable_images
    from procdata.stats import image_stats
    resize, out = Resize(size), []
    for _, items in readable_images(url):
        out.extend(resize(image) for _, _, image in items[:images - len(out)])
        if len(out) >= images:
            break
    return image_stats(np.stack(out))


def cmd_stats(args) -> dict:
    from procdata.stats import generator_stats, outside_natural
    check_positive(args, "images", "size")
    names = parse_generators(args.generators)
    rows = []
    for name in names:
        rows.append({"source": name, "rendering": "plain", **generator_stats(name, args.images, args.size,
                                                                              args.seed).to_dict()})
        if args.natural:
            rows.append({"source": name, "rendering": "natural",
                         **generator_stats(name, args.images, args.size, args.seed, natural=True).to_dict()})
    for url in args.reference:
        rows.append({"source": url, "rendering": "reference", **reference_stats(url, args.images, args.size).to_dict()})
    print(f"{'source':40s} {'rendering':9s} {'images':>6s} {'saturation':>10s} {'lum share':>9s} {'HF power':>8s} "
          f"{'slope':>6s}  outside natural ranges")
    for row in rows:
        outside = ", ".join(outside_natural(row)) or "-"
        print(f"{row['source'][-40:]:40s} {row['rendering']:9s} {row['images']:6d} {row['saturation']:10.3f} "
              f"{row['luminance_share']:9.3f} {row['high_freq_power']:8.3f} {row['spectral_slope']:6.2f}  {outside}")
    return {"stats": rows}


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
    memory, memory_labels = embed_labelled(args.memory, encoder, args.batch_size)
    queries, query_labels = embed_labelled(args.queries, encoder, args.batch_size)
    result = knn_sweep(memory, memory_labels, queries, query_labels, ks, args.temperature)
    for k, acc in result["by_k"].items():
        print(f"k={k:<4d} top-1 {100 * acc:5.1f}%")
    print(f"{args.encoder}: best top-1 {100 * result['top1']:.1f}% at k={result['best_k']} "
          f"({len(memory)} memory, {len(queries)} queries, {len(set(memory_labels))} classes)")
    return {**result, "encoder": args.encoder, "memory_images": len(memory), "query_images": len(queries)}


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


def cmd_embed(args) -> dict:
    from dataclasses import asdict

    from tqdm import tqdm

    from cluster.runtime import ray_session
    from index.embed_bench import EmbedBenchConfig
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
    from index.embed_job import plan_embedding, run_embedding
    plan = plan_embedding(args.collection, args.encoder, args.out, args.partition_size or 512)
    with ray_session(args.address), tqdm(total=plan.pending_images, unit="img", desc=f"embed → {args.out}",
                                         file=sys.stderr, disable=not plan.pending) as bar:
        summary = run_embedding(plan, args.concurrency, args.batch_size, progress=bar.update, decode=args.decode)
    print(f"{summary.images} vectors in {summary.partitions} partitions at {summary.out} ({summary.computed} "
          f"partitions embedded by this run); {summary.errors} unreadable")
    return asdict(summary)


def embed_bench(args, defaults) -> dict:
    """``vismem embed --bench``: one record per encoder (index.embed_bench)."""
    from dataclasses import replace

    from cluster.runtime import ray_session
    from index.embed_bench import run
    if args.out:
        raise ValueError("--bench embeds into a fresh folder under --workdir (default: a temporary one): drop --out")
    encoders = tuple(e.strip() for e in (args.encoder or ",".join(defaults.encoders)).split(",") if e.strip())
    cfg = replace(defaults, encoders=encoders, images=args.images, collection=args.collection,
                  source_size=args.source_size, layout=args.layout, partition_size=args.partition_size,
                  batch_size=args.batch_size, concurrency=args.concurrency, decode=args.decode, repeats=args.repeats,
                  workdir=args.workdir)
    with ray_session(args.address):
        return run(cfg, record_printer(args))


def cmd_build(args) -> dict:
    from dataclasses import asdict

    from tqdm import tqdm

    from cluster.runtime import ray_session
    from index.build import PARALLEL_MIN, build_memory
    from index.parallel_add import plan_files
    check_positive(args, "shards", "nprobe")
    options = {}                                     # only what was asked for: build_memory's defaults otherwise
    if args.replace:
        options["replace"] = True
    if args.nprobe is not None:
        options["nprobe"] = args.nprobe
    bars = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            unit = {"sample": "file", "train": "index", "encode": "file", "merge": "shard"}.get(stage, "task")
            bars[stage] = tqdm(total=total, unit=unit, desc=f"build: {stage}", file=sys.stderr)
        bars[stage].update(done - bars[stage].n)

    plan = plan_files(args.embeddings)               # footers read once, here and for the build
    if args.local or (sum(f.rows for f in plan[0]) < PARALLEL_MIN and not args.address
                      and not os.environ.get("RAY_ADDRESS")):
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
    from index.tune import tune
    check_positive(args, "held_out", "k")
    memory = VisualMemory.open(args.memory)
    queries = None
    if args.queries:
        from index.build import embedding_encoder
        from index.edits import check_embeddings_encoder
        from index.embeddings import embedding_matrix, read_embeddings
        queries = embedding_matrix(read_embeddings(args.queries))
        check_embeddings_encoder(memory.manifest, memory.url, embedding_encoder(args.queries), queries.shape[1],
                                 args.queries)
    before = memory.manifest.search.get("nprobe")
    version, result = tune(memory, args.target_recall, queries, args.held_out, args.k, args.reason)
    print(f"memory {args.memory}: version {version}, nprobe {before} -> {result['nprobe']}: recall@{result['k']} "
          f"{result['recall']:.4f} on {result['queries']} {result['held_out']} (target {result['target']}; by nprobe "
          f"{result['by_nprobe']})")
    return {"memory": args.memory, "version": version, **result}


def cmd_info(args) -> dict:
    from dataclasses import asdict

    from index.manifest import list_versions, read_manifest
    m = read_manifest(args.memory, args.version)
    print(f"memory {args.memory}, version {m.version} (versions {list_versions(args.memory)})\n"
          f"  {m.count} vectors of dim {m.dim}, {m.metric}, {m.factory}\n  encoder {m.encoder['name']}\n"
          f"  shards: {[s.count for s in m.shards]}")
    if m.recall:
        print(f"  search defaults: nprobe {m.search.get('nprobe')}: recall@{m.recall['k']} {m.recall['recall']:.3f} "
              f"against exact search, measured by the build on {m.recall['queries']} of its vectors")
    elif m.search:
        print(f"  search defaults: {m.search}")
    segments, removed = sum(len(s.segments) for s in m.shards), sum(s.deleted_count for s in m.shards)
    if segments or removed:
        print(f"  since the last compaction: {segments} added segments, {removed} removed ids still in the files "
              "(`vismem memory compact` merges and drops them)")
    return {**asdict(m), "count": m.count}


class Steps:
    """A progress bar on stderr over the steps of a command that takes time (open the memory, edit,
    ...): ``step(name)`` starts the next step, the bar counts finished ones and shows elapsed time."""

    def __init__(self, desc: str, names: list[str]):
        from tqdm import tqdm
        self.bar = tqdm(total=len(names), desc=desc, unit="step", file=sys.stderr,
                        bar_format="{desc}: {n_fmt}/{total_fmt} steps{postfix} [{elapsed}]")
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_postfix_str(name)

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.bar.update()
            self.bar.set_postfix_str("done")
        else:
            self.bar.leave = False                 # an error: its one line stands alone
        self.bar.close()


def parse_ids(text: str) -> list[int]:
    """``--ids``: comma-separated memory ids (whole numbers)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--ids takes comma-separated whole numbers (memory ids), got {text!r}") from None
    if not values:
        raise ValueError(f"--ids needs at least one id, got {text!r}")
    return values


def first(ids, limit: int = 10) -> str:
    """The first ``limit`` of ``ids`` for a summary line, and how many more."""
    ids = list(ids)
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f" … and {len(ids) - limit} more" if len(ids) > limit else "")


def counts_text(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def live_labels(memory) -> set:
    """The labels of the vectors ``memory`` answers with."""
    import numpy as np
    labels = set()
    for shard in memory.shards:
        for part in shard.parts:
            labels.update(part.labels[~np.isin(part.ids, shard.deleted)])
    return labels


def open_memory(url: str, steps: Steps):
    from index.memory import VisualMemory
    steps(f"open {url}")
    return VisualMemory.open(url)


def cmd_memory_add(args) -> dict:
    import numpy as np
    with Steps("memory add", ["open", "add"]) as step:
        memory = open_memory(args.memory, step)
        before = live_labels(memory)
        step(f"read, encode and write {args.embeddings}")
        version, ids = memory.add_embeddings(args.embeddings, reason=args.reason)
    added = set()
    for shard in memory.shards:
        added.update(shard.lookup(ids[shard.held(ids)])[1].tolist())
    new = sorted((added - before) - {None}, key=str)
    print(f"memory {args.memory}: version {version} adds {len(ids)} vectors (ids {ids.min()}–{ids.max()}), "
          f"{len(new)} new classes{': ' + ', '.join(map(str, new[:20])) if new else ''}"
          f"{' …' if len(new) > 20 else ''}; {len(memory)} vectors now")
    return {"memory": args.memory, "version": version, "added": len(ids), "ids": np.asarray(ids).tolist(),
            "new_classes": new, "count": len(memory)}


def cmd_memory_remove(args) -> dict:
    import numpy as np
    ids = parse_ids(args.ids) if args.ids is not None else None
    uris = [u.strip() for text in args.uris for u in text.split(",") if u.strip()] if args.uris else None
    if uris == []:
        raise ValueError("--uris needs at least one URI")
    if ids is None and uris is None and args.label is None:
        raise ValueError("memory remove needs what to remove: --ids, --uris or --label")
    selection = dict(ids=ids, uris=uris, labels=args.label, reason=args.reason)
    with Steps("memory remove", ["open", "remove" + (", compact and vacuum" if args.purge else "")]) as step:
        memory = open_memory(args.memory, step)
        if not args.purge:
            step("remove")
            version, removed = memory.remove(**selection)
        else:
            step("remove, compact and vacuum")
            purged = memory.purge(**selection)
            version, removed = purged["remove_version"], np.asarray(purged["removed"], dtype=np.int64)
    result = {"memory": args.memory, "version": version, "removed": len(removed), "ids": removed.tolist(),
              "purged": args.purge, "count": len(memory)}
    head = f"memory {args.memory}: version {version} removes {len(removed)} vectors (ids {first(removed)})"
    if args.purge:
        vacuum = purged["vacuum"]
        result.update(current=purged["version"], compact_version=purged["compact_version"], vacuum=vacuum)
        young = vacuum["kept_recent"]
        print(f"{head}; version {purged['compact_version']} compacts it and vacuum deleted versions "
              f"{first(vacuum['deleted_versions'])} ({len(vacuum['deleted_files'])} files, "
              f"{vacuum['freed_bytes'] / 1e6:.1f} MB): " +
              ("no file of the memory holds them any more: unlearning is complete" if not young else
               f"{len(young)} unreferenced files younger than 15 minutes were kept (an edit may be in flight): "
               "unlearning is complete once `vismem memory vacuum` deletes them later") +
              f" ({len(memory)} vectors now)")
    else:
        print(f"{head}; no search of version {version} or later returns them, but they stay in older versions' "
              f"files until `vismem memory compact` and `vismem memory vacuum` (or remove with --purge) "
              f"({len(memory)} vectors now)")
    return result


def cmd_memory_prune(args) -> dict:
    check_positive(args, "threshold", "k")
    if args.mode == "hard" and args.threshold is None:
        raise ValueError("--mode hard needs --threshold N: items counted N times or more as a wrong-class neighbour "
                         "are removed")
    if args.mode == "soft" and args.threshold is not None:
        raise ValueError("--threshold goes with --mode hard: soft pruning down-weights every item counted at all, "
                         "by 1.75/(1+count)")
    with Steps("memory prune", ["open", "read queries", "prune"] if args.queries else ["open", "prune"]) as step:
        memory = open_memory(args.memory, step)
        queries = query_labels = None
        if args.queries:
            step(f"read {args.queries}")
            queries, query_labels = read_labelled_queries(memory, args.queries)
        step(f"count wrong-class neighbours of {len(queries) if queries is not None else len(memory)} queries, "
             f"{'leave-one-out, ' if queries is None else ''}k={args.k}")
        options = {} if args.threshold is None else {"threshold": args.threshold}
        version, summary = memory.prune(queries, query_labels, mode=args.mode, k=args.k, reason=args.reason,
                                        **options)
    over = f"{summary['queries']} queries ({args.queries or 'the memory itself, leave-one-out'}, k={args.k})"
    found = f"{summary['flagged']} items were wrong-class neighbours (at most {summary['max_count']} times)"
    if args.mode == "hard":
        done = f"{summary['pruned']} counted {args.threshold} times or more removed"
    else:
        done = f"{summary['reweighted']} down-weighted to 1.75/(1+count)"
    print(f"memory {args.memory}: {args.mode} pruning over {over}: {found}; " +
          (f"{done} in version {version} ({len(memory)} vectors now)" if summary["changed"] else
           f"nothing changes, no new version (still version {version})"))
    return {"memory": args.memory, "version": version, **summary, "count": len(memory)}


def read_labelled_queries(memory, url: str):
    """The vectors and labels of the embeddings at ``url``, which must come from the memory's
    encoder and all carry a label."""
    import numpy as np

    from index.build import embedding_encoder
    from index.edits import check_embeddings_encoder
    from index.embeddings import embedding_matrix, read_embeddings
    table = read_embeddings(url)
    vectors = embedding_matrix(table)
    check_embeddings_encoder(memory.manifest, memory.url, embedding_encoder(url), vectors.shape[1], url)
    labels = np.array(table.column("label").to_pylist(), dtype=object)
    unlabelled = int(sum(label is None for label in labels))
    if not len(vectors) or unlabelled:
        raise ValueError(f"--queries {url} holds {len(vectors)} vectors, {unlabelled} of them without a label; "
                         "pruning counts wrong-class neighbours, so every query needs its label")
    return vectors, labels


def cmd_memory_versions(args) -> dict:
    from index.history import log
    from index.manifest import read_manifest
    current = read_manifest(args.memory).version          # no memory (or a newer format): one line, exit 2
    records = log(args.memory)
    for r in records:
        what = r["operation"] + (f" of version {r['target']}" if r.get("target") is not None else "")
        print(f"{'*' if r['version'] == current else ' '} {r['version']:4d}  {utc(r['time'])}  {what}")
    print(f"memory {args.memory}: {len(records)} versions, current {current}")
    return {"memory": args.memory, "current": current, "versions": records}


def utc(iso: str) -> str:
    from datetime import datetime, timezone
    return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def cmd_memory_log(args) -> dict:
    from index.history import log
    from index.manifest import read_manifest
    current = read_manifest(args.memory).version
    records = log(args.memory)
    print(f"{'version':>8s}  {'time (UTC)':19s}  {'operation':10s} {'counts':24s} {'user':12s} reason")
    for r in records:
        counts = counts_text(r["counts"]) + (f", restores {r['target']}" if r.get("target") is not None else "")
        print(f"{r['version']:8d}  {utc(r['time'])[:19]}  {r['operation']:10s} {counts:24s} {r['user'] or '-':12s} "
              f"{r['reason'] or ''}".rstrip())
    return {"memory": args.memory, "current": current, "log": records}


def cmd_memory_diff(args) -> dict:
    from index.history import diff
    from index.manifest import read_manifest
    read_manifest(args.memory)                            # no memory (or a newer format): one line, exit 2
    with Steps("memory diff", ["ids"]) as step:
        step(f"read the ids of versions {args.from_version} and {args.to_version}")
        changes = diff(args.memory, args.from_version, args.to_version)
    added, removed = changes["added"], changes["removed"]
    print(f"memory {args.memory}, version {args.from_version} → {args.to_version}: {len(added)} added"
          f"{f' (ids {first(added)})' if len(added) else ''}, {len(removed)} removed"
          f"{f' (ids {first(removed)})' if len(removed) else ''}")
    return {"memory": args.memory, "from": args.from_version, "to": args.to_version, "added": added.tolist(),
            "removed": removed.tolist()}


def cmd_memory_rollback(args) -> dict:
    with Steps("memory rollback", ["open", "rollback"]) as step:
        memory = open_memory(args.memory, step)
        step(f"restore version {args.to_version}")
        version = memory.rollback(args.to_version, reason=args.reason)
    print(f"memory {args.memory}: version {version} holds version {args.to_version}'s content "
          f"({len(memory)} vectors)")
    return {"memory": args.memory, "version": version, "restored": args.to_version, "count": len(memory)}


def cmd_memory_compact(args) -> dict:
    with Steps("memory compact", ["open", "compact"]) as step:
        memory = open_memory(args.memory, step)
        step("rewrite shards")
        version = memory.compact(reason=args.reason)
    counts = memory.manifest.counts
    print(f"memory {args.memory}: version {version} rewrites {counts.get('shards')} shards as one index each "
          f"(dropping {counts.get('dropped')} removed vectors, merging {counts.get('segments')} segments): its files "
          f"hold only its {len(memory)} vectors; older versions' files still hold removed ones until "
          f"`vismem memory vacuum`")
    return {"memory": args.memory, "version": version, "count": len(memory), "compacted": counts}


def cmd_memory_vacuum(args) -> dict:
    check_positive(args, "keep_last")
    if args.older_than_days is not None and args.older_than_days < 0:
        raise ValueError(f"--older-than-days must be zero or more, got {args.older_than_days}")
    options = {}                                     # only what was asked for: vacuum's defaults otherwise
    if args.keep_last is not None:
        options["keep_last"] = args.keep_last
    if args.older_than_days is not None:
        options["older_than_s"] = args.older_than_days * 86400
    with Steps("memory vacuum", ["open", "vacuum"]) as step:
        memory = open_memory(args.memory, step)
        step("find and delete unreferenced files" if not args.dry_run else "find unreferenced files")
        summary = memory.vacuum(**options, dry_run=args.dry_run)
    deleted, young = summary["deleted_versions"], summary["kept_recent"]
    print(f"memory {args.memory}: {'would delete' if args.dry_run else 'deleted'} {len(deleted)} versions"
          f"{f' ({first(deleted)})' if deleted else ''} and {len(summary['deleted_files'])} files, "
          f"{summary['freed_bytes'] / 1e6:.1f} MB{' to free' if args.dry_run else ' freed'}; "
          f"kept versions {first(summary['kept_versions'])}" +
          (f"; {len(young)} unreferenced files younger than 15 minutes kept (an edit may be in flight)"
           if young else ""))
    return {"memory": args.memory, **summary, "dry_run": args.dry_run}


def cmd_index_bench(args) -> dict:
    from index.bench import IndexBenchConfig, run
    check_positive(args, "vectors", "dim", "clusters", "shards", "held_out")
    cfg = IndexBenchConfig(vectors=args.vectors, dim=args.dim, clusters=args.clusters, spread=args.spread,
                           shards=args.shards, queries=args.held_out, factory=args.factory,
                           nprobes=tuple(parse_ints(args.nprobes, "--nprobes")),
                           also=tuple(f for f in (args.also or "").split(";") if f.strip()), workdir=args.workdir,
                           workers=args.workers)
    from cluster.runtime import init_ray
    return run(cfg, record_printer(args), start_ray=init_ray)


def record_printer(args):
    """Prints a benchmark's records as they come: one JSON object per line with --json (the
    command then prints no summary object after them), else ``key=value`` pairs."""
    as_json, args.json = args.json, False

    def emit(record: dict) -> None:
        print(json.dumps(record) if as_json else "  ".join(f"{k}={v}" for k, v in record.items()), flush=True)

    return emit


def cmd_memory_bench(args) -> dict:
    from index.memory_bench import MemoryBenchConfig, run
    check_positive(args, "dim", "shards", "repeats", "add", "http_removes")
    cfg = MemoryBenchConfig(sizes=tuple(parse_ints(args.sizes, "--sizes")), dim=args.dim, shards=args.shards,
                            repeats=args.repeats, add=args.add, http=not args.no_http, http_removes=args.http_removes,
                            workdir=args.workdir)
    if not cfg.http:
        return run(cfg, record_printer(args))
    from cluster.runtime import ray_session
    with ray_session(None, serve_too=True):
        return run(cfg, record_printer(args))


def cmd_serve(args) -> dict:
    import time

    from cluster.runtime import ray_session
    from index.serve import start
    from index.serve.auth import token_digest
    check_positive(args, "port", "replicas", "shard_timeout")
    digest = token_digest(args.token_file)
    with ray_session(args.address, serve_too=True):        # on the way out, Stopped included: Serve, then Ray
        stop_on_signals("Serve and Ray shut down")
        start(args.memory, host=args.host, port=args.port, replicas=args.replicas, shard_timeout_s=args.shard_timeout,
              token_digest=digest, mmap=args.mmap)
        print(f"serving {args.memory} on http://{args.host}:{args.port} (POST /v1/classify, /v1/search; GET /v1/info, "
              f"/docs; editing {'on: /v1/memory/add, /v1/memory/remove' if digest else 'off (no token)'}); "
              "Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)


def cmd_client(args) -> dict:
    import base64

    import fsspec

    from cluster.demo import post
    check_positive(args, "k", "nprobe")
    images = []
    for uri in args.images:
        with fsspec.open(uri, "rb") as f:
            images.append(base64.b64encode(f.read()).decode())
    body = {"images": images, "k": args.k}
    if args.command == "classify":
        body["rule"] = args.rule
    if args.nprobe is not None:
        body["nprobe"] = args.nprobe
    answer = post(f"{args.url.rstrip('/')}/v1/{args.command if args.command == 'classify' else 'search'}", body)
    for uri, result in zip(args.images, answer["results"]):
        head = f"{uri}: {result['decision']}" if "decision" in result else f"{uri}:"
        print(head + ("  (PARTIAL: shards %s missing)" % answer["missing_shards"] if answer["partial"] else ""))
        for n in result["neighbours"]:
            print(f"    {n['similarity']:.3f}  {n['label']!s:12s} {n['uri']}" + (f"  w={n['weight']:.3g}" if "weight" in n else ""))
    return answer


COMMANDS = {("demo", None): cmd_demo, ("procdata", "generate"): cmd_generate, ("procdata", "preview"): cmd_preview,
            ("procdata", "bench"): cmd_bench, ("procdata", "stats"): cmd_stats, ("encoder", "train"): cmd_train,
            ("encoder", "eval-knn"): cmd_eval_knn, ("encoder", "bench"): cmd_encoder_bench, ("embed", None): cmd_embed,
            ("index", "build"): cmd_build, ("index", "bench"): cmd_index_bench,
            ("index", "tune"): cmd_tune, ("memory", "info"): cmd_info,
            ("memory", "add"): cmd_memory_add, ("memory", "remove"): cmd_memory_remove,
            ("memory", "prune"): cmd_memory_prune, ("memory", "versions"): cmd_memory_versions,
            ("memory", "log"): cmd_memory_log, ("memory", "diff"): cmd_memory_diff,
            ("memory", "rollback"): cmd_memory_rollback, ("memory", "compact"): cmd_memory_compact,
            ("memory", "vacuum"): cmd_memory_vacuum, ("memory", "bench"): cmd_memory_bench, ("serve", None): cmd_serve,
            ("classify", None): cmd_client, ("query", None): cmd_client}

if __name__ == "__main__":
    sys.exit(main())
