"""The main job, end to end: procedural data → DINO encoder → Ray Data embedding → sharded
FAISS memory → Ray Serve router → kNN classification of held-out real images → report.

Runs on the embedded defaults (local Ray on 127.0.0.1, a local folder as the object store,
scikit-learn's bundled digits as the real images) and, unchanged, as a Ray job on a cluster with
``--store s3://...``.

Each stage imports what it uses (torch, Ray, FAISS, Serve) inside: ``vismem demo``'s parser reads
``DemoConfig`` from this module, and ``vismem --help`` must not pay for those imports.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import fsspec
import numpy as np

from encoder.config import TrainConfig

log = logging.getLogger("vismem.demo")
RULES = ("plurality", "distance", "softmax", "rank")


@dataclass
class DemoConfig:
    store: str = "vismem-demo"              # fsspec URL of the object store (a local folder by default)
    max_minutes: float = 3.0                # training time budget
    max_steps: int | None = None            # stop training after this many steps (for reproducible runs)
    batch_size: int | None = None           # images per worker and step (None: the preset's)
    preset: str = "tiny-cpu"
    workers: int = 2
    generators: tuple[str, ...] = TrainConfig.generators     # the default recipe's mix
    seed: int = 0
    shards: int = 2
    k: int = 10
    port: int = 0                           # 0: a free port
    report_examples: int = 12
    address: str | None = None              # Ray cluster address; None: local Ray (or RAY_ADDRESS)
    fresh: bool = False                     # retrain and re-embed even if outputs exist
    serve: bool = False                     # keep the memory served after the table, until stopped


class Stages:
    """Prints numbered stage banners with elapsed times (the CLI's progress skeleton)."""

    def __init__(self, total: int, echo=print):
        self.total, self.n, self.echo, self.start = total, 0, echo, time.time()
        self.times: dict[str, float] = {}

    def __call__(self, key: str, title: str):
        stages = self

        class Stage:
            def __enter__(self):
                stages.n += 1
                self.t = time.time()
                stages.echo(f"\n[{stages.n}/{stages.total}] {title}  (t+{time.time() - stages.start:.0f}s)")
                return self

            def __exit__(self, *exc):
                if exc[0] is None:
                    stages.times[key] = round(time.time() - self.t, 1)
                    stages.echo(f"      done in {time.time() - self.t:.1f}s")

        return Stage()


def post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url} answered {e.code}: {e.read().decode(errors='replace')[:500]}") from None


def wait_ready(url: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.time() > deadline:
                raise TimeoutError(f"the router at {url} did not answer within {timeout}s") from None
            time.sleep(0.5)


def read_labels(embeddings_url: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from index.ingest.embeddings import embedding_matrix, read_embeddings
    table = read_embeddings(embeddings_url)
    return embedding_matrix(table), np.array(table.column("label").to_pylist(), dtype=object), table.column("uri").to_pylist()


def classify_over_http(base: str, query_uris: list[str], k: int, rule: str, batch: int = 64) -> list[dict]:
    results = []
    for start in range(0, len(query_uris), batch):
        images = []
        for uri in query_uris[start:start + batch]:
            with fsspec.open(uri, "rb") as f:
                images.append(base64.b64encode(f.read()).decode())
        answer = post(f"{base}/classify", {"images": images, "k": k, "rule": rule})
        if answer["partial"]:
            raise RuntimeError(f"shards {answer['missing_shards']} did not answer; the accuracy would be wrong")
        results.extend(answer["results"])
    return results


def run_demo(cfg: DemoConfig, echo=print, hold=None) -> dict:
    """Run every stage; return ``{"accuracy": {...}, "report": url, ...}``. With ``cfg.serve`` the
    memory stays served after the table: ``hold(base_url)`` runs before Serve is shut down (by
    default it waits for Ctrl-C or SIGTERM; ``vismem demo --serve`` turns those into an exit)."""
    import ray

    from cluster.runtime import init_ray, shutdown
    from encoder.config import preset

    store = cfg.store.rstrip("/")
    if "://" not in store:
        store = os.path.abspath(store)
    stages = Stages(7, echo)
    owns_ray = not ray.is_initialized()          # shut down only the Ray this run started
    try:
        with stages("ray", "start Ray"):
            init_ray(cfg.address)
            echo(f"      resources: {ray.cluster_resources()}")

        with stages("data", "write the real images (scikit-learn digits) to the object store"):
            digits = write_real_images(store, echo)

        with stages("train", f"train DINO on procedural images only ({', '.join(cfg.generators)}), "
                    f"{cfg.workers} Ray Train workers, {cfg.max_steps or 'no'} step limit, {cfg.max_minutes} min"):
            encoder_url, provenance = train_encoder(cfg, store, echo)

        specs = {"procedural": encoder_url, "random_init": f"random-init:{cfg.preset}:{cfg.seed}",
                 "raw_pixels": f"raw-pixels:{preset(cfg.preset).arch.img_size}"}
        with stages("embed", "batch-embed the real images with Ray Data (encoder actor pool), 3 encoders"):
            embeddings = embed_splits(cfg, store, specs, digits, echo)

        with stages("build", f"build the memory: {cfg.shards} FAISS shards + manifest"):
            memory_url = build_demo_memory(cfg, store, embeddings["procedural", "memory"], echo)

        from index.serve import free_port            # Ray Serve: only from the serve stage on
        base = f"http://127.0.0.1:{cfg.port or free_port()}"
        with stages("serve", f"serve the memory (Ray Serve router + {cfg.shards} shard searchers on {base}) and classify "
                    f"the held-out images through it"):
            served = classify_served(cfg, memory_url, base, embeddings["procedural", "queries"], echo)

        with stages("baselines", "baselines (same kNN, same votes) and the report"):
            accuracy = {"procedural": served["accuracy"], **baselines(cfg, embeddings, served["accuracy"])}
            report = write_demo_report(cfg, store, accuracy, served, encoder_url, memory_url, provenance)
        print_table(accuracy, cfg.k, echo)
        echo(f"\nreport: {report}")
        if cfg.serve:
            echo(f"\nthe memory stays served: the page at {base}/ (search it, look at the neighbours); "
                 "Ctrl-C to stop")
            sys.stdout.flush()
            (hold or wait_forever)(base)
    finally:
        shutdown(ray_too=owns_ray, serve_too=True)
    return {"accuracy": accuracy, "report": report, "encoder": encoder_url, "memory": memory_url,
            "stage_seconds": stages.times, "config": dataclasses.asdict(cfg)}


def wait_forever(base: str) -> None:
    while True:
        time.sleep(3600)


def write_real_images(store: str, echo=print) -> dict:
    """Stage 2: scikit-learn's digits as two labelled folder trees, memory and held-out queries."""
    from eval.datasets import write_digits
    digits = write_digits(f"{store}/collections/digits")
    echo(f"      {digits['counts']['memory']} memory images at {digits['memory']}, "
         f"{digits['counts']['queries']} held-out queries at {digits['queries']}")
    return digits


def train_encoder(cfg: DemoConfig, store: str, echo=print) -> tuple[str, dict]:
    """Stage 3: DINO on procedural images in Ray Train (or the encoder a previous run left, unless
    ``cfg.fresh``); returns its URL and provenance."""
    from encoder.config import preset
    from encoder.train import train
    fs, _ = fsspec.core.url_to_fs(store)
    run, encoder_url = f"{store}/runs/demo", f"{store}/runs/demo/encoder"
    if cfg.fresh or not fs.exists(f"{encoder_url}/config.json"):
        if cfg.fresh and fs.exists(run):
            fs.rm(run, recursive=True)
        tcfg = preset(cfg.preset, generators=tuple(cfg.generators), seed=cfg.seed, workers=cfg.workers,
                      max_minutes=cfg.max_minutes, max_steps=cfg.max_steps or 10**9, batch_size=cfg.batch_size)
        encoder_url = train(tcfg, run)
    else:
        echo(f"      reusing {encoder_url} (pass --fresh to retrain)")
    with fsspec.open(f"{encoder_url}/provenance.json") as f:
        provenance = json.load(f)
    echo(f"      encoder {encoder_url}: {provenance['steps']} steps, {provenance['images_seen']} procedural images")
    return encoder_url, provenance


def embed_splits(cfg: DemoConfig, store: str, specs: dict[str, str], digits: dict, echo=print) -> dict:
    """Stage 4: both splits with every encoder through Ray Data; ``{(encoder, split): url}``."""
    from index.ingest.job import embed_collection
    fs, _ = fsspec.core.url_to_fs(store)
    embeddings = {}
    for name, spec in specs.items():
        for split in ("memory", "queries"):
            out = f"{store}/embeddings/{name}/{split}"
            if cfg.fresh and fs.exists(out):
                fs.rm(out, recursive=True)
            summary = embed_collection(digits[split], spec, out, partition_size=256)
            embeddings[name, split] = out
            echo(f"      {name:11s} {split:7s}: {summary.images} vectors (d={summary.dim}), "
                 f"{summary.computed}/{summary.partitions} partitions computed, {summary.errors} unreadable")
    return embeddings


def build_demo_memory(cfg: DemoConfig, store: str, embeddings_url: str, echo=print) -> str:
    """Stage 5: a fresh memory of ``cfg.shards`` shards from the procedural encoder's vectors."""
    from index.build.build import build_memory
    fs, _ = fsspec.core.url_to_fs(store)
    memory_url = f"{store}/memory"
    if fs.exists(memory_url):
        fs.rm(memory_url, recursive=True)
    manifest = build_memory(embeddings_url, memory_url, cfg.shards)
    echo(f"      {memory_url}: version {manifest.version}, {manifest.count} vectors, {manifest.factory}, "
         f"shards {[s.count for s in manifest.shards]}")
    return memory_url


def classify_served(cfg: DemoConfig, memory_url: str, base: str, queries_url: str, echo=print) -> dict:
    """Stage 6: start the Serve app and classify every held-out image over HTTP with each rule.

    Returns ``{"accuracy": {rule: top-1}, "answers": {rule: [result, ...]}, "labels", "uris"}``.
    """
    from index.serve import start
    start(memory_url, host="127.0.0.1", port=int(base.rsplit(":", 1)[1]))
    info = wait_ready(f"{base}/info")
    echo(f"      router up: {info['count']} vectors in shards {info['shards']}")
    _, labels, uris = read_labels(queries_url)
    answers = {rule: classify_over_http(base, uris, cfg.k, rule) for rule in RULES}
    accuracy = {rule: float(np.mean([r["decision"] == t for r, t in zip(answers[rule], labels)])) for rule in RULES}
    return {"accuracy": accuracy, "answers": answers, "labels": labels, "uris": uris}


def baselines(cfg: DemoConfig, embeddings: dict, served_accuracy: dict[str, float]) -> dict:
    """Stage 7a: the same kNN and votes in this process for the two baselines; the procedural
    encoder too, as a check on the served answers."""
    from eval.knn import knn_accuracy
    in_process = {}
    for name in ("procedural", "random_init", "raw_pixels"):
        mem, mem_labels, _ = read_labels(embeddings[name, "memory"])
        qry, qry_labels, _ = read_labels(embeddings[name, "queries"])
        in_process[name] = knn_accuracy(mem, mem_labels, qry, qry_labels, cfg.k)
    # The router embeds the query images itself, in other batches than Ray Data did, so a
    # near-tie may flip; anything beyond that would be a bug in the fan-out or merge.
    if any(abs(in_process["procedural"][r] - served_accuracy[r]) > 0.01 for r in RULES):
        log.warning("served accuracy %s differs from in-process kNN %s", served_accuracy, in_process["procedural"])
    return {"random_init": in_process["random_init"], "raw_pixels": in_process["raw_pixels"]}


def write_demo_report(cfg: DemoConfig, store: str, accuracy: dict, served: dict, encoder_url: str, memory_url: str,
                      provenance: dict) -> str:
    """Stage 7b: the HTML report, with a seeded sample of served answers and their neighbours."""
    from eval.report import write_report
    uris, labels, answers = served["uris"], served["labels"], served["answers"]["softmax"]
    picks = np.random.default_rng(cfg.seed).choice(len(uris), min(cfg.report_examples, len(uris)), replace=False)
    examples = [{"query_uri": uris[i], "truth": labels[i], "rule": "softmax",
                 **{key: answers[i][key] for key in ("decision", "neighbours")}} for i in picks]
    return write_report(f"{store}/report.html", "vismem demo: procedural perception, explicit memory",
                        accuracy, examples, {"encoder": encoder_url, "memory": memory_url, "k": cfg.k,
                                             "trained on": f"{provenance['images_seen']} procedural images "
                                                           f"({', '.join(provenance['generators'])}), no real data"})


def print_table(accuracy: dict[str, dict[str, float]], k: int, echo=print) -> None:
    echo("\nkNN top-1 on held-out digits (k=%d)" % k)
    echo(f"  {'encoder':12s}" + "".join(f"{r:>11s}" for r in RULES))
    for name, acc in accuracy.items():
        echo(f"  {name:12s}" + "".join(f"{100 * acc[r]:10.1f}%" for r in RULES))
