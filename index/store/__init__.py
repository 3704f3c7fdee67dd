"""Store: how a memory lives on storage. One version's manifest (``manifest``), the commit protocol
and the one commit entry point every writer goes through (``commit``: stage → write → commit → move
the pointer), and the history read back from the chain of manifests (``history``). Nothing here knows
FAISS: shards reach storage through ``index.shard``."""
