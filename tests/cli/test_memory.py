"""`vismem memory ...`: editing a memory from the command line (add, remove, prune, versions, log,
diff, rollback, compact, vacuum), locally and on S3, and bad input as one line, exit 2, nothing
written."""

import json
import os

import numpy as np
import pytest

from cluster.cli import main
from index.build.build import build_memory
from index.memory import VisualMemory
from index.store.manifest import list_versions
from tests.index.edit.test_memory_edits import write_collection
from tests.index.test_memory import unit


def build_small(root, store=None):
    """A 2-shard Flat memory of 200 16-d vectors in 4 classes (c0..c3), uris mem://img/<i>.png;
    returns (memory url, vectors)."""
    vectors = unit(np.random.default_rng(3).normal(size=(200, 16)))
    mem = store or str(root / "mem")
    build_memory(write_collection(str(root / "emb"), vectors, [f"c{i % 4}" for i in range(200)]), mem, shards=2)
    return mem, vectors


@pytest.fixture
def small(tmp_path):
    return build_small(tmp_path)


def vismem(capsys, *args) -> tuple[int, str, str]:
    """``main(args)``: (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.splitlines()[-1])


def snapshot(root) -> dict:
    """Every file under ``root`` with its size and modification time."""
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(root) for f in files}


def test_add_remove_history_and_rollback(small, tmp_path, capsys):
    mem, vectors = small
    new = write_collection(str(tmp_path / "new"), -vectors[:6], ["zebra"] * 3 + ["c1"] * 3, ids=np.arange(6),
                           uris=[f"mem://new/{i}.png" for i in range(6)])
    code, out, err = vismem(capsys, "memory", "add", "--memory", mem, "--embeddings", new, "--reason", "zebras",
                            "--json")
    assert code == 0, err
    added = last_json(out)
    assert (added["version"], added["added"], added["new_classes"], added["count"]) == (2, 6, ["zebra"], 206)
    assert added["ids"] == list(range(200, 206))
    assert "version 2 adds 6 vectors" in out and "1 new classes: zebra" in out and "206 vectors now" in out
    assert "memory add" in err and "2/2 steps" in err                      # progress on stderr

    code, out, err = vismem(capsys, "memory", "remove", "--memory", mem, "--ids", "0,1,203", "--reason", "consent")
    assert code == 0, err
    assert "version 3 removes 3 vectors (ids 0, 1, 203)" in out
    assert "stay in older versions' files until `vismem memory compact` and `vismem memory vacuum`" in out
    code, out, err = vismem(capsys, "memory", "remove", "--memory", mem, "--label", "c3", "--label", "zebra",
                            "--uris", "mem://img/2.png,mem://img/4.png", "--uris", "mem://new/5.png", "--json")
    assert code == 0, err
    removed = last_json(out)
    c3 = list(range(3, 200, 4))
    assert removed["version"] == 4 and removed["ids"] == sorted({*c3, 200, 201, 202, 2, 4, 205})
    assert removed["count"] == 206 - 3 - len(removed["ids"]) and not removed["purged"]
    memory = VisualMemory.open(mem)
    assert not memory.live([0, 1, 2, 3, 4, 200, 203]).any() and memory.live([5, 204]).all()

    code, out, _ = vismem(capsys, "memory", "versions", "--memory", mem)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [["1", lines[0].split()[1]], ["2", lines[1].split()[1]],
                                                        ["3", lines[2].split()[1]], ["*", "4"]]
    assert [line.split()[-1] for line in lines[:4]] == ["build", "add", "remove", "remove"] and "UTC" in lines[0]
    assert lines[-1].endswith("4 versions, current 4")
    assert last_json(vismem(capsys, "memory", "versions", "--memory", mem, "--json")[1])["current"] == 4

    code, out, _ = vismem(capsys, "memory", "log", "--memory", mem)
    assert code == 0
    rows = out.splitlines()
    assert rows[0].split()[:2] == ["version", "time"] and len(rows) == 5
    assert "add" in rows[2] and "added 6" in rows[2] and rows[2].endswith("zebras")
    assert "remove" in rows[3] and "removed 3" in rows[3] and rows[3].endswith("consent")
    log = last_json(vismem(capsys, "memory", "log", "--memory", mem, "--json")[1])["log"]
    assert [r["operation"] for r in log] == ["build", "add", "remove", "remove"] and log[1]["reason"] == "zebras"
    assert log[0]["user"] and log[0]["user"] == log[3]["user"]

    code, out, _ = vismem(capsys, "memory", "diff", "--memory", mem, "--from", "1", "--to", "4")
    gone = sorted({0, 1, 2, 4, *c3})
    assert code == 0 and f"version 1 → 4: 1 added (ids 204), {len(gone)} removed (ids 0, 1, 2, 3, 4, 7, 11" in out
    assert "… and" in out                                               # only the first ids in the summary
    diff = last_json(vismem(capsys, "memory", "diff", "--memory", mem, "--from", "1", "--to", "4", "--json")[1])
    assert diff["added"] == [204] and diff["removed"] == gone

    code, out, err = vismem(capsys, "memory", "rollback", "--memory", mem, "--to", "2", "--reason", "undo", "--json")
    assert code == 0, err
    assert last_json(out) == {"memory": mem, "version": 5, "restored": 2, "count": 206}
    assert "version 5 holds version 2's content (206 vectors)" in out
    again = VisualMemory.open(mem)
    assert again.version == 5 and again.live([0, 3, 200, 205]).all()
    assert last_json(vismem(capsys, "memory", "log", "--memory", mem, "--json")[1])["log"][-1]["target"] == 2
    assert "rollback of version 2" in vismem(capsys, "memory", "versions", "--memory", mem)[1]


def test_edit_on_s3(s3_bucket, tmp_path, capsys):
    mem, _ = build_small(tmp_path, store=s3_bucket + "/mem")
    code, out, err = vismem(capsys, "memory", "remove", "--memory", mem, "--label", "c2", "--reason", "s3", "--json")
    assert code == 0, err
    assert last_json(out)["version"] == 2 and last_json(out)["count"] == 150
    memory = VisualMemory.open(mem)
    assert memory.version == 2 and len(memory) == 150 and not memory.live([2, 6, 10]).any()
    log = last_json(vismem(capsys, "memory", "log", "--memory", mem, "--json")[1])["log"]
    assert log[-1]["operation"] == "remove" and log[-1]["reason"] == "s3" and log[-1]["counts"] == {"removed": 50}
    code, out, err = vismem(capsys, "memory", "remove", "--memory", mem, "--ids", "2")        # already removed
    assert code == 2 and "[2] not in memory" in err and list_versions(mem) == [1, 2]


def other_encoder(tmp_path, vectors):
    return write_collection(str(tmp_path / "other"), vectors[:3], ["a"] * 3, encoder=("runs/other", "def"))


def wrong_dimension(tmp_path, vectors):
    return write_collection(str(tmp_path / "wide"), unit(np.ones((3, 8))), ["a"] * 3)


BAD = [
    (["remove", "--ids", "3,5,1000"], r"[1000] not in memory"),
    (["remove", "--ids", "3,x"], "--ids takes comma-separated whole numbers (memory ids), got '3,x'"),
    (["remove", "--label", "c1", "--label", "okapi"], "labels ['okapi'] not in memory"),
    (["remove", "--uris", "mem://img/1.png,mem://img/nope.png"], "uris ['mem://img/nope.png'] not in memory"),
    (["remove"], "memory remove needs what to remove: --ids, --uris or --label"),
    (["remove", "--uris", ","], "--uris needs at least one URI"),
    (["add", "--embeddings", other_encoder], "encoder runs/other (sha256 def, 16-d)"),
    (["add", "--embeddings", wrong_dimension], "(sha256 abc, 8-d)"),
    (["add", "--embeddings", "NOWHERE"], "no embeddings at"),
    (["rollback", "--to", "9"], "has no version 9 (versions: [1])"),
    (["rollback", "--to", "1"], "version 1 is the current version"),
    (["diff", "--from", "1", "--to", "9"], "has no version 9"),
    (["info", "--version", "9"], "has no version 9"),
    (["prune", "--threshold", "0", "--mode", "hard"], "--threshold must be positive, got 0"),
    (["prune", "--mode", "soft", "--queries", other_encoder], "encoder runs/other"),
    (["prune", "--mode", "hard"], "--mode hard needs --threshold N"),
    (["prune", "--mode", "soft", "--threshold", "3"], "--threshold goes with --mode hard"),
    (["vacuum", "--keep-last", "0"], "--keep-last must be positive, got 0"),
    (["vacuum", "--older-than-days", "-1"], "--older-than-days must be zero or more, got -1.0"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a if isinstance(a, str) else a.__name__ for a in args)
                                                    for args, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(small, tmp_path, capsys, args, message):
    mem, vectors = small
    args = [a(tmp_path, vectors) if callable(a) else a for a in args]
    args = [str(tmp_path / a) if a == "NOWHERE" else a for a in args]
    before = snapshot(mem)
    code, out, err = vismem(capsys, "memory", args[0], "--memory", mem, *args[1:])
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("vismem memory: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err and snapshot(mem) == before and list_versions(mem) == [1]


@pytest.mark.parametrize("action", ["remove --ids 1", "add --embeddings EMB", "rollback --to 1", "log", "versions",
                                    "diff --from 1 --to 1", "info", "compact", "vacuum --dry-run",
                                    "prune --mode soft"])
def test_no_memory_or_a_newer_format_is_one_line(small, tmp_path, capsys, action):
    mem, _ = small
    words = [str(tmp_path / "emb") if w == "EMB" else w for w in action.split()]
    code, _, err = vismem(capsys, "memory", words[0], "--memory", str(tmp_path / "nomem"), *words[1:])
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and f"no memory at {tmp_path / 'nomem'}" in lines[0], err
    assert not (tmp_path / "nomem").exists()

    if action.startswith("rollback"):
        VisualMemory.open(mem).remove(ids=[0])                  # a version 2 to roll back from
    path = f"{mem}/v{list_versions(mem)[-1]}/manifest.json"
    with open(path) as f:
        m = json.load(f)
    m["format"] = "vismem-memory/9"
    with open(path, "w") as f:
        json.dump(m, f)
    before = snapshot(mem)
    code, _, err = vismem(capsys, "memory", words[0], "--memory", mem, *words[1:])
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1, err
    assert "'vismem-memory/9' manifest, which this vismem cannot read" in lines[0], err
    assert snapshot(mem) == before


def test_a_conflict_with_another_writer_is_one_line(small, capsys, monkeypatch):
    """Another writer commits between this command's open and its commit: MemoryConflict, one line,
    nothing of this edit written."""
    mem, _ = small
    real = VisualMemory.open.__func__

    def open_then_lose_the_race(cls, url, *a, **kw):
        stale = real(cls, url, *a, **kw)
        real(cls, url).remove(ids=[7], reason="the other writer")
        return stale

    monkeypatch.setattr(VisualMemory, "open", classmethod(open_then_lose_the_race))
    code, _, err = vismem(capsys, "memory", "remove", "--memory", mem, "--ids", "1")
    monkeypatch.undo()
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and lines == ["vismem memory: error: version 2 was written by another writer; re-open the "
                                   "memory and retry"], err
    memory = VisualMemory.open(mem)
    assert memory.version == 2 and memory.live([1]).all() and not memory.live([7]).any()


def test_every_memory_command_has_memory_json_and_examples():
    from tests.cli.test_cli import subcommands
    from cluster.cli import parser
    actions = {name: p for name, p in subcommands(parser()) if name.startswith("memory ")}
    assert set(actions) == {f"memory {a}" for a in ("info", "add", "remove", "prune", "versions", "log", "diff",
                                                    "rollback", "compact", "vacuum", "bench")}
    assert actions.pop("memory bench").epilog.startswith("examples:\n  vismem memory bench")   # makes its own memories
    for name, p in actions.items():
        options = set(p._option_string_actions)
        assert {"--memory", "--json", "-v"} <= options, name
        assert p.epilog.startswith("examples:\n  vismem " + name), name


# compact, vacuum, purge and prune ------------------------------------------------------------------
def test_compact_then_vacuum(small, capsys):
    mem, _ = small
    assert vismem(capsys, "memory", "remove", "--memory", mem, "--ids", "0,1,2")[0] == 0
    code, out, err = vismem(capsys, "memory", "compact", "--memory", mem, "--reason", "tidy", "--json")
    assert code == 0, err
    compacted = last_json(out)
    assert compacted["version"] == 3 and compacted["count"] == 197 and "memory compact" in err
    assert compacted["compacted"]["dropped"] == 3 and "dropping 3 removed vectors" in out
    assert "until `vismem memory vacuum`" in out
    code, _, err = vismem(capsys, "memory", "compact", "--memory", mem)             # nothing left to compact
    assert code == 2 and "nothing to compact" in err and list_versions(mem) == [1, 2, 3]
    memory = VisualMemory.open(mem)
    assert memory.version == 3 and len(memory) == 197 and not memory.live([0, 1, 2]).any()

    before = snapshot(mem)
    code, out, err = vismem(capsys, "memory", "vacuum", "--memory", mem, "--keep-last", "1", "--dry-run", "--json")
    assert code == 0, err
    dry = last_json(out)
    assert dry["dry_run"] and dry["deleted_versions"] == [1, 2] and dry["kept_versions"] == [3]
    assert dry["deleted_files"] and dry["freed_bytes"] > 0 and "would delete 2 versions" in out
    assert all(f.startswith(("v1/", "v2/")) for f in dry["deleted_files"])
    assert snapshot(mem) == before and list_versions(mem) == [1, 2, 3]

    code, out, err = vismem(capsys, "memory", "vacuum", "--memory", mem, "--keep-last", "1", "--json")
    assert code == 0, err
    done = last_json(out)
    assert {k: done[k] for k in ("deleted_versions", "deleted_files", "freed_bytes", "kept_versions")} == \
        {k: dry[k] for k in ("deleted_versions", "deleted_files", "freed_bytes", "kept_versions")}
    assert "deleted 2 versions" in out and list_versions(mem) == [3] and len(VisualMemory.open(mem)) == 197

    code, out, err = vismem(capsys, "memory", "vacuum", "--memory", mem, "--older-than-days", "1")
    assert code == 0 and "deleted 0 versions and 0 files" in out, err


def test_remove_with_purge_unlearns(small, capsys):
    mem, vectors = small
    code, out, err = vismem(capsys, "memory", "remove", "--memory", mem, "--ids", "5,6", "--purge", "--json")
    assert code == 0, err
    result = last_json(out)
    assert result["purged"] and result["ids"] == [5, 6] and result["count"] == 198
    assert "unlearning is complete" in out and result["version"] == 2 and result["compact_version"] == 3
    assert result["vacuum"]["deleted_versions"] == [1, 2] and result["current"] == 3
    memory = VisualMemory.open(mem)
    assert not memory.live([5, 6]).any() and not np.isin(memory.search(vectors[:20], 50).ids, [5, 6]).any()
    assert list_versions(mem) == [memory.version]              # no older version holds them any more
    code, _, err = vismem(capsys, "memory", "remove", "--memory", mem, "--ids", "5", "--purge")
    assert code == 2 and "[5] not in memory" in err


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_prune(tmp_path, capsys, mode):
    """Class c1's items that sit among c0's clusters mislead their neighbours: pruning finds them."""
    rng = np.random.default_rng(1)
    centres = unit(rng.normal(size=(2, 16)))
    vectors = unit(np.repeat(centres, 100, axis=0) + 0.1 * rng.normal(size=(200, 16)))
    labels = ["c0"] * 100 + ["c1"] * 100
    for i in range(5):
        labels[i] = "c1"                                           # mislabelled items in c0's cluster
    mem = str(tmp_path / "mem")
    build_memory(write_collection(str(tmp_path / "emb"), vectors, labels), mem, shards=2)
    threshold = ["--threshold", "5"] if mode == "hard" else []
    code, out, err = vismem(capsys, "memory", "prune", "--memory", mem, "--mode", mode, *threshold, "-k", "10",
                            "--reason", "noisy labels", "--json")
    assert code == 0, err
    result = last_json(out)
    assert result["version"] == 2 and result["mode"] == mode and result["changed"] and result["leave_one_out"]
    assert f"{mode} pruning over 200 queries (the memory itself, leave-one-out, k=10)" in out
    assert "memory prune" in err
    memory = VisualMemory.open(mem)
    assert memory.log()[-1]["reason"] == "noisy labels" and memory.log()[-1]["operation"] == "prune"
    if mode == "hard":
        assert not memory.live(list(range(5))).any() and len(memory) == 200 - result["pruned"] == result["count"]
        assert f"{result['pruned']} counted 5 times or more removed in version 2" in out
    else:
        assert len(memory) == 200 and result["reweighted"] >= 5 and "down-weighted to 1.75/(1+count)" in out

    queries = write_collection(str(tmp_path / "queries"), vectors[100:110], ["c1"] * 10)
    code, out, err = vismem(capsys, "memory", "prune", "--memory", mem, "--queries", queries, "--mode", mode,
                            *threshold, "--json")
    assert code == 0, err
    result = last_json(out)
    assert result["queries"] == 10 and not result["leave_one_out"] and f"10 queries ({queries}, k=10)" in out
    assert result["version"] == (3 if result["changed"] else 2) == VisualMemory.open(mem).version

    unlabelled = write_collection(str(tmp_path / "unlabelled"), vectors[:4], [None] * 4)
    before = list_versions(mem)
    code, _, err = vismem(capsys, "memory", "prune", "--memory", mem, "--queries", unlabelled, "--mode", mode,
                          *threshold)
    assert code == 2 and "4 of them without a label" in err and list_versions(mem) == before


def test_info_says_what_compaction_would_drop(small, capsys):
    small, _ = small
    code, out, _ = vismem(capsys, "memory", "info", "--memory", small)
    assert code == 0 and "since the last compaction" not in out
    vismem(capsys, "memory", "remove", "--memory", small, "--ids", "1,2,3")
    code, out, _ = vismem(capsys, "memory", "info", "--memory", small)
    assert code == 0 and "3 removed ids still in the files" in out
    vismem(capsys, "memory", "compact", "--memory", small)
    assert "since the last compaction" not in vismem(capsys, "memory", "info", "--memory", small)[1]
