"""Runs trained once and read back: the datasets and runs the notebooks, ``make reproduce`` and
the benchmarks share, cached by name.

Runs are cached under ``runs/experiments/<name>``, so notebook 05 reuses the model notebook 01
trained, and a second execution of a notebook retrains nothing (training is deterministic, so
a cached run equals a fresh one).  A cached run is reused only when its saved config is the one
asked for (:func:`runs.refuse_other_run`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .ablations import VALIDATION, row_overrides, run_name
from .files import FolderBusy, folder_lock, read_log
from .runs import refuse_other_run
from .icons import make_icons
from .synthshop import make_synthshop
from .train import config_from, train


ICONS = "icons"  # the preset name of the icons dataset (:mod:`mixer_lite.icons`)
FAST_ENV = "MIXER_LITE_FAST"  # "1": the notebooks' fast mode, CI's quick check on `tiny`
# Every run's steps in fast mode: the notebooks' code and claims are checked on short runs (a
# third of `tiny-cpu`'s 42 on `tiny`), so that CI takes less time on a 2-core laptop without
# AVX-512 (docs/EXPERIMENTS.md, "Where a CPU step's time goes").  At 32 px as well, two claims
# failed (notebooks 01 and 02).
FAST_STEPS = 16
ENSURE_LOCK = ".ensure.lock"  # held by ensure_run from its check of a run to its seconds.json


def repo_root() -> Path:
    """The checkout's root, from the notebooks folder or the root itself."""
    here = Path.cwd()
    return here.parent if here.name == "notebooks" else here


def data_folder_name(preset: str, scene_share: float = 0.0) -> str:
    """The folder :func:`ensure_data` makes for ``preset`` (and ``scene_share``) under data/."""
    if preset == ICONS:
        return "icons"
    return f"synth-{preset}" + (f"-scenes{round(100 * scene_share)}" if scene_share else "")


def validation_run_name(data_folder: str, variant: str, seed: int) -> str:
    """The name :func:`ensure_validation_run` gives a variant's run on the dataset folder
    named ``data_folder``, so a notebook can name its runs before they exist."""
    return f"{data_folder.removeprefix('synth-')}-{variant}-s{seed}"


def fast_mode() -> bool:
    """Whether the notebooks run in CI's fast mode (``MIXER_LITE_FAST=1``)."""
    return os.environ.get(FAST_ENV, "0") == "1"


def ensure_data(preset: str, seed: int = 0, root: str | Path | None = None,
                scene_share: float = 0.0) -> Path:
    """The dataset folder of ``preset``, made once; every later call reads the same folder:
    ``data/synth-<preset>`` for a SynthShop preset (``data/synth-<preset>-scenes<percent>``
    with ``scene_share`` of scene docs), ``data/icons`` for ``icons`` (built from the icon sets
    installed as ``make data-icons`` does).  A folder another process is writing (two notebooks
    at once) is waited for, then read."""
    out = Path(root or repo_root() / "data") / data_folder_name(preset, scene_share)
    base = out.parent
    workers = min(2, os.cpu_count() or 1)
    while not (out / "docs.jsonl").exists():
        try:
            if preset == ICONS:
                make_icons(out, npm_root=base / ".icon-packages" / "node_modules", seed=seed,
                           workers=workers)
            else:
                extra = {"scene_share": scene_share} if scene_share else {}
                make_synthshop(out, preset=preset, seed=seed, workers=workers, **extra)
        except FolderBusy:  # another process writes it: look again in a while (and build it
            time.sleep(2)   # if that process died)
        except FileExistsError:  # another process renamed its whole folder into place between
            if not (out / "docs.jsonl").exists():  # the look above and this build
                raise
    return out


def ensure_run(data_dir: str | Path, name: str, overrides: list[str] = (),
               runs: str | Path | None = None) -> dict:
    """Train ``tiny-cpu`` with ``overrides`` into ``runs/experiments/<name>`` unless it is there
    already.

    Returns the run's evaluation (``eval.json``) plus ``run`` (its folder), ``seconds`` (the
    training time when it was trained) and ``steps``.  The whole resolved config a run was
    trained with is in its ``config.json`` (written by :func:`train`), so a run made with other
    overrides *or other defaults* (an older mixer-lite) is an error naming the differing keys,
    never silently reused.  A key an older ``config.json`` lacks counts as its default: a new
    option's default keeps the behaviour from before the option existed.  A run another process
    is training (two notebooks at once) is waited for, then read, not trained twice.

    In fast mode (:func:`fast_mode`) the run trains :data:`FAST_STEPS` steps, whatever its
    overrides say, into ``<name>-fast``: a quick check of the code, cached apart from the
    full-length run of the same name.
    """
    if fast_mode():
        name, overrides = f"{name}-fast", [*overrides, f"--steps={FAST_STEPS}"]
    run = Path(runs or repo_root() / "runs" / "experiments") / name
    cfg = config_from("tiny-cpu", list(overrides))
    refuse_other_run(run, cfg, "delete it or choose another name")
    # One process trains a run and writes its time; another asking for it meanwhile (two
    # notebooks at once) waits for both, then reads them.
    with folder_lock(run, "ensure_run", wait=True, lock_file=ENSURE_LOCK):
        if not (run / ("eval.json" if cfg.eval_at_end else "model.pt")).exists():
            resume = (run / "checkpoints" / "last.pt").exists()
            t0 = time.time()
            train(data_dir, run, cfg, resume=resume, progress=False, preset="tiny-cpu")
            (run / "seconds.json").write_text(json.dumps(round(time.time() - t0, 1)))
    out = json.loads((run / "eval.json").read_text()) if cfg.eval_at_end else {}
    if (run / "val.json").exists():
        out["validation"] = json.loads((run / "val.json").read_text())
    out["run"] = str(run)
    out["seconds"] = json.loads((run / "seconds.json").read_text())
    out["steps"] = json.loads((run / "config.json").read_text())["steps"]
    return out


def ensure_validation_run(data_dir: str | Path, variant: str, seed: int,
                          overrides: list[str] = (), runs: str | Path | None = None) -> dict:
    """:func:`ensure_run` of ``tiny-cpu`` plus ``overrides`` with a tenth of the classes held out
    as validation photos and the test queries unread (:data:`ablations.VALIDATION`), named
    ``<data folder without synth->-<variant>-s<seed>``: the runs ``bench/scene_fusion.py``
    chooses among and notebook 02 opens.  Also returns ``overrides``, all of them."""
    overrides = [*VALIDATION, f"--seed={seed}", *overrides]
    name = validation_run_name(Path(data_dir).name, variant, seed)
    return ensure_run(data_dir, name, overrides, runs) | {"overrides": overrides}


def ensure_row(data_dir: str | Path, preset: str, slug: str, seed: int,
               runs: str | Path | None = None) -> dict:
    """:func:`ensure_run` of the row ``slug`` of :data:`ablations.ROWS` with ``seed``."""
    return ensure_run(data_dir, run_name(preset, slug, seed), row_overrides(data_dir, slug, seed),
                      runs)


def read_metrics(run: str | Path) -> list[dict]:
    """The training log ``RUN/metrics.jsonl`` as a list of dicts."""
    return read_log(Path(run) / "metrics.jsonl")
