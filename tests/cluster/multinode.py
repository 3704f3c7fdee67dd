"""The multi-node scenario tests/cluster/test_multinode.py runs in a process of its own (the test
session holds a single-node Ray of its own): a Ray cluster on this machine of a head (no CPUs: the
driver only) and two worker nodes with distinct custom resources, node death detected in about
two seconds, and the scheduler spreading work (Ray's hybrid policy with a spread threshold of 0
and no random pick among the best nodes); on it the embedding, the build and the served memory.

``python -m tests.cluster.multinode COLLECTION STORE QUERIES`` embeds COLLECTION into STORE/emb and
builds STORE/mem (URLs every node reads: object storage, since vismem refuses a local path on a
cluster of several nodes), and prints one JSON object as its last line: where the encoder actors
and shard replicas ran, and the served answers to the query vectors in QUERIES (a .npy file).
"""

import json
import sys
import time

import numpy as np
import ray
from ray.cluster_utils import Cluster

SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                 "health_check_failure_threshold": 4,           # a killed node is dead after ~2 s, not 15-20 s
                 "scheduler_spread_threshold": 0.0, "scheduler_top_k_absolute": 1, "scheduler_top_k_fraction": 0.0}
ENCODER = "raw-pixels:8"


def actor_nodes(contains: str) -> dict[str, str]:
    """{actor class name: node id} of the live actors whose class name contains ``contains`` (GCS's table)."""
    table = ray._private.state.state.actor_table(None)
    return {f"{a['ActorClassName']}#{actor_id[:6]}": a["Address"]["NodeID"] for actor_id, a in table.items()
            if contains in a["ActorClassName"] and a["State"] == "ALIVE"}


def main(collection: str, store: str, queries: str) -> dict:
    t0 = time.monotonic()
    phase = lambda name: print(f"[multinode] {name}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": SYSTEM_CONFIG})
    nodes = {"node_a": cluster.add_node(num_cpus=2, resources={"node_a": 1}, wait=False),
             "node_b": cluster.add_node(num_cpus=2, resources={"node_b": 1}, wait=False)}
    from index.build.build import build_memory       # imported while the worker nodes start
    from index.ingest.job import embed_collection
    from index.serve import free_port, start
    from index.serve.client import Client
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    phase("cluster up")
    workers = {name: node.node_id for name, node in nodes.items()}
    out = {"workers": workers, "head": cluster.head_node.node_id}
    seen: dict[str, str] = {}

    def watch(_done: int) -> None:                       # the pool's actors, while they are alive
        seen.update(actor_nodes("MapWorker"))

    embed_collection(collection, ENCODER, f"{store}/emb", partition_size=8, concurrency=2, progress=watch)
    out["encoder_actors"] = seen
    phase("embedded")
    build_memory(f"{store}/emb", f"{store}/mem", shards=2, use_ray=True)
    phase("built")
    port = free_port()
    start(f"{store}/mem", host="127.0.0.1", port=port, replicas=2, shard_cpus=0.25)
    out["shard_replicas"] = actor_nodes("ShardSearcher")
    with Client(f"http://127.0.0.1:{port}") as client:
        answer = client.search(vectors=np.load(queries), k=5)
    phase("served")
    out["served"] = [[n.id for n in r.neighbours] for r in answer.results]
    out["partial"] = answer.partial
    started = time.monotonic()                          # a worker node killed (SIGKILL): how soon Ray knows
    cluster.remove_node(nodes["node_b"], allow_graceful=False)
    while any(n["Alive"] for n in ray.nodes() if n["NodeID"] == workers["node_b"]):
        time.sleep(0.1)
    out["death_detected_s"] = time.monotonic() - started
    phase("node death seen")
    ray.shutdown()
    phase("driver off")
    cluster.shutdown()
    phase("cluster off")
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
