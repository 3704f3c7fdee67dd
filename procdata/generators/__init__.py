"""Procedural image generators: batched torch functions of (seed, indices, size, device).

Every generator draws its per-image parameters from a random stream seeded by
``(generator, seed, index)`` alone, then renders the whole batch at once. So one image's pixels
depend only on its own ``(seed, index)``: the same image comes out whatever batch it is generated
in, in any process, on the same device type. Generators return float intensities
``[n, 3, size, size]``; ``render`` clamps them to [0, 1] and ``generate`` quantises to uint8.

    registry.py     GENERATORS by name; generate, render, render_natural
    streams.py      per-image random streams and the batch helpers the generators share
    dead_leaves.py  dead_leaves
    fields.py       spectral, shader
    expression.py   expression: random expression-tree shaders
    fractal.py      fractal
    mixers.py       kml, kml_mixup, mixup: made of other generators' images

Every name is importable from ``procdata.generators`` itself; the families are imported here in
the order they register (``GENERATORS`` keeps it).
"""

from procdata.generators.registry import (GENERATORS, LUMA, Generator, generate, get_generator, quantise, register,
                                          render, render_natural)
from procdata.generators.streams import (grouped, image_normals, image_rngs, image_uniforms, per_image, pixel_grid,
                                         splitmix64, splitmix64_torch)
from procdata.generators.dead_leaves import (dead_leaves, inverse_cdf_power3, leaf_labels, leaf_shapes, triangle,
                                             window_ladder)
from procdata.generators.fields import shader, spectral
from procdata.generators.expression import expression
from procdata.generators.fractal import fractal, ifs_system
from procdata.generators.mixers import (DEFAULT_SOURCES, KML_SOURCES, blur3, child_seed, kml, kml_mixup, mixed_sources,
                                        mixup, two_means_mask)

__all__ = ["DEFAULT_SOURCES", "GENERATORS", "Generator", "KML_SOURCES", "LUMA", "blur3", "child_seed", "dead_leaves",
           "expression", "fractal", "generate", "get_generator", "grouped", "ifs_system", "image_normals", "image_rngs",
           "image_uniforms", "inverse_cdf_power3", "kml", "kml_mixup", "leaf_labels", "leaf_shapes", "mixed_sources",
           "mixup", "per_image", "pixel_grid", "quantise", "register", "render", "render_natural", "shader", "spectral",
           "splitmix64", "splitmix64_torch", "triangle", "two_means_mask", "window_ladder"]
