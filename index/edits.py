"""Edits of a memory (add, remove, rollback), each committed as a new version (compact and prune,
in index.maintenance and index.prune, commit through ``commit_edit`` too).

An edit starts from the version its ``VisualMemory`` holds, builds new shard objects beside the
current ones (an added segment, a larger deletion set), saves only what is new, and commits the
next version (``index.commit``); only then does the in-process memory switch to the new shards,
so its next query sees the edit and a failed edit changes nothing. A remove writes one small
deletion file per touched shard and never reads or rewrites an index, so its cost does not grow
with the memory. Vectors are removed from the files themselves only by ``compact`` and ``vacuum``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import faiss
import numpy as np

from index import commit
from index.manifest import FORMAT, Manifest, current_user, read_manifest
from index.placement import Placement, encode, owners
from index.queries import check_vectors
from index.shards import Shard, deserialize, metadata_table

if TYPE_CHECKING:
    from index.memory import VisualMemory


def add(memory: "VisualMemory", vectors, labels, uris, source_ids=None, reason: str | None = None,
        ) -> tuple[int, np.ndarray]:
    """Give ``vectors`` new ids from ``next_id``, encode them with the memory's trained index into a
    new segment of each shard they go to (``index.placement``), and commit. ``uris`` may be None (vectors
    with no image behind them). Returns (version, ids)."""
    m = memory.manifest
    vectors = check_vectors(vectors, m.dim, "added vectors")
    n = len(vectors)
    uris = [None] * n if uris is None else uris
    columns = {"labels": labels, "uris": uris, **({"source_ids": source_ids} if source_ids is not None else {})}
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"{n} vectors to add but {len(values)} {name}; give one per vector")
    labels, uris = np.asarray(list(labels), dtype=object), np.asarray(list(uris), dtype=object)
    source_ids = None if source_ids is None else np.asarray(source_ids, dtype=np.int64)
    ids = np.arange(m.next_id, m.next_id + n, dtype=np.int64)
    trained = memory.trained_index()
    shards = list(memory.shards)
    for s, (rows, lists) in enumerate(Placement.of(m).split(trained, vectors, ids)):
        if not len(rows):
            continue
        index = encode(trained, vectors[rows], ids[rows], lists)
        shards[s] = shards[s].with_segment(index, metadata_table(
            ids[rows], uris[rows], labels[rows], None if source_ids is None else source_ids[rows]))
    version = commit_edit(memory, shards, next_id=m.next_id + n, operation="add", counts={"added": n}, reason=reason)
    return version, ids


def remove(memory: "VisualMemory", ids=None, uris=None, labels=None, reason: str | None = None,
           ) -> tuple[int, np.ndarray]:
    """Remove the live vectors named by ``ids``, ``uris`` and/or ``labels`` (all of them must name
    something in the memory, else nothing is written) and commit. Returns (version, removed ids)."""
    if ids is None and uris is None and labels is None:
        raise ValueError("name what to remove: ids, uris or labels")
    found = [np.zeros(0, dtype=np.int64)]
    if ids is not None:
        ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        unknown = ids[~memory.live(ids)]
        if len(unknown):
            raise ValueError(f"{describe(unknown.tolist())} not in memory {memory.url} (version "
                             f"{memory.manifest.version}); nothing was removed")
        found.append(ids)
    for column, wanted in (("uri", uris), ("label", labels)):
        if wanted is None:
            continue
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        matched, seen = matching(memory, column, set(wanted))
        missing = [w for w in dict.fromkeys(wanted) if w not in seen]
        if missing:
            raise ValueError(f"{column}s {describe(missing)} not in memory {memory.url} (version "
                             f"{memory.manifest.version}); nothing was removed")
        found.append(matched)
    removed = np.unique(np.concatenate(found))
    if not len(removed):
        raise ValueError(f"nothing to remove from memory {memory.url}: no ids, uris or labels were given")
    return remove_live(memory, removed, "remove", {"removed": len(removed)}, reason), removed


def remove_live(memory: "VisualMemory", removed: np.ndarray, operation: str, counts: dict,
                reason: str | None = None) -> int:
    """Add ``removed`` (live ids, unique) to their shards' deletion sets and commit: the one exact
    remove path, for ``remove`` and hard pruning. Returns the new version."""
    shards = list(memory.shards)
    owner = owners(shards, removed)
    for s in np.unique(owner[owner >= 0]):
        shards[s] = shards[s].without(removed[owner == s])
    return commit_edit(memory, shards, operation=operation, counts=counts, reason=reason)


def rollback(memory: "VisualMemory", version: int, reason: str | None = None) -> int:
    """Commit a new version whose content (shards, trained index, encoder, search defaults) is
    version ``version``'s. Ids are never handed out twice, so ``next_id`` does not go back."""
    if version == memory.manifest.version:
        raise ValueError(f"version {version} is the current version of memory {memory.url}; nothing to roll back")
    target = read_manifest(memory.url, version)
    loaded = {p.stored.index: p for s in memory.shards for p in s.parts if p.stored is not None}
    search = target.search_defaults(memory.nprobe)
    shards = [Shard.load(memory.url, e, i, search, loaded, mmap=memory.mmap) for i, e in enumerate(target.shards)]
    m = memory.manifest
    new = replace(target, version=m.version + 1, parent=m.version, next_id=max(m.next_id, target.next_id),
                  operation="rollback", counts={"vectors": target.count}, target=version, reason=reason,
                  user=current_user(), created=time.time(), format=FORMAT)
    fs, root = commit.filesystem(memory.url)
    with commit.staged(fs, root, new.version):
        commit.commit(fs, root, new.version, new.to_json())
    memory.switch(new, shards)
    commit.move_pointer(fs, root, new.version)
    return new.version


def commit_edit(memory: "VisualMemory", shards: list[Shard], **changes) -> int:
    """Save ``shards``' new files, commit the next version with ``changes``, then switch the
    in-process memory to it and move the pointer. Returns the new version."""
    m = memory.manifest
    fs, root = commit.filesystem(memory.url)
    version = m.version + 1
    with commit.staged(fs, root, version) as folder:
        new = next_manifest(m, [s.save(fs, root, folder) for s in shards], **changes)
        commit.commit(fs, root, version, new.to_json())
    memory.switch(new, shards)
    commit.move_pointer(fs, root, version)
    return version


def next_manifest(m: Manifest, entries: list, **changes) -> Manifest:
    """The manifest of the version after ``m`` with shard ``entries`` and ``changes`` (operation,
    counts, reason, next_id, ...): one home for what every edit records, in process and served."""
    return replace(m, **{"version": m.version + 1, "shards": entries, "parent": m.version, "created": time.time(),
                         "user": current_user(), "format": FORMAT, "target": None, "reason": None, **changes})


def matching(memory: "VisualMemory", column: str, wanted: set) -> tuple[np.ndarray, set]:
    """Live ids whose ``column`` (uri or label) is in ``wanted``, and which of ``wanted`` occur."""
    found = [shard.matching(column, wanted) for shard in memory.shards]
    return np.concatenate([ids for ids, _ in found]), set().union(*(seen for _, seen in found))


def describe(items: list, limit: int = 10) -> str:
    """``items`` for an error message: the first ``limit`` of them, and how many more."""
    shown = ", ".join(map(repr, items[:limit]))
    return f"[{shown}{f' and {len(items) - limit} more' if len(items) > limit else ''}]"


def check_embeddings_encoder(manifest: Manifest, memory_url: str, encoder: dict, dim: int, source: str) -> None:
    """Added embeddings must come from the memory's encoder and have its dimension: similarities
    between two encoders' vectors mean nothing."""
    if encoder.get("sha256") != manifest.encoder.get("sha256") or dim != manifest.dim:
        raise ValueError(f"memory {memory_url} holds vectors of encoder {manifest.encoder.get('name')} "
                         f"(sha256 {str(manifest.encoder.get('sha256'))[:12]}, {manifest.dim}-d); {source} holds "
                         f"vectors of encoder {encoder.get('name')} (sha256 {str(encoder.get('sha256'))[:12]}, "
                         f"{dim}-d); embed the images with the memory's encoder")


def load_trained(memory_url: str, manifest: Manifest) -> faiss.Index:
    fs, root = commit.filesystem(memory_url)
    return deserialize(fs.cat_file(f"{root}/{manifest.trained_index}"))
