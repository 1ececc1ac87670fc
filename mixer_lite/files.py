"""Atomic file writes: a run's outputs appear whole or not at all.

Every file mixer-lite writes for later (checkpoints, model, metrics, classes, indexes) goes
through :func:`atomic_path`: the bytes go to a temporary file of a unique name in the same
folder, which is then renamed over the target (``os.replace``, atomic on one file system).
So a killed writer never leaves a half-written file behind, and two writers of one output
never share a temporary file: the last rename wins, whole.  A folder that a command fills over
minutes (a run, an index, a dataset) is held by one writer at a time (:func:`folder_lock`).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

_TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it into place if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete what killed writers left in ``folder`` (their unique temporary files)."""
    folder = Path(folder)
    stale = sorted(folder.glob(f".*{_TMP_SUFFIX}")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def file_sha256(path: str | Path) -> str | None:
    """The sha256 of a file's bytes (what ties an index to its model, or names shipped
    weights); None when there is no such file."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def check_writable(path: str | Path, kind: str = "file") -> None:
    """Raise an ``OSError`` naming ``path`` when a command could not write it there: a folder
    where a file goes, a file where a folder goes (or on the way to it), or no write permission
    on the nearest existing folder.  Commands call it before any work, not after it."""
    p = Path(path)
    if kind == "file" and p.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(p))
    if kind == "folder" and p.exists() and not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(p))
    while True:  # again if the folder checked vanished meanwhile (another process renamed it)
        existing = p if kind == "folder" and p.is_dir() else p.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a part of the path is a file, not a folder",
                                     str(existing))
        if os.access(existing, os.W_OK | os.X_OK):
            return
        if existing.exists():
            raise PermissionError(errno.EACCES, "permission denied", str(existing))


def strict_json(obj, **kwargs) -> str:
    """JSON that strict readers accept: a NaN or an infinity (a diverged metric, an undefined
    mean) is written as ``null``, never as the bare ``NaN`` Python's json writes."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kwargs)


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(strict_json(obj, indent=2) + "\n")


def read_log(path: str | Path) -> list[dict]:
    """A JSON Lines log (``metrics.jsonl``) as a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_log(path: str | Path, step: int) -> None:
    """Keep only the lines of a training log up to ``step``: a run resumed from the checkpoint
    of ``step`` logs the later steps again, and each step must appear once."""
    path = Path(path)
    if not path.exists():
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept))


LOCK_FILE = ".lock"


class FolderBusy(FileExistsError):
    """Another live process holds the folder's lock (:func:`folder_lock`)."""


@contextmanager
def folder_lock(folder: str | Path, what: str, wait: bool = False, lock_file: str = LOCK_FILE):
    """Hold ``folder``'s lock for the block, or fail at once naming the process that holds it
    (:class:`FolderBusy`); with ``wait``, say so on stderr and block until the holder ends.

    One writer per run folder: two ``train`` (or ``demo``, or ``index``) into one folder would
    interleave their files.  The lock is an ``flock`` on ``folder/.lock``, so the system frees it
    when its holder dies, even by ``kill -9``: a stale lock never blocks a rerun.  The file
    itself says who holds it (process id, command, start time), for the message.  Another
    ``lock_file`` is another lock on the same folder, for a caller whose block spans work that
    takes the folder's own lock (:func:`runcache.ensure_run` around ``train``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lock_file
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            if not wait:
                raise FolderBusy(f"{folder} is in use by another mixer-lite process ({holder}); "
                                 f"wait for it to end, or choose another folder") from None
            print(f"{folder} is in use by another mixer-lite process ({holder}); waiting for it "
                  f"to end", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()}, {what}, since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv[:3])}\n")
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def build_new_folder(out: str | Path, what: str, write):
    """Fill the new folder ``out`` by ``write(folder)`` and return what it returns.

    ``out`` must be new or empty: an existing dataset is never overwritten.  The files go to a
    hidden sibling, renamed into place when whole: a killed run leaves no half folder under the
    name asked for, and the next run starts that sibling afresh."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new folder")
    partial = out.parent / f".{out.name}.partial"
    check_writable(partial, "folder")
    with folder_lock(partial, what):
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            shutil.rmtree(partial)  # the process that held the lock a moment ago wrote it
            raise FolderBusy(f"{out} was written by another process meanwhile")
        for stale in partial.iterdir():
            if stale.name != LOCK_FILE:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        result = write(partial)
        (partial / LOCK_FILE).unlink()
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(partial, out)
    return result
