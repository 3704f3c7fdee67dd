"""The memory's manifest (docs/ARCHITECTURE.md §3, §4): what one version of the memory holds.

``ROOT/v<N>/manifest.json`` lists the encoder, dimension, metric, factory string, the trained
empty index, and the shards: each a base index, its delta segments and its deletion set, every
file with its count and sha256. It also records the operation that made the version (build, add,
remove, rollback, …), its counts, the user and an optional reason, so the chain of manifests is
the audit log. Paths are relative to ROOT, so a memory can be copied or moved between stores
whole. A version's files are never modified: an edit writes new files and references unchanged
ones. How a version is committed and found is ``index.store.commit``'s job.

Format ``vismem-memory/4`` (``tier``: a two-tier shard's re-rank vectors, ``index.shard.tiers``);
``vismem-memory/3`` (``placement``: which shard holds which vectors, ``index.shard.placement``);
``vismem-memory/2`` (placed by id) and ``vismem-memory/1`` manifests (no segments, no deletions, no
operation) are still read, and an edit writes its version in the current format. A newer format is refused, naming it, rather than half understood.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

from index.store.commit import (POINTER, commit, current_version, exists, filesystem, manifest_path, move_pointer,
                                version_dir)

FORMAT = "vismem-memory/4"
READABLE = ("vismem-memory/1", "vismem-memory/2", "vismem-memory/3", FORMAT)
__all__ = ["FORMAT", "POINTER", "Manifest", "Segment", "ShardEntry", "list_versions", "next_manifest", "read_manifest",
           "sha256", "version_dir", "write_manifest"]


@dataclass
class Segment:
    """A delta segment: vectors added after the base, encoded with the memory's trained index."""
    index: str                 # relative path of the FAISS index file
    metadata: str              # relative path of the metadata Parquet (id, uri, label, source_id)
    count: int
    sha256: str
    tier: str | None = None            # relative path of the .npy of re-rank vectors (two-tier format), id order
    tier_sha256: str | None = None


@dataclass
class ShardEntry:
    index: str                 # relative path of the base FAISS index file
    metadata: str              # relative path of the base metadata Parquet (id, uri, label, source_id)
    count: int                 # vectors the shard answers with: base + segments − deleted
    sha256: str
    segments: list[Segment] = field(default_factory=list)
    deleted: str | None = None          # relative path of the .npy of sorted int64 ids removed from the shard
    deleted_count: int = 0
    deleted_sha256: str | None = None
    base_count: int | None = None       # rows of the base files (= count in a vismem-memory/1 manifest)
    weights: str | None = None          # relative path of the .npy of (id, weight) vote weights (soft pruning)
    weights_count: int = 0
    weights_sha256: str | None = None
    tier: str | None = None             # relative path of the base's re-rank vectors (index.shard.tiers)
    tier_sha256: str | None = None

    def __post_init__(self):
        self.segments = [s if isinstance(s, Segment) else Segment(**s) for s in self.segments]
        if self.base_count is None:
            self.base_count = self.count

    def files(self) -> list[str]:
        """Every file of the shard, relative to the memory root."""
        parts = [p for s in self.segments for p in (s.index, s.metadata, s.tier) if p]
        return [self.index, self.metadata, *parts, *(p for p in (self.deleted, self.weights, self.tier) if p)]


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):                    # no passwd entry (some containers)
        return os.environ.get("USER", "unknown")


@dataclass
class Manifest:
    version: int
    encoder: dict              # {"name": url or spec, "sha256": ...}
    dim: int
    metric: str
    factory: str
    trained_index: str
    shards: list[ShardEntry]
    next_id: int               # the id the next vector to enter the memory gets
    search: dict = field(default_factory=dict)       # defaults every query gets: {"nprobe", "k_factor"}
    placement: dict | None = None        # {"by": "lists", "bounds": [...]}; None: by id (index.shard.placement)
    recall: dict | None = None                       # measured at build: {"k", "recall", "queries", ...}
    created: float = field(default_factory=time.time)
    parent: int | None = None
    operation: str = "build"   # what made this version: build, add, remove, rollback, compact, prune
    counts: dict = field(default_factory=dict)       # what it changed, e.g. {"added": 10} or {"removed": 3}
    user: str | None = field(default_factory=current_user)
    reason: str | None = None
    target: int | None = None  # the version a rollback restored
    format: str = FORMAT

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def files(self) -> set[str]:
        """Every file this version references (its manifest aside), relative to the memory root."""
        return {self.trained_index, *(f for s in self.shards for f in s.files())}

    def search_defaults(self, nprobe: int | None = None) -> dict:
        """The defaults every search of this version gets (``search``), with ``nprobe`` replacing
        the recorded one when given: what an opened memory or a served shard searches with."""
        return {**self.search, **({"nprobe": nprobe} if nprobe else {})}

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "Manifest":
        if data.get("format") not in READABLE:
            raise ValueError(f"{source} is a {data.get('format')!r} manifest, which this vismem cannot read or edit "
                             f"(it reads {', '.join(READABLE)}); upgrade vismem")
        data = dict(data)
        data.setdefault("user", None)                # a vismem-memory/1 manifest did not record who built it
        data["shards"] = [ShardEntry(**s) for s in data["shards"]]
        return cls(**data)


def next_manifest(m: Manifest, entries: list, content: Manifest | None = None, **changes) -> Manifest:
    """The manifest of the version after ``m`` with shard ``entries`` and ``changes`` (operation,
    counts, reason, next_id, ...): one home for what every edit records, in process and served.
    ``content`` is the manifest whose content (encoder, factory, trained index, search defaults,
    placement, recall) the new version holds instead of ``m``'s: a rollback's target."""
    base = m if content is None else content
    return replace(base, **{"version": m.version + 1, "shards": entries, "parent": m.version, "created": time.time(),
                            "user": current_user(), "format": FORMAT, "target": None, "reason": None, **changes})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(root_url: str, manifest: Manifest) -> None:
    """Commit ``v<N>/manifest.json`` (``index.store.commit.MemoryConflict`` if another writer did), then
    move the pointer to it."""
    fs, root = filesystem(root_url)
    commit(fs, root, manifest.version, manifest.to_json())
    move_pointer(fs, root, manifest.version)


def read_manifest(root_url: str, version: int | None = None) -> Manifest:
    """The current manifest of the memory at ``root_url`` (or version ``version``)."""
    fs, root = filesystem(root_url)
    if version is None:
        version = current_version(fs, root)
        if version is None:
            raise FileNotFoundError(f"no memory at {root_url}: {POINTER} not found (build one with `vismem index build`)")
    elif not exists(fs, f"{root}/{manifest_path(version)}"):
        raise FileNotFoundError(missing_version(root_url, version))
    rel = manifest_path(version)
    return Manifest.from_dict(json.loads(fs.cat_file(f"{root}/{rel}")), f"{root_url}/{rel}")


def missing_version(root_url: str, version: int) -> str:
    """Why version ``version`` cannot be read: versions are numbered without gaps, so one below the
    latest that is gone was deleted by ``vacuum``."""
    versions = list_versions(root_url)
    if versions and 1 <= version < versions[-1]:
        return f"version {version} of memory {root_url} was deleted by vacuum (versions: {versions})"
    return f"memory {root_url} has no version {version} (versions: {versions})"


def list_versions(root_url: str) -> list[int]:
    """Every committed version of the memory, oldest first."""
    fs, root = filesystem(root_url)
    if not fs.exists(root):
        return []
    fs.invalidate_cache(root)
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    numbers = sorted(int(n[1:]) for n in names if n.startswith("v") and n[1:].isdigit())
    return [n for n in numbers if exists(fs, f"{root}/{manifest_path(n)}")]
