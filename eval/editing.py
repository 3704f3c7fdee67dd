"""The visual-memory paper's editing figures (Geirhos et al. 2024), on CIFAR-10 or any labelled
collection pair: adding classes to a memory without retraining, and pruning it.

    python -m eval.editing --cifar ../shared/data/cifar10 --out editing.json

- **Adding classes**: a memory of the train images of half the classes; kNN accuracy on their test
  images; ``VisualMemory.add_embeddings`` of the other classes' train images (new classes, no
  retraining); accuracy on the new classes' test images and on the old classes' before and after.
  The edited memory must answer exactly as one built from every class over the same trained index.
- **Pruning**: the whole memory; hard pruning (remove items that are wrong-class neighbours at
  least ``threshold`` times, leave-one-out over the memory) and soft pruning (vote weights
  1.75/(1+count)); test accuracy before and after each.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

import numpy as np

from encoder.embed import Encoder
from eval.readable import same_size_images
from index.build.build import build_memory
from index.ingest.embeddings import write_vectors
from index.memory import VisualMemory

log = logging.getLogger("vismem.eval.editing")


def embed_split(url: str, encoder, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors and labels of every image of a same-size labelled collection."""
    images, labels = same_size_images(url, limit)
    return encoder.embed(images, batch_size=1024), np.asarray(labels, dtype=object)


def write_split(url: str, encoder, vectors: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> str:
    return write_vectors(url, vectors[ids], labels[ids], [f"train#{i}" for i in ids], ids=ids, encoder=encoder.name,
                         encoder_sha256=encoder.sha256)


def accuracy(memory, vectors: np.ndarray, labels: np.ndarray, k: int, rule: str) -> float:
    if not len(vectors):
        return float("nan")
    return float(np.mean(np.asarray(memory.classify(vectors, k, rule).decisions, dtype=object) == labels))


def class_addition(train, test, encoder, work: str, k: int, rule: str, old: list[str]) -> dict:
    """Build from the ``old`` classes, add the rest, and compare with a build from all of them."""
    (train_x, train_y), (test_x, test_y) = train, test
    is_old_train, is_old_test = np.isin(train_y, old), np.isin(test_y, old)
    build_memory(write_split(f"{work}/old", encoder, train_x, train_y, np.flatnonzero(is_old_train)),
                 f"{work}/mem", shards=2)
    memory = VisualMemory.open(f"{work}/mem")
    before = accuracy(memory, test_x[is_old_test], test_y[is_old_test], k, rule)
    start = time.perf_counter()
    version, added = memory.add_embeddings(write_split(f"{work}/new", encoder, train_x, train_y,
                                                       np.flatnonzero(~is_old_train)), reason="add the new classes")
    add_seconds = time.perf_counter() - start
    after_old = accuracy(memory, test_x[is_old_test], test_y[is_old_test], k, rule)
    new = accuracy(memory, test_x[~is_old_test], test_y[~is_old_test], k, rule)
    every = accuracy(memory, test_x, test_y, k, rule)
    build_memory(write_split(f"{work}/all", encoder, train_x, train_y, np.arange(len(train_x))),
                 f"{work}/whole", shards=2)
    whole = VisualMemory.open(f"{work}/whole")
    same = exact_same_answers(memory, whole, test_x[:2000], k)
    return {"old_classes": old, "memory_before": int(is_old_train.sum()), "added": int(len(added)),
            "add_seconds": round(add_seconds, 2), "version": version,
            "old_classes_accuracy_before": round(before, 4), "old_classes_accuracy_after": round(after_old, 4),
            "old_classes_change_points": round(100 * (after_old - before), 2),
            "new_classes_accuracy": round(new, 4), "all_classes_accuracy": round(every, 4),
            "whole_build_accuracy": round(accuracy(whole, test_x, test_y, k, rule), 4),
            "answers_equal_a_build_of_all_classes": same}


def exact_same_answers(a, b, queries: np.ndarray, k: int) -> bool:
    """Whether two memories give the same neighbours (by URI: ids differ between them) and scores."""
    fa, fb = a.search(queries, k), b.search(queries, k)
    return bool((fa.uris == fb.uris).all() and np.allclose(fa.similarities, fb.similarities, atol=1e-5))


def pruning(train, test, encoder, work: str, k: int, rule: str, thresholds: list[int]) -> dict:
    """Test accuracy of the whole memory, and after hard pruning (each threshold) and soft pruning."""
    (train_x, train_y), (test_x, test_y) = train, test
    url = write_split(f"{work}/prune-all", encoder, train_x, train_y, np.arange(len(train_x)))
    runs = []
    for mode, threshold in [("soft", 1)] + [("hard", t) for t in thresholds]:
        memory_url = f"{work}/prune-{mode}-{threshold}"
        build_memory(url, memory_url, shards=2)
        memory = VisualMemory.open(memory_url)
        before = accuracy(memory, test_x, test_y, k, rule)
        start = time.perf_counter()
        _, summary = memory.prune(None, None, threshold=threshold, mode=mode, k=k, reason=f"{mode} pruning")
        after = accuracy(memory, test_x, test_y, k, rule)
        runs.append({"mode": mode, "threshold": threshold, "accuracy_before": round(before, 4),
                     "accuracy_after": round(after, 4), "change_points": round(100 * (after - before), 2),
                     "seconds": round(time.perf_counter() - start, 1), **{key: value for key, value in summary.items()
                                                                          if key not in ("mode", "threshold", "k")}})
        log.info("%s", runs[-1])
    return {"memory": int(len(train_x)), "runs": runs}


def run(cifar: str, encoder_spec: str, k: int, rule: str, thresholds: list[int], figures: list[str],
        limit: int | None = None) -> dict:
    encoder = Encoder.load(encoder_spec)
    train = embed_split(f"{cifar}/train.parquet", encoder, limit)
    test = embed_split(f"{cifar}/test.parquet", encoder, limit)
    classes = sorted(set(train[1]))
    out = {"encoder": encoder_spec, "k": k, "rule": rule, "memory_images": len(train[0]),
           "query_images": len(test[0]), "classes": classes}
    with tempfile.TemporaryDirectory(prefix="vismem-editing-") as work:
        if "add" in figures:
            out["class_addition"] = class_addition(train, test, encoder, work, k, rule, classes[:len(classes) // 2])
            log.info("%s", out["class_addition"])
        if "prune" in figures:
            out["pruning"] = pruning(train, test, encoder, work, k, rule, thresholds)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.editing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default="../shared/data/cifar10", help="folder with train.parquet and test.parquet")
    p.add_argument("--encoder", default="raw-pixels:32", help="encoder URL, random-init:PRESET or raw-pixels:SIZE")
    p.add_argument("-k", "--k", type=int, default=10, help="neighbours per query")
    p.add_argument("--rule", default="softmax", help="voting rule")
    p.add_argument("--thresholds", default="1,2,4", help="hard-pruning thresholds to try")
    p.add_argument("--figures", default="add,prune", help="which figures: add, prune")
    p.add_argument("--limit", type=int, default=None, help="at most this many train and test images (quick runs)")
    p.add_argument("--out", default=None, help="write the figures to this JSON file too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    result = run(args.cifar, args.encoder, args.k, args.rule, [int(t) for t in args.thresholds.split(",")],
                 args.figures.split(","), args.limit)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
