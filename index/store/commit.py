"""How a new memory version becomes current, safely under two writers and crashes.

Layout: ``ROOT/v<N>/manifest.json`` is version N; ``ROOT/manifest.json`` (the pointer) names the
current one. A writer that starts from version N

1. writes its new files (never an existing one) under its own folder ``v<N+1>/<token>/``,
2. creates ``v<N+1>/manifest.json`` *exclusively*: this is the commit point. Of two writers that
   both start from N, exactly one creates it; the other gets ``MemoryConflict`` and nothing of
   its edit becomes visible, so no update is lost;
3. moves the pointer forward to N+1.

``transaction`` is the one entry point for these steps: the build, every edit, rollback and the
served memory's Router each make their version inside one.

A writer killed before step 2 leaves only files no manifest references (harmless, for vacuum to
delete); the previous version stays whole. A writer killed between 2 and 3 has committed: the
pointer is only a hint that readers roll forward (``current_version`` probes ``v<N+1>``, ``v<N+2>``,
… past it), and the next edit moves it. Versions are consecutive, which is what makes the exclusive
create a compare-and-swap: every writer based on N competes for the same name.

Exclusive create: a hard link of a finished temporary file on local disks (atomic, never a partial
file), S3's conditional put ``If-None-Match: *`` through s3fs's ``mode="create"`` (AWS S3 since
2024 and moto honour it; s3fs maps the 412 answer to ``FileExistsError``), and fsspec's
``mode="create"`` elsewhere (atomic for the in-process ``memory://`` store used in tests).

Every byte the memory stores goes through ``write`` and every file it deletes (``vacuum``) through
``delete``, so tests can make the n-th one fail and check that the previous version survives and
that a re-run completes the edit.

``vacuum`` deletes old versions' manifests, which would let a stale writer based on one of them
re-create a deleted ``v<K>/manifest.json`` unseen (readers roll forward from the pointer, past
K). So ``vacuum`` moves the pointer to the current version first, and ``staged`` and ``commit``
refuse a version the pointer has already passed.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from procdata.storage import write_atomic

log = logging.getLogger("vismem.index.commit")
POINTER = "manifest.json"


class MemoryConflict(RuntimeError):
    """Another writer committed the version this edit was going to write."""


def version_dir(version: int) -> str:
    return f"v{version}"


def manifest_path(version: int) -> str:
    """The path of version ``version``'s manifest, relative to the memory root."""
    return f"{version_dir(version)}/{POINTER}"


def new_folder(version: int) -> str:
    """A folder for one writer's files of version ``version``: its own, so that two writers racing
    for the same version never overwrite each other's files (the loser's become orphans)."""
    return f"{version_dir(version)}/{uuid.uuid4().hex[:12]}"


def write(fs, path: str, data, mode: str = "new") -> None:
    """Store ``data`` at ``path``. ``mode``: ``"new"`` for a file no reader knows of yet (a plain
    put), ``"create"`` to create it only if absent (``FileExistsError`` otherwise), ``"replace"``
    for an existing name readers may be reading (an atomic replace: the pointer).

    ``data`` is bytes, or (mode ``"new"`` only) a function that writes the file's bytes to the
    open file it is given: a shard index streams out that way, never held whole in memory. A new
    file's name is referenced by no manifest until its version commits, so a write killed half-way
    leaves only an orphan for vacuum (on S3 not even that: a failed stream aborts its upload)."""
    if callable(data) and mode != "new":
        raise ValueError("only a new file can be written as a stream")
    if mode == "replace":
        return write_atomic(fs, path, data)
    if mode not in ("create", "new"):
        raise ValueError(f"unknown write mode {mode!r}")

    def put():
        if mode == "create":
            create_exclusive(fs, path, data)
        elif callable(data):
            f = fs.open(path, "wb")
            try:
                data(f)
            except BaseException:
                if isinstance(f, fsspec.spec.AbstractBufferedFile):
                    f.discard()                # an object store's upload is aborted, not completed
                else:
                    f.close()                  # a local file: an orphan in this writer's own folder
                raise
            f.close()
        else:
            fs.pipe_file(path, data)

    try:
        put()
    except FileNotFoundError:
        if not isinstance(fs, LocalFileSystem):    # object stores have no folders (and a missing bucket stays missing)
            raise
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        put()


def create_exclusive(fs, path: str, data: bytes) -> None:
    """Create ``path`` holding ``data`` unless it exists (then ``FileExistsError``), atomically."""
    if isinstance(fs, LocalFileSystem):            # a link cannot replace a name: the POSIX way to claim one
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        finally:
            with suppress(OSError):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data, mode="create")


def commit(fs, root: str, version: int, body: bytes) -> None:
    """Create ``v<version>/manifest.json`` exclusively (the commit point), or ``MemoryConflict``.

    A store error after which the manifest is there with our bytes (an answer lost on the way
    back) counts as committed: the caller must not then delete the files it references.
    """
    path = f"{root}/{manifest_path(version)}"
    try:
        write(fs, path, body, mode="create")
    except FileExistsError:
        raise MemoryConflict(conflict_message(version)) from None
    except Exception:
        with suppress(Exception):
            if exists(fs, path) and fs.cat_file(path) == body:
                return check_not_passed(fs, root, version)
        raise
    check_not_passed(fs, root, version)


def check_not_passed(fs, root: str, version: int) -> None:
    """A writer slow enough that ``version`` was committed by another writer *and* deleted by
    ``vacuum`` meanwhile re-creates its manifest behind the pointer, where no reader looks (vacuum
    moves the pointer past a version before deleting it). Undo that and answer ``MemoryConflict``."""
    if (read_pointer(fs, root) or 0) >= version:
        with suppress(Exception):
            fs.rm(f"{root}/{manifest_path(version)}")
        raise MemoryConflict(conflict_message(version))


def conflict_message(version: int) -> str:
    return f"version {version} was written by another writer; re-open the memory and retry"


@contextmanager
def staged(fs, root: str, version: int):
    """A new folder for this writer's files of ``version`` (yielded relative to ``root``). Fails at
    once with ``MemoryConflict`` if the version is already committed; removes the folder if the
    block raises, which it must do only before its ``commit`` succeeded (``commit`` is its last
    step), so an edit that fails leaves nothing a later writer could mistake for its own."""
    if exists(fs, f"{root}/{manifest_path(version)}") or (read_pointer(fs, root) or 0) >= version:
        raise MemoryConflict(conflict_message(version))
    folder = new_folder(version)
    try:
        yield folder
    except BaseException:
        remove_folder(fs, root, folder)
        raise


@dataclass
class Transaction:
    """One writer's next version in the making (see ``transaction``): its files go under ``folder``
    (relative to ``root`` in ``fs``); ``manifest`` is what the version commits."""
    fs: object
    root: str
    version: int
    folder: str
    manifest: object = None                # the new version's Manifest, set by the block


@contextmanager
def transaction(url: str, version: int):
    """Make version ``version`` of the memory at ``url``: stage → write → commit → move the pointer.

    Yields a ``Transaction`` whose ``folder`` is this writer's own (``staged``: ``MemoryConflict``
    at once if the version is already committed). The block writes the version's new files there
    and sets ``manifest``; leaving the block creates ``v<version>/manifest.json`` exclusively (the
    commit point: ``MemoryConflict`` if another writer got there first) and then moves the pointer.
    A block that raises commits nothing and its folder is removed."""
    fs, root = filesystem(url)
    with staged(fs, root, version) as folder:
        txn = Transaction(fs, root, version, folder)
        yield txn
        if txn.manifest is None:
            raise RuntimeError(f"the transaction of version {version} of {url} set no manifest; nothing was committed")
        commit(fs, root, version, txn.manifest.to_json())
    move_pointer(fs, root, version)


def delete(fs, paths: list[str]) -> None:
    """Delete ``paths`` (absolute within ``fs``): the one way the memory deletes files (vacuum)."""
    if paths:
        fs.rm(paths)


def move_pointer(fs, root: str, version: int) -> None:
    """Point ``ROOT/manifest.json`` at ``version`` unless it already names a later one.

    Called after the commit, so a failure here loses nothing (readers roll forward past a stale
    pointer); it is logged, not raised, because the edit it follows has already happened.
    """
    try:
        if (pointed := read_pointer(fs, root)) is not None and pointed >= version:
            return
        write(fs, f"{root}/{POINTER}", json.dumps({"current": version, "path": manifest_path(version)}).encode(),
              mode="replace")
    except Exception as e:  # noqa: BLE001 (any storage error: the version is committed all the same)
        log.warning("version %d of %s is committed but the pointer was not moved (%s: %s); readers find it anyway",
                    version, root, type(e).__name__, e)


def read_pointer(fs, root: str) -> int | None:
    """The version the pointer names, or None where there is no memory yet."""
    try:
        return int(json.loads(fs.cat_file(f"{root}/{POINTER}"))["current"])
    except FileNotFoundError:
        return None


def exists(fs, path: str) -> bool:
    fs.invalidate_cache(path.rsplit("/", 1)[0])     # s3fs answers from a listing cache otherwise
    return fs.exists(path)


def current_version(fs, root: str) -> int | None:
    """The latest committed version: the pointer's, rolled forward past versions committed after
    it (a writer that died between commit and pointer move, or a slower writer's older pointer)."""
    version = read_pointer(fs, root)
    if version is None:
        return None
    while exists(fs, f"{root}/{manifest_path(version + 1)}"):
        version += 1
    return version


def remove_folder(fs, root: str, folder: str) -> None:
    """Delete an uncommitted writer's ``folder`` (and its version folder when that is left empty),
    best effort: what stays behind is an orphan that no manifest references."""
    try:
        if fs.exists(f"{root}/{folder}"):
            fs.rm(f"{root}/{folder}", recursive=True)
        parent = f"{root}/{folder.rsplit('/', 1)[0]}"
        if isinstance(fs, LocalFileSystem) and fs.exists(parent) and not fs.ls(parent):
            fs.rmdir(parent)
    except Exception as e:  # noqa: BLE001
        log.warning("could not remove the uncommitted files under %s/%s (%s); vacuum removes them later", root, folder, e)


def filesystem(url: str):
    """(fs, root without a trailing slash) for a memory URL."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")
