"""WebDataset tar collections (docs/ARCHITECTURE.md §3), on a local folder and on S3 (a moto server on 127.0.0.1):
samples grouped by key with their labels, tars read in sample ranges by seeking, embedding equal to
the same images as a folder tree, re-runs and grown collections, and every broken tar either
refused by name at listing or accounted item by item."""

import io
import json
import os
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from index.ingest.collections import (Partition, decode_partition, list_inputs, list_partitions, make_partitions,
                                      read_partition)
from index.ingest.embeddings import read_embeddings, record_name
from index.ingest.job import EmbedPartitions, embed_collection, plan_embedding, run_embedding, summarise


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 5), (value, 255 - value, value // 2)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value // 3, 255 - value)).save(buf, format="JPEG")
    return buf.getvalue()


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]], folders: tuple[str, ...] = (),
              stray: dict[str, bytes] | None = None) -> bytes:
    """A tar (PAX format, as Python writes by default) of the samples' members in order, after
    folder entries ``folders``; ``stray`` members (no key) go after the first sample."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in folders:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for n, (key, members) in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            for name, data in (stray or {}).items() if n == 0 else ():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_offsets(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


def write(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


LONG = "shard/" + "x" * 120 + "/000003"          # > 100 characters: a PAX header precedes its members
FIVE = [("shard/000000", {"png": png(10), "cls": b" 3\n"}),
        ("shard/000001", {"jpg": jpeg(40), "label": b"dog"}),
        ("shard/000002", {"json": b'{"label": "cat", "w": 6}', "png": png(70)}),
        (LONG, {"png": png(100)}),
        ("shard/000004", {"png": png(130), "cls": b"7", "json": b'{"label": "not this"}'})]


def test_tar_listing_labels_and_sample_ranges(tmp_path):
    tar = write(tmp_path / "wds" / "shard-000.tar",
                tar_bytes(FIVE, folders=("shard",), stray={"shard/._000000.png": b"macOS metadata", "README": b"x"}))
    [listed] = list_inputs(str(tmp_path / "wds"))
    assert listed["rows"] == 5 and len(listed["sample_offsets"]) == 5 and listed["size"] == os.path.getsize(tar)

    [whole] = list_partitions(str(tmp_path / "wds"), partition_size=100)
    items = read_partition(whole)
    assert [i[0] for i in items] == [0, 1, 2, 3, 4]
    assert [i[1] for i in items] == [f"{tar}#{key}" for key, _ in FIVE]
    assert [i[2] for i in items] == ["3", "dog", "cat", None, "7"]
    assert [i[3] for i in items] == [png(10), jpeg(40), png(70), png(100), png(130)]
    assert [i[1:] for i in read_partition(list_partitions(tar, 100)[0])] == [i[1:] for i in items]  # the tar's own URL

    parts = list_partitions(str(tmp_path / "wds"), partition_size=2)
    assert [(p.start, p.stop, p.first_id, len(p)) for p in parts] == [(0, 2, 0, 2), (2, 4, 2, 2), (4, 5, 4, 1)]
    assert [i for p in parts for i in read_partition(p)] == items
    for p in parts:         # a partition carries its first sample's offset, never the tar's offset list
        assert p.tar == tar and p.parquet is None and p.uris == [] and set(p.inputs[0]) == {
            "uri", "size", "mtime", "rows", "start", "stop", "offset"}
        assert p.inputs[0]["offset"] == listed["sample_offsets"][p.start] and len(json.dumps(p.to_dict())) < 400

    # a re-run resumes a tar recorded up to sample 3: its listed offsets give the offset of sample 3
    [rest] = make_partitions([{**listed, "start": 3}], 10, number=7, first_id=50)
    assert (rest.number, rest.first_id, rest.start, rest.stop) == (7, 50, 3, 5)
    assert [i[1:] for i in read_partition(rest)] == [i[1:] for i in items[3:]]
    # without an offset (a record written by hand) the tar is walked from its start
    walked = Partition(0, 2, [{k: v for k, v in parts[1].inputs[0].items() if k != "offset"}])
    assert read_partition(walked) == items[2:4]


def test_tars_on_s3_in_ranges(s3_bucket):
    fs = fsspec.filesystem("s3")
    root = f"{s3_bucket}/wds"
    fs.pipe(f"{root}/shard-000.tar", tar_bytes([(f"a/{n:06d}", {"png": png(n * 20), "cls": b"a"}) for n in range(3)]))
    fs.pipe(f"{root}/shard-001.tar", tar_bytes([(f"b/{n:06d}", {"jpeg": jpeg(n * 50)}) for n in range(2)]))
    fs.invalidate_cache()
    inputs = list_inputs(root)
    assert [(i["uri"], i["rows"]) for i in inputs] == [(f"{root}/shard-000.tar", 3), (f"{root}/shard-001.tar", 2)]
    assert all("etag" in i for i in inputs)
    parts = list_partitions(root, partition_size=2)
    assert [(p.tar.rsplit("/", 1)[1], p.start, p.stop, p.first_id) for p in parts] == [
        ("shard-000.tar", 0, 2, 0), ("shard-000.tar", 2, 3, 2), ("shard-001.tar", 0, 2, 3)]
    ranged = [i for p in parts for i in read_partition(p)]
    whole = [i for p in list_partitions(root, partition_size=100) for i in read_partition(p)]
    assert ranged == whole and [i[0] for i in whole] == [0, 1, 2, 3, 4]
    assert [i[1] for i in whole][2:4] == [f"{root}/shard-000.tar#a/000002", f"{root}/shard-001.tar#b/000000"]
    assert [i[2] for i in whole] == ["a", "a", "a", None, None] and whole[4][3] == jpeg(50)


def by_uri_order(out: str):
    table = read_embeddings(out)
    order = np.argsort(table.column("id").to_numpy())
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))[order]
    return (table.column("id").to_numpy()[order].tolist(), np.array(table.column("uri").to_pylist())[order].tolist(),
            np.array(table.column("label").to_pylist(), dtype=object)[order].tolist(), vectors)


def embed_here(collection: str, out: str, partition_size: int = 2):
    """``vismem embed`` without Ray: plan, then embed the pending partitions in this process as the
    actors would (Ray starts once per test file; the Ray runs here are the tars' own)."""
    plan = plan_embedding(collection, "raw-pixels:8", out, partition_size)
    actor = EmbedPartitions(plan.encoder_spec, plan.out)
    for part in plan.pending:
        actor.embed_one(part)
    return plan, summarise(*fsspec.core.url_to_fs(out), plan)


def test_embed_tars_equals_folder_tree_and_reruns(ray_local, tmp_path):
    values = [10, 45, 80, 115, 150, 185, 220]
    labels = ["cat"] * 4 + ["dog"] * 3
    tree, wds = tmp_path / "tree", tmp_path / "wds"
    for n, (value, label) in enumerate(zip(values, labels)):
        write(tree / label / f"{n:03d}.{'jpg' if n == 5 else 'png'}", jpeg(value) if n == 5 else png(value))

    def sample(n: int) -> tuple[str, dict[str, bytes]]:
        image = {"jpg": jpeg(values[n])} if n == 5 else {"png": png(values[n])}
        return f"{n:03d}", {"cls": labels[n].encode(), **image}

    write(wds / "shard-000.tar", tar_bytes([sample(n) for n in range(4)]))
    write(wds / "shard-001.tar", tar_bytes([sample(n) for n in range(4, 7)]))
    out_tree, out_wds = str(tmp_path / "emb-tree"), str(tmp_path / "emb-wds")

    embed_here(str(tree), out_tree)
    # a plan killed after recording 3 of its 4 partitions: the next run resumes shard-001 at sample 2
    plan = plan_embedding(str(wds), "raw-pixels:8", out_wds, partition_size=2)
    assert [(p.tar.rsplit("/", 1)[1], p.start, p.stop) for p in plan.pending] == [
        ("shard-000.tar", 0, 2), ("shard-000.tar", 2, 4), ("shard-001.tar", 0, 2), ("shard-001.tar", 2, 3)]
    os.remove(f"{out_wds}/{record_name(3)}")
    summary = embed_collection(str(wds), "raw-pixels:8", out_wds, partition_size=2)
    assert (summary.partitions, summary.computed, summary.images, summary.errors, summary.total) == (4, 4, 7, 0, 7)
    record = json.loads(open(f"{out_wds}/{record_name(3)}").read())
    assert record["inputs"][0]["start"] == 2 and "offset" in record["inputs"][0]
    assert "sample_offsets" not in open(f"{out_wds}/{record_name(0)}").read()

    ids_t, uris_t, labels_t, vectors_t = by_uri_order(out_tree)
    ids_w, uris_w, labels_w, vectors_w = by_uri_order(out_wds)
    assert ids_w == ids_t == list(range(7)) and labels_w == labels_t == labels
    assert uris_w == [f"{wds}/shard-00{n // 4}.tar#{n:03d}" for n in range(7)]
    np.testing.assert_array_equal(vectors_w, vectors_t)

    again = embed_collection(str(wds), "raw-pixels:8", out_wds, partition_size=2)
    assert (again.computed, again.images, again.partitions) == (0, 7, 4)

    write(wds / "shard-002.tar", tar_bytes([("100", {"png": png(5), "cls": b"eel"}), ("101", {"png": png(6)})]))
    plan, grown = embed_here(str(wds), out_wds)
    assert [(p.tar.rsplit("/", 1)[1], p.start, p.stop, p.first_id) for p in plan.pending] == [("shard-002.tar", 0, 2, 7)]
    assert (grown.computed, grown.images, grown.partitions, grown.total) == (1, 9, 5, 9)
    ids, uris, labels_g, _ = by_uri_order(out_wds)
    assert ids == list(range(9)) and uris[:7] == uris_w
    assert uris[7:] == [f"{wds}/shard-002.tar#100", f"{wds}/shard-002.tar#101"] and labels_g[7:] == ["eel", None]


def test_broken_tars_are_refused_by_name(tmp_path):
    three = [(f"{n:06d}", {"png": png(n), "cls": b"x"}) for n in range(3)]
    good = tar_bytes(three)
    members = member_offsets(good)           # png, cls of sample 0, then of 1, then of 2
    end = members[-1].offset_data + 512      # each member's data fits one block: the end-of-archive blocks start here
    for name, data, readable in [("mid-member", good[:members[2].offset_data + 50], 1),
                                 ("mid-header", good[:members[3].offset + 100], 1),
                                 ("between-members", good[:members[4].offset], 1),
                                 ("no-end-marker", good[:end], 2)]:
        tar = write(tmp_path / name / "shard.tar", data)
        with pytest.raises(ValueError) as error:
            list_inputs(str(tmp_path / name))
        message = str(error.value)
        assert message.startswith(f"{tar}: truncated or corrupt tar: {readable} complete sample(s) readable"), message
        assert "Copy the tar again (or remove it from the collection)" in message

    for name, files, match in [
            ("not-a-tar", {"x.tar": b"plain text, no tar" * 40}, "x.tar is not a tar file"),
            ("gzip-as-tar", {"x.tar": b"\x1f\x8b" + b"\0" * 600}, "x.tar is gzip-compressed: .*uncompressed .tar"),
            ("compressed", {"a.tar.gz": b"\x1f\x8b", "b.tar": good}, "holds compressed tars .*a.tar.gz.*decompress"),
            ("concatenated", {"x.tar": good + good}, "x.tar: data after the end-of-archive marker"),
            ("scattered", {"x.tar": tar_bytes([("s/1", {"png": png(1)}), ("s/2", {"png": png(2)}), ("s/1", {"cls": b"a"})])},
             "x.tar: the files of sample s/1 are not consecutive .*tar --sort=name"),
            ("empty", {"x.tar": tar_bytes([]), "y.tar": tar_bytes([], folders=("d",))}, "has no samples"),
            ("zero-bytes", {"x.tar": b""}, "x.tar is empty")]:
        for file, data in files.items():
            write(tmp_path / name / file, data)
        with pytest.raises(ValueError, match=match):
            list_inputs(str(tmp_path / name))

    write(tmp_path / "mixed" / "a.tar", good)
    pq.write_table(pa.table({"image": [png(1)]}), tmp_path / "mixed" / "b.parquet")
    with pytest.raises(ValueError, match="holds both Parquet files .* and WebDataset tars"):
        list_inputs(str(tmp_path / "mixed"))
    # an empty tar beside others is an input of no samples, and no partition
    write(tmp_path / "one-empty" / "a.tar", good)
    write(tmp_path / "one-empty" / "b.tar", tar_bytes([]))
    assert [i["rows"] for i in list_inputs(str(tmp_path / "one-empty"))] == [3, 0]
    assert [len(p) for p in list_partitions(str(tmp_path / "one-empty"), 10)] == [3]


def test_sample_without_image_and_corrupt_image_are_errors(tmp_path):
    tar = write(tmp_path / "wds" / "s.tar", tar_bytes([
        ("000000", {"png": png(1)}), ("000001", {"cls": b"3", "json": b"{}"}),
        ("000002", {"jpg": b"not a jpeg", "cls": b"4"}), ("000003", {"png": png(2)})]))
    [part] = list_partitions(str(tmp_path / "wds"))
    images, errors = decode_partition(part)
    assert [(i, u) for i, u, _, _ in images] == [(0, f"{tar}#000000"), (3, f"{tar}#000003")]
    assert errors == [
        {"id": 1, "uri": f"{tar}#000001", "error": f"sample has no image (members: 000001.cls, 000001.json): {tar}#000001"},
        {"id": 2, "uri": f"{tar}#000002", "error": f"not an image file: {tar}#000002"}]


def test_tar_cut_after_planning_is_accounted_item_by_item(ray_local, s3_bucket):
    fs = fsspec.filesystem("s3")
    root, out = f"{s3_bucket}/wds", f"{s3_bucket}/emb"
    fs.pipe(f"{root}/a.tar", tar_bytes([(f"a/{n}", {"png": png(n * 30)}) for n in range(3)]))
    b = tar_bytes([("b/0", {"png": png(1)}), ("b/1", {"cls": b"no picture"}), ("b/2", {"png": png(2)}),
                   ("b/3", {"png": png(3)})])
    fs.pipe(f"{root}/b.tar", b)
    fs.invalidate_cache()
    plan = plan_embedding(root, "raw-pixels:8", out, partition_size=2)
    assert plan.images == 7 and len(plan.pending) == 4

    fs.pipe(f"{root}/b.tar", b[:member_offsets(b)[2].offset_data + 30])     # cut in the image of sample b/2
    fs.invalidate_cache()
    summary = run_embedding(plan)               # no exception: its accounting check holds
    assert (summary.images, summary.errors, summary.total) == (4, 3, 7)
    errors = [json.loads(line) for line in fs.cat(f"{out}/errors.jsonl").decode().splitlines()]
    assert [(e["id"], e["uri"]) for e in errors] == [(4, f"{root}/b.tar#b/1"), (5, f"{root}/b.tar#b/2"),
                                                     (6, f"{root}/b.tar#sample=3")]
    assert errors[0]["error"] == f"sample has no image (members: 1.cls): {root}/b.tar#b/1"
    for e in errors[1:]:
        assert e["error"].startswith(f"cannot read sample {e['id'] - 3} of the tar (unexpected end of data); "
                                     f"the tar changed after the collection was listed (size {len(b)} -> "), e
        assert e["error"].endswith(f": {e['uri']}")
    assert read_embeddings(out).column("id").to_pylist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=f"{root}/b.tar: truncated or corrupt tar: 2 complete sample"):
        embed_collection(root, "raw-pixels:8", out, partition_size=2)     # a re-run refuses the cut tar by name
