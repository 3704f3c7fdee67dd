"""``vismem eval``: the source papers' evaluations, one module of ``eval/`` each (of a memory:
``eval.voting``, ``eval.pruning``, ``eval.unlearning``; of an encoder: ``eval.similarity``,
``eval.segmentation``), each writing OUT/NAME.json and PNG plots.

Imports inside the commands are on purpose: ``vismem --help`` and each command import no Ray, FAISS or
torch they do not use (see ``cluster.cli``).
"""

from __future__ import annotations

import argparse
import json

from cluster.cli.common import add_command, add_common, add_group, add_k, check_positive, parse_ints, record_printer
from eval.sweeps import ALPHAS, KINDS, KS, PRUNE_KS, TEMPERATURES, THRESHOLDS
from index.voting import RULES

QUERIES_HELP = ("labelled queries: an embeddings folder as `vismem embed` writes it, from the memory's encoder "
                "(default: a held-out split of the memory, see --holdout)")
HOLDOUT_HELP = ("without --queries: this seeded random fraction of the memory's items are the queries, and the "
                "memory answering them is the rest (default 0.1)")


def add_eval_parsers(sub) -> None:
    group = add_group(sub, "eval", "the papers' evaluations: of a memory (voting rules, pruning, unlearning, "
                                   "influence) and of an encoder (2AFC similarity, segmentation)")
    add_voting_parser(group)
    add_pruning_parser(group)
    add_unlearning_parser(group)
    add_similarity_parser(group)
    add_segmentation_parser(group)
    add_influence_parser(group)


def add_memory_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", required=True, help="the memory's URL (any stored memory; it is never changed)")
    p.add_argument("--out", required=True, help="folder URL for the report: NAME.json and PNG plots")
    p.add_argument("--queries", default=None, metavar="URL", help=QUERIES_HELP)
    p.add_argument("--holdout", type=float, default=None, metavar="FRACTION", help=HOLDOUT_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of random choices")
    p.add_argument("--nprobe", type=int, default=None, metavar="N",
                   help="IVF lists each search visits (default: the memory's; a Flat memory ignores it)")
    add_common(p, ray=False)


def add_voting_parser(group) -> None:
    p = add_command(group, "voting", "accuracy against k, softmax temperature T and rank α for every voting rule",
                    description="One search of the memory at the largest k, then index.voting's vote on the first "
                                "k neighbours for each point: every rule against k (softmax at --temperature, rank "
                                "at --alpha), softmax against T and rank against α at -k. Writes OUT/voting.json, "
                                "voting_k.png, voting_temperature.png and voting_alpha.png.",
                    epilog="examples:\n"
                           "  vismem eval voting --memory s3://bucket/mem --queries s3://bucket/test-emb --out runs/v\n"
                           "  vismem eval voting --memory mem/ --holdout 0.2 --ks 1,5,10,50 --out runs/v --json\n")
    add_memory_options(p)
    p.add_argument("--ks", default=",".join(map(str, KS)), help="comma-separated ks of the k sweep")
    p.add_argument("--temperatures", default=",".join(map(str, TEMPERATURES)), help="softmax temperatures to sweep")
    p.add_argument("--alphas", default=",".join(map(str, ALPHAS)), help="rank α values to sweep")
    p.add_argument("-k", "--k", type=int, default=10, help="neighbours voting in the T and α sweeps")
    p.add_argument("--temperature", type=float, default=0.07, help="softmax T of the k sweep")
    p.add_argument("--alpha", type=float, default=2.0, help="rank α of the k sweep")
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated voting rules of the k sweep")


def add_pruning_parser(group) -> None:
    p = add_command(group, "pruning", "accuracy against the hard-pruning threshold and the soft-pruning k",
                    description="Each point runs `vismem memory prune`'s pruning on the memory held in process "
                                "(nothing is written): hard pruning at each --thresholds value (items that are "
                                "wrong-label neighbours that many times or more are removed, counted over "
                                "--prune-k neighbours), soft pruning at each --prune-ks value (0: unpruned). "
                                "Pruning queries: the memory leave-one-out, or --prune-queries; never the "
                                "evaluation queries. Writes OUT/pruning.json, pruning_hard.png, pruning_soft.png.",
                    epilog="examples:\n"
                           "  vismem eval pruning --memory s3://bucket/mem --queries s3://bucket/test-emb --out runs/p\n"
                           "  vismem eval pruning --memory mem/ --modes hard --thresholds 1,2,5 --out runs/p --json\n")
    add_memory_options(p)
    add_k(p, 10)
    p.add_argument("--rule", default="softmax", choices=RULES, help="voting rule of the evaluation queries")
    p.add_argument("--modes", default="hard,soft", help="comma-separated pruning modes: hard, soft")
    p.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)), help="hard-pruning thresholds to sweep")
    p.add_argument("--prune-k", type=int, default=10, help="neighbours counted by hard pruning")
    p.add_argument("--prune-ks", default=",".join(map(str, PRUNE_KS)), help="soft-pruning ks to sweep (0: unpruned)")
    p.add_argument("--prune-queries", default=None, metavar="URL",
                   help="labelled embeddings that pruning counts over (default: the memory itself, leave-one-out)")


def add_unlearning_parser(group) -> None:
    p = add_command(group, "unlearning", "remove a class or a random fraction; check the memory answers exactly as "
                                         "one rebuilt without them; accuracy before and after",
                    description="Removes (as `vismem memory remove`, then compacts as `purge` does, both in process: "
                                "the memory is never changed) a class (--forget class:LABEL) or a seeded random "
                                "fraction (--forget random:0.01); builds a memory of the kept items over the "
                                "memory's trained index; checks that for every query both give the same ids, labels "
                                "and similarities and no removed item; reports accuracy before and after on the "
                                "forgotten class (random: the queries a removed item was a neighbour of) and the "
                                "rest. (Removing the most influential items, listed by `vismem eval influence`, is "
                                "not wired here yet.) Writes OUT/unlearning.json and unlearning.png; when the answers differ it says so and exits with status 2.",
                    epilog="examples:\n"
                           "  vismem eval unlearning --memory s3://bucket/mem --queries s3://bucket/test-emb "
                           "--forget class:cat --out runs/u\n"
                           "  vismem eval unlearning --memory mem/ --forget random:0.01 --out runs/u --json\n")
    add_memory_options(p)
    p.add_argument("--forget", default="random:0.01", metavar="class:LABEL|random:FRACTION",
                   help="what to remove: every item of a class, or a random fraction of the items")
    add_k(p, 10)
    p.add_argument("--rule", default="softmax", choices=RULES, help="voting rule of the accuracies")
    p.add_argument("--work", default=None, metavar="URL",
                   help="where the rebuilt memory is written (default: a temporary folder, deleted after)")
    p.add_argument("--embeddings", default=None, metavar="URL",
                   help="the embeddings the memory was built from: the rebuild reads the kept items' vectors there "
                        "(default: the memory's stored vectors, exact for a Flat memory; an IVF or quantised one "
                        "needs its embeddings, since decoded codes can fall into other lists when encoded again)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest similarity difference taken as equal")


ENCODER_HELP = ("an encoder to evaluate, as `vismem encoder eval-knn --encoder` takes it: a checkpoint URL, "
                "random-init:PRESET[:SEED] or raw-pixels:SIZE; comma-separated to compare several in one run, as "
                "vismem embed --bench takes them")


def add_influence_parser(group) -> None:
    p = add_command(group, "influence", "identifiable memory items: those whose removal flips some query's decision",
                    description="An item is identifiable when removing it (so the (k+1)-th neighbour enters) "
                                "changes some query's decision. Exact from one search at k+1: for each query and "
                                "each of its k neighbours, the vote without that neighbour. Also the count "
                                "against k for --ks from the same search. JSON keys: identifiable (a count), "
                                "identifiable_fraction (of the memory's items); OUT/influence.json lists every "
                                "identifiable id with its URI and how many queries it flips. Writes "
                                "OUT/influence.json and influence.png.",
                    epilog="examples:\n"
                           "  vismem eval influence --memory s3://bucket/mem --queries s3://bucket/test-emb --out runs/i\n"
                           "  vismem eval influence --memory mem/ --holdout 0.1 -k 20 --out runs/i --json\n")
    add_memory_options(p)
    add_k(p, 20)
    p.add_argument("--rule", default="softmax", choices=RULES, help="voting rule of the decisions")
    p.add_argument("--temperature", type=float, default=0.07, help="softmax T")
    p.add_argument("--alpha", type=float, default=2.0, help="rank α")
    p.add_argument("--ks", default="1,5,10,20,50", help="comma-separated ks of the plotted sweep")


def add_similarity_parser(group) -> None:
    p = add_command(group, "similarity", "2AFC agreement with human similarity judgements (NIGHTS, or synthetic)",
                    description="For each triplet (reference, distortion A, distortion B, the share of judges who "
                                "found B closer) every method picks the distortion more similar to the reference: "
                                "an encoder by the cosine of embeddings, psnr and ssim by the pixels. Agreement is "
                                "DreamSim's 2AFC score (the judges' share for the pick, 1/2 on a tie). Triplets: "
                                "--nights ROOT (data.csv with ref/ and distort/, as NIGHTS unpacks; DreamSim's "
                                "filter: --split test, --min-votes 6), or --synthetic-from URL: any collection of "
                                "same-size images, each distorted twice by one kind at two strengths, where the "
                                "weaker is the right answer, or (kind 'class', from the labels) shown beside "
                                "another image of its class and one of another class, where the same class is the "
                                "right answer: the semantic part that ranks encoders. JSON key: agreement ({method: fraction}). Writes "
                                "OUT/similarity.json and similarity.png.",
                    epilog="examples:\n"
                           "  vismem eval similarity --synthetic-from cifar10/test.parquet --limit 2000 --encoder "
                           "raw-pixels:32 --encoder random-init:tiny-cpu --out runs/s\n"
                           "  vismem eval similarity --nights s3://bucket/nights --encoder runs/a/encoder --out runs/s "
                           "--json\n")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--nights", metavar="URL", help="a NIGHTS root: data.csv, ref/, distort/")
    source.add_argument("--synthetic-from", metavar="URL",
                        help="a collection (folder tree or Parquet) of same-size images to make triplets from")
    p.add_argument("--out", required=True, help="folder URL for the report: similarity.json and similarity.png")
    p.add_argument("--encoder", default="raw-pixels:32", help=ENCODER_HELP + " (default: raw-pixels:32)")
    p.add_argument("--baselines", default="psnr,ssim", help="comma-separated pixel baselines: psnr, ssim ('' none)")
    p.add_argument("--kinds", default=",".join(KINDS), help="synthetic distortions, comma-separated")
    p.add_argument("--limit", type=int, default=None,
                   help="synthetic: images used, a seeded random subset (default 1000); NIGHTS: the first N "
                        "triplets (default: all); 0: all")
    p.add_argument("--size", type=int, default=64, help="NIGHTS: images are resized to SIZE px on reading")
    p.add_argument("--split", default="test", help="NIGHTS: the split column's value to keep ('' keeps all)")
    p.add_argument("--min-votes", type=int, default=6, help="NIGHTS: keep triplets with this many votes or more")
    p.add_argument("--batch-size", type=int, default=256, help="triplets per batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and the distortions")
    p.add_argument("--device", default=None, help="where encoders run, e.g. cuda or cpu (default: the GPU if any)")
    add_common(p, ray=False)


def add_segmentation_parser(group) -> None:
    p = add_command(group, "segmentation", "zero-shot segmentation from patch tokens: per-image PCA R² and "
                                           "patch-kNN label transfer (mIoU, pixel and foreground accuracy)",
                    description="Reads annotated images, (image, mask PNG) pairs: a folder ROOT/images/NAME.* with "
                                "ROOT/masks/NAME.png, or Parquet with image and mask columns, on any fsspec URL; "
                                "a mask pixel is its class index (0 background, 255 ignore), the class names are "
                                "in --classes or classes.txt beside the images. For each --encoder: R² of the "
                                "held-out images' patch tokens on their own first --components principal "
                                "components explained by the mask's segments (background dropped), and each "
                                "held-out patch labelled by the softmax vote of its -k most similar --memory "
                                "patches, scored at the encoder's input resolution. JSON keys: r2, miou, "
                                "pixel_accuracy, foreground_accuracy ({encoder: value}). Writes "
                                "OUT/segmentation.json, segmentation.png and segmentation_examples.png.",
                    epilog="examples:\n"
                           "  vismem eval segmentation --memory s3://bucket/seg/train --queries s3://bucket/seg/val "
                           "--encoder runs/a/encoder,random-init:tiny-cpu --out runs/seg\n"
                           "  vismem eval segmentation --memory scenes/mem --queries scenes/q --encoder "
                           "raw-pixels:32 --out runs/seg --json\n")
    p.add_argument("--memory", required=True, help="annotated images the patch labels are transferred from")
    p.add_argument("--queries", required=True, help="held-out annotated images: R² and the transfer are scored here")
    p.add_argument("--out", required=True, help="folder URL for the report: segmentation.json and PNG plots")
    p.add_argument("--encoder", default="raw-pixels:32", help=ENCODER_HELP + " (default: raw-pixels:32)")
    p.add_argument("--classes", default=None, metavar="URL",
                   help="class names, one a line, line i naming class i (default: classes.txt beside the images)")
    add_k(p, 10)
    p.add_argument("--temperature", type=float, default=0.07, help="softmax T of the patch vote")
    p.add_argument("--components", type=int, default=3, help="per-image PCA components of R² (0: the raw tokens)")
    p.add_argument("--memory-limit", type=int, default=0, help="use the first N memory images (0: all)")
    p.add_argument("--query-limit", type=int, default=0, help="use the first N held-out images (0: all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    p.add_argument("--device", default=None, help="where encoders run, e.g. cuda or cpu (default: the GPU if any)")
    add_common(p, ray=False)


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{option} needs positive numbers, got {text!r}")
    return values


def names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def memory_fields(args) -> dict:
    check_positive(args, "k", "nprobe")
    return dict(memory=args.memory, out=args.out, queries=args.queries, holdout=args.holdout, seed=args.seed,
                nprobe=args.nprobe)


def finish(args, as_json: bool, summary: dict, lines: list[str]) -> dict:
    """Print the summary lines; with --json the summary is the last line (main prints it)."""
    for line in lines + [f"wrote {summary['report']} and {', '.join(summary['plots'].values())}"]:
        print(line)
    args.json = as_json
    return summary


def cmd_eval_voting(args) -> dict:
    from eval.voting import VotingConfig, run
    cfg = VotingConfig(**memory_fields(args), ks=tuple(parse_ints(args.ks, "--ks")),
                       temperatures=parse_floats(args.temperatures, "--temperatures"),
                       alphas=parse_floats(args.alphas, "--alphas"), k=args.k, temperature=args.temperature,
                       alpha=args.alpha, rules=names(args.rules))
    as_json = args.json
    summary = run(cfg, record_printer(args))
    lines = [f"{rule:10s} best top-1 {100 * r['accuracy']:5.1f}% at k={r['best_k']}"
             for rule, r in summary["by_rule"].items()]
    for sweep, key in (("temperature_sweep", "temperature"), ("alpha_sweep", "alpha")):
        if summary[sweep]:
            best = max(summary[sweep], key=lambda p: p["accuracy"])
            lines.append(f"{key} sweep at k={cfg.k}: best {100 * best['accuracy']:.1f}% at {key}={best[key]}")
    lines.append(f"memory {args.memory}: {summary['memory_items']} items, {summary['query_count']} queries "
                 f"({summary['queries']})")
    return finish(args, as_json, summary, lines)


def cmd_eval_pruning(args) -> dict:
    from eval.pruning import PruningConfig, run
    check_positive(args, "prune_k")
    try:
        prune_ks = tuple(int(v) for v in names(args.prune_ks))
    except ValueError:
        raise ValueError(f"--prune-ks takes comma-separated whole numbers, got {args.prune_ks!r}") from None
    cfg = PruningConfig(**memory_fields(args), k=args.k, rule=args.rule, modes=names(args.modes),
                        thresholds=tuple(parse_ints(args.thresholds, "--thresholds")), prune_k=args.prune_k,
                        prune_ks=prune_ks, prune_queries=args.prune_queries)
    as_json = args.json
    summary = run(cfg, record_printer(args))
    lines = [f"unpruned: top-1 {100 * summary['unpruned']:.1f}% ({summary['memory_items']} items, "
             f"{summary['query_count']} queries, k={cfg.k}, {cfg.rule})"]
    for mode, best in summary["best"].items():
        where = f"threshold {best['threshold']}" if mode == "hard" else f"prune k {best['prune_k']}"
        lines.append(f"{mode} pruning: best top-1 {100 * best['accuracy']:.1f}% at {where} "
                     f"({best['change_points']:+.2f} points, {best['changed']} items "
                     f"{'removed' if mode == 'hard' else 'reweighted'})")
    return finish(args, as_json, summary, lines)


def cmd_eval_unlearning(args) -> dict:
    from eval.unlearning import UnlearningConfig, run
    if args.tolerance < 0:
        raise ValueError(f"--tolerance must be zero or more, got {args.tolerance}")
    cfg = UnlearningConfig(**memory_fields(args), forget=args.forget, k=args.k, rule=args.rule, work=args.work,
                           embeddings=args.embeddings, tolerance=args.tolerance)
    as_json = args.json
    summary = run(cfg, record_printer(args))
    lines = [f"removed {summary['removed']} of {summary['items_before']} items ({cfg.forget}); answers equal a "
             f"rebuild without them: {'yes' if summary['exact'] else 'NO'} "
             + ", ".join(f"({name}: {c['queries_differing']} of {summary['query_count']} queries differ)"
                         for name, c in summary["checks"].items())]
    lines += [f"{group:16s} top-1 {fmt(s['before'])} -> {fmt(s['after'])} ({s['queries']} queries)"
              for group, s in summary["accuracy"].items()]
    summary = {key: value for key, value in summary.items() if key != "removed_ids"}     # in the JSON file
    finish(args, as_json, summary, lines)
    if not summary["exact"]:
        if as_json:
            print(json.dumps(summary, default=str))
        hint = "" if args.embeddings or "Flat" in summary.get("factory", "") else \
            " (a quantised memory: give --embeddings, the vectors it was built from)"
        raise ValueError(f"the edited memory does not answer as the rebuilt one (see the checks above){hint}")
    return summary


def fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{100 * value:5.1f}%"


def cmd_eval_similarity(args) -> dict:
    from eval.similarity import SimilarityConfig, run
    check_positive(args, "size", "batch_size")
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be 0 (all) or more, got {args.limit}")
    limit = (1000 if args.synthetic_from else None) if args.limit is None else args.limit or None
    cfg = SimilarityConfig(out=args.out, nights=args.nights, synthetic=args.synthetic_from,
                           encoders=tuple(names(args.encoder)), baselines=names(args.baselines),
                           kinds=names(args.kinds), limit=limit, size=args.size,
                           split=args.split or None, min_votes=args.min_votes, batch_size=args.batch_size,
                           seed=args.seed, device=args.device)
    as_json = args.json
    summary = run(cfg, record_printer(args))
    lines = [f"{method:28s} agreement {100 * value:5.1f}%" for method, value in summary["agreement"].items()]
    lines.append(f"{summary['triplet_count']} triplets ({summary['triplets']}); the judges' own ceiling "
                 f"{100 * summary['human_ceiling']:.1f}%")
    return finish(args, as_json, summary, lines)


def cmd_eval_segmentation(args) -> dict:
    from eval.segmentation import SegmentationConfig, run
    check_positive(args, "k", "batch_size", "temperature")
    if min(args.components, args.memory_limit, args.query_limit) < 0:
        raise ValueError("--components, --memory-limit and --query-limit must be 0 or more")
    cfg = SegmentationConfig(memory=args.memory, queries=args.queries, out=args.out,
                             encoders=tuple(names(args.encoder)), classes=args.classes, k=args.k,
                             temperature=args.temperature, components=args.components,
                             memory_limit=args.memory_limit or None, query_limit=args.query_limit or None,
                             batch_size=args.batch_size, device=args.device)
    as_json = args.json
    summary = run(cfg, record_printer(args))
    lines = [f"{spec:28s} R² {fmt_plain(r['r2'])}  mIoU {fmt_plain(r['miou'])}  pixel acc. "
             f"{fmt_plain(r['pixel_accuracy'])}  foreground acc. {fmt_plain(r['foreground_accuracy'])}"
             for spec, r in summary["encoders"].items()]
    lines.append(f"{summary['memory_images']} memory images, {summary['query_images']} held-out, classes: "
                 f"{', '.join(summary['classes'])}")
    return finish(args, as_json, summary, lines)


def fmt_plain(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def cmd_eval_influence(args) -> dict:
    from eval.influence import InfluenceConfig, run
    check_positive(args, "temperature", "alpha")
    cfg = InfluenceConfig(**memory_fields(args), k=args.k, rule=args.rule, temperature=args.temperature,
                          alpha=args.alpha, ks=tuple(parse_ints(args.ks, "--ks")))
    as_json = args.json
    summary = run(cfg, record_printer(args))
    lines = [f"k={p['k']:<4d} identifiable {p['identifiable']:7d} ({100 * p['identifiable_fraction']:.3f}% of the "
             f"memory), {p['queries_flippable']} queries flippable, top-1 {fmt(p['accuracy'])}" for p in summary["sweep"]]
    lines.append(f"at k={summary['k']} ({summary['rule']}): {summary['identifiable']} of {summary['memory_items']} "
                 f"items identifiable ({100 * summary['identifiable_fraction']:.3f}%), over {summary['query_count']} "
                 f"queries ({summary['queries']})")
    summary = {key: value for key, value in summary.items() if key != "identifiable_items"}     # in the JSON file
    return finish(args, as_json, summary, lines)


EVAL_COMMANDS = {("eval", "voting"): cmd_eval_voting, ("eval", "pruning"): cmd_eval_pruning,
                 ("eval", "unlearning"): cmd_eval_unlearning, ("eval", "similarity"): cmd_eval_similarity,
                 ("eval", "segmentation"): cmd_eval_segmentation, ("eval", "influence"): cmd_eval_influence}
