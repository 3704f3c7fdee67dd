"""Base64 image files from a request, size-checked from their headers before any is decoded.

A small PNG can declare billions of pixels (a decompression bomb), so each image's size is read
from its header (``Image.open`` reads no pixels) and checked against the limits first; only then
is it decoded, by the encoder's own ``encoder.embed.decode_image``.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib

import numpy as np
from fastapi import HTTPException
from PIL import Image

from index.serve.api import Limits

DAMAGED = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)   # what Pillow's decoders raise


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the header of the image file ``data``; 422 or 400 when it is none."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError:
        raise HTTPException(400, f"{name} declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels "
                                 "(a decompression bomb?): send a smaller image") from None
    except DAMAGED:
        raise HTTPException(422, f"{name} is valid base64 but not an image file (PNG, JPEG, WebP, ...): "
                                 "send the base64 of the image file's bytes") from None


def decode_images(encoded: list[str], limits: Limits) -> list[np.ndarray]:
    """RGB arrays of the base64 image files ``encoded`` (``images[i]`` of the request)."""
    files, total = [], 0
    for n, text in enumerate(encoded):
        name = f"images[{n}]"
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(422, f"{name} is not a base64-encoded image file: it is not valid base64") from None
        width, height = image_size(data, name)
        if width * height > limits.max_pixels:
            raise HTTPException(400, f"{name} is {width}×{height} = {width * height / 1e6:.1f} megapixels, over the "
                                     f"limit of {limits.max_pixels / 1e6:g} megapixels an image: downscale it")
        total += width * height
        if total > limits.max_request_pixels:
            raise HTTPException(400, f"images[0..{n}] hold {total / 1e6:.1f} megapixels together, over the limit of "
                                     f"{limits.max_request_pixels / 1e6:g} megapixels a request: send fewer per request")
        files.append(data)
    from encoder.embed import decode_image      # imports torch: only the Router's process needs it
    images = []
    for n, data in enumerate(files):
        try:
            images.append(decode_image(data))
        except DAMAGED as e:
            raise HTTPException(422, f"images[{n}] could not be decoded: {e}; send the complete image file") from None
    return images
