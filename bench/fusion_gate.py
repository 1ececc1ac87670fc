"""Whether a trained gated-fusion run weighs each doc's image against its title, or mixes two
co-adapted halves at fixed shares: docs/EXPERIMENTS.md, "The gate mixes at fixed shares".

    python bench/fusion_gate.py runs/experiments/icons-openclipart-cnn-s0 [RUN ...] \
        [--data data/icons] [--config tiny-cpu]

For each run, side by side: validation Recall@10 with every doc embedded as trained, with each
gate dimension fixed at its mean over all docs (what the gate's variation between docs adds), as
its image vector alone (the gate forced to 1) and as its fused concepts alone (forced to 0); the
spread of the docs' image weights (the gate's mean over dimensions), and per dimension, the
gate's standard deviation across docs and that variance's share of the gate's whole variance
(:func:`mixer_lite.measures.fusion_halves`).  No
retraining, no test query read.  The validation photos are those ``--config`` holds out (chosen
by a hash of each class, whatever the seed); a run whose own ``val.json`` the trained row does
not reproduce was made with other classes, and is refused.  About a minute a run on
``data/icons`` on 2 cores.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixer_lite.ablations import VALIDATION
from mixer_lite.dataset import load_dataset
from mixer_lite.measures import fusion_halves
from mixer_lite.runs import load_run_model
from mixer_lite.sampling import make_samples
from mixer_lite.train import config_from


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", default="data/icons")
    p.add_argument("--config", default="tiny-cpu")
    args = p.parse_args()
    data = load_dataset(args.data, check_images=False)
    validation = make_samples(data, config_from(args.config, VALIDATION))[0].validation
    print("| run | as trained | gate at its mean | image vector alone | fused concepts alone "
          "| image weight, mean (sd; min-max) | gate sd across docs (share of its variance) |"
          "\n|---|---|---|---|---|---|---|", flush=True)
    for run in args.runs:
        got = fusion_halves(load_run_model(run), data, validation)
        recorded = json.loads((run / "val.json").read_text())["val_recall@10"]
        if abs(got["trained"]["val_recall@10"] - recorded) > 1e-9:
            raise SystemExit(f"{run}: its val.json says validation Recall@10 {recorded:.4f}, "
                             f"these validation photos give {got['trained']['val_recall@10']:.4f}"
                             f": the run held out other classes than --config {args.config}")
        w, spread = got["image_weight"], got["gate_spread"]
        r10 = {half: 100 * got[half]["val_recall@10"]
               for half in ("trained", "constant", "image", "concepts")}
        print(f"| {run.name} | {r10['trained']:.1f} | {r10['constant']:.1f} | {r10['image']:.1f} "
              f"| {r10['concepts']:.1f} | {w['mean']:.3f} ({w['std']:.3f}; {w['min']:.3f}-"
              f"{w['max']:.3f}) | {spread['across_docs']:.3f} ({spread['doc_share']:.0%}) |",
              flush=True)


if __name__ == "__main__":
    main()
