"""``vismem demo``: the main job end to end on the embedded defaults.

Imports inside the commands are on purpose: ``vismem --help`` and each command import no Ray, FAISS or
torch they do not use (see ``cluster.cli``).
"""

from __future__ import annotations

from cluster.cli.common import add_command, add_common, add_k, check_positive, parse_generators, stop_on_signals


def add_demo_parser(sub) -> None:
    from cluster.demo import DemoConfig
    from encoder.config import PRESETS
    from procdata.catalog import GENERATOR_NAMES as GENERATORS   # names only: no torch for --help
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
    demo.add_argument("--batch-size", type=int, default=None,
                      help="procedural images per worker and step (default: the preset's)")
    demo.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="encoder and DINO recipe")
    demo.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (processes) for training")
    demo.add_argument("--generators", default=",".join(d.generators),
                      help=f"comma-separated procedural generators, from: {', '.join(GENERATORS)}")
    demo.add_argument("--seed", type=int, default=d.seed, help="seed of data, initialisation and split")
    demo.add_argument("--shards", type=int, default=d.shards, help="number of FAISS shards in the memory")
    add_k(demo, d.k)
    demo.add_argument("--port", type=int, default=d.port, help="HTTP port of the router on 127.0.0.1 (0: a free port)")
    demo.add_argument("--fresh", action="store_true", help="retrain and re-embed even if outputs exist in --store")
    demo.add_argument("--serve", action="store_true",
                      help="keep the memory served after the table and print the page's URL, until Ctrl-C or SIGTERM")
    add_common(demo)


def cmd_demo(args) -> dict:
    from cluster.demo import DemoConfig, run_demo, wait_forever
    check_positive(args, "max_minutes", "max_steps", "batch_size", "workers", "shards", "k")   # before Ray starts
    cfg = DemoConfig(store=args.store, max_minutes=args.max_minutes, max_steps=args.max_steps,
                     batch_size=args.batch_size, preset=args.preset,
                     workers=args.workers, generators=parse_generators(args.generators), seed=args.seed,
                     shards=args.shards, k=args.k, port=args.port, address=args.address, fresh=args.fresh,
                     serve=args.serve)

    def serve_until_stopped(base: str) -> None:        # after Ray is up: ray.init sets its own SIGTERM handler
        stop_on_signals("Serve and Ray shut down")
        wait_forever(base)

    return run_demo(cfg, hold=serve_until_stopped)
