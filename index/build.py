"""Embeddings → a sharded memory: choose the index type, train one empty index, fill the shards,
and measure the recall the memory will answer at.

The memory hands out its own ids: a build numbers the collection's vectors 0..n−1 in the order of
the collection's ids (the same numbers for ``vismem embed``'s output) and keeps the collection's
id as ``source_id``. Shard ``s`` owns the ids with ``id % shards == s``, so adding and removing
vectors later touches exactly one shard per id. A build commits its version like every edit
(``index.commit``): files first, in a folder of its own, then the manifest; a build that fails
removes what it wrote, so a memory never shows a half-built version.
"""

from __future__ import annotations

import logging
import math

import faiss
import fsspec
import numpy as np

from index import commit
from index.embeddings import JOB_FILE, embedding_matrix, read_embeddings
from index.manifest import Manifest, ShardEntry, read_manifest
from index.recall import calibrate_nprobe
from index.shards import Shard, metadata_table, serialize

log = logging.getLogger("vismem.index.build")
FLAT_LIMIT = 100_000
TARGET_RECALL = 0.95


def choose_factory(n: int, dim: int) -> str:
    """Flat below ~100k vectors; IVF with 8-bit scalar codes above (HNSW coarse quantiser from 10M).

    nlist ≈ 8·√N rounded to a power of two. Why SQ8 and not PQ: measured at 1M clustered vectors
    of d=384 (``vismem index bench``), IVF-PQ64 tops out near recall@10 0.5–0.7 whatever nprobe,
    and PQ64 re-ranked with SQ8 codes costs more bytes than SQ8 alone (README, "Recall"). A user
    who needs fewer bytes per vector passes ``--factory IVF…,PQ…`` and the build reports the
    recall it measured.
    """
    if n < FLAT_LIMIT:
        return "IDMap2,Flat"
    nlist = 2 ** round(math.log2(8 * math.sqrt(n)))
    if n >= 10_000_000:
        return f"IVF{nlist}_HNSW32,SQ8"
    return f"IVF{nlist},SQ8"


def training_size(factory: str) -> int:
    """How many vectors to train on: ≥ 39·nlist, and ≥ 9,984 for 8-bit PQ (DESIGN.md §3)."""
    if "IVF" not in factory:
        return 0
    nlist = int(factory.split("IVF")[1].split(",")[0].split("_")[0])
    return max(39 * nlist, 9_984 if "PQ" in factory else 0)


def empty_index(dim: int, factory: str) -> faiss.Index:
    """The untrained index ``factory`` describes, or a ValueError naming the factory string."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        reason = lines[-1].split(": ", 1)[-1] if lines else "rejected"
        raise ValueError(f"FAISS cannot build the index factory string {factory!r} for {dim}-d vectors ({reason}); "
                         "see https://github.com/facebookresearch/faiss/wiki/The-index-factory") from None


def with_ids(factory: str, dim: int) -> str:
    """``factory``, prefixed with ``IDMap2,`` where the index cannot store the memory's own ids
    (Flat, HNSW, Refine): memory ids are global and sparse, never positions."""
    owner = empty_index(dim, factory)                  # owns the C++ object the downcast view points to
    index = faiss.downcast_index(owner)
    if factory.startswith("IDMap") or (faiss.try_extract_index_ivf(index) is not None
                                       and not isinstance(index, faiss.IndexRefine)):
        return factory
    return f"IDMap2,{factory}"


def train_empty_index(vectors: np.ndarray, factory: str, seed: int = 0) -> faiss.Index:
    index = empty_index(vectors.shape[1], factory)
    if not index.is_trained:
        want = training_size(factory)
        if len(vectors) < want:
            log.warning("training %s on %d vectors (< %d recommended)", factory, len(vectors), want)
        sample = vectors[np.random.default_rng(seed).permutation(len(vectors))[:max(want, 1)]]
        if faiss.get_num_gpus() > 0 and "IVF" in factory:
            ivf = faiss.extract_index_ivf(index)
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
        index.train(np.ascontiguousarray(sample))
    return index


def build_memory(embeddings_url: str, memory_url: str, shards: int = 2, factory: str | None = None,
                 encoder: dict | None = None, replace: bool = False, nprobe: int | None = None,
                 target_recall: float = TARGET_RECALL, trained: faiss.Index | None = None) -> Manifest:
    """Build the next version of the memory at ``memory_url`` (version 1 for a new one).

    ``nprobe`` fixes the default search depth; by default the build picks the smallest nprobe
    whose recall@10 against exact search, measured on vectors of the collection, reaches
    ``target_recall``. A memory that holds another encoder's vectors is refused unless
    ``replace``. ``trained`` is a trained empty index of ``factory`` to fill instead of training
    one (another memory's): two memories over one trained index answer comparably, exactly.
    """
    table = read_embeddings(embeddings_url)
    vectors = embedding_matrix(table)
    if len(vectors) == 0:
        raise ValueError(f"no vectors under {embeddings_url}: every image failed to embed?")
    check_shards(shards, len(vectors))
    encoder = encoder or embedding_encoder(embeddings_url)
    factory = with_ids(factory or choose_factory(len(vectors), vectors.shape[1]), int(vectors.shape[1]))
    check_nprobe(nprobe, factory, int(vectors.shape[1]))
    previous = current_manifest(memory_url)
    if previous is not None and not replace:
        check_same_encoder(previous, encoder, int(vectors.shape[1]), memory_url)

    if trained is not None and (trained.d != vectors.shape[1] or not trained.is_trained):
        raise ValueError(f"the trained index given must be a trained {vectors.shape[1]}-d index")

    log.info("building %s over %d vectors of dim %d in %d shards", factory, len(vectors), vectors.shape[1], shards)
    empty = trained if trained is not None else train_empty_index(vectors, factory)
    ids = np.arange(len(vectors), dtype=np.int64)                 # read_embeddings sorts by the collection's id
    source_ids = table.column("id").to_numpy()
    uris = np.array(table.column("uri").to_pylist(), dtype=object)
    labels = np.array(table.column("label").to_pylist(), dtype=object)
    fs, root = commit.filesystem(memory_url)
    version = previous.version + 1 if previous else 1
    with commit.staged(fs, root, version) as folder:
        commit.write(fs, f"{root}/{folder}/trained.faiss", serialize(empty))
        entries, filled = [], []
        for s in range(shards):
            rows = np.flatnonzero(ids % shards == s)
            index = faiss.clone_index(empty)
            index.add_with_ids(vectors[rows], ids[rows])
            metadata = metadata_table(ids[rows], uris[rows], labels[rows], source_ids[rows])
            shard, entry = write_shard(fs, root, folder, s, index, metadata)
            entries.append(entry)
            filled.append(shard)
        search, recall = search_defaults(filled, vectors, ids, nprobe, target_recall)
        manifest = Manifest(version=version, encoder=encoder, dim=int(vectors.shape[1]), metric="inner_product",
                            factory=factory, trained_index=f"{folder}/trained.faiss", shards=entries,
                            next_id=len(ids), search=search, recall=recall,
                            parent=previous.version if previous else None, operation="build",
                            counts={"vectors": len(ids)})
        commit.commit(fs, root, version, manifest.to_json())
    commit.move_pointer(fs, root, version)
    return manifest


def check_shards(shards: int, count: int) -> None:
    if shards <= 0:
        raise ValueError(f"the number of shards must be positive, got {shards}")
    if shards > count:
        raise ValueError(f"{shards} shards for {count} vectors would leave shards empty; use at most {count} "
                         "(a shard of a few million vectors is typical)")


def check_nprobe(nprobe: int | None, factory: str, dim: int) -> None:
    """A pinned nprobe must name between 1 and nlist lists (Flat indexes ignore it)."""
    if nprobe is None:
        return
    owner = empty_index(dim, factory)                  # owns the C++ object the IVF view points to
    ivf = faiss.try_extract_index_ivf(owner)
    if ivf is not None and not 1 <= nprobe <= ivf.nlist:
        raise ValueError(f"nprobe must be between 1 and nlist = {ivf.nlist}, got {nprobe}")


def current_manifest(memory_url: str) -> Manifest | None:
    try:
        return read_manifest(memory_url)
    except FileNotFoundError:
        return None


def check_same_encoder(previous: Manifest, encoder: dict, dim: int, memory_url: str) -> None:
    """A new version must hold vectors of the same encoder as the current one (their similarities
    mean nothing to each other otherwise), unless the user asks to replace the memory."""
    if previous.encoder.get("sha256") != encoder.get("sha256") or previous.dim != dim:
        raise ValueError(f"memory {memory_url} holds vectors of encoder {previous.encoder.get('name')} "
                         f"({previous.dim}-d); these embeddings come from encoder {encoder.get('name')} ({dim}-d). "
                         "Build into another --memory, or pass --replace to make them the current version")


def write_shard(fs, root: str, folder: str, number: int, index: faiss.Index, metadata) -> tuple[Shard, ShardEntry]:
    """Shard ``number`` (``index`` over ``metadata``'s ids), saved under ``folder``."""
    shard = Shard(index, metadata, number)
    return shard, shard.save(fs, root, folder)


def search_defaults(shards: list[Shard], vectors: np.ndarray, ids: np.ndarray, nprobe: int | None,
                    target: float) -> tuple[dict, dict | None]:
    """The manifest's search defaults and the recall they were measured at (None for Flat)."""
    if faiss.try_extract_index_ivf(shards[0].index) is None:
        return {}, None
    result = calibrate_nprobe(shards, vectors, ids, target, nprobe=nprobe)
    if result["recall"] < target:
        log.warning("recall@%d is %.3f at nprobe %d, below the target %.2f: the factory's codes are too coarse "
                    "(try an SQ8 or refined factory)", result["k"], result["recall"], result["nprobe"], target)
    return {"nprobe": result["nprobe"]}, result


def embedding_encoder(embeddings_url: str) -> dict:
    """The encoder recorded by the embedding job that wrote ``embeddings_url``."""
    import json
    with fsspec.open(embeddings_url.rstrip("/") + "/" + JOB_FILE) as f:
        job = json.load(f)
    return {"name": job["encoder"], "sha256": job["encoder_sha256"]}
