"""The memory's manifest: ``ROOT/manifest.json`` points to ``ROOT/v<N>/manifest.json``.

Each version lists the encoder, dimension, metric, factory string, the trained empty index and
the shards. Paths inside a manifest are relative to ROOT, so a memory can be copied or moved
between stores whole. Files are written first and the pointer last, so readers see one version
whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import fsspec

from procdata.storage import write_atomic

POINTER = "manifest.json"
FORMAT = "vismem-memory/1"


@dataclass
class ShardEntry:
    index: str                 # relative path of the FAISS index file
    metadata: str              # relative path of the metadata Parquet (id, uri, label)
    count: int
    sha256: str


@dataclass
class Manifest:
    version: int
    encoder: dict              # {"name": url or spec, "sha256": ...}
    dim: int
    metric: str
    factory: str
    trained_index: str
    shards: list[ShardEntry]
    next_id: int
    search: dict = field(default_factory=dict)       # defaults every query gets: {"nprobe", "k_factor"}
    recall: dict | None = None                       # measured at build: {"k", "recall", "queries", ...}
    created: float = field(default_factory=time.time)
    parent: int | None = None
    format: str = FORMAT

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def search_defaults(self, nprobe: int | None = None) -> dict:
        """The defaults every search of this version gets (``search``), with ``nprobe`` replacing
        the recorded one when given: what an opened memory or a served shard searches with."""
        return {**self.search, **({"nprobe": nprobe} if nprobe else {})}

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "Manifest":
        if data.get("format") != FORMAT:
            raise ValueError(f"{source} is not a {FORMAT} manifest (field 'format' is {data.get('format')!r})")
        data = dict(data)
        data["shards"] = [ShardEntry(**s) for s in data["shards"]]
        return cls(**data)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_dir(version: int) -> str:
    return f"v{version}"


def write_manifest(root_url: str, manifest: Manifest) -> None:
    """Write ``v<N>/manifest.json``, then move the pointer to it."""
    fs, root = fsspec.core.url_to_fs(root_url)
    root = root.rstrip("/")
    body = json.dumps(asdict(manifest), indent=2).encode()
    rel = f"{version_dir(manifest.version)}/{POINTER}"
    fs.makedirs(f"{root}/{version_dir(manifest.version)}", exist_ok=True)
    write_atomic(fs, f"{root}/{rel}", body)
    write_atomic(fs, f"{root}/{POINTER}", json.dumps({"current": manifest.version, "path": rel}).encode())


def read_manifest(root_url: str, version: int | None = None) -> Manifest:
    """The current manifest of the memory at ``root_url`` (or version ``version``)."""
    fs, root = fsspec.core.url_to_fs(root_url)
    root = root.rstrip("/")
    if version is None:
        if not fs.exists(f"{root}/{POINTER}"):
            raise FileNotFoundError(f"no memory at {root_url}: {POINTER} not found (build one with `vismem index build`)")
        with fs.open(f"{root}/{POINTER}") as f:
            rel = json.load(f)["path"]
    else:
        rel = f"{version_dir(version)}/{POINTER}"
        if not fs.exists(f"{root}/{rel}"):
            raise FileNotFoundError(f"memory {root_url} has no version {version}")
    with fs.open(f"{root}/{rel}") as f:
        return Manifest.from_dict(json.load(f), f"{root_url}/{rel}")


def list_versions(root_url: str) -> list[int]:
    fs, root = fsspec.core.url_to_fs(root_url)
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root.rstrip("/"), detail=False)]
    return sorted(int(n[1:]) for n in names if n.startswith("v") and n[1:].isdigit()
                  and fs.exists(f"{root.rstrip('/')}/{n}/{POINTER}"))
