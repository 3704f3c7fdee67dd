"""``vismem serve`` and the HTTP client commands (``vismem classify``, ``vismem query``).

Imports inside the commands are on purpose: ``vismem --help`` and each command import no Ray, FAISS or
torch they do not use (see ``cluster.cli``).
"""

from __future__ import annotations

from cluster.cli.common import add_command, add_common, add_k, add_nprobe, check_positive, stop_on_signals


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
        print(f"serving {args.memory}: the page at http://{args.host}:{args.port}/ (API: POST /v1/classify, "
              f"/v1/search; GET /v1/info, /docs; editing "
              f"{'on: /v1/memory/add, /v1/memory/remove, /v1/memory/rollback' if digest else 'off (no token)'}); "
              "Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)


def cmd_client(args) -> dict:
    from index.serve.client import Client
    check_positive(args, "k", "nprobe")
    with Client(args.url) as client:
        if args.command == "classify":
            answer = client.classify(images=args.images, k=args.k, rule=args.rule, nprobe=args.nprobe)
        else:
            answer = client.search(images=args.images, k=args.k, nprobe=args.nprobe)
    answer = answer.model_dump()
    for uri, result in zip(args.images, answer["results"]):
        head = f"{uri}: {result['decision']}" if "decision" in result else f"{uri}:"
        print(head + ("  (PARTIAL: shards %s missing)" % answer["missing_shards"] if answer["partial"] else ""))
        for n in result["neighbours"]:
            print(f"    {n['similarity']:.3f}  {n['label']!s:12s} {n['uri']}" + (f"  w={n['weight']:.3g}" if "weight" in n else ""))
    return answer
