"""encoder: DINO self-supervised training on procedural images, and the Encoder that embeds.

``Encoder`` is loaded on first use (PEP 562), so that reading ``encoder.config`` (the CLI's
``--help``, the demo's defaults) does not import torch and timm."""

__all__ = ["Encoder"]


def __getattr__(name: str):
    if name == "Encoder":
        from encoder.embed import Encoder                # torch, timm: only for whoever embeds
        return Encoder
    raise AttributeError(f"module 'encoder' has no attribute {name!r}")
