"""Errors of the embedding path name the thing (a file, a URI, an encoder spec), never a library's
internals; and the job's progress is ours, not Ray Data's."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from encoder import Encoder
from index.ingest.collections import decode_partition, list_partitions
from index.ingest.embeddings import embedding_table, part_name, read_embeddings


def test_encoder_spec_errors_name_the_spec():
    for spec, message in [("raw-pixels:abc", "raw-pixels:abc: SIZE must be a positive whole number, got 'abc'"),
                          ("raw-pixels:0", "raw-pixels:0: SIZE must be a positive whole number"),
                          ("random-init:nope", "random-init:nope: unknown preset 'nope'; choose one of: tiny-cpu"),
                          ("random-init:tiny-cpu:x", "random-init:tiny-cpu:x: SEED must be a whole number")]:
        with pytest.raises(ValueError) as error:
            Encoder.load(spec)
        assert str(error.value).startswith(message), str(error.value)


def test_unreadable_images_name_their_uri(tmp_path):
    (tmp_path / "c" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "c" / "a" / "good.png")
    (tmp_path / "c" / "a" / "notes.png").write_bytes(b"plain text, not a picture")
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, format="JPEG")
    (tmp_path / "c" / "a" / "torn.jpg").write_bytes(buf.getvalue()[:200])
    [part] = list_partitions(str(tmp_path / "c"))
    images, errors = decode_partition(part)
    assert [uri for _, uri, _, _ in images] == [f"{tmp_path}/c/a/good.png"]
    by_uri = {e["uri"]: e["error"] for e in errors}
    assert by_uri[f"{tmp_path}/c/a/notes.png"] == f"not an image file: {tmp_path}/c/a/notes.png"
    assert by_uri[f"{tmp_path}/c/a/torn.jpg"].startswith("damaged image file")
    assert not any("BytesIO" in e or "0x" in e for e in by_uri.values())


def test_mixed_dimensions_name_both_files(tmp_path):
    rng = np.random.default_rng(0)
    for number, dim in ((0, 4), (1, 8)):
        table = embedding_table([number], [f"img{number}.png"], ["x"], rng.normal(size=(1, dim)).astype(np.float32))
        pq.write_table(table, tmp_path / part_name(number))
    with pytest.raises(ValueError, match=rf"{tmp_path}/part-00000.parquet has 4-d vectors, "
                                         rf"{tmp_path}/part-00001.parquet has 8-d"):
        read_embeddings(str(tmp_path))


def test_ray_data_progress_bars_are_off_for_the_job(ray_local, tmp_path):
    import ray

    from index.ingest.job import embedding_dataset, plan_embedding
    (tmp_path / "c").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "c" / "1.png")
    plan = plan_embedding(str(tmp_path / "c"), "raw-pixels:4", str(tmp_path / "emb"))
    ds = embedding_dataset(plan, 1, 8)
    assert not ds.context.enable_progress_bars and not ds.context.print_on_execution_start
    assert ray.data.DataContext.get_current().enable_progress_bars          # other datasets keep theirs
