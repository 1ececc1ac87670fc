"""The classification recipe's steps, one change at a time on validation photos: the runs
behind docs/EXPERIMENTS.md, "The classification recipe, chosen on validation photos".

    python bench/recipe_ledger.py --list
    python bench/recipe_ledger.py --steps cos20,aug [--data data/synth-small] [--seed 0]

Each step is (label, slug, the settings it varies from the earlier recipe,
``mixer_lite.ablations.EARLIER_RECIPE``); its run is ``runs/experiments/recipe-<slug>``
(``-s<seed>`` for a seed other than 0; ``<folder>-recipe-<slug>`` on another dataset than
SynthShop ``small``), trained once and read back.  The step prints its
validation Recall@1/10 (the test queries are never read).  About 10 minutes a step on 2 cores.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mixer_lite.ablations import recipe_overrides
from mixer_lite.runcache import ensure_data, ensure_run

_PRETRAINED = {"model.concept_text": "none", "model.image_weights": "openclipart-cnn"}
_COS20 = {**_PRETRAINED, "scale": "20", "model.concept_attention": "cosine"}
_AUG = {**_COS20, "augment": "true"}
_SCRATCH = {**_AUG, "model.image_weights": "none"}
STEPS: list[tuple[str, str, dict]] = [
    ("previous recipe", "prev", {}),
    ("no weight decay on the centres", "nowd", {"centre_weight_decay": "0"}),
    ("fused concepts keep no text content", "notext", {"model.concept_text": "none"}),
    ("class-balanced batches (K=4 per class)", "pk4",
     {"model.concept_text": "none", "samples_per_class": "4"}),
    ("clip the encoder's gradients only", "noclipc",
     {"model.concept_text": "none", "clip_centres": "false"}),
    ("margin warmed up over the first 10% of steps", "mwarm",
     {"model.concept_text": "none", "margin_warmup_frac": "0.1"}),
    ("the image encoder starts from the shipped pretrained weights", "pretrained", _PRETRAINED),
    ("concepts attend by scaled cosine", "cosine",
     {**_PRETRAINED, "model.concept_attention": "cosine"}),
    ("concepts compete for image regions (slot attention)", "slots",
     {**_PRETRAINED, "model.concept_attention": "slots"}),
    ("CosFace scale 20 instead of 30", "scale20", {**_PRETRAINED, "scale": "20"}),
    ("scale 20 and concepts attend by scaled cosine", "cos20", _COS20),
    ("cos20 with margin 0.2", "cos20m02", {**_COS20, "margin": "0.2"}),
    ("cos20 with margin 0.5", "cos20m05", {**_COS20, "margin": "0.5"}),
    ("cos20, fused concepts keep a learned share of the text (from 0)", "gated",
     {**_COS20, "model.concept_text": "gated"}),
    ("cos20 with flip-and-shift augmentation of both domains", "aug", _AUG),
    ("aug, twice the steps (7 epochs)", "long", {**_AUG, "epochs": "7"}),
    ("aug, fused concepts keep the text (residual)", "aug-residual",
     {**_AUG, "model.concept_text": "residual"}),
    ("aug, fused concepts keep a learned share of the text (from 0)", "aug-gated",
     {**_AUG, "model.concept_text": "gated"}),
    ("InfoNCE on click pairs without augmentation (its better setting), 434 steps",
     "infonce-long", {**_COS20, "loss": "infonce", "steps": "434"}),
    ("InfoNCE on click pairs without augmentation, twice the row's images (388 steps)",
     "infonce-2x", {**_COS20, "loss": "infonce", "steps": "388"}),
    # Not steps of the recipe: the encoder from scratch (the reproduction row), measured
    # against that row's seed-0 run.
    ("from scratch, lr 2e-3 instead of 5e-4", "scratch-lr2e3",
     {**_COS20, "model.image_weights": "none", "lr": "2e-3"}),
    ("from scratch, flip-and-shift augmentation", "scratch-aug",
     {**_COS20, "model.image_weights": "none", "augment": "true"}),
    ("from scratch, augmented, lr 2e-3", "scratch-aug-lr2e3", {**_SCRATCH, "lr": "2e-3"}),
    # Pixels against steps, at about the same training time (a 32-px step costs about a sixth
    # of a 64-px one, a 48-px step about half).
    ("from scratch, augmented, 48 px, 7 epochs", "scratch-48px-e7",
     {**_SCRATCH, "model.image_size": "48", "epochs": "7"}),
    ("from scratch, augmented, 32 px, 14 epochs", "scratch-32px-e14",
     {**_SCRATCH, "model.image_size": "32", "epochs": "14"}),
    ("from scratch, augmented, 32 px, 21 epochs (the scratch-cpu preset)", "scratch-32px-e21",
     {**_SCRATCH, "model.image_size": "32", "epochs": "21"}),
    ("pretrained, 32 px, 14 epochs", "pretrained-32px-e14",
     {**_AUG, "model.image_size": "32", "epochs": "14"}),
    ("pretrained, 32 px, 21 epochs", "pretrained-32px-e21",
     {**_AUG, "model.image_size": "32", "epochs": "21"}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    ap.add_argument("--steps", default="", help="comma-separated slugs to train (or read back)")
    ap.add_argument("--data", default=None, help="dataset folder (default: SynthShop small)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    by_slug = {slug: (label, varied) for label, slug, varied in STEPS}
    if args.list or not args.steps:
        for label, slug, varied in STEPS:
            print(f"{slug:22s} {label}  {varied}")
        return
    unknown = [s for s in args.steps.split(",") if s not in by_slug]
    if unknown:
        raise SystemExit(f"unknown step(s) {unknown}; --list shows them")
    data = args.data or ensure_data("small")
    print("| step | validation Recall@1 (%) | validation Recall@10 (%) |\n|---|---|---|")
    for slug in args.steps.split(","):
        label, varied = by_slug[slug]
        name = (f"{Path(args.data).name}-" if args.data else "") + f"recipe-{slug}" + \
            (f"-s{args.seed}" if args.seed else "")
        val = ensure_run(data, name, recipe_overrides(varied, [f"--seed={args.seed}"]))["validation"]
        print(f"| {label} | {100 * val['val_recall@1']:.1f} | {100 * val['val_recall@10']:.1f} |")


if __name__ == "__main__":
    main()
