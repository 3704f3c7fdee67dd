"""encoder: DINO self-supervised training on procedural images, and the Encoder that embeds."""

from encoder.embed import Encoder

__all__ = ["Encoder"]
