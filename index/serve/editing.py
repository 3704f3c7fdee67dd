"""Edits of a served memory, applied live: the shard replicas that own the vectors do the work.

An edit through the Router (``/v1/memory/add``, ``/v1/memory/remove``) runs under the Router's
edit lock, as one writer of the memory:

1. each shard that owns some of the edit's vectors (``index.shard.placement``: a new vector's shard
   is the owner of its IVF list, or ``id % shards``; a stored one's is the shard that holds it, which
   the Router asks the shards) stages its new state in one of its replicas
   (``ShardState.stage_add`` / ``stage_remove``) and writes only the new files (a segment, a
   deletion set) into the edit's folder, returning its manifest entry;
2. the Router commits the next version with those entries (``index.store.commit.transaction``, the
   commit entry point the build and every in-process edit use too: the exclusive create
   of ``v<N+1>/manifest.json``; a writer elsewhere that got there first is a conflict, after which
   the Router adopts the newer version and tries once more);
3. the Router answers from the new version from then on and tells each shard to follow it.

Every search carries the version the Router answers from, and a replica that holds an older one
follows before it searches: the staged shard when its entry is the committed one, else the
version read from storage with every part it already holds reused. So once an edit is
acknowledged, no query that starts later is answered from before it, on any replica, and the
only cost of a remove is its deletion file and a manifest.
"""

from __future__ import annotations

import asyncio
import logging

import faiss
import numpy as np

from index.shard.faiss_io import load_trained
from index.shard.placement import Placement, encode
from index.shard.state import Shard, metadata_table
from index.store import commit
from index.store.manifest import Manifest, next_manifest, read_manifest

log = logging.getLogger("vismem.index.serve")
WATCH_S = 1.0                # how often a served memory checks its storage for versions written elsewhere (the
                             # promise is 2 s: one period plus the shards' follow)


class ShardState:
    """The editable state of one shard replica (mixed into ``ShardSearcher``): the shard it
    answers from, the version that shard belongs to, and shards staged for edits not yet committed."""

    def open_shard(self, memory_url: str, version: int, number: int, nprobe: int | None, mmap: bool = False) -> None:
        """Load shard ``number`` of ``version``; ``mmap``: map its IVF lists from the local disk
        (``Shard.load``), this version's and every later one's."""
        self.memory_url, self.number, self.nprobe, self.mmap = memory_url, number, nprobe, mmap
        manifest = read_manifest(memory_url, version)
        self.version, self.trained, self.placement = manifest.version, None, Placement.of(manifest)
        self.shard = Shard.load(memory_url, manifest.shards[number], number, manifest.search_defaults(nprobe),
                                mmap=mmap)
        self.staged: dict[int, tuple[Shard, object]] = {}

    async def health(self) -> int:
        """The version this shard answers from (the Router's /healthz asks every shard)."""
        return self.version

    async def follow(self, version: int) -> int:
        """Answer from ``version`` from now on if it is newer than the one held; returns the version
        held. Async like every method that touches the shard, so that they run one at a time on the
        replica's event loop, between searches, never in a thread beside one."""
        if version <= self.version:
            return self.version
        manifest = read_manifest(self.memory_url, version)
        entry = manifest.shards[self.number]
        staged, staged_entry = self.staged.pop(version, (None, None))
        if staged is not None and staged_entry == entry:
            self.shard = staged
        else:
            loaded = {p.stored.index: p for p in self.shard.parts if p.stored is not None}
            self.shard = Shard.load(self.memory_url, entry, self.number, manifest.search_defaults(self.nprobe), loaded,
                                    mmap=self.mmap)
        self.staged = {v: s for v, s in self.staged.items() if v > version}
        self.version, self.placement = version, Placement.of(manifest)
        return version

    async def resolve(self, version: int, ids: list[int], uris: list[str], labels: list[str]) -> dict:
        """At ``version``: which of ``ids`` are live in this shard, and the live ids
        whose URI or label is one of ``uris`` / ``labels`` (with the URIs and labels seen)."""
        await self.follow(version)
        ids = np.asarray(ids, dtype=np.int64)
        live = ids[self.shard.live(ids)] if len(ids) else ids
        by_uri, seen_uris = self.shard.matching("uri", set(uris))
        by_label, seen_labels = self.shard.matching("label", set(labels))
        return {"live": live.tolist(), "matched": np.unique(np.concatenate([live, by_uri, by_label])).tolist(),
                "uris": sorted(seen_uris), "labels": sorted(seen_labels)}

    async def uri_of(self, version: int, item_id: int) -> str | None:
        """At ``version``: the URI of item ``item_id`` if it is live in this shard and has one, else None."""
        await self.follow(version)
        ids = np.asarray([item_id], dtype=np.int64)
        if not self.shard.live(ids).all():
            return None
        return self.shard.describe(ids)[0][0]

    async def stage_remove(self, version: int, folder: str, ids: list[int]):
        """Stage this shard without ``ids`` (ids it owns) for ``version`` and write its new deletion
        set; ``{"unknown": [...]}`` instead, writing nothing, when some of them are not live here."""
        await self.follow(version - 1)
        ids = np.asarray(ids, dtype=np.int64)
        unknown = ids[~self.shard.live(ids)]
        if len(unknown):
            return {"unknown": unknown.tolist()}
        return self.stage(version, folder, self.shard.without(ids))

    async def stage_add(self, version: int, folder: str, vectors: np.ndarray, ids: np.ndarray, uris: list,
                        labels: list):
        """Stage this shard plus a segment holding those of ``vectors`` it owns (``index.shard.placement``;
        encoded with the memory's trained index, no training) for ``version`` and write the segment;
        None, writing nothing, when it owns none of them."""
        await self.follow(version - 1)
        trained = self.trained_index()
        vectors, ids = np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64)
        mine, lists = self.placement.split(trained, vectors, ids)[self.number]
        if not len(mine):
            return None
        index = encode(trained, vectors[mine], ids[mine], lists)
        metadata = metadata_table(ids[mine], [uris[i] for i in mine], [labels[i] for i in mine])
        tier = self.shard.tier_rows(vectors[mine])                  # a two-tier shard's re-rank rows, else None
        return self.stage(version, folder, self.shard.with_segment(index, metadata, tier))

    def stage(self, version: int, folder: str, shard: Shard):
        fs, root = commit.filesystem(self.memory_url)
        entry = shard.save(fs, root, folder)
        self.staged[version] = (shard, entry)
        return entry

    def trained_index(self) -> faiss.Index:
        """The memory's trained empty index, read once (it is the same for every version)."""
        if self.trained is None:
            self.trained = load_trained(self.memory_url, read_manifest(self.memory_url, self.version))
        return self.trained


class EditConflict(Exception):
    """The memory moved on under this server twice in a row."""


async def commit_edit(router, stage, operation: str, reason: str | None) -> Manifest:
    """Stage on the shards (``await stage(manifest, version, folder)`` → ({shard number: entry},
    manifest changes such as ``counts`` and ``next_id``)), commit the next version (one
    ``commit.transaction``: the pointer moves as it ends), switch the Router to it and tell every
    shard. On a conflict (another writer committed that version) the Router adopts the memory's
    current version and stages again, once."""
    async with router.edit_lock:
        for attempt in range(2):
            m = router.manifest
            version = m.version + 1
            try:
                with commit.transaction(router.memory_url, version) as txn:
                    entries, changes = await stage(m, version, txn.folder)
                    txn.manifest = next_manifest(m, [entries.get(n, entry) for n, entry in enumerate(m.shards)],
                                                 operation=operation, reason=reason, **changes)
            except commit.MemoryConflict:
                if attempt:
                    raise EditConflict(f"memory {router.memory_url} was edited elsewhere twice while this edit ran; "
                                       "retry it") from None
                await follow_storage(router)
                continue
            new = router.manifest = txn.manifest
            # not awaited: every later query carries the version and its replicas follow first anyway;
            # telling them now only spares the first such query the manifest read
            router.following = asyncio.create_task(tell_shards(router, version))
            return new


async def follow_storage(router) -> None:
    """Answer from the memory's current version on storage (written by another writer); the shards
    follow with the next query, which carries it."""
    fs, root = commit.filesystem(router.memory_url)
    current = commit.current_version(fs, root)
    if current is not None and current > router.manifest.version:
        log.info("memory %s moved to version %d elsewhere; following it", router.memory_url, current)
        router.manifest = read_manifest(router.memory_url, current)


async def watch_storage(router, every_s: float = WATCH_S) -> None:
    """Adopt versions committed by other writers (the CLI, another process) within ``every_s``:
    a pointer read and one existence check per period, under the edit lock."""
    while True:
        await asyncio.sleep(every_s)
        try:
            async with router.edit_lock:
                await follow_storage(router)
        except Exception as e:  # noqa: BLE001 (a storage hiccup must not end the watch)
            log.warning("could not check %s for newer versions: %r", router.memory_url, e)


async def tell_shards(router, version: int) -> None:
    """Ask every shard to follow ``version`` now (one replica each; the others follow on their next
    query, which carries it). A shard that cannot is logged: its queries will say so."""
    results = await asyncio.gather(*(h.follow.remote(version) for h in router.shards), return_exceptions=True)
    for n, r in enumerate(results):
        if isinstance(r, BaseException):
            log.warning("shard %d did not follow version %d: %r", n, version, r)
