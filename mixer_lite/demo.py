"""The main job behind ``make demo``: the whole pipeline on the built-in SynthShop data.

make data -> validate -> build classes -> train (``tiny-cpu``, or the preset named) -> evaluate
against the raw-pixel baseline -> figures and metrics in ``reports/``.  Each step is skipped
when its output exists, so a second ``make demo`` is quick and an interrupted one resumes
(training from its last checkpoint); a run folder holding a run of other settings is an error,
never silently reused.
"""
from __future__ import annotations

import json
from pathlib import Path

from .classes import build_classes_from_clicks, raw_click_classes, write_classes
from .dataset import load_dataset
from .files import write_json
from .files import folder_lock
from .retrieval import evaluate_model, evaluate_raw_pixels
from .runs import load_run_model, refuse_other_run
from .synthshop import make_synthshop
from .train import config_from, train
from .measures import doc_attention
from .viz import class_size_rank, concept_attention, query_doc_grid, recall_curves


def run_demo(data_dir: str = "data/synth-small", reports: str = "reports", preset: str = "small",
             seed: int = 0, workers: int = 2, run: str = "runs/demo",
             train_overrides: list[str] | None = None, config: str = "tiny-cpu") -> dict:
    data_dir, reports, run = Path(data_dir), Path(reports), Path(run)
    cfg = config_from(config, [f"--seed={seed}", *(train_overrides or [])])
    refuse_other_run(run, cfg, "delete it or pass another --run")
    with folder_lock(reports, "demo"):  # one demo per reports folder (train locks the run)
        return _demo_steps(data_dir, reports, preset, seed, workers, run, cfg, config)


def _demo_steps(data_dir: Path, reports: Path, preset: str, seed: int, workers: int, run: Path,
                cfg, config: str) -> dict:
    if not (data_dir / "docs.jsonl").exists():
        print(f"[demo] 1/5 generating SynthShop '{preset}' (seed {seed}) into {data_dir}")
        make_synthshop(data_dir, preset=preset, seed=seed, workers=workers)
    print(f"[demo] 2/5 validating {data_dir}")
    data = load_dataset(data_dir)
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
    shown = doc_attention(model, data)
    concept_attention(shown["images"], shown["info"], shown["token_strings"],
                      n_docs=len(shown["images"]), titles=shown["titles"],
                      path=reports / "attention_gallery.png")
    keys = ("recall@1", "recall@5", "recall@10", "recall@20", "recall@50", "map@10", "mrr",
            "queries", "docs")
    metrics = {"mixer": {k: ours[k] for k in keys}, "raw_pixels": {k: raw[k] for k in keys},
               "classes": {k: stats[k] for k in ("classes", "samples", "queries", "docs")}}
    write_json(reports / "metrics.json", metrics)
    for name in ("mixer", "raw_pixels"):
        m = metrics[name]
        print(f"[demo]     {name:<10} Recall@1 {m['recall@1']:.3f}  Recall@10 "
              f"{m['recall@10']:.3f}  mAP@10 {m['map@10']:.3f}")
    print(f"[demo] wrote {reports}/: query_doc_grid.png, class_sizes.png, recall_curves.png, "
          f"attention_gallery.png, metrics.json, classes.jsonl")
    print(f"[demo] to search it in a browser: mixer-lite serve --run {run} --data {data_dir}, "
          f"then open http://127.0.0.1:8000/")
    return metrics
