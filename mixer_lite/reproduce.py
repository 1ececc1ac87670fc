"""``make reproduce``: the README's reproduction table, one row per claim of the paper.

``python -m mixer_lite.reproduce [--preset small] [--seeds 0,1,2] [--out FILE.json] [--retrain]``

Each row of :data:`mixer_lite.ablations.ROWS` is trained with every seed, evaluated on the
test queries, and printed as a markdown table of mean ± standard deviation over seeds,
with the floors last: the Mixer model at its initial weights (per seed, no training step), the shipped
image backbone frozen (its pooled features searched by cosine: what fine-tuning must add to),
and two raw-pixel baselines (no learning, no seed): each image centred on its mean value, and
each side (docs, queries) centred on its mean image, a strong simple reference on drawings.
``--preset icons`` measures the same rows on the icons dataset (:mod:`mixer_lite.icons`).

**Records.**  Every measurement behind the table is kept in the repository, one JSON file per
run under ``results/reproduce/<preset>/``: the row, seed, overrides, the whole resolved config,
a fingerprint of the dataset's JSONL files, the test metrics, the training time and steps, and
the versions and CPU count it was measured with.  The table is built from them, so it can be
assembled piece by piece (the ``small`` table is hours of CPU) and a reader can check
every number against the run that made it.  A missing record is measured (the run is taken
from ``runs/experiments/`` if it is there, else trained) and written; a record made under
another config or other data is an error naming the difference, never silently used.
``--retrain`` ignores the records, takes every run from ``runs/experiments/`` (training what is
not there) and rewrites them, naming each record whose metrics changed.  The header gives the
records' summed training time apart from this call's time.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import numpy as np

from .config import as_json, config_diff
from .dataset import data_fingerprint, load_dataset
from .ablations import METRICS, ROWS, row_overrides, run_name
from .measures import evaluate_frozen_backbone, evaluate_untrained
from .runcache import FAST_ENV, ICONS, ensure_data, ensure_row, fast_mode, repo_root
from .files import write_json
from .retrieval import evaluate_raw_pixels
from .runs import environment
from .train import config_from

UNTRAINED = "Mixer untrained (initial weights)"
RAW_PIXELS = "raw pixels (no learning)"
MEAN_IMAGE = "raw pixels minus the mean image (no learning)"
FROZEN = "shipped backbone, frozen (no training)"
# The floors measured once per dataset (no seed): record name suffix, measurement.
FLOORS = {
    FROZEN: ("frozen_backbone", lambda data: evaluate_frozen_backbone(data)),
    RAW_PIXELS: ("raw_pixels", lambda data: evaluate_raw_pixels(data)),
    MEAN_IMAGE: ("mean_image_pixels", lambda data: evaluate_raw_pixels(data, mean_image=True)),
}


def records_dir(preset: str, root: str | Path | None = None) -> Path:
    """Where the records of ``preset`` live: ``results/reproduce/<preset>/`` by default."""
    return Path(root or repo_root() / "results" / "reproduce") / preset


def scene_records_dir(root: str | Path | None = None) -> Path:
    """Where ``bench/scene_fusion.py`` writes a record per run it read the test queries of
    (``<run>.json``, test metrics by doc kind and the attention measures): ``results/scenes/``."""
    return Path(root or repo_root() / "results" / "scenes")


def read_record(path: Path) -> dict:
    """One record; a damaged one is an error naming the file, the line and what is missing."""
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); delete the record "
                         f"(`make reproduce` measures it again) or restore it from git") from None
    missing = [k for k in ("row", "metrics") if k not in rec]
    missing += [f"metrics.{m}" for m in METRICS if m not in rec.get("metrics", {})]
    if missing:
        raise ValueError(f"{path}: record lacks {', '.join(missing)}")
    return rec


def recorded(path: Path, want: dict, measure, retrain: bool = False) -> dict:
    """The record at ``path`` if it was made under ``want``; else ``measure()``, written there.

    ``want`` holds what the measurement depends on (row, seed, config, data); ``measure``
    returns the measured fields.  A record whose ``want`` differs raises, naming the keys.
    """
    old = read_record(path) if path.exists() else None
    if old is not None and not retrain:
        diff = sorted(k for k in want if k != "config" and old.get(k) != want[k])
        if "config" in want:
            diff += [f"config.{k}" for k in config_diff(old.get("config", {}),
                                                        want["config"])]
        if diff:
            raise FileExistsError(f"{path} was measured under other settings (differs in "
                                  f"{', '.join(diff)}); delete it or pass --retrain")
        return old
    rec = {**{k: as_json(v) if k == "config" else v for k, v in want.items()}, **measure(),
           "measured_with": environment()}
    data = rec["metrics"].get("data", {})
    if "path" in data:  # records are committed: no machine's absolute path in them
        data["path"] = os.path.relpath(data["path"], repo_root())
    if old is not None and old.get("metrics") != rec["metrics"]:
        print(f"{path}: metrics changed on retraining (recall@10 {old['metrics']['recall@10']}"
              f" -> {rec['metrics']['recall@10']})")
    write_json(path, rec)
    return rec


def _row_record(folder: Path, data_dir: Path, fingerprint: str, preset: str, slug: str,
                seed: int, retrain: bool) -> dict:
    overrides = row_overrides(data_dir, slug, seed)
    want = {"row": ROWS[slug].label, "seed": seed, "overrides": overrides,
            "config": config_from("tiny-cpu", overrides), "data": fingerprint}

    def measure():
        r = ensure_row(data_dir, preset, slug, seed)
        return {"metrics": {k: v for k, v in r.items() if k not in ("run", "seconds", "steps")},
                "train_seconds": r["seconds"], "steps": r["steps"]}
    return recorded(folder / f"{run_name(preset, slug, seed)}.json", want, measure, retrain)


def recorded_metrics(preset: str, slug: str, seeds=(0, 1, 2),
                     records: str | Path | None = None) -> list[dict]:
    """The test metrics of row ``slug`` for each of ``seeds`` from its committed records (the
    validation photos' under ``validation``): what a notebook quotes beyond the seed it runs."""
    folder = records_dir(preset, records)
    return [read_record(folder / f"{run_name(preset, slug, s)}.json")["metrics"] for s in seeds]


def select_rows(slugs: str | None) -> list[str]:
    """The slugs of :data:`ROWS` a comma-separated list names (``"mixer,image_only"``), all of
    them for None; an unknown one is an error listing the rows."""
    if not slugs:
        return list(ROWS)
    unknown = [s for s in slugs.split(",") if s not in ROWS]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; rows: {', '.join(ROWS)}")
    return slugs.split(",")


def reproduce(preset: str = "small", seeds=(0, 1, 2), out: str | None = None,
              retrain: bool = False, records: str | Path | None = None,
              rows: list[str] | None = None) -> dict:
    """The table of the row slugs ``rows`` (all by default) over ``seeds``: each record checked
    (or measured), then read."""
    if fast_mode():  # its short runs would be recorded as the rows
        raise SystemExit(f"{FAST_ENV}=1 is the notebooks' fast mode (short runs); unset it to "
                         "measure records")
    rows = list(ROWS) if rows is None else rows
    data_dir = ensure_data(preset, 0)
    fingerprint = data_fingerprint(data_dir)
    folder = records_dir(preset, records)
    t0 = time.time()
    for slug in rows:
        for s in seeds:
            _row_record(folder, data_dir, fingerprint, preset, slug, s, retrain)

    @functools.lru_cache(maxsize=1)
    def dataset():  # loaded only if a floor must be measured
        return load_dataset(data_dir, check_images=False)

    for s in seeds:
        recorded(folder / f"{_floor_name(preset, UNTRAINED, s)}.json",
                 {"row": UNTRAINED, "seed": s, "data": fingerprint,
                  "config": config_from("tiny-cpu", [f"--seed={s}"])},
                 lambda s=s: {"metrics": evaluate_untrained(dataset(), s)}, retrain)
    for row, (_, measure) in FLOORS.items():
        recorded(folder / f"{_floor_name(preset, row)}.json", {"row": row, "data": fingerprint},
                 lambda measure=measure: {"metrics": measure(dataset())}, retrain)
    result = collect(preset, seeds, records, rows)
    result["seconds"] = round(time.time() - t0, 1)
    if out:
        write_json(out, result)
    return result


def _floor_name(preset: str, row: str, seed: int | None = None) -> str:
    return f"{preset}-untrained-s{seed}" if row == UNTRAINED else f"{preset}-{FLOORS[row][0]}"


def collect(preset: str, seeds, records: str | Path | None = None,
            rows: list[str] | None = None) -> dict:
    """The table from the records alone (no data, no training): what :func:`reproduce` prints.

    The row slugs ``rows`` (all of :data:`ROWS` by default) in :data:`ROWS` order, each under
    its label, then the untrained floor (one value a seed) and the :data:`FLOORS` (one value
    each);
    ``train_seconds`` sums the rows' recorded training times.
    """
    folder = records_dir(preset, records)
    rows = list(ROWS) if rows is None else rows
    names = [(row.label, run_name(preset, slug, s)) for slug, row in ROWS.items() if slug in rows
             for s in seeds]
    names += [(UNTRAINED, _floor_name(preset, UNTRAINED, s)) for s in seeds]
    names += [(row, _floor_name(preset, row)) for row in FLOORS]
    table, train_seconds = {}, 0.0
    for row, name in names:
        path = folder / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no record of this measurement; `make reproduce` "
                                    f"measures and writes it")
        rec = read_record(path)
        for m in METRICS:
            table.setdefault(row, {}).setdefault(m, []).append(rec["metrics"][m])
        train_seconds += rec.get("train_seconds", 0.0)
    return {"preset": preset, "seeds": list(seeds), "rows": table,
            "train_seconds": round(train_seconds, 1)}


def markdown(result: dict) -> str:
    head = "| row | " + " | ".join(m.replace("recall", "Recall").replace("map", "mAP")
                                  for m in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]
    for row, vals in result["rows"].items():
        cells = []
        for m in METRICS:
            v = np.asarray(vals[m]) * 100
            cells.append(f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v[0]:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    ap.add_argument("--rows", default=None,
                    help=f"comma-separated row slugs (default: all): "
                         f"{','.join(ROWS)}")
    ap.add_argument("--retrain", action="store_true",
                    help="ignore the records in results/reproduce/ and measure every run again")
    a = ap.parse_args(argv)
    result = reproduce(a.preset, [int(s) for s in a.seeds.split(",")], a.out, a.retrain,
                       rows=select_rows(a.rows))
    name = "the icons dataset" if a.preset == ICONS else f"SynthShop {a.preset}"
    print(f"{name}, seeds {result['seeds']}, metrics in % "
          f"(mean ± std over seeds); the runs took {result['train_seconds'] / 60:.0f} min to "
          f"train (as recorded when each was trained), this table {result['seconds']:.0f} s:")
    print(markdown(result))


if __name__ == "__main__":
    main()
