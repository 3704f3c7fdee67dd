"""kNN classification: the quality bar of an encoder, as the source papers measure it.

``knn_accuracy`` scores the four voting rules at one k (the demo's table). ``knn_sweep`` is the
papers' protocol: softmax-weighted votes (T = 0.07) for every k of a sweep from one exact search
at the largest k, reporting the best. ``embed_labelled`` embeds a labelled collection in any
format ``index.ingest.collections`` reads (folder tree or Parquet, local or object storage).

The exact search is ``index.exact``'s (FAISS's where FAISS is installed, else the same search in
torch), so the evaluation runs on machines that have torch alone.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from eval.readable import readable_images
from eval.sweeps import K_SWEEP
from index.exact import exact_search
from index.ingest.collections import list_partitions
from index.voting import RULES, neighbour_weights, vote

log = logging.getLogger("vismem.eval.knn")


def knn_accuracy(memory: np.ndarray, memory_labels, queries: np.ndarray, query_labels, k: int = 10,
                 rules=RULES) -> dict[str, float]:
    """Top-1 accuracy per voting rule, with an exact inner-product (cosine) search."""
    sims, ids = exact_search(memory, queries, k)
    memory_labels = np.asarray(memory_labels, dtype=object)
    truth = np.asarray(query_labels, dtype=object)
    out = {}
    for rule in rules:
        decisions = np.asarray(vote(memory_labels[ids], sims, rule, ids=ids).decisions, dtype=object)
        out[rule] = float(np.mean(decisions == truth))
    return out


def knn_sweep(memory: np.ndarray, memory_labels: Sequence, queries: np.ndarray, query_labels: Sequence,
              ks: Sequence[int] = K_SWEEP, temperature: float = 0.07) -> dict:
    """Softmax-weighted kNN top-1 for every k in ``ks``: ``{"top1", "best_k", "by_k"}``.

    The votes are ``index.voting``'s softmax rule, vectorised over queries (ties go to the class
    listed first in sorted order rather than the one seen first; with real-valued weights ties
    do not occur in practice). ks larger than the memory are dropped.
    """
    ks = sorted({int(k) for k in ks if 0 < int(k) <= len(memory)})
    if not ks:
        raise ValueError(f"no k in the sweep fits a memory of {len(memory)} vectors")
    if len(memory_labels) != len(memory) or len(query_labels) != len(queries):
        raise ValueError("every memory vector and every query needs exactly one label")
    classes, codes = np.unique(np.asarray(memory_labels, dtype=str), return_inverse=True)
    truth = np.asarray(query_labels, dtype=str)
    sims, ids = exact_search(memory, queries, ks[-1])
    weights = neighbour_weights(sims, "softmax", temperature)
    neighbour_class = codes[ids]
    rows = np.arange(len(queries))[:, None]
    by_k = {}
    for k in ks:
        scores = np.zeros((len(queries), len(classes)))
        np.add.at(scores, (np.broadcast_to(rows, (len(queries), k)), neighbour_class[:, :k]), weights[:, :k])
        by_k[k] = float(np.mean(classes[scores.argmax(1)] == truth))
    best_k = max(by_k, key=lambda k: (by_k[k], -k))
    return {"top1": by_k[best_k], "best_k": best_k, "by_k": by_k}


def embed_labelled(url: str, encoder, batch_size: int = 512, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """Embeddings and labels of every readable image of the collection at ``url``.

    Unreadable images are skipped and logged; an image without a label is an error, since a kNN
    evaluation needs every label.
    """

    parts = list_partitions(url, batch_size)
    vectors, labels = [], []
    with tqdm(total=sum(len(p) for p in parts), desc=f"embed {url}", unit="img", disable=not progress) as bar:
        for part, items in readable_images(url, parts):
            for uri, label, _ in items:
                if label is None:
                    raise ValueError(f"{uri} has no label: kNN evaluation needs a labelled collection "
                                     "(ROOT/<label>/<image> or a Parquet 'label' column)")
                labels.append(label)
            if items:
                vectors.append(encoder.embed([image for _, _, image in items], batch_size=batch_size))
            bar.update(len(part))
    return np.concatenate(vectors), labels
