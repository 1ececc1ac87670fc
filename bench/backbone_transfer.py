"""Which pretrained image encoder transfers, chosen on validation photos: the runs behind
docs/EXPERIMENTS.md, "A backbone pretrained across designers".

    python bench/backbone_transfer.py --weights designers-cnn,openclipart-cnn \
        [--data data/icons] [--seeds 0,1,2] [--extra=--epochs=10] [--test]

For each weights file (a shipped name, a path, or ``none`` for random weights), side by side:
the frozen encoder's validation Recall@1/10 (its pooled features alone, no training:
:func:`mixer_lite.measures.evaluate_frozen_validation`), then ``tiny-cpu`` fine-tuned from it
with each seed (``--extra`` overrides added; validation only, the test queries never read;
``runs/experiments/<data>-<weights>-s<seed>``) and its validation Recall@10.  ``--test`` (once
the weights are chosen) also reads the test queries, once per finished run and once for the
frozen encoder, and writes records to ``results/transfer/``.  About 6 minutes a run on
``data/icons``, 9 on ``data/synth-small``, on 2 cores.  ``--probe-only``, on a SynthShop folder,
prints what each frozen encoder knows of its products instead
(:func:`mixer_lite.measures.backbone_probe` on validation products) and trains nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mixer_lite.ablations import VALIDATION
from mixer_lite.dataset import data_fingerprint, load_dataset
from mixer_lite.measures import (backbone_probe, evaluate_frozen_backbone,
                                 evaluate_frozen_validation, image_encoder_from)
from mixer_lite.reproduce import recorded
from mixer_lite.retrieval import evaluate_model
from mixer_lite.runcache import ensure_run, repo_root
from mixer_lite.runs import load_run_model
from mixer_lite.train import config_from


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/icons")
    p.add_argument("--weights", default="openclipart-cnn",
                   help="comma-separated: shipped names, weights files, or none")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--extra", action="append", default=[],
                   help="a tiny-cpu override added to every run (repeatable)")
    p.add_argument("--test", action="store_true",
                   help="also read the test queries once and write results/transfer/<run>.json")
    p.add_argument("--probe-only", action="store_true",
                   help="on a SynthShop folder: only what each frozen encoder knows of it "
                        "(linear probes of category and colour, photo-to-doc Recall@10, on a "
                        "tenth of the training products held out), no run")
    args = p.parse_args()
    data_dir = Path(args.data)
    if args.probe_only:
        for weights in args.weights.split(","):
            r = backbone_probe(image_encoder_from(weights), data_dir, split="validation")
            print(f"{weights}: category {100 * r['category']:.1f}, colour "
                  f"{100 * r['colour']:.1f}, photo-to-doc Recall@10 "
                  f"{100 * r['photo_to_doc_recall@10']:.1f} ({r['eval_photos']} photos)",
                  flush=True)
        return
    data = load_dataset(data_dir, check_images=False)
    seeds = [int(s) for s in args.seeds.split(",")]
    # `--model.fusion=image_only` names its runs `...-fusion-image_only-s0`
    extra_name = "".join("-" + o.lstrip("-").split("=")[0].split(".")[-1] + "-" +
                         o.split("=", 1)[1] for o in args.extra)
    print(f"| weights | frozen val R@1 | frozen val R@10 | fine-tuned val R@10, seeds "
          f"{args.seeds} | mean |\n|---|---|---|---|---|")
    for weights in args.weights.split(","):
        overrides_of = [f"--model.image_weights={weights}", *args.extra]
        frozen = evaluate_frozen_validation(data, config_from("tiny-cpu", overrides_of),
                                            weights)
        label = Path(weights).stem
        tuned, runs = [], []
        for seed in seeds:
            overrides = [*VALIDATION, f"--seed={seed}", *overrides_of]
            name = f"{data_dir.name}-{label}{extra_name}-s{seed}"
            result = ensure_run(data_dir, name, overrides)
            tuned.append(result["validation"]["val_recall@10"])
            runs.append((name, result["run"], overrides))
        print(f"| {weights} | {100 * frozen['val_recall@1']:.1f} | "
              f"{100 * frozen['val_recall@10']:.1f} | "
              + ", ".join(f"{100 * t:.1f}" for t in tuned)
              + f" | {100 * np.mean(tuned):.1f} |", flush=True)
        if args.test:
            frozen_test = recorded(
                repo_root() / "results" / "transfer" / f"{data_dir.name}-frozen-{label}.json",
                {"row": f"{weights}, frozen (no training)", "data": data_fingerprint(data_dir)},
                lambda: {"metrics": evaluate_frozen_backbone(data, weights)})
            print(f"  frozen: test R@10 {100 * frozen_test['metrics']['recall@10']:.1f}",
                  flush=True)
            for (name, run, overrides), seed in zip(runs, seeds):
                want = {"row": f"tiny-cpu from {weights}", "seed": seed, "overrides": overrides,
                        "config": config_from("tiny-cpu", overrides),
                        "data": data_fingerprint(data_dir)}
                rec = recorded(repo_root() / "results" / "transfer" / f"{name}.json", want,
                               lambda run=run: {"metrics": evaluate_model(load_run_model(run),
                                                                          data)})
                print(f"  {name}: test R@10 {100 * rec['metrics']['recall@10']:.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
