"""A memory's history, read from its chain of manifests: the audit log and what changed between
two versions. Every version's manifest records the operation that made it, its counts, the user
and the reason, so the log needs nothing besides the manifests."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
from index.shard.columns import read_table
from index.shard.state import live_mask, read_ids
from index.store import commit
from index.store.manifest import Manifest, list_versions, read_manifest


def log(memory_url: str) -> list[dict]:
    """One record per committed version, oldest first: version, time (UTC, ISO 8601), operation,
    counts, user, reason (and the restored version, for a rollback)."""
    fs, root = commit.filesystem(memory_url)
    versions = list_versions(memory_url)
    paths = [f"{root}/{commit.manifest_path(v)}" for v in versions]
    blobs = fs.cat(paths) if paths else {}
    records = []
    for version, path in zip(versions, paths):
        m = Manifest.from_dict(json.loads(blobs[path]), path)
        record = {"version": m.version, "time": datetime.fromtimestamp(m.created, timezone.utc).isoformat(),
                  "operation": m.operation, "counts": m.counts, "user": m.user, "reason": m.reason}
        if m.target is not None:
            record["target"] = m.target
        records.append(record)
    return records


def live_ids(memory_url: str, manifest: Manifest) -> np.ndarray:
    """The sorted ids version ``manifest`` answers with, read from its metadata and deletion files
    (no index is loaded)."""
    fs, root = commit.filesystem(memory_url)
    out = []
    for entry in manifest.shards:
        paths = [f"{root}/{p}" for p in [entry.metadata, *(s.metadata for s in entry.segments)]]
        blobs = fs.cat(paths + ([f"{root}/{entry.deleted}"] if entry.deleted else []))
        ids = np.concatenate([read_table(p, blobs[p], ["id"]).column("id").to_numpy() for p in paths])
        if entry.deleted:
            ids = ids[live_mask(ids, read_ids(blobs[f"{root}/{entry.deleted}"]))]
        out.append(ids)
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def diff(memory_url: str, a: int, b: int) -> dict:
    """``{"added": ids in b not in a, "removed": ids in a not in b}`` (sorted int64 arrays).

    Ids name the same vector in every version between two builds; a build numbers its vectors
    afresh, so versions on either side of one are refused rather than compared by number."""
    old, new = read_manifest(memory_url, a), read_manifest(memory_url, b)
    lo, hi = sorted((a, b))
    for v in [v for v in list_versions(memory_url) if lo < v <= hi]:
        if read_manifest(memory_url, v).operation == "build":
            raise ValueError(f"versions {a} and {b} of {memory_url} lie on either side of the build of version {v}: "
                             "a build numbers its vectors afresh, so their ids do not name the same vectors")
    before, after = live_ids(memory_url, old), live_ids(memory_url, new)
    return {"added": np.setdiff1d(after, before), "removed": np.setdiff1d(before, after)}
