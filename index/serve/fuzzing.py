"""What a fuzzer needs to know about the API that JSON Schema cannot say, as schemathesis hooks.

Load it with ``SCHEMATHESIS_HOOKS=index.serve.fuzzing st run URL/openapi.json --checks all``: the
fuzzer then makes real images where the schema says ``format: base64-image`` (random base64 is not
an image file, and the server rightly refuses it), and gives an add as many ``labels`` and ``uris``
as items. Everything else the schema states itself (``index.serve.api``), so schemathesis's
positive cases are requests the server must accept.
"""

import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

from index.serve.api import IMAGE_FORMAT


def png_base64(seed: int, side: int) -> str:
    """A small random RGB PNG, base64-encoded."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


schemathesis.openapi.format(IMAGE_FORMAT, st.builds(png_base64, st.integers(0, 2**32 - 1), st.integers(1, 48)))


@schemathesis.hook
def map_case(context, case):
    """An add names one label (and one URI, if any) per item: pad or cut them to the items' count.
    (A case hook, not a body hook: schemathesis applies case hooks in its coverage phase too.)"""
    body = case.body
    if not isinstance(body, dict) or not case.operation.path.endswith("/memory/add"):
        return case
    items = body.get("images") if isinstance(body.get("images"), list) else body.get("vectors")
    if isinstance(items, list):
        for name in ("labels", "uris"):
            if isinstance(body.get(name), list):
                body[name] = (body[name] + ["x"] * len(items))[:len(items)]
    return case
