"""Ingest: real image collections in, embeddings out. Readers of a collection (folder tree, Parquet,
WebDataset tars) split into partitions (``collections``, ``webdataset``, with what both need in
``files``), the embeddings contract that ``vismem embed`` writes and every later stage reads
(``embeddings``), and the streaming Ray Data job that embeds a collection with an encoder (``job``)."""
