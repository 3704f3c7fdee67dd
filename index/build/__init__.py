"""Build: embeddings in, a new memory version out. The factory rules and the build itself
(``build``), its per-file and per-shard tasks on Ray or in process (``parallel_add``), the recall
measurement the build and ``tune`` share (``recall``), and ``tune``, which re-measures an open
memory and records the cheapest nprobe that reaches a target recall."""
