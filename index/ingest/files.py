"""What a collection's input files are made of: which names are images, what tells a changed file
from an unchanged one, and how a listed path becomes a URL again. The readers of folder trees and
Parquet files (``index.ingest.collections``), of WebDataset tars (``index.ingest.webdataset``) and
of embeddings (``index.ingest.embeddings``) share these."""

from __future__ import annotations

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def protocol_prefix(url: str) -> str:
    """What to put before a listed path to get a URL again (``s3://``, ``memory://``, or nothing)."""
    return "" if "://" not in url or url.startswith("file://") else url.split("://", 1)[0] + "://"


def fingerprint(info: dict) -> dict:
    """What tells a changed file from an unchanged one: its size, and its ETag where the store has
    one (S3, GCS, Azure), else its modification time."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return {"size": info["size"], "etag": str(etag).strip('"')}
    mtime = info.get("mtime", info.get("LastModified", info.get("created")))
    return {"size": info["size"], "mtime": mtime.isoformat() if hasattr(mtime, "isoformat") else mtime}
