"""The reproduction's rows, one per claim of the paper, and the earlier recipe the experiment
log starts from: settings only (what trains them is :mod:`mixer_lite.runcache`).

Each row (:data:`ROWS`) is a training override of the ``tiny-cpu`` preset on the same data and
clicks:

* the shipped pretrained image encoder vs random weights, in the same recipe and in the
  recipe chosen for them (``scratch``: 32 px, more epochs);
* separate vs shared transforms (domain gap);
* concept fusion vs image-only, text-only and concat fusion;
* classification (CosFace, ArcFace, sampled centres) vs InfoNCE and triplet on the same clicks;
* weak-label classes vs raw clicks as labels.

Classification and the pairwise losses are compared at the **same number of images encoded**
(our choice; the paper states no budget).  A classification step encodes ``batch_size``
samples, a pairwise step ``batch_size`` photos *and* their clicked docs, so a pairwise row
trains half the steps of the Mixer row on the same data (:func:`row_overrides`); the raw-clicks
row, one sample per click, trains as many steps as the Mixer row.  Equal epochs would give the
pairwise rows 4.6x and the raw-clicks row 2.0x the Mixer row's images on SynthShop ``small``,
since an epoch of clicks is longer than an epoch of capped class samples.  The one row that
names its own budget is the encoder from scratch (:data:`train.FROM_SCRATCH`, at about 1.2x
the Mixer row's training time; ``docs/EXPERIMENTS.md``, item 15).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from .dataset import load_dataset
from .objectives import PAIRWISE_LOSSES, images_per_sample
from .sampling import EpochSampler, make_samples, total_steps
from .train import FROM_SCRATCH, TrainConfig, config_from


@dataclass(frozen=True)
class Row:
    """One row of the table: ``slug`` names its cached runs and records, ``label`` is what
    tables and figures show, ``overrides`` change the ``tiny-cpu`` preset."""

    slug: str
    label: str
    overrides: tuple[str, ...] = ()


ROWS: dict[str, Row] = {row.slug: row for row in (
    Row("mixer", "Mixer (concept fusion, CosFace)", ()),
    Row("scratch", "Mixer, image encoder from scratch", FROM_SCRATCH),
    Row("random_weights", "Mixer, image encoder from random weights (same recipe)",
        ("--model.image_weights=none",)),
    Row("softmax_attention", "Mixer, softmax attention over regions",
        ("--model.concept_attention=softmax",)),
    Row("shared", "shared transform (no domain split)", ("--model.shared_transform=true",)),
    Row("image_only", "image-only docs", ("--model.fusion=image_only",)),
    Row("text_only", "text-only docs", ("--model.fusion=text_only",)),
    Row("concat", "concat fusion", ("--model.fusion=concat",)),
    Row("arcface", "ArcFace", ("--loss=arcface",)),
    Row("sampled", "CosFace, centres sampled 0.1", ("--sample_rate=0.1",)),
    Row("infonce", "InfoNCE on click pairs", ("--loss=infonce",)),
    Row("triplet", "triplet on click pairs", ("--loss=triplet",)),
    Row("raw_clicks", "raw clicks as labels", ("--labels=raw_clicks",)),
)}
METRICS = ("recall@1", "recall@10", "map@10")

# The recipe the experiment log starts from (docs/EXPERIMENTS.md, "The classification recipe"):
# every setting its steps vary is spelled out, so its cached run means the same thing whatever
# the preset's defaults are now.  bench/recipe_ledger.py holds the steps, one change each.
EARLIER_RECIPE = {"centre_weight_decay": "5e-4", "model.concept_text": "residual",
                  "samples_per_class": "1", "clip_centres": "true", "margin_warmup_frac": "0",
                  "scale": "30", "model.image_weights": "none", "epochs": "3.5",
                  "model.concept_attention": "softmax", "augment": "false", "lr": "5e-4"}
VALIDATION = ["--val_share=0.1", "--eval_at_end=false"]


def recipe_overrides(varied: dict | None = None, extra: list[str] = ()) -> list[str]:
    """The ``tiny-cpu`` overrides of the earlier recipe changed by ``varied``: validation on,
    test untouched."""
    settings = {**EARLIER_RECIPE, **(varied or {})}
    return [*VALIDATION, *(f"--{k}={v}" for k, v in settings.items()), *extra]


def run_name(preset: str, slug: str, seed: int) -> str:
    """The cache folder name of a reproduction row: ``<preset>-<slug>-s<seed>`` (an unknown
    slug is a ``KeyError``)."""
    if slug not in ROWS:
        raise KeyError(f"unknown row {slug!r}; rows: {', '.join(ROWS)}")
    return f"{preset}-{slug}-s{seed}"


def row_overrides(data_dir: str | Path, slug: str, seed: int) -> list[str]:
    """The ``tiny-cpu`` overrides of one row of :data:`ROWS` with ``seed``.

    A row whose own epochs would encode another number of images than the Mixer row on the
    same data (the pairwise rows, two images a pair; raw clicks, one sample a click) also gets
    ``--steps`` that match the Mixer row's images (module docstring); a row that names its own
    ``--epochs`` or ``--steps`` keeps them.
    """
    overrides = [f"--seed={seed}", *ROWS[slug].overrides]
    cfg, mixer = config_from("tiny-cpu", overrides), config_from("tiny-cpu", [f"--seed={seed}"])
    own_budget = (cfg.epochs, cfg.steps) != (mixer.epochs, mixer.steps)
    if own_budget or _sampling(cfg) == _sampling(mixer):  # nothing to match, nothing to load
        return overrides
    root = str(Path(data_dir).resolve())
    steps, per_step = _steps_and_images_per_step(root, *_sampling(cfg))
    budget = math.prod(_steps_and_images_per_step(root, *_sampling(mixer)))
    if steps * per_step != budget:
        overrides.append(f"--steps={max(1, budget // per_step)}")
    return overrides


def _sampling(cfg: TrainConfig) -> tuple:
    """The fields of a config that decide its samples, steps and images per step."""
    return (cfg.labels, cfg.loss in PAIRWISE_LOSSES, cfg.classes, cfg.val_share,
            cfg.max_per_class, cfg.batch_size, cfg.epochs, cfg.steps)


@functools.lru_cache(maxsize=None)
def _steps_and_images_per_step(data_root: str, labels, pairwise, classes, val_share,
                               max_per_class, batch_size, epochs, steps) -> tuple[int, int]:
    cfg = TrainConfig(labels=labels, loss=PAIRWISE_LOSSES[0] if pairwise else "cosface",
                      classes=classes, val_share=val_share, max_per_class=max_per_class,
                      batch_size=batch_size, epochs=epochs, steps=steps)
    samples, _ = make_samples(_load(data_root), cfg)
    sampler = EpochSampler(samples.label, max_per_class, batch_size, cfg.seed)
    return total_steps(cfg, sampler.steps_per_epoch), batch_size * images_per_sample(cfg.loss)


@functools.lru_cache(maxsize=1)
def _load(data_root: str):
    return load_dataset(data_root, check_images=False)
