"""``vismem serve`` and the HTTP client commands (``vismem classify``, ``vismem query``).

Imports inside the commands are on purpose: ``vismem --help`` and each command import no Ray, FAISS or
torch they do not use (see ``cluster.cli``).
"""

from __future__ import annotations

import argparse

from cluster.cli.common import add_command, add_common, add_k, add_nprobe, check_positive, stop_on_signals


def add_serve_parser(sub) -> None:
    serve = add_command(sub, "serve", "serve a memory over HTTP with Ray Serve (until Ctrl-C or SIGTERM)",
                        description="Deploy the memory's shard searchers and the router with Ray Serve and answer "
                                    "HTTP until stopped. Ctrl-C (SIGINT) or SIGTERM shuts Serve and Ray down and "
                                    "exits with status 130 or 0 respectively.")
    serve.add_argument("--memory", default=None, help="memory root URL (required)")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port")
    serve.add_argument("--replicas", type=int, default=1, help="replicas per shard searcher")
    serve.add_argument("--shard-timeout", type=float, default=10.0, help="seconds before a shard counts as failed")
    serve.add_argument("--mmap", action="store_true",
                       help="memory-map the shards' IVF lists from the memory's local disk instead of loading them: "
                            "a shard larger than RAM can answer, paged in as queries visit its lists (a memory on "
                            "a local disk only; the shard replicas must run on that machine)")
    serve.add_argument("--colocate", action="store_true",
                       help="hold every shard in the Router's own process: no hop between the Router and the "
                            "shards, the lowest latency for a memory that fits one node's RAM; no shard replicas "
                            "(--replicas) and no partial answers: the Router answers from all shards or fails")
    serve.add_argument("--ingress", choices=("proxy", "direct"), default="proxy",
                       help="proxy (default): Serve's HTTP proxy takes each request and hands it to the Router; "
                            "direct: the Router's replica answers HTTP on --port itself, one hop fewer (README "
                            "\"Serving\" has the figures), through Ray 2.60's experimental direct ingress: for the "
                            "local Ray vismem starts, not with --address or --config-out")
    serve.add_argument("--token-file", default=None, metavar="PATH",
                       help="file holding the bearer token that /v1/memory/add and /v1/memory/remove need "
                            "(default: $VISMEM_TOKEN; with neither, editing over HTTP is off)")
    serve.add_argument("--config-out", default=None, metavar="PATH",
                       help="write a Ray Serve config for this memory and these options to PATH (for `serve run "
                            "PATH`, `serve deploy PATH` or a RayService's serveConfigV2) and exit without serving; "
                            "the token is named, never written: --token-file's path, else $VISMEM_TOKEN, read "
                            "where the app is built")
    serve.add_argument("--autoscale", default=None, metavar="MIN:MAX", type=replica_range,
                       help="with --config-out: Serve autoscales each shard's searchers between MIN and MAX "
                            "replicas (starting at --replicas, clamped), by the requests in flight per replica "
                            "(default: the fixed --replicas)")
    add_common(serve)
    actions = serve.add_subparsers(dest="action", metavar="ACTION", required=False)
    add_serve_bench_parser(actions)
    add_serve_faults_parser(actions)


def replica_range(text: str) -> tuple[int, int]:
    """``MIN:MAX`` replicas, 0 ≤ MIN ≤ MAX, MAX ≥ 1 (argparse prints the error with the option)."""
    low, sep, high = text.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX, e.g. 1:4")
    low, high = int(low), int(high)
    if low > high or high < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def add_serve_bench_parser(actions) -> None:
    from index.bench.serve_bench import ServeBenchConfig
    d = ServeBenchConfig()
    bench = add_command(actions, "bench", "latency and throughput of a served memory, beside in-process and FAISS",
                        description="Single queries (p50/p99), concurrent clients (queries/s) and batches "
                                    "(vectors/s) over HTTP and, for an app it starts, through a Serve handle; the "
                                    "same queries against the memory opened in this process and bare FAISS, in the "
                                    "same run. Give the URL of a running app (its memory must be readable from "
                                    "here), a memory to serve, or a synthetic size to build and serve.",
                        epilog="examples:\n"
                               "  vismem serve bench --url http://127.0.0.1:8000 --json\n"
                               "  vismem serve bench --memory ./mem\n"
                               "  vismem serve bench --synthetic 1000000 --workdir /tmp/sb   # 1M, d=384, 4 shards")
    where = bench.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running app")
    where.add_argument("--memory", dest="bench_memory", help="serve this memory in this process and measure it")
    where.add_argument("--synthetic", type=int, metavar="N",
                       help="build a clustered synthetic memory of N vectors (default build), serve and measure it")
    bench.add_argument("--dim", type=int, default=d.dim, help="dimension of the synthetic memory")
    bench.add_argument("--shards", type=int, default=d.shards, help="shards of the synthetic memory")
    bench.add_argument("--singles", type=int, default=d.singles, help="single queries per path, one after another")
    bench.add_argument("--clients", type=int, default=d.clients, help="concurrent clients")
    bench.add_argument("--seconds", type=float, default=d.seconds, help="length of each concurrent run")
    bench.add_argument("--batch", type=int, default=d.batch, help="vectors per batched request")
    bench.add_argument("--batches", type=int, default=d.batches, help="batched requests per path")
    add_k(bench, d.k)
    bench.add_argument("--workdir", default=None,
                       help="where the synthetic memory is built (default: a temporary folder)")
    bench.add_argument("--layout", choices=(*d.layouts, "both"), default="both",
                       help="for an app started here: the shards as ShardSearcher deployments, colocated in the "
                            "Router's process (vismem serve --colocate), or both side by side in the same run")
    bench.add_argument("--ingress", choices=("proxy", "direct"), default=d.ingress,
                       help="for an app started here: HTTP through Serve's proxy, or answered by the Router replica "
                            "itself (vismem serve --ingress direct; a local Ray only)")
    add_common(bench)


def add_serve_faults_parser(actions) -> None:
    from index.bench.serve_faults import FaultLoadConfig
    d = FaultLoadConfig(memory="")
    faults = add_command(actions, "faults", "a fixed-rate query load while shard replicas are killed",
                         description="Serve a memory, send single queries over HTTP at a fixed rate, kill a shard "
                                     "replica part-way (ray.kill, as a lost node would) and judge every answer "
                                     "against the memory opened here: a complete answer must be its top-k, a "
                                     "partial one exactly the live shards' top-k. Prints the statuses, the 5xx, the "
                                     "partial and wrong answers, and the time to recover.",
                         epilog="examples:\n"
                                "  vismem serve faults --memory ./mem --seconds 60 --kill-at 10\n"
                                "  vismem serve faults --memory ./mem --replicas 2 --shard-cpus 0.1  # none partial\n"
                                "  vismem serve faults --memory ./mem --kill all  # 503s, then whole again")
    faults.add_argument("--memory", dest="fault_memory", required=True, metavar="URL", help="memory root URL to serve")
    faults.add_argument("--replicas", type=int, default=d.replicas, help="replicas per shard")
    faults.add_argument("--rate", type=float, default=d.rate, help="queries per second (open loop)")
    faults.add_argument("--seconds", type=float, default=d.seconds, help="length of the load")
    faults.add_argument("--kill-at", type=float, default=d.kill_at_s, help="seconds into the load to kill")
    faults.add_argument("--kill", choices=("one", "all"), default=d.kill,
                        help="a replica of --shard, or one replica of every shard")
    faults.add_argument("--shard", type=int, default=d.shard, help="the shard whose replica is killed")
    faults.add_argument("--clients", type=int, default=d.clients, help="threads sending the load")
    faults.add_argument("--shard-timeout", type=float, default=d.shard_timeout_s,
                        help="seconds before a shard counts as failed")
    faults.add_argument("--shard-cpus", type=float, default=d.shard_cpus, help="Ray CPUs reserved per shard replica")
    add_k(faults, d.k)
    add_common(faults)


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
            q.add_argument("--counterfactual", type=int, default=None, metavar="N",
                           help="also explain each decision: the fewest memory items (at most N) whose removal "
                                "would change it, and the neighbours that would enter in their place")
        add_nprobe(q, "IVF lists to visit in each shard (default: the memory's, set by `vismem index build`)")
        add_common(q, ray=False)


def cmd_serve(args) -> dict:
    import time

    from cluster.runtime import ray_session
    from index.serve import start
    from index.serve.auth import token_digest
    check_positive(args, "port", "replicas", "shard_timeout")
    if args.memory is None:
        raise ValueError("--memory is required: the URL of the memory to serve (or `vismem serve bench ...`)")
    if args.ingress == "direct" and args.config_out:
        raise_direct_ingress_refused()
    if args.config_out:
        return write_config(args)
    if args.autoscale:
        raise ValueError("--autoscale goes with --config-out (Serve autoscaling from a config file); "
                         "`vismem serve` itself serves --replicas fixed replicas")
    digest = token_digest(args.token_file)
    if args.ingress == "direct":
        set_direct_ingress(args.address, args.port)
    with ray_session(args.address, serve_too=True):        # on the way out, Stopped included: Serve, then Ray
        stop_on_signals("Serve and Ray shut down")
        start(args.memory, host=args.host, port=args.port, replicas=args.replicas, shard_timeout_s=args.shard_timeout,
              token_digest=digest, mmap=args.mmap, colocate=args.colocate, ingress=args.ingress)
        print(f"serving {args.memory}: the page at http://{args.host}:{args.port}/ (API: POST /v1/classify, "
              f"/v1/search; GET /v1/info, /docs; editing "
              f"{'on: /v1/memory/add, /v1/memory/remove, /v1/memory/rollback' if digest else 'off (no token)'}); "
              "Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)


def raise_direct_ingress_refused():
    raise ValueError("--ingress direct is set in the environment of the Ray that vismem serve starts; a cluster "
                     "(--address, RAY_ADDRESS) or a Serve config (--config-out) must have its nodes started "
                     "under that environment instead: serve them with the default proxy ingress")


def set_direct_ingress(address: str | None, port: int, ports: int = 1) -> None:
    """Direct ingress on ``port`` (and the next ``ports - 1``) for the local Ray about to start; refused
    for a cluster, whose nodes read their environment when they started."""
    import os

    from cluster.runtime import named_cluster
    from index.serve import direct_ingress_env
    if named_cluster(address):
        raise_direct_ingress_refused()
    os.environ.update(direct_ingress_env(port, ports))                # before Ray starts: its processes read it


def write_config(args) -> dict:
    from cluster.serve_app import ServeArgs                        # the builder: FAISS, FastAPI
    from cluster.serve_config import serve_config, write_serve_config
    from index.store.manifest import read_manifest
    token = {"token_file": args.token_file} if args.token_file else {"token_env": "VISMEM_TOKEN"}
    served = ServeArgs(memory=args.memory, replicas=args.replicas, shard_timeout_s=args.shard_timeout,
                       mmap=args.mmap, colocate=args.colocate, **token)
    config = serve_config(served, len(read_manifest(args.memory).shards), host=args.host, port=args.port,
                          autoscale=args.autoscale)
    write_serve_config(args.config_out, config)
    print(f"wrote {args.config_out}: serve {args.memory} with `serve run {args.config_out}` or `serve deploy "
          f"{args.config_out}` (HTTP on {args.host}:{args.port}; editing token from "
          f"{args.token_file or '$VISMEM_TOKEN'} where the app is built)", flush=True)
    return {"config": args.config_out, "serve_config": config}


def cmd_serve_bench(args) -> dict:
    from cluster.cli.common import record_printer
    from cluster.runtime import ray_session
    from index.bench.serve_bench import ServeBenchConfig, run
    from index.serve import free_port
    d = ServeBenchConfig()
    check_positive(args, "synthetic", "dim", "shards", "singles", "clients", "seconds", "batch", "batches", "k")
    cfg = ServeBenchConfig(url=args.url, memory=args.bench_memory, synthetic=args.synthetic, dim=args.dim,
                           shards=args.shards, singles=args.singles, clients=args.clients, seconds=args.seconds,
                           batch=args.batch, batches=args.batches, k=args.k, workdir=args.workdir,
                           layouts=d.layouts if args.layout == "both" else (args.layout,), ingress=args.ingress)
    if args.url:
        return run(cfg, record_printer(args))
    if cfg.ingress == "direct":
        cfg.port = free_port()                                   # one port an app, from this one up
        set_direct_ingress(args.address, cfg.port, ports=len(cfg.layouts))
    with ray_session(args.address, serve_too=True):
        return run(cfg, record_printer(args))


def cmd_serve_faults(args) -> dict:
    from cluster.cli.common import record_printer
    from cluster.runtime import ray_session
    from index.bench.serve_faults import FaultLoadConfig, run
    check_positive(args, "replicas", "rate", "seconds", "clients", "shard_timeout", "k")
    cfg = FaultLoadConfig(args.fault_memory, replicas=args.replicas, rate=args.rate, seconds=args.seconds,
                          kill_at_s=args.kill_at, shard=args.shard, kill=args.kill, clients=args.clients,
                          k=args.k, shard_timeout_s=args.shard_timeout, shard_cpus=args.shard_cpus)
    with ray_session(args.address, serve_too=True):
        return run(cfg, record_printer(args))


def cmd_client(args) -> dict:
    from index.serve.client import Client
    check_positive(args, "k", "nprobe")
    with Client(args.url) as client:
        if args.command == "classify":
            check_positive(args, "counterfactual")
            answer = client.classify(images=args.images, k=args.k, rule=args.rule, nprobe=args.nprobe,
                                     counterfactual=args.counterfactual)
        else:
            answer = client.search(images=args.images, k=args.k, nprobe=args.nprobe)
    answer = answer.model_dump()
    for uri, result in zip(args.images, answer["results"]):
        head = f"{uri}: {result['decision']}" if "decision" in result else f"{uri}:"
        print(head + ("  (PARTIAL: shards %s missing)" % answer["missing_shards"] if answer["partial"] else ""))
        for n in result["neighbours"]:
            weight = f"  w={n['weight']:.3g}" if "weight" in n else ""
            print(f"    {n['similarity']:.3f}  {n['label']!s:12s} {n['uri']}{weight}")
        if result.get("counterfactual"):
            print_counterfactual(result["decision"], result["counterfactual"])
    return answer


def print_counterfactual(decision, cf: dict) -> None:
    if cf["flipped_to"] is None:
        print(f"  no removal of {cf['budget']} memory items or fewer changes {decision!r}")
        return
    print(f"  removing these {len(cf['removals'])} would make it {cf['flipped_to']!r}:")
    for n in cf["removals"]:
        print(f"    - {n['similarity']:.3f}  {n['label']!s:12s} id {n['id']}  {n['uri']}")
    for n in cf["entrants"]:
        print(f"    + {n['similarity']:.3f}  {n['label']!s:12s} id {n['id']}  {n['uri']}  (enters the top k)")
