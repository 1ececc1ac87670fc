"""Atomic file writes: a run's outputs appear whole or not at all.

Every file mixer-lite writes for later (checkpoints, model, metrics, classes, indexes) goes
through :func:`atomic_path`, so a killed run never leaves a half-written file behind.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it into place if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    tmp.replace(path)


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
