"""An item's URI leads back to its image file (``item_bytes``), for each URI form the readers
give: a file, a Parquet row (``#row=N`` or ``#row=N:filename``) and a WebDataset sample
(``#key``); what is not there is a FileNotFoundError naming the URI."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index.ingest.collections import item_bytes


@pytest.fixture()
def stored(tmp_path):
    pq.write_table(pa.table({"image": [b"a", b"bb", b"ccc"], "filename": ["x", "y", "z"]}), tmp_path / "t.parquet",
                   row_group_size=2)                                 # row 2 lies in the second row group
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, data in (("a/001", b"one"), ("a/002", b"two")):
            for ext, payload in (("jpg", data), ("cls", b"3")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "f.png").write_bytes(b"png bytes")
    return tmp_path


def test_each_uri_form_reads_its_own_image(stored):
    assert item_bytes(f"{stored}/t.parquet#row=2:z") == b"ccc" and item_bytes(f"{stored}/t.parquet#row=0") == b"a"
    assert item_bytes(f"{stored}/s.tar#a/002") == b"two" and item_bytes(f"{stored}/s.tar#a/001") == b"one"
    assert item_bytes(f"{stored}/f.png") == b"png bytes" and item_bytes(f"file://{stored}/f.png") == b"png bytes"


@pytest.mark.parametrize("uri, message", [
    ("t.parquet#row=9", "t.parquet has 3 rows"),
    ("s.tar#a/003", "no image of sample 'a/003'"),
    ("nope.png", "nope.png"),
])
def test_what_is_not_there_is_named(stored, uri, message):
    with pytest.raises(FileNotFoundError, match=message):
        item_bytes(f"{stored}/{uri}")
