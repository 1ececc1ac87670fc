"""Generation rate of SynthShop's `large` preset with 1 and 2 worker processes, side by side.

    python bench/make_data.py                   # large's settings on its first 10k products
    python bench/make_data.py --products 100000 # the whole large preset (about 10 minutes)

The rate is images written per second (docs + query photos), the generator's unit of work.
Both runs use the same preset, seed and size, one after the other, in one process tree.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from mixer_lite.synthshop import PRESETS, make_synthshop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", type=int, default=10_000)
    args = ap.parse_args()
    full = PRESETS["large"]
    # Same queries per product as the full preset, so the mix of doc and query images holds.
    n_queries = int(full.n_queries * args.products / full.n_products)
    rows = []
    for workers in (1, 2):
        out = Path(tempfile.mkdtemp(prefix="bench-synth-")) / "large"
        t0 = time.perf_counter()
        stats = make_synthshop(out, preset="large", seed=0, workers=workers, progress=False,
                               n_products=args.products, n_queries=n_queries)
        dt = time.perf_counter() - t0
        images = stats["docs"] + stats["train_queries"] + stats["test_queries"]
        rows.append((workers, images, dt, images / dt))
        shutil.rmtree(out.parent)
    print(f"SynthShop 'large' settings, {args.products} products")
    print(f"{'workers':>8} {'images':>9} {'seconds':>9} {'images/s':>10} {'speed-up':>9}")
    for workers, images, dt, rate in rows:
        print(f"{workers:>8} {images:>9} {dt:>9.1f} {rate:>10.0f} {rate / rows[0][3]:>8.2f}x")


if __name__ == "__main__":
    main()
