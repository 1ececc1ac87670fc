"""``make reproduce``: the README's reproduction table, one row per claim of the paper.

``python -m mixer_lite.reproduce [--preset small] [--seeds 0,1,2] [--out reports/reproduce.json]``

Each row of :data:`mixer_lite.experiments.ROWS` is trained with every seed (runs are cached
under ``runs/experiments/``, so an interrupted table resumes and the notebooks reuse its
seed-0 runs), evaluated on the test queries, and printed as a markdown table of mean ±
standard deviation over seeds, with two floors last: the Mixer model at its initial weights
(per seed, no training step) and the raw-pixel baseline (no learning, no seed).  The header
gives the runs' summed training time (as measured when each was trained) apart from this
call's time, since a table built over several calls from cached runs takes only the latter.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from .dataset import load_dataset
from .experiments import METRICS, ROWS, ensure_data, ensure_row, evaluate_untrained
from .files import write_json
from .retrieval import evaluate_raw_pixels


def reproduce(preset: str = "small", seeds=(0, 1, 2), out: str | None = None) -> dict:
    data_dir = ensure_data(preset, 0)
    t0 = time.time()
    table, train_seconds = {}, 0.0
    for row in ROWS:
        runs = [ensure_row(data_dir, preset, row, s) for s in seeds]
        table[row] = {m: [r[m] for r in runs] for m in METRICS}
        train_seconds += sum(r["seconds"] for r in runs)
    data = load_dataset(data_dir, check_images=False)
    untrained = [evaluate_untrained(data, s) for s in seeds]
    table["Mixer untrained (initial weights)"] = {m: [r[m] for r in untrained] for m in METRICS}
    raw = evaluate_raw_pixels(data)
    table["raw pixels (no learning)"] = {m: [raw[m]] for m in METRICS}
    result = {"preset": preset, "seeds": list(seeds), "rows": table,
              "train_seconds": round(train_seconds, 1), "seconds": round(time.time() - t0, 1)}
    if out:
        write_json(out, result)
    return result


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
    a = ap.parse_args(argv)
    result = reproduce(a.preset, [int(s) for s in a.seeds.split(",")], a.out)
    print(f"SynthShop {result['preset']}, seeds {result['seeds']}, metrics in % "
          f"(mean ± std over seeds); the runs took {result['train_seconds'] / 60:.0f} min to "
          f"train (cached runs: when they were trained), this table {result['seconds']:.0f} s:")
    print(markdown(result))


if __name__ == "__main__":
    main()
