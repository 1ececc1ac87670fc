"""Atomic file writes: a run's outputs appear whole or not at all.

Every file mixer-lite writes for later (checkpoints, model, metrics, classes, indexes) goes
through :func:`atomic_path`: the bytes go to a temporary file of a unique name in the same
folder, which is then renamed over the target (``os.replace``, atomic on one file system).
So a killed writer never leaves a half-written file behind, and two writers of one output
never share a temporary file: the last rename wins, whole.
"""
from __future__ import annotations

import json
import os
import tempfile
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


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


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
