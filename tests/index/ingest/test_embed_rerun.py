"""Running ``vismem embed`` again into the same output: a collection that grew gets its new images
embedded with new ids (the old ids never change), a changed or removed input is refused by name, a
killed job resumes with no missing and no duplicate id, and every image is accounted for."""

import io
import json
import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from index.ingest.embeddings import read_embeddings, record_name
from index.ingest.job import EmbedPartitions, embed_collection, plan_embedding, summarise


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (9, 7), (value, 255 - value, value // 2)).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root, names: dict[str, int]):
    for name, value in names.items():
        os.makedirs(os.path.dirname(f"{root}/{name}"), exist_ok=True)
        with open(f"{root}/{name}", "wb") as f:
            f.write(png(value))


def ids_by_uri(out: str) -> dict[str, int]:
    table = read_embeddings(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate ids"
    return dict(zip(table.column("uri").to_pylist(), ids))


def embed_here(plan):
    """Embed a plan's pending partitions in this process (no Ray), as the actors would."""
    actor = EmbedPartitions(plan.encoder_spec, plan.out)
    for part in plan.pending:
        actor.embed_one(part)
    fs, root = fsspec.core.url_to_fs(plan.out)
    return summarise(fs, root.rstrip("/"), plan)


SEVEN = {"cat/0.png": 10, "cat/1.png": 40, "cat/2.png": 70, "cat/3.png": 100, "dog/0.png": 130, "dog/1.png": 160,
         "dog/2.png": 190}


def test_grown_folder_is_embedded_and_changes_are_refused(ray_local, tmp_path):
    photos, out = str(tmp_path / "photos"), str(tmp_path / "emb")
    write_folder(photos, SEVEN)
    first = embed_collection(photos, "raw-pixels:4", out, partition_size=3)
    assert (first.images, first.errors, first.total, first.partitions) == (7, 0, 7, 3)
    before = ids_by_uri(out)
    assert sorted(before.values()) == list(range(7))

    write_folder(photos, {"cat/1b.png": 220, "dog/9.png": 250})     # cat/1b sorts in the middle
    progress = []
    again = embed_collection(photos, "raw-pixels:4", out, partition_size=3, progress=progress.append)
    assert (again.images, again.errors, again.total, again.computed, again.partitions) == (9, 0, 9, 1, 4)
    assert progress == [2]
    after = ids_by_uri(out)
    assert {uri: after[uri] for uri in before} == before                  # no id handed out changes
    assert sorted(after.values()) == list(range(9))
    assert {after[f"{photos}/cat/1b.png"], after[f"{photos}/dog/9.png"]} == {7, 8}
    labels = dict(zip(read_embeddings(out).column("uri").to_pylist(), read_embeddings(out).column("label").to_pylist()))
    assert labels[f"{photos}/cat/1b.png"] == "cat" and labels[f"{photos}/dog/9.png"] == "dog"

    # a recorded image that changed, or disappeared: refused, by name, before anything is written
    files_before = sorted(os.listdir(out))
    write_folder(photos, {"cat/2.png": 5, "dog/10.png": 1})
    with pytest.raises(ValueError, match=r"changed 1: .*/photos/cat/2\.png\. .*new --out") as changed:
        plan_embedding(photos, "raw-pixels:4", out, partition_size=3)
    assert "removed" not in str(changed.value)
    os.remove(f"{photos}/dog/0.png")
    with pytest.raises(ValueError, match=r"changed 1: .*cat/2\.png; removed 1: .*/photos/dog/0\.png"):
        plan_embedding(photos, "raw-pixels:4", out, partition_size=3)
    assert sorted(os.listdir(out)) == files_before


def test_killed_job_resumes_without_missing_or_duplicate_ids(ray_local, tmp_path):
    photos, out = str(tmp_path / "photos"), str(tmp_path / "emb")
    write_folder(photos, {f"a/{n}.png": 40 * n for n in range(5)})
    plan = plan_embedding(photos, "raw-pixels:4", out, partition_size=2)
    assert [(p.number, p.first_id, len(p)) for p in plan.pending] == [(0, 0, 2), (1, 2, 2), (2, 4, 1)]
    os.remove(f"{out}/{record_name(2)}")       # the plan was killed before recording partition 2 ...
    EmbedPartitions(plan.encoder_spec, out).embed_one(plan.pending[1])   # ... and the job after partition 1

    summary = embed_collection(photos, "raw-pixels:4", out, partition_size=2)
    assert (summary.computed, summary.images, summary.total, summary.partitions) == (2, 5, 5, 3)
    assert ids_by_uri(out) == {f"{photos}/a/{n}.png": n for n in range(5)}   # as if never killed

    # a finished partition whose Parquet went missing is never reported as done
    fs, root = fsspec.core.url_to_fs(out)
    os.remove(f"{out}/part-00001.parquet")
    with pytest.raises(RuntimeError, match=r"emb: 3 images embedded \+ 0 unreadable = 3, but .*photos holds 5 "
                                           r"images; 1 partition\(s\) have no Parquet: run the same command again"):
        summarise(fs, root, plan)


def test_parquet_collection_grows_by_files(tmp_path):
    coll, out = tmp_path / "coll", str(tmp_path / "emb")
    coll.mkdir()
    pq.write_table(pa.table({"image": [png(v) for v in (0, 50, 100, 150, 200)]}), coll / "a.parquet")
    plan = plan_embedding(str(coll), "raw-pixels:4", out, partition_size=2)
    os.remove(f"{out}/{record_name(2)}")       # a plan killed half-way recorded rows 0-3 of a.parquet only
    plan = plan_embedding(str(coll), "raw-pixels:4", out, partition_size=2)
    assert [(p.number, p.first_id, p.start, p.stop) for p in plan.pending] == [(0, 0, 0, 2), (1, 2, 2, 4), (2, 4, 4, 5)]
    assert embed_here(plan).images == 5

    pq.write_table(pa.table({"image": [png(v) for v in (30, 60, 90)], "filename": ["x.png", "y.png", None]}),
                   coll / "b.parquet")
    plan = plan_embedding(str(coll), "raw-pixels:4", out, partition_size=2)
    assert [(p.number, p.first_id, p.parquet.rsplit("/", 1)[-1]) for p in plan.pending] == [(3, 5, "b.parquet"),
                                                                                           (4, 7, "b.parquet")]
    summary = embed_here(plan)
    assert (summary.images, summary.total, summary.partitions) == (8, 8, 5)
    ids = ids_by_uri(out)
    assert ids[f"{coll}/a.parquet#row=4"] == 4
    assert [ids[f"{coll}/b.parquet#row={n}"] for n in ("0:x.png", "1:y.png", "2")] == [5, 6, 7]

    pq.write_table(pa.table({"image": [png(v) for v in (1, 2)]}), coll / "a.parquet")
    with pytest.raises(ValueError, match=r"changed 1: .*/coll/a\.parquet\."):
        plan_embedding(str(coll), "raw-pixels:4", out, partition_size=2)


def test_grown_collection_on_s3(ray_local, s3_bucket):
    fs = fsspec.filesystem("s3")
    photos, out = f"{s3_bucket}/photos", f"{s3_bucket}/emb"
    for name, value in {"a/1.png": 10, "a/3.png": 90, "b/1.png": 170}.items():
        fs.pipe(f"{photos}/{name}", png(value))
    embed_collection(photos, "raw-pixels:4", out, partition_size=2)
    before = ids_by_uri(out)
    record = json.loads(fs.cat(f"{out}/{record_name(0)}"))
    assert record["inputs"][0]["uri"] == f"{photos}/a/1.png" and record["inputs"][0]["etag"]

    fs.pipe(f"{photos}/a/2.png", png(50))
    summary = embed_collection(photos, "raw-pixels:4", out, partition_size=2)
    assert (summary.images, summary.total, summary.computed) == (4, 4, 1)
    after = ids_by_uri(out)
    assert {uri: after[uri] for uri in before} == before and after[f"{photos}/a/2.png"] == 3

    fs.pipe(f"{photos}/a/3.png", png(91))            # new content: a new ETag
    with pytest.raises(ValueError, match=r"changed 1: s3://.*/photos/a/3\.png"):
        plan_embedding(photos, "raw-pixels:4", out, partition_size=2)


def test_output_bucket_must_exist(s3_bucket, tmp_path):
    (tmp_path / "photos" / "a").mkdir(parents=True)
    (tmp_path / "photos" / "a" / "1.png").write_bytes(png(1))
    s3 = fsspec.filesystem("s3")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-vismem .*never created"):
        plan_embedding(str(tmp_path / "photos"), "raw-pixels:4", "s3://no-such-bucket-vismem/emb")
    s3.invalidate_cache()
    assert not s3.exists("no-such-bucket-vismem")
    deep = f"{s3_bucket}/runs/2026/emb"                 # prefixes under an existing bucket are fine
    assert plan_embedding(str(tmp_path / "photos"), "raw-pixels:4", deep).pending
