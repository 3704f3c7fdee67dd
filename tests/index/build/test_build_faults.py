"""A worker killed mid-build: Ray retries its task and the build ends as if nothing had happened
(the memory is byte-identical to the same build in one process), or, killed on every attempt, the
build fails with nothing committed and no staged version left behind.

The kills are real: the test SIGKILLs the Ray worker process while it runs ``encode_file``, or
``merge_shard`` once that task has begun writing its shard's files under their final names (so
the retry finds the dead attempt's files, complete or cut short, in its way). It finds that
process by the title Ray gives a worker while it runs a task (``ray::encode_file``; ``ray::IDLE``
between tasks), among the workers of the local Ray this process started (children of its raylet,
itself a child of this process: another Ray on the machine is never touched). A candidate is
stopped (SIGSTOP) and its title (and the test's condition) read again before the kill, so only a
worker that is still running the task dies; one that finished meanwhile is resumed. The state API
(``ray.util.state.list_tasks``) cannot find the worker in time: task events reach it about a
second late, and an ``encode_file`` task here runs for a tenth of a second. It does confirm,
afterwards, that Ray saw each killed attempt as ``WORKER_DIED`` and what it did next.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from index.build.build import build_memory
from index.build.parallel_add import TASK_OPTIONS, encode_file, merge_shard
from index.memory import VisualMemory
from index.store.manifest import list_versions, read_manifest
from index.synthetic import ClusteredVectors
from tests.index.build.test_parallel_build import shard_digests, write

FACTORY = "IVF64,SQ8"
ROWS, ROWS_PER_FILE = 40_000, 10_000       # 4 files: encode_file tasks of ~0.1 s each, long enough to catch
TASK, MERGE = encode_file.__name__, merge_shard.__name__
ATTEMPTS = TASK_OPTIONS["max_retries"] + 1
pytestmark = pytest.mark.timeout(300)      # a build that hangs after a kill fails here, not after the suite's 900 s


@pytest.fixture(scope="module")
def vectors():
    return ClusteredVectors(dim=64, clusters=256, spread=0.8, seed=11).rows(0, ROWS)


@pytest.fixture(scope="module")
def embeddings(vectors, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("faults") / "emb")
    write(url, vectors, rows_per_file=ROWS_PER_FILE)
    return url


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def title(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0", 1)[0]


class WorkerKiller(threading.Thread):
    """SIGKILLs, up to ``times`` times, a worker of this process's local Ray caught running ``task``
    (only while ``when()`` is true, if given: what it returned, read while the worker was stopped,
    is kept in ``seen`` for each kill)."""

    def __init__(self, task: str, times: int, when: Callable[[], object] | None = None):
        super().__init__(daemon=True)
        self.title = f"ray::{task}".encode()
        self.times = times
        self.when = when or (lambda: True)
        self.killed: list[int] = []
        self.seen: list = []
        self.done = threading.Event()
        self.me = os.getpid()

    def running(self) -> list[int]:
        """Workers of our Ray (parent: a child of this process, the raylet) titled as running the task
        (a killed worker keeps its title until it has exited: it is not counted twice)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                if pid not in self.killed and title(pid) == self.title and parent(parent(pid)) == self.me:
                    found.append(pid)
            except (OSError, ValueError, IndexError):        # gone meanwhile
                continue
        return found

    def kill(self, pid: int) -> bool:
        """Kill ``pid`` if, once stopped, it is still running the task; else let it go on."""
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return False
        try:
            if title(pid) == self.title and (seen := self.when()):
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
                self.seen.append(seen)
                return True
        except OSError:
            pass
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        return False

    def run(self):
        while not self.done.is_set() and len(self.killed) < self.times:
            for pid in self.running():
                if len(self.killed) < self.times and self.when():
                    self.kill(pid)
            time.sleep(0.002)


@contextmanager
def killing(task: str, times: int, when: Callable[[], object] | None = None):
    killer = WorkerKiller(task, times, when)
    killer.start()
    try:
        yield killer
    finally:
        killer.done.set()
        killer.join(30)


def attempts_since(ray, task: str, since_ms: float, ready, timeout: float = 60) -> dict:
    """``{task_id: {attempt: (state, error_type)}}`` of the ``task`` tasks created since
    ``since_ms``, as soon as ``ready`` holds of it (task events reach the state API a second or so
    late), else as they stand after ``timeout`` seconds."""
    from ray.util.state import list_tasks
    address = ray.get_runtime_context().gcs_address    # this session's Ray, not another on the machine
    deadline = time.time() + timeout
    while True:
        found: dict = defaultdict(dict)
        for t in list_tasks(address=address, filters=[("name", "=", task)], detail=True, limit=10_000, timeout=30,
                            raise_on_missing_output=False):
            if (t.creation_time_ms or 0) >= since_ms:
                found[t.task_id][t.attempt_number] = (t.state, t.error_type)
        if ready(found) or time.time() > deadline:
            return dict(found)
        time.sleep(0.5)


def tree(root: Path) -> dict[str, str]:
    """``{path under root: sha256}`` of every file of a memory."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def build_files(root: Path) -> dict[str, str | None]:
    """The files of a memory of one version by name, the build's own folder (a random token) as
    ``<build>``, with their sha256 (None for the manifests, which hold the token and a time)."""
    out = {}
    for path, digest in tree(root).items():
        parts = Path(path).parts
        name = "/".join((parts[0], "<build>", *parts[2:])) if len(parts) > 2 else path
        out[name] = None if parts[-1] == "manifest.json" else digest
    return out


def retried_once(ray, task: str, count: int, since_ms: float) -> None:
    """Of the ``count`` ``task`` tasks created since ``since_ms``, one attempt died (``WORKER_DIED``),
    Ray ran that task again and it finished; every other task finished at once."""
    tasks = attempts_since(ray, task, since_ms, lambda found: len(found) == count and all(
        any(state == "FINISHED" for state, _ in a.values()) for a in found.values()) and any(
        state == "FAILED" for a in found.values() for state, _ in a.values()))
    failed = {(t, n): error for t, a in tasks.items() for n, (state, error) in a.items() if state == "FAILED"}
    assert len(tasks) == count and list(failed.values()) == ["WORKER_DIED"], tasks
    [(t, n)] = failed
    assert tasks[t][n + 1][0] == "FINISHED", tasks[t]                         # Ray ran it again


def assert_same_memory(local: Path, on_ray: Path, manifest, vectors) -> None:
    """The memory built on Ray is the one built in process: the same files, and it answers the same."""
    assert shard_digests(str(local)) == shard_digests(str(on_ray))
    assert build_files(local) == build_files(on_ray)         # every file the same bytes, none more, none less
    assert manifest.version == 1 and list_versions(str(on_ray)) == [1] and manifest.counts["vectors"] == ROWS
    a, b = VisualMemory.open(str(local)), VisualMemory.open(str(on_ray))      # opening checks every file's sha256
    queries = vectors[::400]
    found = b.search(queries, 10)
    assert (found.ids == a.search(queries, 10).ids).all()
    assert (found.ids[:, 0] == np.arange(0, ROWS, 400)).all()                 # each vector finds itself


def test_a_worker_killed_while_it_encodes_a_file_is_retried_and_the_memory_is_the_same(ray_local, vectors,
                                                                                     embeddings, tmp_path):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    build_memory(embeddings, str(local), shards=2, factory=FACTORY, use_ray=False)
    since = time.time() * 1000
    with killing(TASK, times=1) as killer:
        manifest = build_memory(embeddings, str(on_ray), shards=2, factory=FACTORY, use_ray=True)
    assert len(killer.killed) == 1, f"no worker was caught running {TASK}: make its files larger"
    retried_once(ray_local, TASK, ROWS // ROWS_PER_FILE, since)
    assert_same_memory(local, on_ray, manifest, vectors)


def test_a_worker_killed_while_it_writes_a_shard_is_retried_and_the_memory_is_the_same(ray_local, vectors,
                                                                                     embeddings, tmp_path):
    # One shard: a single merge task, of ~0.3 s (most of it the calibration searches after the
    # shard is written), and every shard file in the staging folder is that task's own.
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    build_memory(embeddings, str(local), shards=1, factory=FACTORY, use_ray=False)

    def written() -> dict[str, int]:
        """The shard files staged so far, with their sizes: the merge task has begun writing."""
        return {p.name: p.stat().st_size for p in sorted(on_ray.glob("v1/*/shard-*"))}

    since = time.time() * 1000
    with killing(MERGE, times=1, when=written) as killer:
        manifest = build_memory(embeddings, str(on_ray), shards=1, factory=FACTORY, use_ray=True)
    assert len(killer.killed) == 1, f"no worker was caught running {MERGE} after it began writing its shard"
    [left] = killer.seen                  # what the dead attempt left under the shard files' final names
    assert "shard-0000.faiss" in left, left
    retried_once(ray_local, MERGE, 1, since)
    assert_same_memory(local, on_ray, manifest, vectors)      # the retry wrote them all again: not a byte left over


def test_a_task_killed_on_every_attempt_fails_the_build_with_nothing_committed(ray_local, embeddings, tmp_path):
    memory = tmp_path / "mem"
    build_memory(embeddings, str(memory), shards=2, factory=FACTORY, use_ray=False)     # version 1
    before = tree(memory)
    since = time.time() * 1000
    with killing(TASK, times=ATTEMPTS * ROWS // ROWS_PER_FILE) as killer, \
            pytest.raises(RuntimeError, match=r"the build's encode task \d+ of 4 failed: its worker died 4 times "
                                              r"\(WorkerCrashedError; .*nothing was committed") as failed:
        build_memory(embeddings, str(memory), shards=2, factory=FACTORY, use_ray=True)
    assert isinstance(failed.value.__cause__, ray_local.exceptions.WorkerCrashedError)
    assert len(killer.killed) >= ATTEMPTS

    def exhausted(a: dict) -> bool:
        return sorted(a) == list(range(ATTEMPTS)) and all(v == ("FAILED", "WORKER_DIED") for v in a.values())
    tasks = attempts_since(ray_local, TASK, since, lambda found: any(exhausted(a) for a in found.values()))
    assert any(exhausted(a) for a in tasks.values()), tasks                  # one task died on each of its attempts

    assert tree(memory) == before                  # not a file added, changed or removed: no staged v2 left behind
    assert not (memory / "v2").exists()
    assert list_versions(str(memory)) == [1] and read_manifest(str(memory)).version == 1
    assert len(VisualMemory.open(str(memory))) == ROWS
