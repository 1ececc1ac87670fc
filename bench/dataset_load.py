"""What a job pays before its first step: the dataset read with every image decoded, under a
``validate`` stamp, and from a pack, side by side in one run.

    python bench/dataset_load.py [--data data/synth-small] [--repeats 2] [--train]

Each process of a job (each rank of a torchrun) loads the dataset first.  Three ways, timed in
this process, alternately, the best of ``--repeats`` each: the folder with every image decoded
(what ``train`` did before stamps and packs), the folder under the stamp of ``mixer-lite
validate`` (:func:`mixer_lite.dataset.write_valid_stamp`: lines and paths checked, no image
opened), and its pack (``mixer-lite pack``: Arrow shards memory-mapped, nothing checked again;
the pack is made in a temporary folder first, and its making timed once).  The stamp is
written into the folder, as ``mixer-lite validate`` does; it is removed for the first way.

``--train`` also times the whole ``mixer-lite train`` command from its start to the end of its
first step, once per way, in a process of its own (imports, the load, the weak-label classes,
the model, the first batch and step): ``tiny-cpu`` with images decoded per batch by one loader
worker, centres from random and no class held out, so that no recipe setting decodes images
before step 1.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mixer_lite.dataset import VALID_STAMP, load_dataset, write_valid_stamp
from mixer_lite.pack import pack_dataset

WAYS = ("every image decoded", "under the stamp", "from the pack")


def time_to_step_one(data: Path, out: Path) -> float:
    cmd = [sys.executable, "-m", "mixer_lite.cli", "train", "--data", str(data), "--out",
           str(out), "--config", "tiny-cpu", "--steps=1", "--eval_at_end=false", "--val_share=0",
           "--centre_init=random", "--preload_images=false", "--loader_workers=1",
           "--threads=2"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synth-small")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--train", action="store_true", help="also time train to its first step")
    args = ap.parse_args()
    folder = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        pack = Path(tmp) / "pack"
        t0 = time.perf_counter()
        pack_dataset(folder, pack, progress=False)
        packing = time.perf_counter() - t0
        sources = {"every image decoded": (folder, False), "under the stamp": (folder, True),
                   "from the pack": (pack, True)}
        write_valid_stamp(folder)
        load = dict.fromkeys(WAYS, float("inf"))
        for _ in range(args.repeats):
            for way in WAYS:
                where, trust = sources[way]
                t0 = time.perf_counter()
                data = load_dataset(where, trust_stamp=trust)
                load[way] = min(load[way], time.perf_counter() - t0)
        first = {}
        if args.train:
            (folder / VALID_STAMP).unlink()
            for i, way in enumerate(WAYS):
                if way == "under the stamp":
                    write_valid_stamp(folder)
                first[way] = time_to_step_one(sources[way][0], Path(tmp) / f"run{i}")
    images = len(data.docs) + len(data.queries)
    print(f"{folder}: {images} images; packed in {packing:.1f} s")
    head = "| load | load s | x every image decoded |"
    if first:
        head += " train to step 1, s | x every image decoded |"
    print(head + "\n|" + "---|" * head.count(" | ") + "---|")
    for way in WAYS:
        row = f"| {way} | {load[way]:.2f} | {load[way] / load[WAYS[0]]:.3f} |"
        if first:
            row += f" {first[way]:.1f} | {first[way] / first[WAYS[0]]:.3f} |"
        print(row)


if __name__ == "__main__":
    main()
