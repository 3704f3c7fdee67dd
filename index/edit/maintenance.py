"""Keeping a memory's storage small and its removals physical: ``compact`` and ``vacuum``.

A remove only adds ids to a deletion set (fast, exact at search time), so the removed vectors stay
in the index files of every version, and old versions stay on storage for ``rollback``. Unlearning
is complete only after the remove and both steps, which ``VisualMemory.purge`` runs in order:

- ``compact`` commits a version whose touched shards are each one base index of exactly their live
  vectors (codes copied, never re-encoded, so answers do not change); untouched shards are
  referenced, not rewritten.
- ``vacuum`` deletes the manifests of versions not kept, then every file in the memory's version
  folders that no kept version references.

Both take a version's snapshot (``index.snapshot``); ``compact`` returns the next one.

Why a grace period: a writer in flight, based on the current version N, is writing files under
``v<N+1>/<token>/`` that no manifest references *yet*; deleting them would make its commit
reference missing files. So an unreferenced file in a folder above the current version (and a
stale temporary pointer) is deleted only once it is older than ``grace_s`` (15 minutes by default,
far longer than an edit takes; files whose age the store does not report are kept). Unreferenced
files in folders up to the current version go at once: a writer of such a version can no longer
commit (``index.store.commit``), so they are leftovers of crashed or losing writers or of versions
vacuumed earlier. Not guarded: a ``rollback`` to a version that a vacuum running at the same
time deletes would commit references to deleted files; run vacuum when no one rolls back.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime

from fsspec.implementations.local import LocalFileSystem

from index.shard.state import Shard
from index.snapshot import Snapshot
from index.store import commit
from index.store.manifest import Manifest, list_versions

GRACE_S = 15 * 60.0
VERSION_FOLDER = re.compile(r"^v(\d+)/")


# compact ---------------------------------------------------------------------------------------
def needs_compaction(shard: Shard) -> bool:
    """Whether ``shard`` has delta segments or removed ids, which ``compact`` folds into one base."""
    return len(shard.parts) > 1 or len(shard.deleted) > 0


def compact(snapshot: Snapshot, reason: str | None = None) -> Snapshot:
    """Rewrite every shard that has segments or removed ids as one base index and commit; returns
    the next snapshot. ValueError (nothing written) when no shard has either."""
    todo = [i for i, s in enumerate(snapshot.shards) if needs_compaction(s)]
    if not todo:
        raise ValueError(f"nothing to compact in memory {snapshot.url} (version {snapshot.version}): "
                         "no shard has delta segments or removed vectors")
    shards = list(snapshot.shards)
    for i in todo:
        shards[i] = snapshot.shards[i].compacted()
    counts = {"shards": len(todo), "segments": sum(len(snapshot.shards[i].parts) - 1 for i in todo),
              "dropped": sum(len(snapshot.shards[i].deleted) for i in todo), "vectors": len(snapshot)}
    return snapshot.commit(shards, operation="compact", counts=counts, reason=reason)


# vacuum ----------------------------------------------------------------------------------------
def vacuum(snapshot: Snapshot, keep_last: int | None = None, older_than_s: float | None = None,
           dry_run: bool = False, grace_s: float = GRACE_S) -> dict:
    """Delete the versions not kept and every file no kept version references; writes no version.

    Kept: the current version (always), the newest ``keep_last`` versions, and versions younger
    than ``older_than_s`` seconds; a version is deleted only if no rule keeps it, and with neither
    rule every version is kept (only orphans go). ``dry_run`` reports without deleting. Returns
    ``{"deleted_versions", "deleted_files", "freed_bytes", "kept_versions", "kept_recent"}``
    (``kept_recent``: unreferenced files younger than ``grace_s``, left for a later vacuum).
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (the current version is always kept), got {keep_last}")
    if older_than_s is not None and older_than_s < 0:
        raise ValueError(f"older_than_s must not be negative, got {older_than_s}")
    fs, root = commit.filesystem(snapshot.url)
    current = commit.current_version(fs, root)
    manifests = read_manifests(fs, root, list_versions(snapshot.url))
    kept = kept_versions(manifests, {current, snapshot.version}, keep_last, older_than_s, time.time())
    dropped = sorted(set(manifests) - kept)
    referenced = {commit.manifest_path(v) for v in kept} | {f for v in kept for f in manifests[v].files()}
    doomed, recent = unreferenced(fs, root, referenced, current, grace_s)
    report = {"deleted_versions": dropped, "deleted_files": sorted(doomed), "freed_bytes": sum(doomed.values()),
              "kept_versions": sorted(kept), "kept_recent": sorted(recent), "dry_run": dry_run}
    if not dry_run and doomed:
        delete(fs, root, current, doomed, [commit.manifest_path(v) for v in dropped])
    return report


def read_manifests(fs, root: str, versions: list[int]) -> dict[int, Manifest]:
    paths = {v: f"{root}/{commit.manifest_path(v)}" for v in versions}
    blobs = fs.cat(list(paths.values())) if paths else {}
    return {v: Manifest.from_dict(json.loads(blobs[p]), p) for v, p in paths.items()}


def kept_versions(manifests: dict[int, Manifest], always: set, keep_last: int | None,
                  older_than_s: float | None, now: float) -> set[int]:
    """The versions vacuum keeps (see ``vacuum``)."""
    versions = sorted(manifests)
    if keep_last is None and older_than_s is None:
        return set(versions)
    kept = {v for v in always if v in manifests}
    if keep_last is not None:
        kept |= set(versions[-keep_last:])
    if older_than_s is not None:
        kept |= {v for v in versions if now - manifests[v].created < older_than_s}
    return kept


def unreferenced(fs, root: str, referenced: set, current: int, grace_s: float) -> tuple[dict, list]:
    """({relative path: size} of the files to delete, [young files kept]): files in version folders
    (and stale temporary pointers) that no kept version references, less those a writer may still
    commit (see the module's docstring). Other files under the root are not the memory's."""
    fs.invalidate_cache(root)
    now, doomed, recent = time.time(), {}, []
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root):].lstrip("/")
        folder = VERSION_FOLDER.match(rel)
        if not (folder or rel.startswith(f"{commit.POINTER}.tmp-")) or rel in referenced:
            continue
        settled = folder is not None and int(folder.group(1)) <= current
        when = modified(info)
        if settled or (when is not None and now - when >= grace_s):
            doomed[rel] = int(info.get("size") or 0)
        else:
            recent.append(rel)
    return doomed, recent


def modified(info: dict) -> float | None:
    """A listed file's last modification (seconds since the epoch), as local disks and S3 report it."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


def delete(fs, root: str, current: int, doomed: dict, manifests: list[str]) -> None:
    """Delete the ``doomed`` files: the deleted versions' manifests first, so a crash part-way
    leaves every version that still has a manifest whole (what is left are orphans for the next
    vacuum). The pointer is first made to name the current version: readers roll forward from
    it, and ``commit.staged`` then refuses writers based on a deleted version."""
    commit.move_pointer(fs, root, current)
    if commit.read_pointer(fs, root) != current:
        raise RuntimeError(f"vacuum of {root}: could not point the memory at its current version {current}; "
                           "nothing was deleted")
    first = [m for m in manifests if m in doomed]
    commit.delete(fs, [f"{root}/{p}" for p in first])
    commit.delete(fs, [f"{root}/{p}" for p in sorted(doomed) if p not in first])
    remove_empty_folders(fs, root, doomed)


def remove_empty_folders(fs, root: str, deleted: dict) -> None:
    """On a local disk, remove the folders the deletion left empty (object stores have none)."""
    if not isinstance(fs, LocalFileSystem):
        return
    folders = {p.rsplit("/", 1)[0] for p in deleted if "/" in p}
    folders |= {f.split("/", 1)[0] for f in folders}
    for folder in sorted(folders, key=lambda f: -f.count("/")):          # deepest first
        try:
            fs.rmdir(f"{root}/{folder}")
        except OSError:                                                  # not empty (or gone): leave it
            pass

