"""Training throughput under each speed setting, side by side in one run: the data path
(images decoded per batch in the training loop, DataLoader worker processes preparing the next
batches, every image preloaded) and the image encoder's switches (channels_last, compile).

    python bench/train_speed.py [--data data/synth-small] [--workers 1,2] [--steps 60]
                                [--pack DIR] [--no-switches]

Each setting trains the same ``tiny-cpu`` steps on ``--data`` with ``preload_images=False`` (what
a dataset too large for memory needs: every batch decoded from its files) at ``--threads`` torch
threads, and reads its own ``metrics.jsonl``: images encoded per second and the share of the step
time spent waiting for the next batch (:class:`mixer_lite.train.Throughput`), over the steps
after the first logging window (the workers' start).  The preloaded run (every image decoded
before step 1) is the ceiling: a step that never waits; the switches are measured on it.
Centres start at random and no class is held out, so no setting decodes anything before its
first step.  ``--pack``: the same data packed (``mixer-lite pack``) read by 1 loader worker, one
row more; ``--no-switches``: the data path only.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mixer_lite.train import config_from, train


def steady_state(run: Path) -> tuple[float, float]:
    """Images/s and data-wait share of a run's log records after the first one (each record
    covers ``log_every`` steps)."""
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
    seconds = [1 / r["images_per_s"] for r in log]  # each window's time, per image it encoded
    wait = sum(r["data_wait_share"] * s for r, s in zip(log, seconds))
    return len(log) / sum(seconds), wait / sum(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synth-small")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare with 0")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--pack", default=None, help="the data's pack: one more row, 1 worker")
    ap.add_argument("--no-switches", action="store_true", help="skip channels_last, compile")
    args = ap.parse_args()
    common = [f"--steps={args.steps}", "--log_every=10", "--eval_at_end=false", "--val_share=0",
              "--centre_init=random", f"--threads={args.threads}",
              f"--batch_size={args.batch_size}", f"--checkpoint_every={args.steps}"]
    settings = [("decoded in the loop", ["--preload_images=false", "--loader_workers=0"])]
    settings += [(f"{w} loader worker{'s' * (w > 1)}",
                  ["--preload_images=false", f"--loader_workers={w}"])
                 for w in map(int, args.workers.split(","))]
    if args.pack:
        settings.append(("1 loader worker, from the pack",
                         ["--preload_images=false", "--loader_workers=1"]))
    preloaded = ["--preload_images=true", "--loader_workers=0"]
    settings.append(("preloaded", preloaded))
    switches = [("preloaded", preloaded),
                ("+ channels_last", preloaded + ["--channels_last=true"]),
                ("+ compile", preloaded + ["--compile=true"])]
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(settings + ([] if args.no_switches else switches[1:])):
            run = Path(tmp) / f"run{i}"
            data = args.pack if name.endswith("from the pack") else args.data
            train(data, run, config_from("tiny-cpu", common + extra), progress=False)
            measured[name] = steady_state(run)
    print(f"{args.data}: {args.steps} steps of {args.batch_size} images at "
          f"{args.threads} torch threads, images decoded at 64 px")
    for title, rows in (("images", settings),) + ((("image encoder", switches),)
                                                  if not args.no_switches else ()):
        base = measured[rows[0][0]][0]
        print(f"\n| {title} | images/s | x {rows[0][0]} | data-wait share |\n|---|---|---|---|")
        for name, _ in rows:
            speed, wait = measured[name]
            print(f"| {name} | {speed:.0f} | {speed / base:.2f} | {wait:.1%} |")


if __name__ == "__main__":
    main()
