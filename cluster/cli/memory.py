"""``vismem memory``: inspect, edit, version and benchmark a memory.

Imports inside the commands are on purpose: ``vismem --help`` and each command import no Ray, FAISS or
torch they do not use (see ``cluster.cli``).
"""

from __future__ import annotations

import argparse
import sys

from cluster.cli.common import add_command, add_common, add_group, add_k, check_positive, parse_ints, record_printer


def add_memory_parsers(sub) -> None:
    # long on purpose: one declarative argparse block per command, read top to bottom like its --help
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

    from index.bench.memory_bench import MemoryBenchConfig
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


def cmd_info(args) -> dict:
    from dataclasses import asdict

    from index.store.manifest import list_versions, read_manifest
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


def open_memory(url: str, steps: Steps):
    from index.memory import VisualMemory
    steps(f"open {url}")
    return VisualMemory.open(url)


def cmd_memory_add(args) -> dict:
    import numpy as np
    with Steps("memory add", ["open", "add"]) as step:
        memory = open_memory(args.memory, step)
        before = memory.labels()
        step(f"read, encode and write {args.embeddings}")
        version, ids = memory.add_embeddings(args.embeddings, reason=args.reason)
    new = sorted((memory.labels(ids) - before) - {None}, key=str)
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

    from index.ingest.embeddings import read_memory_embeddings
    table, vectors = read_memory_embeddings(memory.manifest, memory.url, url)
    labels = np.array(table.column("label").to_pylist(), dtype=object)
    unlabelled = int(sum(label is None for label in labels))
    if not len(vectors) or unlabelled:
        raise ValueError(f"--queries {url} holds {len(vectors)} vectors, {unlabelled} of them without a label; "
                         "pruning counts wrong-class neighbours, so every query needs its label")
    return vectors, labels


def cmd_memory_versions(args) -> dict:
    from index.store.history import log
    from index.store.manifest import read_manifest
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
    from index.store.history import log
    from index.store.manifest import read_manifest
    current = read_manifest(args.memory).version
    records = log(args.memory)
    print(f"{'version':>8s}  {'time (UTC)':19s}  {'operation':10s} {'counts':24s} {'user':12s} reason")
    for r in records:
        counts = counts_text(r["counts"]) + (f", restores {r['target']}" if r.get("target") is not None else "")
        print(f"{r['version']:8d}  {utc(r['time'])[:19]}  {r['operation']:10s} {counts:24s} {r['user'] or '-':12s} "
              f"{r['reason'] or ''}".rstrip())
    return {"memory": args.memory, "current": current, "log": records}


def cmd_memory_diff(args) -> dict:
    from index.store.history import diff
    from index.store.manifest import read_manifest
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


def cmd_memory_bench(args) -> dict:
    from index.bench.memory_bench import MemoryBenchConfig, run
    check_positive(args, "dim", "shards", "repeats", "add", "http_removes")
    cfg = MemoryBenchConfig(sizes=tuple(parse_ints(args.sizes, "--sizes")), dim=args.dim, shards=args.shards,
                            repeats=args.repeats, add=args.add, http=not args.no_http, http_removes=args.http_removes,
                            workdir=args.workdir)
    if not cfg.http:
        return run(cfg, record_printer(args))
    from cluster.runtime import ray_session
    with ray_session(None, serve_too=True):
        return run(cfg, record_printer(args))
