"""The generators' names, in the order ``procdata.generators`` registers them.

Here, outside the package, so that the CLI's parsers (``--help``, ``choices``) read them without
importing torch; ``procdata.generators.registry.register`` refuses a name that is not listed, and
a test checks that the registry holds exactly these, in this order.
"""

GENERATOR_NAMES = ("dead_leaves", "spectral", "shader", "expression", "fractal", "kml", "kml_mixup", "mixup")
