"""``vismem serve faults``: load with a fault. Single queries over HTTP at a fixed rate while shard
replicas are killed, every answer checked against the memory opened in this process.

The load is open-loop (query i is due at ``i / rate`` seconds, whatever the earlier ones took),
so a slow answer shows as latency rather than as a quieter load. At ``kill_at_s`` one replica of
shard ``shard`` (or of every shard, ``kill="all"``) is killed with ``ray.kill``, as a node loss
or an OOM kill would take it. Every answer is then judged: a complete answer must be the
memory's own top-k, a partial one must name its missing shards and be exactly the live shards'
own top-k; a 5xx or a wrong answer is counted as such. With one replica a shard, answers are
partial (or, with every shard down, a 503 naming them) until Serve has replaced the dead replica:
the time from the kill to the first complete answer after the last incomplete one is the time to
recover. With two replicas a shard, the other replica answers and none is partial.

Ray and FAISS are imported where they are used: the CLI reads this module's defaults for ``--help``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import requests

from index.bench.serve_bench import percentiles

APP = "vismem-fault-load"


@dataclass
class FaultLoadConfig:
    memory: str                          # the memory to serve and check against
    replicas: int = 1                    # per shard
    rate: float = 50.0                   # queries/s, open loop
    seconds: float = 60.0
    kill_at_s: float = 10.0
    shard: int = 1                       # whose replica is killed (kill="one")
    kill: str = "one"                    # "one": a replica of `shard`; "all": one of every shard
    clients: int = 8                     # threads sending the load
    queries: int = 256                   # distinct query vectors, cycled
    k: int = 10
    shard_timeout_s: float = 2.0
    shard_cpus: float = 0.25
    seed: int = 0


@dataclass
class Answer:
    due_s: float                         # when the load was to send it, from the start
    seconds: float                       # its latency
    status: int                          # HTTP status (0: no answer at all)
    query: int = -1
    partial: bool = False
    missing: tuple[int, ...] = ()
    ids: list | None = None
    detail: str = ""                     # the error's words, for an answer that is not a 200


def replica_names(app: str, shard: int) -> list[str]:
    """The actor names of the live replicas of ``app``'s ShardSearcher of ``shard``."""
    import ray
    from ray.util.state import list_actors
    prefix = f"SERVE_REPLICA::{app}#ShardSearcher-{shard}#"          # the "#" keeps shard 1 from matching 10
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                         limit=10_000)
    return sorted(a.name for a in actors if a.name and a.name.startswith(prefix))


def kill_replicas(app: str, shards: list[int]) -> list[str]:
    """Kill one live replica of each of ``shards`` (no restart by Ray: Serve's controller must
    notice and replace it, as after a lost node); returns the names killed."""
    import ray
    killed = []
    for shard in shards:
        names = replica_names(app, shard)
        if not names:
            raise RuntimeError(f"{app} has no live replica of shard {shard} to kill")
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        killed.append(names[0])
    return killed


def send_load(cfg: FaultLoadConfig, base: str, queries: np.ndarray, on_time) -> list[Answer]:
    """``rate`` queries a second for ``seconds`` from ``clients`` threads; ``on_time(elapsed)`` is
    called by the scheduler thread about every 10 ms (the kill hangs on it)."""
    total = int(cfg.rate * cfg.seconds)
    answers: list[Answer | None] = [None] * total
    counter, lock, start = iter(range(total)), threading.Lock(), time.monotonic() + 0.2

    def client():
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                due = i / cfg.rate
                time.sleep(max(0.0, start + due - time.monotonic()))
                answers[i] = ask(session, base, queries, i % len(queries), cfg.k, due)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(cfg.clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        on_time(time.monotonic() - start)
        time.sleep(0.01)
    return [a for a in answers if a is not None]


def ask(session: requests.Session, base: str, queries: np.ndarray, q: int, k: int, due: float) -> Answer:
    began = time.monotonic()
    try:
        r = session.post(f"{base}/v1/search", json={"vectors": [queries[q].tolist()], "k": k}, timeout=30)
    except requests.RequestException as e:
        return Answer(due, time.monotonic() - began, 0, q, detail=f"no answer: {type(e).__name__}")
    seconds = time.monotonic() - began
    if r.status_code != 200:
        return Answer(due, seconds, r.status_code, q, detail=r.text[:300])
    body = r.json()
    return Answer(due, seconds, 200, q, body["partial"], tuple(body["missing_shards"]),
                  [n["id"] for n in body["results"][0]["neighbours"]])


def expected_ids(snapshot, queries: np.ndarray, k: int, missing: tuple[int, ...]) -> np.ndarray:
    """The top-k ids the live shards (all but ``missing``) give, merged as the Router merges them."""
    from index.shard.search import coarse_assignment, merge_topk
    coarse = coarse_assignment(snapshot.shards, queries, None)
    live = [n for n in range(len(snapshot.shards)) if n not in missing]
    answers = [dict(zip(("similarities", "ids"), snapshot.shards[n].search(queries, k, None, coarse))) for n in live]
    return merge_topk(answers, k, live)["ids"]


def judge(answers: list[Answer], snapshot, queries: np.ndarray, k: int) -> dict:
    """Counts of every kind of answer, and how many answers were not the top-k they claim to be."""
    truth = {(): expected_ids(snapshot, queries, k, ())}
    wrong, example = 0, None
    for a in answers:
        if a.status == 200:
            if a.missing not in truth:
                truth[a.missing] = expected_ids(snapshot, queries, k, a.missing)
            expected = [int(i) for i in truth[a.missing][a.query] if i >= 0]
            if a.ids != expected:
                wrong += 1
                example = example or {"query": a.query, "missing": a.missing, "answered": a.ids, "expected": expected}
    statuses = Counter(a.status for a in answers)
    return {"answers": len(answers), "statuses": {str(s): n for s, n in sorted(statuses.items())},
            "server_errors": sum(n for s, n in statuses.items() if s >= 500 or s == 0),
            "partial": sum(a.partial for a in answers), "wrong_answers": wrong,
            "missing_seen": sorted({a.missing for a in answers if a.missing}),
            "errors_seen": sorted({a.detail for a in answers if a.detail})[:5], "wrong_example": example}


def recovery(answers: list[Answer], kill_s: float | None) -> dict:
    """When the incomplete answers (partial or not 200) began and ended, relative to the kill."""
    if kill_s is None:
        return {"killed": False}
    bad = [a.due_s for a in answers if a.status != 200 or a.partial]
    if not bad:
        return {"killed": True, "incomplete_answers": 0, "recovered_after_s": 0.0}
    after = [a.due_s for a in answers if a.due_s > max(bad) and a.status == 200 and not a.partial]
    return {"killed": True, "incomplete_answers": len(bad), "first_incomplete_after_s": round(min(bad) - kill_s, 3),
            "recovered_after_s": round(min(after) - kill_s, 3) if after else None}


def serve_memory(cfg: FaultLoadConfig, port: int | None) -> str:
    """Serve ``cfg.memory`` as app ``APP`` on loopback ``port`` (a free one when None; where Serve
    already runs, the port it runs on, which it keeps); the app's base URL."""
    from index.serve import free_port, start                    # Ray Serve: see the module docstring
    port = free_port() if port is None else port
    start(cfg.memory, port=port, name=APP, route_prefix=f"/{APP}", replicas=cfg.replicas,
          shard_timeout_s=cfg.shard_timeout_s, shard_cpus=cfg.shard_cpus)
    return f"http://127.0.0.1:{port}/{APP}"


def run(cfg: FaultLoadConfig, emit=print, port: int | None = None) -> dict:
    """Serve ``cfg.memory`` (see ``serve_memory``), run the load, remove the app and return the
    summary; the caller has connected Ray with Serve."""
    from ray import serve

    from index.memory import VisualMemory
    from index.queries import check_vectors
    if cfg.kill not in ("one", "all"):
        raise ValueError(f"kill must be 'one' or 'all', got {cfg.kill!r}")
    memory = VisualMemory.open(cfg.memory)
    if cfg.kill == "one" and not 0 <= cfg.shard < len(memory.manifest.shards):
        raise ValueError(f"shard {cfg.shard}: the memory has shards 0 to {len(memory.manifest.shards) - 1}")
    queries = check_vectors(np.random.default_rng(cfg.seed).standard_normal((cfg.queries, memory.manifest.dim)),
                            memory.manifest.dim)
    base = serve_memory(cfg, port)
    try:
        shards = list(range(len(memory.manifest.shards))) if cfg.kill == "all" else [cfg.shard]
        kill = {"at": None, "names": []}

        def on_time(elapsed):
            if kill["at"] is None and elapsed >= cfg.kill_at_s:
                kill["names"], kill["at"] = kill_replicas(APP, shards), elapsed

        answers = send_load(cfg, base, queries, on_time)
    finally:
        serve.delete(APP)
    summary = {"what": "fault_load", "memory": cfg.memory, "replicas": cfg.replicas, "rate": cfg.rate,
               "seconds": cfg.seconds, "killed": kill["names"], "kill_at_s": kill["at"],
               **judge(answers, memory.snapshot, queries, cfg.k), **recovery(answers, kill["at"]),
               **percentiles([a.seconds for a in answers])}
    emit(summary)
    return summary

