"""On a Ray cluster of three nodes on this machine (tests/cluster/multinode.py, in a process of its
own): the embedding's encoder actors run on both worker nodes, the build runs as Ray tasks there,
and each shard's two replicas sit on different nodes; the embeddings, the memory and the served
answers equal the single-node run's (this session's one-node Ray); a killed worker node is
declared dead within seconds through the shortened health checks."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from index.bench.embed_bench import write_collection
from index.build.build import build_memory
from index.ingest.embeddings import embedding_matrix, read_embeddings
from index.ingest.job import embed_collection
from index.memory import VisualMemory

TIMEOUT_S = 110                  # the scenario's own process: a cluster up, embed, build, serve, a node killed
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def by_id(url: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of an embeddings folder, ordered by id."""
    table = read_embeddings(url)
    ids = np.asarray(table.column("id").to_pylist())
    order = np.argsort(ids)
    return ids[order], embedding_matrix(table)[order]


@pytest.fixture(scope="module")
def multinode(s3_endpoint, tmp_path_factory):
    """(collection URL, store URL of the run, the scenario's JSON): 48 images on S3 (moto), embedded,
    built and served on the three-node cluster in a process of its own (under two minutes)."""
    import s3fs                                        # the bucket on the session's S3 endpoint
    bucket = "multinode-" + os.urandom(4).hex()
    s3fs.S3FileSystem().mkdir(bucket)
    collection = write_collection(f"s3://{bucket}/images", 48, 32, "folder", seed=5)
    queries = str(tmp_path_factory.mktemp("multinode") / "queries.npy")
    np.save(queries, np.random.default_rng(0).standard_normal((6, 8 * 8 * 3), np.float32))
    scenario = subprocess.Popen([sys.executable, "-m", "tests.cluster.multinode", collection, f"s3://{bucket}/cluster",
                                 queries], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = scenario.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(scenario.pid, signal.SIGKILL)           # the scenario and its cluster's processes, all of them
        stdout, stderr = scenario.communicate()
        pytest.fail(f"the multi-node scenario took over {TIMEOUT_S} s: {stderr[-3000:]}")
    assert scenario.returncode == 0, stderr[-4000:]
    return collection, f"s3://{bucket}", queries, json.loads(stdout.strip().splitlines()[-1])


def test_work_ran_on_both_worker_nodes_and_replicas_on_different_nodes(multinode):
    out = multinode[-1]
    workers = set(out["workers"].values())
    assert set(out["encoder_actors"].values()) == workers              # an encoder actor on each worker node
    replicas = {}
    for name, node in out["shard_replicas"].items():
        replicas.setdefault(name.split("#")[0], []).append(node)
    assert sorted(replicas) == ["ServeReplica:vismem:ShardSearcher-0", "ServeReplica:vismem:ShardSearcher-1"]
    assert all(len(nodes) == 2 and len(set(nodes)) == 2 and set(nodes) <= workers for nodes in replicas.values())
    assert out["death_detected_s"] < 10                               # Ray's default: 15-20 s


def test_the_answers_equal_the_single_node_run(multinode, ray_local):
    collection, store, queries, out = multinode
    embed_collection(collection, "raw-pixels:8", f"{store}/single/emb", partition_size=8, concurrency=2)
    build_memory(f"{store}/single/emb", f"{store}/single/mem", shards=2, use_ray=True)
    ids, vectors = by_id(f"{store}/single/emb")
    cluster_ids, cluster_vectors = by_id(f"{store}/cluster/emb")
    assert len(ids) == 48 and np.array_equal(ids, cluster_ids) and np.array_equal(vectors, cluster_vectors)
    queries = np.load(queries)
    single = VisualMemory.open(f"{store}/single/mem").search(queries, k=5)
    on_cluster = VisualMemory.open(f"{store}/cluster/mem").search(queries, k=5)
    assert np.array_equal(single.ids, on_cluster.ids)
    assert not out["partial"] and out["served"] == single.ids.tolist()
