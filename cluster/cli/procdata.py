"""``vismem procdata``: write, preview, benchmark and measure procedural data sets.

Imports inside the commands are on purpose: ``vismem --help`` and each command import no Ray, FAISS or
torch they do not use (see ``cluster.cli``).
"""

from __future__ import annotations

import json
import sys

from cluster.cli.common import (add_command, add_common, add_device, add_group, check_positive, parse_generators,
                                parse_ints)


def add_procdata_parsers(sub) -> None:
    from procdata.catalog import GENERATOR_NAMES as GENERATORS   # names only: no torch for --help
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
    stats.add_argument("--generators", default="kml_mixup,shader,dead_leaves,fractal,spectral,expression",
                       help="comma-separated generators")
    stats.add_argument("--reference", action="append", default=[], metavar="URL",
                       help="a real image collection (folder tree or Parquet, any URL) to measure beside them; repeatable")
    stats.add_argument("--images", type=int, default=768, help="images measured per generator or collection")
    stats.add_argument("--size", type=int, default=32, help="image side in pixels, as the training stream renders it")
    stats.add_argument("--natural", action="store_true",
                       help="also measure render_natural (supersampled x2, natural colour) for every generator")
    stats.add_argument("--seed", type=int, default=0, help="seed")
    add_common(stats, ray=False)


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
