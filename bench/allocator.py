"""Training steps with glibc's malloc as it comes against :func:`mixer_lite.runs.keep_freed_memory`
(freed blocks kept for the next step), side by side in one run.

    python bench/allocator.py [--data data/synth-tiny] [--steps 24] [--repeats 2]

Each setting trains the same ``tiny-cpu`` steps in a fresh process (the malloc settings are
process-wide), alternating between the two ``--repeats`` times; each process reports its
training seconds, its minor page faults and its peak resident memory.  Prints the mean of each
and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
from mixer_lite.train import config_from, train
cfg = config_from("tiny-cpu", sys.argv[3:])
t0 = time.time()
train(sys.argv[1], sys.argv[2], cfg, progress=False)
seconds = time.time() - t0
use = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "faults": use.ru_minflt, "peak_mib": use.ru_maxrss / 1024}))
"""
SETTINGS = {"glibc's defaults": "0", "freed memory kept": "1"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synth-tiny")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    overrides = [f"--steps={args.steps}", "--eval_at_end=false", "--val_share=0",
                 f"--threads={args.threads}", f"--checkpoint_every={args.steps}"]
    results = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, flag in SETTINGS.items():
                out = os.path.join(tmp, f"{flag}-{i}")
                env = {**os.environ, "MIXER_LITE_KEEP_FREED_MEMORY": flag}
                done = subprocess.run([sys.executable, "-c", CHILD, args.data, out, *overrides],
                                      env=env, capture_output=True, text=True, check=True)
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    mean = {name: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}
            for name, rs in results.items()}
    print(f"{args.steps} steps of tiny-cpu on {args.data}, {args.threads} threads, "
          f"mean of {args.repeats}")
    print(f"{'setting':<20}{'train s':>9}{'page faults':>14}{'peak MiB':>10}")
    for name, m in mean.items():
        print(f"{name:<20}{m['seconds']:>9.1f}{m['faults']:>14,.0f}{m['peak_mib']:>10.0f}")
    base, kept = mean["glibc's defaults"], mean["freed memory kept"]
    print(f"speed-up {base['seconds'] / kept['seconds']:.2f}x, page faults "
          f"{kept['faults'] / base['faults']:.2f}x, peak memory {kept['peak_mib'] / base['peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
