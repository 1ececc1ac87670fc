"""Loading a dataset with every image decoded against loading it under a validate stamp.

    python bench/dataset_load.py [--data data/synth-small] [--repeats 2]

What each process of a job (each rank of a torchrun) pays before its first step: the full
check decodes every image; after ``mixer-lite validate`` has stamped the folder
(:func:`mixer_lite.dataset.write_valid_stamp`), the lines and paths are checked and no image is
opened.  Both are timed in this process, alternately, the best of ``--repeats`` each.  The stamp
is written into the folder (as ``mixer-lite validate`` does).
"""
from __future__ import annotations

import argparse
import time

from mixer_lite.dataset import load_dataset, write_valid_stamp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synth-small")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    write_valid_stamp(args.data)
    best = {"every image decoded": float("inf"), "under the stamp": float("inf")}
    for _ in range(args.repeats):
        for name, trust in (("every image decoded", False), ("under the stamp", True)):
            t0 = time.perf_counter()
            data = load_dataset(args.data, trust_stamp=trust)
            best[name] = min(best[name], time.perf_counter() - t0)
    images = len(data.docs) + len(data.queries)
    full = best["every image decoded"]
    print(f"{args.data}: {images} images")
    print("| load | seconds | x full check |\n|---|---|---|")
    for name, s in best.items():
        print(f"| {name} | {s:.2f} | {s / full:.3f} |")


if __name__ == "__main__":
    main()
