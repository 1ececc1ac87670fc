"""The main job behind ``make demo``: the whole pipeline on the built-in SynthShop data.

make data -> validate -> build classes -> train (``tiny-cpu``, or the preset named) -> evaluate
against the raw-pixel baseline -> figures and metrics in ``reports/``.  The data has 30% scene
docs (``DEMO_SCENE_SHARE``: the product shot among other products, the title naming it), the
share of the scene records (docs/EXPERIMENTS.md, "Scene docs"), so the attention figures show
whether the title chooses the region, where a single shot gives it nothing to choose.  Each
step is skipped when its output exists, so a second ``make demo`` is quick and an interrupted
one resumes (training from its last checkpoint); a run folder holding a run of other settings
is an error, never silently reused.
"""
from __future__ import annotations

import json
from pathlib import Path

from .classes import build_classes_from_clicks, raw_click_classes, write_classes
from .dataset import images_validated, load_dataset, write_valid_stamp
from .files import write_json
from .files import folder_lock
from .retrieval import evaluate_model, evaluate_raw_pixels
from .runs import load_run_model, refuse_other_run
from .synthshop import make_synthshop
from .train import config_from, train
from .measures import doc_attention, scene_attention, scene_doc_rows
from .runcache import data_folder_name
from .viz import class_size_rank, concept_attention, query_doc_grid, recall_curves, scene_maps

DEMO_SCENE_SHARE = 0.3


def run_demo(data_dir: str | None = None, reports: str = "reports", preset: str = "small",
             seed: int = 0, workers: int = 2, run: str = "runs/demo",
             train_overrides: list[str] | None = None, config: str = "tiny-cpu",
             scene_share: float = DEMO_SCENE_SHARE) -> dict:
    """The demo into ``reports`` and ``run``; ``data_dir`` defaults to ``data/`` and the folder
    name :func:`runcache.data_folder_name` gives the preset and ``scene_share``."""
    data_dir = Path(data_dir or Path("data") / data_folder_name(preset, scene_share))
    reports, run = Path(reports), Path(run)
    cfg = config_from(config, [f"--seed={seed}", *(train_overrides or [])])
    refuse_other_run(run, cfg, "delete it or pass another --run")
    with folder_lock(reports, "demo"):  # one demo per reports folder (train locks the run)
        return _demo_steps(data_dir, reports, preset, seed, workers, run, cfg, config,
                           scene_share)


def _demo_steps(data_dir: Path, reports: Path, preset: str, seed: int, workers: int, run: Path,
                cfg, config: str, scene_share: float) -> dict:
    if not (data_dir / "docs.jsonl").exists():
        print(f"[demo] 1/5 generating SynthShop '{preset}' (seed {seed}, {scene_share:.0%} scene "
              f"docs) into {data_dir}")
        make_synthshop(data_dir, preset=preset, seed=seed, workers=workers,
                       scene_share=scene_share)
    print(f"[demo] 2/5 validating {data_dir}")
    stamped = images_validated(data_dir)
    data = load_dataset(data_dir)
    if not stamped and not data.packed:  # every image decoded: training need not do it again
        try:
            write_valid_stamp(data_dir, by="mixer-lite demo")
        except OSError as e:  # a read-only folder is valid all the same
            print(f"[demo]     (no validation stamp written: {e}; training decodes every "
                  f"image again)")
    print(f"[demo]     valid: {json.dumps(data.summary)}")
    reports.mkdir(parents=True, exist_ok=True)
    query_doc_grid(data, path=reports / "query_doc_grid.png")

    print("[demo] 3/5 building weak-label classes from clicks")
    classes, stats = build_classes_from_clicks(*data.clicks_columns())
    write_classes(reports / "classes.jsonl", classes)
    raw = raw_click_classes(*data.clicks_columns())
    class_size_rank({"raw clicks (each clicked doc)": [len(c["query_ids"]) + 1 for c in raw],
                     "co-click classes": [len(c["query_ids"]) + len(c["doc_ids"])
                                          for c in classes]},
                    query_cap=stats["config"]["max_queries_per_class"],
                    path=reports / "class_sizes.png")
    print(f"[demo]     {stats['classes']} classes, {stats['samples']} samples")

    if not (run / "model.pt").exists():
        resume = (run / "checkpoints" / "last.pt").exists()
        print(f"[demo] 4/5 training {config} into {run}" + (" (resuming)" if resume else ""))
        train(data_dir, run, cfg, resume=resume, preset=config)
    print("[demo] 5/5 evaluating on the test queries (products never clicked in training)")
    model = load_run_model(run)
    if not (run / "eval.json").exists():  # a demo killed during training's final evaluation
        write_json(run / "eval.json", evaluate_model(model, data, batch_size=256))
    ours = json.loads((run / "eval.json").read_text())
    raw = evaluate_raw_pixels(data, size=model.cfg.image_size)
    recall_curves({f"Mixer ({config})": ours["recall_curve"],
                   "raw pixels (no learning)": raw["recall_curve"]},
                  title="Recall@K on SynthShop test queries (unseen products)",
                  path=reports / "recall_curves.png")
    scenes = scene_doc_rows(data, data_dir) if (data_dir / "_truth").is_dir() else []
    shown = doc_attention(model, data, among=scenes if len(scenes) else None)
    concept_attention(shown["images"], shown["info"], shown["token_strings"],
                      n_docs=len(shown["images"]), titles=shown["titles"],
                      path=reports / "attention_gallery.png")
    keys = ("recall@1", "recall@5", "recall@10", "recall@20", "recall@50", "map@10", "mrr",
            "queries", "docs")
    metrics = {"mixer": {k: ours[k] for k in keys}, "raw_pixels": {k: raw[k] for k in keys},
               "classes": {k: stats[k] for k in ("classes", "samples", "queries", "docs")}}
    figures = ["query_doc_grid.png", "class_sizes.png", "recall_curves.png",
               "attention_gallery.png"]
    if len(scenes):
        metrics["scene_attention"] = _scene_figure(model, data, data_dir, reports)
        figures.append("scene_attention.png")
    write_json(reports / "metrics.json", metrics)
    for name in ("mixer", "raw_pixels"):
        m = metrics[name]
        print(f"[demo]     {name:<10} Recall@1 {m['recall@1']:.3f}  Recall@10 "
              f"{m['recall@10']:.3f}  mAP@10 {m['map@10']:.3f}")
    if len(scenes):
        a = metrics["scene_attention"]
        print(f"[demo]     scene docs: attention on the named product {a['product_lift']:.2f}x "
              f"its area (other objects {a['other_lift']:.2f}x); a swapped title moves it onto "
              f"the newly named object in {a['swap_moved']:.0%} of {a['docs']} docs")
    print(f"[demo] wrote {reports}/: {', '.join(figures)}, metrics.json, classes.jsonl")
    print(f"[demo] to search it in a browser: mixer-lite serve --run {run} --data {data_dir}, "
          f"then open http://127.0.0.1:8000/")
    return metrics


def _scene_figure(model, data, data_dir: Path, reports: Path, shown: int = 4) -> dict:
    """The scene measures of :func:`measures.scene_attention` (lift on the named product, the
    title swap), and ``scene_attention.png``: the first ``shown`` scene docs measured, their
    maps under their own title and under the swapped one, every object outlined."""
    scenes = scene_attention(model, data, data_dir)
    per_doc = scenes.pop("per_doc")
    n = min(shown, len(per_doc["rows"]))
    scene_maps(per_doc["images"][:n], per_doc["masks"][:n],
               [("under its own title", per_doc["maps"][:n], [0] * n),
                ("under another object's title", per_doc["maps_swapped"][:n],
                 per_doc["swap"][:n])],
               [data.doc_texts[int(r)] for r in per_doc["rows"][:n]],
               "Scene docs: where the concepts look under the doc's title and a swapped one\n"
               "(solid green: the object that column's title names; dashed white: the others)",
               path=reports / "scene_attention.png")
    return scenes
