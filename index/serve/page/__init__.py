"""The page at ``/`` and the thumbnails it shows.

The page is one packaged file (``index.html``, beside this module: HTML, CSS and JS with no build
step) that speaks only the documented /v1 API. A thumbnail is the image of a memory item, read from
the item's own URI (``index.ingest.collections.item_bytes``), which the Router looks up by id from
the shards: the request names an id, never a path or a URL, so the endpoint can show only what the
memory itself names. Its size is checked from the file's header before it is decoded, as for
uploaded images.
"""

from __future__ import annotations

import functools
import io
from importlib import resources

from fastapi import HTTPException
from PIL import Image

from index.ingest.collections import item_bytes
from index.serve.api import Limits
from index.serve.images import DAMAGED

THUMBNAIL_PX = 160           # the longer side; smaller images are sent as they are (the page scales them up)


@functools.cache
def page_html() -> str:
    return resources.files("index.serve.page").joinpath("index.html").read_text(encoding="utf-8")


def thumbnail_png(item_id: int, uri: str, limits: Limits) -> bytes:
    """The PNG thumbnail of memory item ``item_id`` read from ``uri``; a 404 naming the item when
    its image cannot be read or decoded, a 400 when it declares more pixels than the limit."""
    name = f"the image of memory item {item_id} ({uri})"
    try:
        data = item_bytes(uri)
    except Exception as e:  # noqa: BLE001 (any storage error: the item's image is not readable from here)
        raise HTTPException(404, f"{name} cannot be read: {type(e).__name__}: {e}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size                 # from the header: no pixel decoded yet
            if width * height > limits.max_pixels:
                raise HTTPException(400, f"{name} is {width}×{height}, over the limit of {limits.max_pixels} pixels")
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            out = io.BytesIO()
            image.save(out, format="PNG")
            return out.getvalue()
    except Image.DecompressionBombError:
        raise HTTPException(400, f"{name} declares more pixels than Pillow decodes (a decompression bomb?)") from None
    except DAMAGED as e:
        raise HTTPException(404, f"{name} is not a readable image file: {e}") from None
