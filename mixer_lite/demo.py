"""The main job behind ``make demo``: the whole pipeline on the built-in SynthShop data.

Each step is skipped when its output already exists, so a second ``make demo`` is quick and an
interrupted one resumes.
"""
from __future__ import annotations

import json
from pathlib import Path

from .dataset import load_dataset
from .synthshop import make_synthshop
from .viz import query_doc_grid


def run_demo(data_dir: str = "data/synth-small", reports: str = "reports", preset: str = "small",
             seed: int = 0, workers: int = 2) -> dict:
    data_dir, reports = Path(data_dir), Path(reports)
    if not (data_dir / "docs.jsonl").exists():
        print(f"[demo] generating SynthShop '{preset}' (seed {seed}) into {data_dir}")
        make_synthshop(data_dir, preset=preset, seed=seed, workers=workers)
    print(f"[demo] validating {data_dir}")
    data = load_dataset(data_dir)
    print(f"[demo] valid: {json.dumps(data.summary)}")
    reports.mkdir(parents=True, exist_ok=True)
    grid = reports / "query_doc_grid.png"
    query_doc_grid(data, path=grid)
    print(f"[demo] wrote {grid}")
    return {"data": str(data_dir), "summary": data.summary, "figures": [str(grid)]}
