"""Bench: the benchmarks, kept apart from the code they time. ``index_bench`` (``vismem index bench``:
build and search against bare FAISS), ``memory_bench`` (``vismem memory bench``: what edits cost, in
process and through HTTP) and ``embed_bench`` (``vismem embed --bench``: the embedding pipeline against
the bare encoder)."""
