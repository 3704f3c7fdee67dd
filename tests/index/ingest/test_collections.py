"""Reading real image collections from S3 (a moto server on 127.0.0.1) and embedding them with
Ray Data: labels from folders, unreadable images skipped and listed, resumable output."""

import io
import json

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from index.ingest.collections import list_partitions, read_partition
from index.ingest.embeddings import read_embeddings
from index.ingest.job import embed_collection


def png(value: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (12, 10), value if mode == "L" else (value, 255 - value, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def s3_folder(s3_bucket):
    fs = fsspec.filesystem("s3")
    root = f"{s3_bucket}/photos"
    files = {"cat/a.png": png(10), "cat/b.png": png(20, "L"), "dog/c.png": png(200), "dog/d.jpg": b"not a jpeg",
             "dog/notes.txt": b"ignored"}
    for name, data in files.items():
        fs.pipe(f"{root}/{name}", data)
    fs.invalidate_cache()
    return root


def test_folder_tree_on_s3(s3_folder):
    parts = list_partitions(s3_folder, partition_size=3)
    assert [len(p) for p in parts] == [3, 1]
    assert [p.first_id for p in parts] == [0, 3]
    assert parts[0].labels == ["cat", "cat", "dog"] and parts[0].uris[0] == f"{s3_folder}/cat/a.png"
    items = read_partition(parts[0])
    assert [i[0] for i in items] == [0, 1, 2] and items[2][3] == png(200)


def test_missing_bucket_and_empty_folder(s3_bucket):
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-here/x"):
        list_partitions("s3://no-such-bucket-here/x")
    fsspec.filesystem("s3").pipe(f"{s3_bucket}/empty/readme.txt", b"no images")
    with pytest.raises(ValueError, match="no images under"):
        list_partitions(f"{s3_bucket}/empty")


def test_embed_job_s3_to_s3(ray_local, s3_folder, s3_bucket):
    out = f"{s3_bucket}/emb"
    summary = embed_collection(s3_folder, "raw-pixels:4", out, partition_size=2)
    assert (summary.partitions, summary.computed, summary.images, summary.errors) == (2, 2, 3, 1)
    table = read_embeddings(out)
    assert table.column("id").to_pylist() == [0, 1, 2]
    assert table.column("label").to_pylist() == ["cat", "cat", "dog"]
    emb_type = table.schema.field("embedding").type
    assert emb_type.list_size == 48 and emb_type.value_type == "float"
    fs = fsspec.filesystem("s3")
    errors = [json.loads(line) for line in fs.cat(f"{out}/errors.jsonl").decode().splitlines()]
    assert len(errors) == 1 and errors[0]["uri"].endswith("dog/d.jpg") and errors[0]["id"] == 3
    assert errors[0]["error"] == f"not an image file: {s3_folder}/dog/d.jpg"

    # resumable: a second run recomputes nothing; a lost partition is recomputed alone
    assert embed_collection(s3_folder, "raw-pixels:4", out, partition_size=2).computed == 0
    fs.rm(f"{out}/part-00001.parquet")
    again = embed_collection(s3_folder, "raw-pixels:4", out, partition_size=2)
    assert (again.computed, again.images, again.errors) == (1, 3, 1)
    # vectors of two encoders never mix
    with pytest.raises(ValueError, match="already holds embeddings"):
        embed_collection(s3_folder, "raw-pixels:8", out, partition_size=2)


def test_parquet_collection(ray_local, tmp_path):
    import pyarrow as pa
    table = pa.table({"image": [png(v) for v in (0, 100, 0)], "label": ["x", "y", "x"]})
    pq.write_table(table, tmp_path / "images.parquet")
    parts = list_partitions(str(tmp_path / "images.parquet"), partition_size=2)
    assert [(p.start, p.stop, p.first_id) for p in parts] == [(0, 2, 0), (2, 3, 2)]
    summary = embed_collection(str(tmp_path / "images.parquet"), "raw-pixels:4", str(tmp_path / "emb"), 2)
    assert summary.images == 3
    emb = read_embeddings(str(tmp_path / "emb"))
    assert emb.column("uri").to_pylist()[2].endswith("images.parquet#row=2")
    vectors = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(vectors[0], vectors[2])      # the same colour gives the same pixels
    assert not np.allclose(vectors[0], vectors[1])
