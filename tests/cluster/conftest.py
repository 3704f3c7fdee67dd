"""A small memory on the local disk (3 shards, d=48, raw-pixel encoder the Router can load): what a
Serve config names and the builder opens, without starting Ray."""

import hashlib

import pytest

from index.build.build import build_memory
from index.synthetic import ClusteredVectors
from tests.index.edit.test_memory_edits import write_collection

ENCODER = ("raw-pixels:4", hashlib.sha256(b"raw-pixels:4").hexdigest())


@pytest.fixture(scope="session")
def memory(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cluster-memory")
    vectors = ClusteredVectors(dim=48, clusters=8, spread=0.8, seed=3).rows(0, 300)
    labels = [f"c{i % 3}" for i in range(len(vectors))]
    build_memory(write_collection(str(root / "emb"), vectors, labels, encoder=ENCODER), str(root / "mem"), shards=3)
    return str(root / "mem")
