"""Embeddings → a sharded memory: choose the index type, train one empty index, fill the shards,
and measure the recall the memory will answer at.

The memory hands out its own ids: a build numbers the collection's vectors 0..n−1, file by file in
the order of each file's smallest collection id and within a file by collection id (for ``vismem
embed``'s output, whose files hold contiguous id ranges, that is the collection's id order), and
keeps the collection's id as ``source_id``. An IVF memory's shards each own a range of its inverted
lists (``index.shard.placement``), chosen from the training sample so that they hold about as many vectors
each; other memories place by id (``id % shards``). Either way one vector is in exactly one shard,
so adding and removing vectors later touches one shard per vector. A build commits its version like every edit
(``index.store.commit.transaction``): files first, in a folder of its own, then the manifest; a build that fails
removes what it wrote, so a memory never shows a half-built version. The filling itself is a
parallel add (``index.build.parallel_add``) that never gathers the collection in the driver.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import faiss
import numpy as np

from index.build.recall import K_FACTORS
from index.build.parallel_add import EmbeddingFile, Runner, parallel_add, plan_files, training_sample
from index.ingest.embeddings import check_embeddings_encoder, embedding_encoder
from index.shard.faiss_io import serialize
from index.shard import tiers
from index.shard.placement import Placement
from index.shard.search import plain_ivf
from index.store import commit
from index.store.manifest import Manifest, read_manifest

log = logging.getLogger("vismem.index.build")
FLAT_LIMIT = 100_000
TARGET_RECALL = 0.95
PARALLEL_MIN = 100_000        # vectors from which a build uses Ray (when connected) unless told
NON_IVF_TRAINING = 65_536     # vectors a trainable index without lists (SQ8, PQ codes) trains on
CALIBRATION_QUERIES = 1000     # memory vectors whose recall@10 the build measures
PLACEMENT_SAMPLE = 32_768      # sample vectors whose lists estimate the list sizes the shards split


def choose_factory(n: int, dim: int) -> str:
    """Flat below ~100k vectors; IVF with 8-bit scalar codes above (HNSW coarse quantiser from 10M).

    nlist ≈ 8·√N rounded to a power of two. Why SQ8 and not PQ: at 1M clustered vectors of d=384
    (``vismem index bench``), IVF-PQ64 tops out at a low recall@10 whatever nprobe, and PQ64
    re-ranked with SQ8 codes costs more bytes than SQ8 alone (the figures: README, "Recall", and
    ``eval/results/index_bench_1M_*``). A user
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
    """How many vectors an IVF factory trains on: ≥ 39·nlist, and ≥ 9,984 for 8-bit PQ (docs/ARCHITECTURE.md
    §5); 0 for the others (see ``NON_IVF_TRAINING``)."""
    if "IVF" not in factory:
        return 0
    nlist = int(factory.split("IVF")[1].split(",")[0].split("_")[0])
    return max(39 * nlist, 9_984 if "PQ" in factory else 0)


def empty_index(dim: int, factory: str) -> faiss.Index:
    """The untrained index ``factory`` describes, or a ValueError naming the factory string; for a
    two-tier factory (an IVF index refined, ``index.shard.tiers``) its IVF base."""
    return tiers.split(factory_index(dim, factory))[0]


def tier_dtype(dim: int, factory: str) -> str | None:
    """The dtype a two-tier ``factory`` keeps its re-rank vectors in (None: one tier)."""
    dtype = tiers.split(factory_index(dim, factory))[1]
    return None if dtype is None else dtype.name


def factory_index(dim: int, factory: str) -> faiss.Index:
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
                                       and not isinstance(index, faiss.IndexRefine)):     # two-tier: its IVF base
        return factory
    return f"IDMap2,{factory}"


def train_empty_index(vectors: np.ndarray, factory: str, seed: int = 0) -> faiss.Index:
    index = empty_index(vectors.shape[1], factory)
    if not index.is_trained:
        want = training_size(factory)
        if len(vectors) < want:
            log.warning("training %s on %d vectors (< %d recommended)", factory, len(vectors), want)
        sample = vectors                    # the build passes a random sample of the right size: no copy
        if len(vectors) > max(want, 1):
            sample = vectors[np.random.default_rng(seed).permutation(len(vectors))[:max(want, 1)]]
        if faiss.get_num_gpus() > 0 and "IVF" in factory:
            ivf = faiss.extract_index_ivf(index)
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
        index.train(np.ascontiguousarray(sample))
    return index


def build_memory(embeddings_url: str, memory_url: str, shards: int = 2, factory: str | None = None,
                 encoder: dict | None = None, replace: bool = False, nprobe: int | None = None,
                 target_recall: float = TARGET_RECALL, trained: faiss.Index | None = None,
                 progress: Callable[[str, int, int], object] | None = None, use_ray: bool | None = None,
                 plan: tuple[list[EmbeddingFile], int] | None = None, k_factor: int | None = None) -> Manifest:
    """Build the next version of the memory at ``memory_url`` (version 1 for a new one).

    A parallel add (``index.build.parallel_add``): the driver reads the files' footers and a training
    sample, trains the empty index, and tasks (Ray's when it is connected) encode the files into
    per-shard pieces and merge each shard. ``nprobe`` fixes the default search depth; by default
    the build picks the smallest nprobe whose recall@10 against exact search, measured on vectors
    of the collection, reaches ``target_recall``; a two-tier factory (``index.shard.tiers``) also
    picks ``k_factor``, the candidates re-ranked per answer (the cheapest pair: ``recall.cheapest_setting``)
    unless one is given. A memory that holds another encoder's vectors is
    refused unless ``replace``. ``trained`` is a trained empty index of ``factory`` to fill instead
    of training one (another memory's): two memories over one trained index answer comparably.
    ``progress(stage, done, total)`` is called as tasks finish. ``use_ray``: None runs the tasks on
    Ray when this process is connected to it and the collection holds ``PARALLEL_MIN`` vectors or
    more, False in this process, True requires Ray. ``plan`` is ``plan_files(embeddings_url)`` where
    the caller already read it (the CLI does, to decide whether to start Ray): on S3 every file's
    footer is a request.
    """
    files, dim = plan or plan_files(embeddings_url)
    count = sum(f.rows for f in files)
    if count == 0:
        raise ValueError(f"no vectors under {embeddings_url}: every image failed to embed?")
    check_shards(shards, count)
    encoder = encoder or embedding_encoder(embeddings_url)
    factory = with_ids(factory or choose_factory(count, dim), dim)
    empty = empty_index(dim, factory)
    check_nprobe(nprobe, empty, k_factor)
    check_lists(shards, empty, factory)
    previous = current_manifest(memory_url)
    if previous is not None and not replace:
        check_embeddings_encoder(previous, memory_url, encoder, dim, embeddings_url,
                                 remedy="build into another --memory, or pass --replace to make them the current version")
    if trained is not None and (trained.d != dim or not trained.is_trained):
        raise ValueError(f"the trained index given must be a trained {dim}-d index")

    if use_ray is None and runs_in_process(count):
        use_ray = False
    runner = Runner(progress, use_ray, urls=(embeddings_url, memory_url))
    owner = trained if trained is not None else empty     # keeps the IVF view's object alive
    ivf = faiss.try_extract_index_ivf(owner)
    log.info("building %s over %d vectors of dim %d in %d shards (%d files, %d workers)", factory, count, dim, shards,
             len(files), runner.workers)
    queries = CALIBRATION_QUERIES if ivf is not None else 0
    train = 0 if owner.is_trained else training_size(factory) or NON_IVF_TRAINING
    draw = queries + max(train, PLACEMENT_SAMPLE if ivf is not None else 0)
    sample, sample_ids = training_sample(runner, files, dim, draw) if draw else (None, None)
    calibration = None if ivf is None else (sample[:queries].copy(), sample_ids[:queries].copy())
    held_out = sample is not None and len(sample) >= queries + train   # a small collection trains on all of it
    rest = sample[queries:] if held_out else sample
    runner.progress("train", 0, 1)
    empty = owner if owner.is_trained else train_empty_index(rest, factory)
    placement = place(empty, rest, shards)
    runner.progress("train", 1, 1)
    del sample, sample_ids, rest
    candidates = [nprobe] if nprobe else nprobe_candidates(ivf.nlist) if ivf else []
    version = previous.version + 1 if previous else 1
    with commit.transaction(memory_url, version) as txn:
        folder = txn.folder
        commit.write(txn.fs, f"{txn.root}/{folder}/trained.faiss", serialize(empty))
        entries, recall = parallel_add(runner, files, empty, placement, memory_url, folder, calibration, candidates,
                                       target_recall, max(1, min(10, count - 1)), tier_dtype(dim, factory),
                                       (k_factor,) if k_factor else K_FACTORS)
        check_written(txn.fs, txn.root, entries)
        if recall is not None and recall["recall"] < target_recall:
            log.warning("recall@%d is %.3f at nprobe %d, below the target %.2f: the factory's codes are too coarse "
                        "(try an SQ8 or refined factory)", recall["k"], recall["recall"], recall["nprobe"],
                        target_recall)
        txn.manifest = Manifest(version=version, encoder=encoder, dim=dim, metric="inner_product",
                                factory=factory, trained_index=f"{folder}/trained.faiss", shards=entries,
                                next_id=count, search={key: recall[key] for key in ("nprobe", "k_factor") if key in recall}
                                if recall else {}, recall=recall,
                                placement=placement.record(),
                                parent=previous.version if previous else None, operation="build",
                                counts={"vectors": count})
    return txn.manifest


def place(trained: faiss.Index, sample: np.ndarray | None, shards: int) -> Placement:
    """By list ranges for a plain IVF index (balanced on the sample's list sizes), else by id."""
    ivf = plain_ivf(trained)
    if ivf is None or sample is None:
        return Placement(shards)
    lists = ivf.quantizer.assign(np.ascontiguousarray(sample[:PLACEMENT_SAMPLE]), 1).ravel()
    return Placement.balanced(np.bincount(lists, minlength=ivf.nlist), shards)


def nprobe_candidates(nlist: int) -> list[int]:
    """The nprobes a build or ``tune`` tries, cheapest first: 1, 2, 4, … and nlist itself."""
    return sorted({2 ** i for i in range(int(np.log2(nlist)) + 1)} | {nlist})


def check_written(fs, root: str, entries: list) -> None:
    """Every file the manifest will reference is in the memory's store (a task that wrote elsewhere,
    e.g. on another node's disk, must fail the build, not commit a version that cannot load)."""
    paths = [f"{root}/{p}" for entry in entries for p in entry.files()]
    fs.invalidate_cache(root)
    missing = [p for p in paths if not fs.exists(p)]
    if missing:
        raise FileNotFoundError(f"the build's tasks wrote {len(missing)} file(s) the driver cannot see, e.g. "
                                f"{missing[0]}: on a cluster, build into storage every node shares (s3://...)")


def check_shards(shards: int, count: int) -> None:
    if shards <= 0:
        raise ValueError(f"the number of shards must be positive, got {shards}")
    if shards > count:
        raise ValueError(f"{shards} shards for {count} vectors would leave shards empty; use at most {count} "
                         "(a shard of a few million vectors is typical)")


def check_nprobe(nprobe: int | None, empty: faiss.Index, k_factor: int | None = None) -> None:
    """A pinned nprobe must name between 1 and nlist lists of the ``empty`` index (Flat indexes ignore
    it); a pinned k_factor must be a positive whole number."""
    if k_factor is not None and (int(k_factor) != k_factor or k_factor < 1):
        raise ValueError(f"k_factor must be a positive whole number, got {k_factor}")
    if nprobe is None:
        return
    ivf = faiss.try_extract_index_ivf(empty)
    if ivf is not None and not 1 <= nprobe <= ivf.nlist:
        raise ValueError(f"nprobe must be between 1 and nlist = {ivf.nlist}, got {nprobe}")


def check_lists(shards: int, empty: faiss.Index, factory: str) -> None:
    """An IVF memory's shards each own some of its lists (``index.shard.placement``): at most nlist shards
    (``empty``: an index of ``factory``)."""
    ivf = plain_ivf(empty)
    if ivf is not None and shards > ivf.nlist:
        raise ValueError(f"{shards} shards cannot each own some of the {ivf.nlist} inverted lists of {factory}; "
                         f"use at most {ivf.nlist} shards or more lists")


def runs_in_process(count: int, local: bool = False, cluster_named: bool = False) -> bool:
    """The one Ray-or-not rule of a build of ``count`` vectors: in this process when asked
    (``local``), or when it holds fewer than ``PARALLEL_MIN`` vectors and no Ray cluster is named
    (``cluster_named``: an address was given); seconds in process, where Ray's task start-up would
    be most of the time. Otherwise on Ray (``build_memory`` with ``use_ray=None``: when connected)."""
    return local or (count < PARALLEL_MIN and not cluster_named)


def current_manifest(memory_url: str) -> Manifest | None:
    try:
        return read_manifest(memory_url)
    except FileNotFoundError:
        return None
