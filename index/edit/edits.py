"""Edits of a memory (add, remove, rollback), each committed as a new version (compact and prune,
in index.edit.maintenance and index.edit.prune, commit through ``Snapshot.commit`` too).

An edit starts from a version's snapshot (``index.snapshot``), builds new shard objects beside the
current ones (an added segment, a larger deletion set), saves only what is new, and commits the
next version (``Snapshot.commit``, through ``index.store.commit.transaction``); it returns the next
snapshot, which the caller (``VisualMemory``) answers from, so its next query sees the edit and a
failed edit changes nothing. A remove writes one small deletion file per touched shard and never
reads or rewrites an index, so its cost does not grow with the memory. Vectors are removed from the
files themselves only by ``compact`` and ``vacuum``.
"""

from __future__ import annotations

import numpy as np

from index.ingest.embeddings import read_memory_embeddings
from index.queries import check_vectors
from index.shard.placement import Placement, encode, owners
from index.shard.state import metadata_table
from index.snapshot import Snapshot


def add(snapshot: Snapshot, vectors, labels, uris, source_ids=None, reason: str | None = None,
        ) -> tuple[Snapshot, np.ndarray]:
    """Give ``vectors`` new ids from ``next_id``, encode them with the memory's trained index into a
    new segment of each shard they go to (``index.shard.placement``), and commit. ``uris`` may be None
    (vectors with no image behind them). Returns (the next snapshot, ids)."""
    m = snapshot.manifest
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
    trained = snapshot.trained_index()
    shards = list(snapshot.shards)
    for s, (rows, lists) in enumerate(Placement.of(m).split(trained, vectors, ids)):
        if not len(rows):
            continue
        index = encode(trained, vectors[rows], ids[rows], lists)
        shards[s] = shards[s].with_segment(index, metadata_table(
            ids[rows], uris[rows], labels[rows], None if source_ids is None else source_ids[rows]),
            shards[s].tier_rows(vectors[rows]))
    after = snapshot.commit(shards, next_id=m.next_id + n, operation="add", counts={"added": n}, reason=reason)
    return after, ids


def add_embeddings(snapshot: Snapshot, url: str, reason: str | None = None) -> tuple[Snapshot, np.ndarray]:
    """Add the output of ``vismem embed`` at ``url``, which must come from the memory's encoder;
    each vector's collection id is kept as its ``source_id``. Returns (the next snapshot, ids)."""
    table, vectors = read_memory_embeddings(snapshot.manifest, snapshot.url, url)
    if len(vectors) == 0:
        raise ValueError(f"no vectors under {url}: nothing to add")
    return add(snapshot, vectors, table.column("label").to_pylist(), table.column("uri").to_pylist(),
               table.column("id").to_numpy(), reason)


def remove(snapshot: Snapshot, ids=None, uris=None, labels=None, reason: str | None = None,
           ) -> tuple[Snapshot, np.ndarray]:
    """Remove the live vectors named by ``ids``, ``uris`` and/or ``labels`` (all of them must name
    something in the memory, else nothing is written) and commit. Returns (the next snapshot,
    removed ids)."""
    if ids is None and uris is None and labels is None:
        raise ValueError("name what to remove: ids, uris or labels")
    found = [np.zeros(0, dtype=np.int64)]
    if ids is not None:
        ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        unknown = ids[~snapshot.live(ids)]
        if len(unknown):
            raise ValueError(f"{describe(unknown.tolist())} not in memory {snapshot.url} (version "
                             f"{snapshot.version}); nothing was removed")
        found.append(ids)
    for column, wanted in (("uri", uris), ("label", labels)):
        if wanted is None:
            continue
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        matched, seen = snapshot.matching(column, set(wanted))
        missing = [w for w in dict.fromkeys(wanted) if w not in seen]
        if missing:
            raise ValueError(f"{column}s {describe(missing)} not in memory {snapshot.url} (version "
                             f"{snapshot.version}); nothing was removed")
        found.append(matched)
    removed = np.unique(np.concatenate(found))
    if not len(removed):
        raise ValueError(f"nothing to remove from memory {snapshot.url}: no ids, uris or labels were given")
    return remove_live(snapshot, removed, "remove", {"removed": len(removed)}, reason), removed


def remove_live(snapshot: Snapshot, removed: np.ndarray, operation: str, counts: dict,
                reason: str | None = None) -> Snapshot:
    """Add ``removed`` (live ids, unique) to their shards' deletion sets and commit: the one exact
    remove path, for ``remove`` and hard pruning. Returns the next snapshot."""
    shards = list(snapshot.shards)
    owner = owners(shards, removed)
    for s in np.unique(owner[owner >= 0]):
        shards[s] = shards[s].without(removed[owner == s])
    return snapshot.commit(shards, operation=operation, counts=counts, reason=reason)


def rollback(snapshot: Snapshot, version: int, reason: str | None = None) -> Snapshot:
    """Commit a new version whose content (shards, trained index, encoder, search defaults) is
    version ``version``'s. Ids are never handed out twice, so ``next_id`` does not go back. The
    target's files are all stored already: the commit writes only the manifest."""
    if version == snapshot.version:
        raise ValueError(f"version {version} is the current version of memory {snapshot.url}; nothing to roll back")
    target, shards = snapshot.load_version(version)
    return snapshot.commit(shards, content=target, next_id=max(snapshot.manifest.next_id, target.next_id),
                           operation="rollback", counts={"vectors": target.count}, target=version, reason=reason)


def describe(items: list, limit: int = 10) -> str:
    """``items`` for an error message: the first ``limit`` of them, and how many more."""
    shown = ", ".join(map(repr, items[:limit]))
    return f"[{shown}{f' and {len(items) - limit} more' if len(items) > limit else ''}]"
