"""``vismem``: the command line, thin over the Python API. One module per command group
(``demo``, ``procdata``, ``encoder``, ``eval``, ``embed``, ``index``, ``memory``, ``serve``), each
with its parsers beside its commands; ``common`` holds what they share; this module is the table of them.

Every command prints progress as it goes; with ``--json`` its last line is one JSON object.
Errors print one line naming what was wrong and exit non-zero. Nothing here imports Ray, FAISS or
torch at import time: each command imports what it uses, so ``vismem --help`` is quick and the
encoder commands run on machines without Ray or FAISS.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from cluster.cli.common import Stopped, one_line
from cluster.cli.demo import add_demo_parser, cmd_demo
from cluster.cli.embed import add_embed_parser, cmd_embed
from cluster.cli.encoder import add_encoder_parsers, cmd_compare, cmd_encoder_bench, cmd_eval_knn, cmd_train
from cluster.cli.eval import EVAL_COMMANDS, add_eval_parsers
from cluster.cli.index import add_index_parsers, cmd_build, cmd_index_bench, cmd_tune
from cluster.cli.memory import (add_memory_parsers, cmd_info, cmd_memory_add, cmd_memory_bench, cmd_memory_compact,
                                cmd_memory_diff, cmd_memory_log, cmd_memory_prune, cmd_memory_remove,
                                cmd_memory_rollback, cmd_memory_vacuum, cmd_memory_versions)
from cluster.cli.procdata import add_procdata_parsers, cmd_bench, cmd_generate, cmd_preview, cmd_stats
from cluster.cli.serve import (add_client_parsers, add_serve_parser, cmd_client, cmd_serve, cmd_serve_bench,
                               cmd_serve_faults)

__all__ = ["main", "parser"]

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


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vismem", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_demo_parser(sub)
    add_procdata_parsers(sub)
    add_encoder_parsers(sub)
    add_eval_parsers(sub)
    add_embed_parser(sub)
    add_index_parsers(sub)
    add_memory_parsers(sub)
    add_serve_parser(sub)
    add_client_parsers(sub)
    return top


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


COMMANDS = {("demo", None): cmd_demo, ("procdata", "generate"): cmd_generate, ("procdata", "preview"): cmd_preview,
            ("procdata", "bench"): cmd_bench, ("procdata", "stats"): cmd_stats, ("encoder", "train"): cmd_train,
            ("encoder", "eval-knn"): cmd_eval_knn, ("encoder", "bench"): cmd_encoder_bench,
            ("encoder", "compare"): cmd_compare, **EVAL_COMMANDS,
            ("embed", None): cmd_embed,
            ("index", "build"): cmd_build, ("index", "bench"): cmd_index_bench,
            ("index", "tune"): cmd_tune, ("memory", "info"): cmd_info,
            ("memory", "add"): cmd_memory_add, ("memory", "remove"): cmd_memory_remove,
            ("memory", "prune"): cmd_memory_prune, ("memory", "versions"): cmd_memory_versions,
            ("memory", "log"): cmd_memory_log, ("memory", "diff"): cmd_memory_diff,
            ("memory", "rollback"): cmd_memory_rollback, ("memory", "compact"): cmd_memory_compact,
            ("memory", "vacuum"): cmd_memory_vacuum, ("memory", "bench"): cmd_memory_bench, ("serve", None): cmd_serve,
            ("serve", "bench"): cmd_serve_bench, ("serve", "faults"): cmd_serve_faults,
            ("classify", None): cmd_client, ("query", None): cmd_client}
