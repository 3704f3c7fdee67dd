"""The memory: real knowledge as an editable, versioned, sharded kNN index. ``VisualMemory``
(``memory``) is the one public face; it holds a version's ``Snapshot`` (``snapshot``). The rooms, one
per stage: ``ingest`` (collections in, embeddings out), ``store`` (manifests, the commit protocol,
history), ``shard`` (one shard stored and searched), ``build`` (embeddings in, a memory version out),
``edit`` (a snapshot in, the next one out), ``serve`` (the Ray Serve app) and ``bench``."""
