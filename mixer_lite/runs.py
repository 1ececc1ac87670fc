"""The run folder's torch files: written whole, read without running anything they carry.

A ``model.pt`` or a checkpoint is a zip of tensors plus a pickle that says how they fit
together.  ``torch.load(weights_only=False)`` runs whatever callable that pickle names, so a
run folder copied from elsewhere could execute code on ``evaluate``, ``index``, ``search`` or
``--resume``.  Every torch file mixer-lite writes holds tensors, numbers, strings, lists and
dicts only, so :func:`load_torch` reads them all with ``weights_only=True`` and refuses
anything else with a message naming the file.
"""
from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path

import torch

from .files import atomic_path


def save_torch(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then renamed into place (:func:`files.atomic_path`).

    A failed write (a full disk, a size limit) reaches torch's zip writer as a bare "enforce
    fail at inline_container.cc"; it is raised as an ``OSError`` naming the file and the
    space left, so the user learns what to free.
    """
    import errno
    import shutil

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            if "inline_container" not in str(e) and "write" not in str(e):
                raise
            free = shutil.disk_usage(Path(path).parent).free
            raise OSError(errno.ENOSPC if free < 2**20 else errno.EIO,
                          f"writing failed ({free / 2**20:.1f} MiB free on its disk: full, or "
                          f"a file-size limit)", str(path)) from None


def load_torch(path: str | Path, what: str, advice: str, device="cpu") -> dict:
    """The dict of plain data and tensors in ``path``, or a ``ValueError`` naming the file.

    ``what`` names the file's kind in messages ("model file", "checkpoint"), ``advice`` says
    what to do about a damaged one.  A file whose pickle names any callable (code, classes
    other than tensors) is refused, never run.
    """
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ValueError(f"{path}: refused: this {what} holds Python objects other than "
                             f"tensors and plain data, which loading would run; mixer-lite "
                             f"never writes such files (was it made elsewhere?)") from None
        raise ValueError(f"{path}: damaged {what}, it cannot be read ({e}); {advice}") from None
    except Exception as e:  # a cut file fails in zip, pickle or storage code, each its own way
        raise ValueError(f"{path}: damaged {what}, it cannot be read ({type(e).__name__}: "
                         f"{e}); {advice}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a mixer-lite {what} (holds a {type(obj).__name__}, "
                         f"not a dict)")
    return obj


def require_keys(obj: dict, keys: tuple[str, ...], path: str | Path, what: str) -> dict:
    """``obj`` when it has every key of ``keys``; else an error naming the file and the keys."""
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{path}: not a mixer-lite {what} (lacks {', '.join(missing)})")
    return obj


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch CPU threads (0: leave them as they are), then restore the
    process's count: a library call must not change its caller's threads."""
    if n < 0:
        raise ValueError(f"threads must be >= 0 (0: torch's default), got {n}")
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

