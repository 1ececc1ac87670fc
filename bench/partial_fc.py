"""Classifier step time and peak memory: full margin softmax vs class-centre sampling (Partial FC).

    python bench/partial_fc.py [--classes 1e4,1e5,1e6] [--dim 128] [--batch 256] [--steps 5]

Each configuration runs in its own child process (so peak RSS is its own), one after the other
in this run: forward + backward + the row-wise AdamW step of the classifier alone on random unit embeddings,
the part of a training step that grows with the number of classes.  Memory is the child's peak
resident set size above the same child's baseline after importing torch; ratios are sampled /
full at the same class count.  On CUDA (`--device cuda`) memory is torch's peak allocation.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(num_classes: int, rate: float, dim: int, batch: int, steps: int, device: str) -> dict:
    import torch

    from mixer_lite.losses import MarginClassifier

    torch.manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clf = MarginClassifier(num_classes, dim, sample_rate=rate).to(device)
    x = torch.nn.functional.normalize(torch.randn(batch, dim, device=device), dim=1)
    y = torch.randint(0, num_classes, (batch,), device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step(i):
        clf(x, y, step=i).backward()
        clf.step(lr=1e-3, weight_decay=0.05)  # the classifier's own row-wise AdamW
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step(0)  # warm-up: allocates the optimiser state
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    dt = (time.perf_counter() - t0) / steps
    if device.startswith("cuda"):
        mem = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        mem = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"seconds": dt, "mib": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", default="1e4,1e5,1e6")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        n, rate = args.child.split(":")
        print(json.dumps(child(int(n), float(rate), args.dim, args.batch, args.steps,
                               args.device)))
        return
    rows = []
    for n in [int(float(c)) for c in args.classes.split(",")]:
        res = {}
        for rate in (1.0, args.rate):
            out = subprocess.run([sys.executable, __file__, f"--child={n}:{rate}",
                                  f"--dim={args.dim}", f"--batch={args.batch}",
                                  f"--steps={args.steps}", f"--device={args.device}"],
                                 capture_output=True, text=True, check=True)
            res[rate] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((n, res[1.0], res[args.rate]))
    print(f"classifier only: embedding {args.dim}, batch {args.batch}, {args.device}, "
          f"mean of {args.steps} steps (fwd + bwd + AdamW)")
    print(f"{'classes':>9} | {'full ms':>9} {'full MiB':>9} | {'sampled ms':>10} "
          f"{'sampled MiB':>11} | {'time ratio':>10} {'mem ratio':>9}")
    for n, full, samp in rows:
        print(f"{n:>9,} | {full['seconds'] * 1e3:>9.1f} {full['mib']:>9.1f} | "
              f"{samp['seconds'] * 1e3:>10.1f} {samp['mib']:>11.1f} | "
              f"{samp['seconds'] / full['seconds']:>10.2f} {samp['mib'] / max(full['mib'], 1e-9):>9.2f}")
    print(f"target at the largest size: sampled (rate {args.rate}) <= 0.25 x full in time and "
          f"memory")


if __name__ == "__main__":
    main()
