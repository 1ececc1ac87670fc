"""Embedding without gradients (what evaluation, validation and index building do) with glibc's
malloc as it comes vs :func:`mixer_lite.runs.keep_freed_memory`, at several batch sizes, side
by side in one run: query photos and docs (image and title through the doc tower) per second,
the ratio of kept memory to glibc's, and whether every setting's embeddings equal those of
glibc's malloc at batch 256.

    python bench/embed_speed.py [--data data/synth-small-scenes30] [--run runs/demo]
                                [--sizes 32,64,256] [--images 2048] [--repeats 3]

``--run``: a trained run's model (``make demo``'s by default).  Each allocator
setting runs in a fresh process (``MIXER_LITE_KEEP_FREED_MEMORY``), which embeds the same first
``--images`` docs and photos, preloaded, the batch sizes alternating ``--repeats`` times at the
process's torch threads; the median is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mixer_lite.dataset import ImageTable, image_files, load_dataset
from mixer_lite.retrieval import embed_docs, embed_queries
from mixer_lite.runs import KEEP_FREED_MEMORY_ENV, keep_freed_memory, load_run_model

SETTINGS = {"glibc": "0", "kept": "1"}  # the environment variable's value for each


def measure(args, out: Path) -> None:
    """One process's measurements: rates per (kind, batch) and the embeddings, into ``out``."""
    applied = keep_freed_memory()
    data = load_dataset(args.data)
    model = load_run_model(args.run)
    n = min(args.images, len(data.docs), len(data.queries))
    rows = np.arange(n)
    size = model.cfg.image_size
    photos = ImageTable(image_files(data, "queries", rows), size)
    docs = ImageTable(image_files(data, "docs", rows), size)
    texts = [data.doc_texts[i] for i in rows]
    kinds = {"photos": lambda b: embed_queries(model, photos, b),
             "docs": lambda b: embed_docs(model, docs, texts, b)}
    seconds = {f"{k} {b}": [] for k in kinds for b in args.sizes}
    emb = {}
    for _ in range(args.repeats):
        for b in args.sizes:
            for kind, embed in kinds.items():
                began = time.perf_counter()
                emb[f"{kind} {b}"] = embed(b)
                seconds[f"{kind} {b}"].append(time.perf_counter() - began)
    np.savez(out.with_suffix(".npz"), **emb)
    out.write_text(json.dumps({"n": n, "size": size, "applied": applied,
                               "rate": {k: n / statistics.median(s)
                                        for k, s in seconds.items()}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synth-small-scenes30")
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--sizes", default="32,64,256")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # a measuring process writes here
    args = ap.parse_args()
    args.sizes = sorted({int(s) for s in args.sizes.split(",")} | {256})  # 256: the reference
    if args.child:
        return measure(args, Path(args.child))
    got, emb = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting, value in SETTINGS.items():
            out = Path(tmp) / f"{setting}.json"
            subprocess.run([sys.executable, __file__, "--data", args.data, "--run", args.run,
                            "--sizes", ",".join(map(str, args.sizes)), "--images",
                            str(args.images), "--repeats", str(args.repeats), "--child",
                            str(out)], env={**os.environ, KEEP_FREED_MEMORY_ENV: value},
                           check=True)
            got[setting] = json.loads(out.read_text())
            with np.load(out.with_suffix(".npz")) as z:
                emb[setting] = dict(z)
    first = got["glibc"]
    if not got["kept"]["applied"]:
        print("(keep_freed_memory is a no-op here: off glibc, both columns measure the same)")
    print(f"{args.run}; {first['n']} photos and {first['n']} docs at {first['size']} px, "
          f"each setting in its own process, median of {args.repeats}")
    print("| batch | photos/s, glibc | photos/s, kept | x | docs/s, glibc | docs/s, kept | x "
          "| embeddings equal |")
    print("|---|---|---|---|---|---|---|---|")
    reference = emb["glibc"]
    for b in args.sizes:
        cells = []
        for kind in ("photos", "docs"):
            g, k = (got[s]["rate"][f"{kind} {b}"] for s in SETTINGS)
            cells += [f"{g:.0f}", f"{k:.0f}", f"**{k / g:.2f}**"]
        same = all(np.array_equal(emb[s][f"{kind} {b}"], reference[f"{kind} 256"])
                   for s in SETTINGS for kind in ("photos", "docs"))
        print(f"| {b} | {' | '.join(cells)} | {same} |")


if __name__ == "__main__":
    main()
