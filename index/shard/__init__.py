"""Shard: one shard of a memory, as it is stored and searched. Its state (base, delta segments,
deletion set and vote weights) with the rule of which ids are live (``state``), the FAISS index bytes
to and from storage, memory-mapped, merged and decoded (``faiss_io``), per-call search parameters,
the coarse assignment shared by every shard and the exact merge of their answers (``search``), and
which shard holds which vectors (``placement``)."""
