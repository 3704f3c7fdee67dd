"""The embedding job as a streaming Ray Data pipeline (decode tasks → encoder actors → Parquet):
the same vectors as ``Encoder.embed``, the right resources on a GPU and on a CPU-only cluster, the
accounting exact when inputs vanish after the plan, killed partitions redone, and ``vismem embed
--bench``."""

import io
import json
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.cli import main
from encoder import Encoder
from index.bench.embed_bench import write_collection
from index.ingest.collections import decode_partition
from index.ingest.embeddings import ERRORS_FILE, embedding_matrix, read_embeddings
from index.ingest.job import decode, embedding_dataset, encoder_pool, plan_embedding, run_embedding, summarise
from procdata.generators import generate

TINY = "random-init:tiny-cpu"
COSINE = 0.999            # uint8 rounding of the resized pixels stays above; a 1-px shift or a flip falls below


def photos(n: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """Smooth procedural images, larger than the 32-px input and not square: they need the resize."""
    return [im.permute(1, 2, 0).numpy()[:height] for im in generate("shader", 3, range(n), size=width)]


def encoded(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def write_folder(root, images: list[np.ndarray]) -> list[str]:
    uris = []
    for n, image in enumerate(images):
        os.makedirs(f"{root}/{'ab'[n % 2]}", exist_ok=True)
        uris.append(f"{root}/{'ab'[n % 2]}/{n:03d}.png")
        with open(uris[-1], "wb") as f:
            f.write(encoded(image))
    return uris


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("spec", [TINY, "raw-pixels:16"])
def test_resize_then_embed_pixels_matches_embed(spec):
    """The two steps (CPU resize to uint8, then the device) give Encoder.embed's vectors up to the
    rounding of the resized pixels; a flipped or shifted image does not pass the same threshold."""
    encoder = Encoder.load(spec, device="cpu")
    grey = np.tile(np.arange(0, 240, 8, dtype=np.uint8), (40, 1))          # grey and RGBA, not flat: raw pixels
    rgba = np.full((9, 50, 4), 200, np.uint8)                                # are centred, a flat image is zero
    rgba[:, :25] = 20
    images = photos(6) + [grey, rgba]
    pixels = np.stack([encoder.resize(im) for im in images])
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 3, encoder.arch.img_size, encoder.arch.img_size)
    expected = encoder.embed(images)
    got = encoder.embed_pixels(pixels, batch_size=3)
    assert got.dtype == np.float32 and cosines(got, expected).min() > COSINE
    flipped = encoder.embed([im[:, ::-1] for im in images[:6]])
    shifted = encoder.embed([im[1:, 1:] for im in images[:6]])
    assert cosines(got[:6], flipped).min() < COSINE and cosines(got[:6], shifted).min() < COSINE
    with pytest.raises(ValueError, match=r"uint8 pixels of shape \[n, 3, \d+, \d+\].*Encoder.resize"):
        encoder.embed_pixels(pixels.astype(np.float32))


def test_resizing_many_images_at_once_equals_one_by_one():
    """The decode tasks resize images of one shape together (``Resize.many``): byte for byte what
    resizing each gives, for mixed shapes, groups larger than a chunk, and shapes that need
    converting (grey, RGBA)."""
    encoder = Encoder.load(TINY, device="cpu")
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, shape, dtype=np.uint8)
              for shape in [(48, 64, 3)] * 9 + [(375, 500, 3)] * 2 + [(7, 9, 3), (40, 30), (9, 50, 4)]]
    images = [images[i] for i in rng.permutation(len(images))]
    one_by_one = np.stack([encoder.resize(im) for im in images])
    assert np.array_equal(encoder.resize.many(images, chunk=4), one_by_one)
    assert encoder.resize.many([]).shape == (0, 3, encoder.arch.img_size, encoder.arch.img_size)


def test_resources_for_gpu_and_cpu_clusters(ray_local):
    gpu = encoder_pool({"CPU": 32.0, "GPU": 4.0, "memory": 1e11})
    assert (gpu.actors, gpu.num_gpus, gpu.num_cpus, gpu.threads, gpu.decode_cpus) == (4, 1, None, None, 1)
    assert encoder_pool({"CPU": 32.0, "GPU": 4.0}, 2).actors == 2
    assert encoder_pool({"CPU": 8.0, "GPU": 1.0}, 4).actors == 1                 # at most one actor per GPU
    assert encoder_pool({"CPU": 32.0, "GPU": 4.0}, partitions=3).actors == 3     # no idle actors
    assert gpu.decode_tasks and not encoder_pool({"CPU": 32.0, "GPU": 4.0}, decode="actors").decode_tasks
    # CPUs only: each actor decodes its own partitions, one single-threaded actor per free CPU
    cpu = encoder_pool({"CPU": 16.0})
    assert (cpu.actors, cpu.num_gpus, cpu.num_cpus, cpu.threads, cpu.decode_tasks) == (16, None, 1.0, 1, False)
    assert (encoder_pool({"CPU": 16.0}, 2).threads, encoder_pool({"CPU": 16.0}, 2).num_cpus) == (8, 8.0)
    busy = encoder_pool({"CPU": 16.0}, free_cpus=5.5)                         # a Serve deployment holds the rest
    assert (busy.actors, busy.num_cpus, busy.threads) == (5, 1.1, 1)
    assert encoder_pool({"CPU": 2.0}, 8).num_cpus == 0.25                     # more actors than CPUs: a share each
    # CPUs only with decode tasks (a GPU cluster's shape): the pool never starves decoding, never fuses with it
    for cpus, actors in [(2.0, None), (1.0, 2), (2.0, 8), (64.0, 2)]:
        pool = encoder_pool({"CPU": cpus}, actors, decode="tasks")
        assert pool.decode_tasks and pool.actors * pool.num_cpus <= cpus / 4
        assert 0 < pool.num_cpus < pool.decode_cpus <= cpus / 2
    here = encoder_pool(ray_local.cluster_resources(), free_cpus=ray_local.available_resources().get("CPU"))
    assert (here.actors, here.num_gpus, here.num_cpus, here.threads, here.decode_tasks) == (2, None, 1.0, 1, False)
    with pytest.raises(ValueError, match="concurrency must be positive"):
        encoder_pool({"CPU": 2.0}, 0)
    with pytest.raises(ValueError, match="decode must be one of auto, tasks, actors, got 'gpu'"):
        encoder_pool({"CPU": 2.0}, decode="gpu")


def test_pipeline_matches_encoder_and_redoes_killed_partitions(ray_local, tmp_path):
    images = photos(10)
    uris = write_folder(tmp_path / "photos", images)
    out = str(tmp_path / "emb")
    plan = plan_embedding(str(tmp_path / "photos"), TINY, out, partition_size=3)
    ds = embedding_dataset(plan, 2, 8, decode="tasks")          # a GPU cluster's shape: decoding is a stage
    progress = [int(row["images"]) for row in ds.iter_rows()]
    assert sorted(progress) == [1, 3, 3, 3]
    stats = ds.stats()
    assert "MapBatches(decode_batch)" in stats and "MapBatches(EmbedPartitions)" in stats
    assert "decode_batch)->" not in stats                        # two stages, not fused into the actors

    table = read_embeddings(out)
    listed = sorted(uris)                                        # ids follow the listing: a/..., then b/...
    assert table.column("uri").to_pylist() == listed and table.column("id").to_pylist() == list(range(10))
    assert table.column("label").to_pylist() == [uri.split("/")[-2] for uri in listed]
    vectors = embedding_matrix(table)
    expected = Encoder.load(TINY, device="cpu").embed([images[uris.index(uri)] for uri in listed])
    assert cosines(vectors, expected).min() > COSINE

    # a job killed after writing the records of partitions 1 and 3 but before their Parquet
    os.remove(f"{out}/part-00001.parquet")
    os.remove(f"{out}/part-00003.parquet")
    again = plan_embedding(str(tmp_path / "photos"), TINY, out, partition_size=3)
    assert [p.number for p in again.pending] == [1, 3]
    ds = embedding_dataset(again, 2, 2)                          # CPUs only: the actors decode (the default here)
    assert sorted(int(row["images"]) for row in ds.iter_rows()) == [1, 3]
    assert "MapBatches(EmbedPartitions)" in ds.stats() and "decode_batch" not in ds.stats()
    summary = summarise(*fsspec.core.url_to_fs(out), again)
    assert (summary.computed, summary.images, summary.errors, summary.total, summary.partitions) == (2, 10, 0, 10, 4)
    redone = read_embeddings(out)
    assert redone.column("id").to_pylist() == list(range(10)) and redone.column("uri").to_pylist() == listed
    np.testing.assert_allclose(embedding_matrix(redone), vectors, atol=1e-5)


def test_inputs_deleted_after_the_plan_are_listed_not_lost(ray_local, tmp_path):
    """A Parquet file and an image file that vanish between the plan and their reading: each of
    their images is listed as unreadable, by URI and reason; the accounting stays exact."""
    (tmp_path / "coll").mkdir()
    blobs = [encoded(im) for im in photos(7)]
    pq.write_table(pa.table({"image": blobs[:4], "label": ["x"] * 4}), tmp_path / "coll" / "a.parquet")
    pq.write_table(pa.table({"image": blobs[4:]}), tmp_path / "coll" / "b.parquet")
    plan = plan_embedding(str(tmp_path / "coll"), TINY, str(tmp_path / "emb"), partition_size=2)
    assert plan.images == 7 and len(plan.pending) == 4
    os.remove(tmp_path / "coll" / "b.parquet")
    summary = run_embedding(plan)
    assert (summary.images, summary.errors, summary.total) == (4, 3, 7)
    errors = [json.loads(line) for line in (tmp_path / "emb" / ERRORS_FILE).read_text().splitlines()]
    gone = f"{tmp_path}/coll/b.parquet"
    assert [e["uri"] for e in errors] == [f"{gone}#row={n}" for n in range(3)]
    assert [e["id"] for e in errors] == [4, 5, 6]
    assert all(e["error"].startswith("cannot read (FileNotFoundError") and e["error"].endswith(gone) for e in errors)
    with pytest.raises(ValueError, match=r"removed 1: .*/coll/b\.parquet"):     # and the next run says so
        plan_embedding(str(tmp_path / "coll"), TINY, str(tmp_path / "emb"), partition_size=2)

    uris = write_folder(tmp_path / "photos", photos(5))
    plan = plan_embedding(str(tmp_path / "photos"), TINY, str(tmp_path / "emb2"), partition_size=2)
    os.remove(uris[2])
    summary = run_embedding(plan)
    assert (summary.images, summary.errors, summary.total) == (4, 1, 5)
    [error] = [json.loads(line) for line in (tmp_path / "emb2" / ERRORS_FILE).read_text().splitlines()]
    gone = sorted(uris).index(uris[2])
    assert error["uri"] == uris[2] and error["id"] == gone and "FileNotFoundError" in error["error"]
    assert sorted(read_embeddings(str(tmp_path / "emb2")).column("id").to_pylist()) == [i for i in range(5) if i != gone]


def test_a_parquet_file_cut_after_the_plan_lists_the_rows_it_lacks(tmp_path):
    (tmp_path / "coll").mkdir()
    blobs = [encoded(im) for im in photos(5)]
    pq.write_table(pa.table({"image": blobs}), tmp_path / "coll" / "a.parquet")
    plan = plan_embedding(str(tmp_path / "coll"), "raw-pixels:8", str(tmp_path / "emb"), partition_size=3)
    pq.write_table(pa.table({"image": blobs[:4]}), tmp_path / "coll" / "a.parquet")     # replaced, one row short
    first, second = (decode(part, Encoder.load("raw-pixels:8").resize) for part in plan.pending)
    assert first.ids == [0, 1, 2] and not first.errors and first.pixels.shape == (3, 3, 8, 8)
    assert second.ids == [3] and second.pixels.shape == (1, 3, 8, 8)
    assert second.errors == [{"id": 4, "uri": f"{tmp_path}/coll/a.parquet#row=4", "error": "the file has fewer rows "
                              f"than when the job was planned: {tmp_path}/coll/a.parquet"}]


@pytest.mark.parametrize("layout, width", [("folder", 64), ("parquet", 160)])
def test_bench_collections_are_real_encoded_images(tmp_path, layout, width):
    from index.ingest.collections import list_partitions
    url = write_collection(str(tmp_path / "c"), 5, width, layout)
    [part] = list_partitions(url)
    images, errors = decode_partition(part)
    assert len(images) == 5 and not errors
    assert {image.shape for *_, image in images} == {(width * 3 // 4, width, 3)}
    assert sorted({label for _, _, label, _ in images}) == ["shader", "spectral"]
    if layout == "folder":                                    # PNG below 128 px
        assert sorted(p.name for p in (tmp_path / "c" / "shader").iterdir()) == ["0000000.png", "0000002.png",
                                                                                "0000004.png"]


def test_embed_bench_prints_one_record_with_the_ratio(ray_local, tmp_path, capsys):
    args = ["embed", "--bench", "--images", "48", "--partition-size", "12", "--repeats", "1", "--workdir",
            str(tmp_path / "bench"), "--json"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines                                 # the record only, no summary object after it
    record = json.loads(lines[0])
    assert record["encoder"] == TINY and record["images"] == 48 and record["errors"] == 0
    assert record["partitions"] == 4 and record["source"] == "64x48 parquet" and record["device"] == "cpu"
    assert record["pipeline_img_s"] > 0 and record["bare_img_s"] > 0
    assert record["ratio"] == round(record["pipeline_img_s"] / record["bare_img_s"], 3)
    assert record["decode_cpu_ms"] > 0 and record["forward_cpu_ms"] > 0 and record["cpus"] == 2


@pytest.mark.parametrize("args, message", [
    (["embed", "--encoder", TINY], "vismem embed needs --collection, --out (or --bench)"),
    (["embed", "--collection", "C", "--encoder", TINY, "--out", "O", "--images", "9"], "--images: only with --bench"),
    (["embed", "--bench", "--out", "O"], "--bench embeds into a fresh folder under --workdir"),
    (["embed", "--bench", "--images", "0"], "--images must be positive"),
])
def test_embed_option_errors(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_collection_given_to_the_bench_is_embedded_whole(ray_local, tmp_path, capsys):
    write_folder(tmp_path / "photos", photos(6))
    assert main(["embed", "--bench", "--collection", str(tmp_path / "photos"), "--encoder", "raw-pixels:8",
                 "--repeats", "1", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (record["images"], record["partitions"], record["source"]) == (6, 6, "collection")
    assert not list(tmp_path.glob("photos/**/*.parquet"))         # nothing written beside the collection
