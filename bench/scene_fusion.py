"""Concept fusion on scene docs, chosen on validation photos: the runs behind
docs/EXPERIMENTS.md, "Scene docs: where the title chooses the region".

    python bench/scene_fusion.py --preset tiny --variants mixer,image_only [--seed 0]

SynthShop ``--preset`` with ``--scene-share`` of scene docs (default 0.3: the product shot among
1-3 products of other categories, the title naming it) is made once as
``data/synth-<preset>-scenes<percent>``.  Each variant is ``tiny-cpu`` plus its overrides, run
with validation only (``runs/experiments/<preset>-scenes<percent>-<variant>-s<seed>``; the test
queries are never read), and prints its validation Recall@10 on all held-out photos, on those
whose class has a scene doc (and with only the scene docs counted as hits), and on the others;
the scene-docs recall again with each scene doc redrawn from the truth (ceilings of choosing
the region, :func:`mixer_lite.measures.recall_by_doc_kind`'s ``scene_docs_as``): every other
object painted out; the product cut out and framed as a single shot; the product's box cut
with what overlaps it left in; cut to the window of ``fusion="regions"`` that best shows its
product, and to the best of 75 windows of three sizes; and cut where the model's own attention
points (a hard pointer, no truth used); then where its concepts look on 256 scene docs
(:func:`mixer_lite.measures.scene_attention`; fusions without attention print none); for a
gated concept fusion, the image weight of the scene docs and of the single docs.

Each ceiling also prints its Recall@10 on all, scene and single photos: what that region choice
would give the scene photos, whose single-shot docs answer for them too.  ``--no-ceilings``
skips the re-embedded scene docs (for more seeds of a chosen variant).  ``--pointed-beside``
also prints the validation recall with every doc indexed twice, as shot and cut where its
attention points, scoring the better of the two (the pointer as a second vector per doc).
``--region-pick argmax`` serves each title-choosing ``regions`` run with its top candidate
alone instead of the blend it was trained through (no retraining).
``--test`` (once a variant is chosen) also reads each finished run's test queries, once, and
writes a record to ``results/scenes/<run>.json``: test Recall@1/10 and mAP@10 by doc kind
(:func:`mixer_lite.measures.recall_by_doc_kind`) and the attention measures.
About 10 minutes a run on ``small`` (12-13 with the ceilings), 1 on ``tiny``, on 2 cores.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from mixer_lite.dataset import data_fingerprint, load_dataset
from mixer_lite.measures import (doc_image_weights, has_image_text_gate, recall_by_doc_kind,
                                 scene_attention, scene_doc_rows)
from mixer_lite.reproduce import recorded, scene_records_dir
from mixer_lite.runcache import ensure_data, ensure_validation_run
from mixer_lite.runs import load_run_model
from mixer_lite.sampling import make_samples
from mixer_lite.train import config_from

VARIANTS: dict[str, tuple[str, ...]] = {
    "mixer": (),
    "image_only": ("--model.fusion=image_only",),
    "text_only": ("--model.fusion=text_only",),
    "concat": ("--model.fusion=concat",),
    "residual": ("--model.concept_text=residual",),
    "softmax": ("--model.concept_attention=softmax",),
    "no_gate": ("--model.fusion_gate=false",),
    "agreement": ("--model.fusion_gate_input=agreement",),
    "constant_gate": ("--model.fusion_gate_input=constant",),
    "direct": ("--model.fusion=direct",),
    "read_only": ("--model.concept_keeps_slot=false",),
    "read_only_no_gate": ("--model.concept_keeps_slot=false", "--model.fusion_gate=false"),
    "long": ("--epochs=7",),
    "image_only_long": ("--model.fusion=image_only", "--epochs=7"),
    "zoom_out": ("--doc_zoom_out=0.4",),
    "image_only_zoom_out": ("--model.fusion=image_only", "--doc_zoom_out=0.4"),
    "zoom": ("--model.fusion=zoom",),
    "mosaic": ("--doc_mosaic=0.25",),
    "no_gate_mosaic": ("--model.fusion_gate=false", "--doc_mosaic=0.25"),
    "image_only_mosaic": ("--model.fusion=image_only", "--doc_mosaic=0.25"),
    "regions_title_whole2_anchored_mosaic": ("--model.fusion=regions",
                                             "--model.region_choice=title",
                                             "--model.region_whole_bias=2",
                                             "--titles_move_centres=false", "--doc_mosaic=0.25"),
    "regions": ("--model.fusion=regions", "--model.fusion_gate=false"),
    "regions_gate": ("--model.fusion=regions",),
    "regions_title": ("--model.fusion=regions", "--model.region_choice=title"),
    "regions_title_whole2": ("--model.fusion=regions", "--model.region_choice=title",
                             "--model.region_whole_bias=2"),
    "regions_title_whole3": ("--model.fusion=regions", "--model.region_choice=title",
                             "--model.region_whole_bias=3"),
    "mixer_title": ("--model.title_sample=true",),
    "mixer_title_anchored": ("--model.title_sample=true", "--titles_move_centres=false"),
    "regions_title_whole2_anchored": ("--model.fusion=regions", "--model.region_choice=title",
                                      "--model.region_whole_bias=2",
                                      "--titles_move_centres=false"),
    "regions_title_whole2_anchored_long": ("--model.fusion=regions",
                                           "--model.region_choice=title",
                                           "--model.region_whole_bias=2",
                                           "--titles_move_centres=false", "--epochs=7"),
    "regions_title_whole2_anchored_window": ("--model.fusion=regions",
                                             "--model.region_choice=title",
                                             "--model.region_whole_bias=2",
                                             "--titles_move_centres=false",
                                             "--model.window_sample=true"),
    "regions_title_fused2": ("--model.fusion=regions", "--model.region_choice=title",
                             "--model.region_whole_bias=2", "--model.region_whole=concepts"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--scene-share", type=float, default=0.3)
    p.add_argument("--variants", default="mixer,image_only",
                   help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test", action="store_true",
                   help="also read the test queries once and write results/scenes/<run>.json")
    p.add_argument("--no-ceilings", action="store_true",
                   help="skip the re-embeddings of the scene docs (painted out, cut out, "
                        "boxed, best windows, cut where attention points): for more seeds of a "
                        "chosen variant")
    p.add_argument("--region-pick", default="blend", choices=["blend", "argmax"],
                   help="serve a title-choosing regions run with its candidates blended (as "
                        "trained) or its top candidate alone (model.ModelConfig.region_pick; "
                        "the same trained run, records named <run>-argmax)")
    p.add_argument("--pointed-beside", action="store_true",
                   help="also index every doc cut where its attention points, beside the doc as "
                        "shot, and print that validation recall")
    args = p.parse_args()
    data_dir = ensure_data(args.preset, scene_share=args.scene_share)
    data = load_dataset(data_dir, check_images=False)
    print("| variant | val R@10 all | scene | scene docs | single | scene docs, others painted "
          "out | product cut out | cut where its attention points | product lift | other lift "
          "| swap moved |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.variants.split(","):
        trained = ensure_validation_run(data_dir, name, args.seed, VARIANTS[name])
        overrides, run_name = trained["overrides"], Path(trained["run"]).name
        model = load_run_model(trained["run"])
        if args.region_pick != "blend":  # serving only: the trained run is the same
            model.cfg = dataclasses.replace(model.cfg, region_pick=args.region_pick)
            name, run_name = f"{name}, {args.region_pick}", f"{run_name}-{args.region_pick}"
        cfg = config_from("tiny-cpu", overrides)
        validation = make_samples(data, cfg)[0].validation
        r = recall_by_doc_kind(model, data, data_dir, validation)
        pointing = model.cfg.fusion in ("concept", "direct", "regions")
        ceilings = () if args.no_ceilings else \
            ("painted", "cropped", "boxed", "windowed", "windowed_fine") + \
            (("pointed",) if pointing else ())
        ceiling = {how: recall_by_doc_kind(model, data, data_dir, validation, scene_docs_as=how)
                   for how in ceilings}
        cells = [f"{100 * r[k]['recall@10']:.1f} ({r[k]['queries']})"
                 for k in ("all", "scene", "scene_docs", "single")]
        cells += [f"{100 * ceiling[how]['scene_docs']['recall@10']:.1f}" if how in ceiling
                  else "-" for how in ("painted", "cropped", "pointed")]
        attention = {}
        if model.cfg.fusion in ("concept", "direct", "zoom", "regions"):
            a = scene_attention(model, data, data_dir, seed=args.seed)
            attention = {k: v for k, v in a.items() if k != "per_doc"}
            cells += [f"{a['product_lift']:.2f}", f"{a['other_lift']:.2f}",
                      f"{100 * a['swap_moved']:.0f}%"]
        else:
            cells += ["-", "-", "-"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        for how, c in ceiling.items():
            print(f"  scene docs {how}, val R@10 " + ", ".join(
                f"{k} {100 * v['recall@10']:.1f}" for k, v in c.items()), flush=True)
        if has_image_text_gate(model):
            weight = doc_image_weights(model, data)
            scene = np.zeros(len(weight), bool)
            scene[scene_doc_rows(data, data_dir)] = True
            print("  image weight (the gate's mean), mean (sd): scene docs "
                  f"{weight[scene].mean():.3f} ({weight[scene].std():.3f}), single docs "
                  f"{weight[~scene].mean():.3f} ({weight[~scene].std():.3f})", flush=True)
        if args.pointed_beside and pointing:
            both = recall_by_doc_kind(model, data, data_dir, validation, pointed_beside=True)
            print("  pointed crop beside each doc, val R@10 " + ", ".join(
                f"{k} {100 * v['recall@10']:.1f}" for k, v in both.items()), flush=True)
        if args.test:
            def measure(model=model, attention=attention):
                test = recall_by_doc_kind(model, data, data_dir)
                return {"metrics": {**{k: test["all"][k] for k in ("recall@1", "recall@10",
                                                                    "map@10", "queries")},
                                    "by_doc_kind": test, "attention": attention}}

            want = {"row": name, "seed": args.seed, "overrides": overrides, "config": cfg,
                    "data": data_fingerprint(data_dir)}
            if args.region_pick != "blend":  # the records of blended runs predate the key
                want["region_pick"] = args.region_pick
            rec = recorded(scene_records_dir() / f"{run_name}.json", want,
                           measure)
            t = rec["metrics"]["by_doc_kind"]
            print("  test R@10 " + ", ".join(f"{k} {100 * v['recall@10']:.1f}"
                                             for k, v in t.items()), flush=True)


if __name__ == "__main__":
    main()
