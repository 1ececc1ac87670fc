"""Training: classification over weak-label classes (Mixer), or pairwise baselines, one loop.

``mixer-lite train --data DIR --out RUN --config tiny-cpu [--key=value ...]``

* **Samples.**  With ``labels=classes`` (Mixer) every query photo and every doc of a class built
  by :mod:`mixer_lite.classes` is one sample of that class; with ``labels=raw_clicks`` (the
  ablation) every clicked doc is a class and each click makes its query a sample of it.  The
  pairwise baselines (``infonce``, ``triplet``) train on the (query, doc) click pairs.
* **Validation.**  ``val_share`` of the weak-label classes are held out of training (their
  photos and docs); their photos search every doc at the end (and every ``val_every`` steps),
  so recipe choices never read the test queries (:class:`Validation`).
* **Sampler.**  Each epoch takes at most ``max_per_class`` samples of every class (skew control
  on top of the class caps), shuffled one by one or in runs of ``samples_per_class``; the order
  is a function of (seed, epoch) alone, so a resumed run sees the same batches.
* **Optimiser.**  AdamW, linear warm-up then cosine decay, gradient clipping, gradient
  accumulation; bf16 autocast on CUDA.
* **Health.**  ``metrics.jsonl`` logs the loss, the centres' mean norm, the mean cosine of a
  sample to its own and to other centres, and the mean cosine within a batch (collapse), so a
  failing recipe shows why.
* **Parallelism.**  Under ``torchrun`` the encoders are data-parallel (DDP) and the classifier
  model-parallel (each rank holds a shard of the centres; see :mod:`mixer_lite.losses`).  The
  classifier loss is already the global-batch mean, so encoder gradients are summed, not
  averaged, across ranks.
* **Checkpoints.**  ``RUN/checkpoints/last.pt`` is written atomically every
  ``checkpoint_every`` steps with model, classifier, optimiser, schedule and RNG state;
  ``--resume`` continues from it and ends with the same weights as an uninterrupted run.

Our choices where the paper is silent: the presets below, CosFace m=0.35 at s=30 by default
and s=20 in ``tiny-cpu`` (measured on validation; ``base-gpu`` keeps 30, unmeasured), a light
augmentation (random flip and a shift of up to 4 pixels) for both domains, and the recipe,
each part kept only where validation showed a gain (``docs/EXPERIMENTS.md``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # the plain bar (not tqdm.auto): notebooks need no widget extension

from .classes import (ClassConfig, build_classes_from_clicks, class_stats, raw_click_classes,
                      stable_rank)
from .dataset import ImageTable, ShopData, data_fingerprint, image_paths, load_dataset
from .losses import MarginClassifier, info_nce, mean_pairwise_cosine, triplet_loss
from .config import apply_overrides, check_resumable, config_diff, saved_config
from .model import MixerModel, ModelConfig, WordTokenizer, load_image_weights
from .files import (check_writable, folder_lock, read_log, remove_stale_temporaries, strict_json,
                    truncate_log, write_json)
from .optim import clip_global_norm, margin_at, sum_gradients_hook, warmup_cosine
from .runs import load_torch, require_keys, save_torch, torch_threads
from .retrieval import (embed_docs, embed_queries, evaluate_model, exact_search,
                        ranking_metrics)

PAIRWISE_LOSSES = ("infonce", "triplet")  # trained on (query, doc) click pairs, not classes
LOSSES = ("cosface", "arcface", *PAIRWISE_LOSSES)
DEFAULT_MARGIN = {"cosface": 0.35, "arcface": 0.5, "triplet": 0.2, "infonce": 0.0}


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    classes: ClassConfig = field(default_factory=ClassConfig)
    labels: str = "classes"           # "classes" | "raw_clicks"
    loss: str = "cosface"             # one of LOSSES
    margin: float | None = None       # None: the loss's default (DEFAULT_MARGIN)
    scale: float = 30.0
    margin_warmup_frac: float = 0.0   # margin ramps 0 -> margin over this share of the steps
    centre_optimizer: str = "sgd"     # "sgd" (momentum 0.9) | "adamw", row-wise on the centres
    centre_init: str = "random"       # "docs": each centre starts at its docs' mean embedding
                                      # (with the cnn encoder, small R@10 0.019 -> 0.036; README)
    centre_lr: float = 2.0            # peak lr of the centres (same warm-up/cosine schedule)
    centre_weight_decay: float = 5e-4  # 0 was measured worse on validation (EXPERIMENTS.md)
    temperature: float = 0.05         # InfoNCE
    sample_rate: float = 1.0          # class-centre sampling (Partial FC); 1 = full softmax
    batch_size: int = 128             # global batch (split over ranks and accumulation steps)
    grad_accum: int = 1
    epochs: float = 4.0
    steps: int = 0                    # > 0: train exactly this many steps, whatever the epochs
    max_per_class: int = 16           # samples of one class per epoch
    samples_per_class: int = 1        # > 1: batches of P classes x K samples (class-balanced)
    val_share: float = 0.0            # share of the weak-label classes held out for validation
    val_every: int = 0                # validation Recall@10 every this many steps (0: at the end)
    lr: float = 5e-4                  # 2e-3 collapsed the from-scratch ViT (README, "Training")
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    clip_grad: float = 5.0
    clip_centres: bool = True         # False: clip the encoder's gradients only (Partial FC)
    augment: bool = True
    amp: bool = True                  # bf16 autocast on CUDA (no effect on CPU)
    device: str = "auto"              # "auto" | "cpu" | "cuda" | "cuda:1" ...
    preload_images: bool = True       # False: decode per batch (real, large datasets)
    loader_threads: int = 4
    threads: int = 0                  # torch CPU threads (0 = torch's default)
    checkpoint_every: int = 200
    log_every: int = 10
    eval_at_end: bool = True
    seed: int = 0
    stop_after: int | None = None     # stop (as if killed) after this many steps

    def __post_init__(self):
        problems = []
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.labels not in ("classes", "raw_clicks"):
            problems.append(f"labels must be 'classes' or 'raw_clicks', got {self.labels!r}")
        if self.batch_size < 2 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            problems.append("batch_size must be >= 2 and a multiple of grad_accum")
        if not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.centre_init not in ("random", "docs"):
            problems.append(f"centre_init must be 'random' or 'docs', got {self.centre_init!r}")
        if self.centre_optimizer not in ("sgd", "adamw"):
            problems.append(f"centre_optimizer must be 'sgd' or 'adamw', "
                            f"got {self.centre_optimizer!r}")
        if self.epochs <= 0 or self.lr <= 0 or self.max_per_class < 1:
            problems.append("epochs, lr and max_per_class must be positive")
        if self.samples_per_class < 1:
            problems.append(f"samples_per_class must be >= 1, got {self.samples_per_class}")
        if not 0 <= self.val_share < 1:
            problems.append(f"val_share must be in [0, 1), got {self.val_share}")
        if self.val_every < 0:
            problems.append(f"val_every must be >= 0, got {self.val_every}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            problems.append("checkpoint_every and log_every must be >= 1")
        if self.clip_grad < 0 or self.weight_decay < 0 or self.centre_weight_decay < 0:
            problems.append("clip_grad (0: off), weight_decay and centre_weight_decay must be "
                            ">= 0")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.margin_warmup_frac <= 1:
            problems.append(f"warmup_frac must be in [0, 1) and margin_warmup_frac in [0, 1], "
                            f"got {self.warmup_frac} and {self.margin_warmup_frac}")
        if self.scale <= 0 or self.temperature <= 0 or self.centre_lr <= 0:
            problems.append(f"scale, temperature and centre_lr must be positive, got "
                            f"{self.scale}, {self.temperature} and {self.centre_lr}")
        if self.margin is not None and self.margin < 0:
            problems.append(f"margin must be >= 0, got {self.margin}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            problems.append(f"--device={self.device}: not a device mixer-lite trains on (auto, "
                            f"cpu, cuda, cuda:N)")
        if self.threads < 0 or self.loader_threads < 1:
            problems.append(f"threads must be >= 0 (0: torch's default) and loader_threads >= 1, "
                            f"got {self.threads} and {self.loader_threads}")
        if self.steps < 0:
            problems.append(f"steps must be >= 0 (0: epochs decide), got {self.steps}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    @property
    def margin_value(self) -> float:
        return DEFAULT_MARGIN[self.loss] if self.margin is None else self.margin


PRESETS = {
    # Minutes on 2 CPU cores at 64x64: a small BatchNorm CNN that starts from the shipped
    # pretrained weights (mixer_lite/weights/), a text transformer from scratch, centres
    # imprinted from the docs, CosFace at scale 20, fused concepts without text content that
    # attend by scaled cosine, flip-and-shift augmentation, 3.5 epochs, 10% of the classes held
    # out for validation.  Each choice was measured on SynthShop small's validation photos
    # (docs/EXPERIMENTS.md).
    "tiny-cpu": TrainConfig(model=ModelConfig(image_encoder="cnn", concept_text="none",
                                              concept_attention="cosine",
                                              image_weights="openclipart-cnn"),
                            centre_init="docs", scale=20.0, epochs=3.5, val_share=0.1),
    # Many GPUs on real data: pretrained backbones by name, bf16, big batches, sampled centres.
    "base-gpu": TrainConfig(
        model=ModelConfig(image_size=224, image_encoder="torchvision:resnet50",
                          image_pretrained=True,
                          text_encoder="sentence-transformers/all-MiniLM-L6-v2",
                          max_text_len=48, n_concepts=16, embed_dim=256, dropout=0.1),
        classes=ClassConfig(max_queries_per_class=500),
        batch_size=1024, epochs=20, lr=3e-4, warmup_frac=0.02, sample_rate=0.1,
        max_per_class=32, preload_images=False, loader_threads=16, checkpoint_every=1000,
        log_every=50),
}


# The image encoder from random weights needs steps more than pixels: at 32 px a step costs
# about a sixth of a 64-px one, so 21 epochs take about 1.2x as long as tiny-cpu's 3.5, and on
# SynthShop small's validation photos they lift Recall@10 from 17.8 (64 px, 3.5 epochs) to 37.9.
# The pretrained encoder is the other way round (its features are for 64 px: 45.5 at 32 px and
# 21 epochs, against 47.5).  docs/EXPERIMENTS.md, item 15.
FROM_SCRATCH = ("--model.image_weights=none", "--model.image_size=32", "--epochs=21")
PRESETS["scratch-cpu"] = apply_overrides(PRESETS["tiny-cpu"], list(FROM_SCRATCH))


def config_from(name: str, overrides: list[str]) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {', '.join(PRESETS)}")
    return apply_overrides(PRESETS[name], overrides)


# --------------------------------------------------------------------------------------------
# Samples and the sampler
# --------------------------------------------------------------------------------------------
@dataclass
class Validation:
    """Held-out training classes: their query photos search every doc, and a hit is a doc of
    the query's own weak-label class.  Built from clicks like the training classes, so it is
    as noisy as they are, and it never reads the test queries."""

    query_rows: np.ndarray
    relevant: list[set[int]]


@dataclass
class Samples:
    """Training samples: kind 0 = query photo, 1 = doc; ``row`` into data.queries / data.docs."""

    kind: np.ndarray
    row: np.ndarray
    label: np.ndarray     # class index, or pair index for the pairwise losses
    num_classes: int
    pair_doc: np.ndarray | None = None  # pairwise losses: the doc row of each query's pair
    validation: Validation | None = None

    def doc_rows(self) -> np.ndarray:
        """The doc rows training uses, sorted, each once."""
        return np.unique(self.row[self.kind == 1] if self.pair_doc is None else self.pair_doc)


def held_out(classes: list[dict], share: float) -> np.ndarray:
    """Which classes validation keeps (a boolean per class).

    Chosen by a hash of each class's first doc id, not by the training seed: every seed, loss
    and label choice trained on the same clicks is validated on the same queries, and a class
    keeps its side whatever other classes exist.
    """
    rank = stable_rank([c["doc_ids"][0] for c in classes]) if classes else np.zeros(0, np.uint64)
    return (rank % 10_000) < round(share * 10_000)


def make_samples(data: ShopData, cfg: TrainConfig) -> tuple[Samples, dict]:
    """The training samples of ``cfg``'s labels and loss, minus the validation classes."""
    cq, cd, cn = data.clicks_columns()
    if len(cq) == 0:
        raise ValueError(f"{data.root}/clicks.jsonl has no clicks: nothing to train on")
    classes = validation = None
    if cfg.val_share > 0 or (cfg.labels == "classes" and cfg.loss not in PAIRWISE_LOSSES):
        classes, stats = build_classes_from_clicks(cq, cd, cn, cfg.classes)
    if cfg.val_share > 0:
        held = held_out(classes, cfg.val_share)
        val_classes = [c for c, h in zip(classes, held) if h]
        classes = [c for c, h in zip(classes, held) if not h]
        held_q = {q for c in val_classes for q in c["query_ids"]}
        held_d = {d for c in val_classes for d in c["doc_ids"]}
        keep = [q not in held_q and d not in held_d for q, d in zip(cq, cd)]
        cq, cd, cn = ([x for x, k in zip(col, keep) if k] for col in (cq, cd, cn))
        rows = [(data.query_row[q], {data.doc_row[d] for d in c["doc_ids"]})
                for c in val_classes for q in c["query_ids"]]
        validation = Validation(np.array([r for r, _ in rows], dtype=np.int64),
                                [rel for _, rel in rows])
        if not rows:
            raise ValueError(f"val_share={cfg.val_share} holds out none of the {len(held)} "
                             f"weak-label classes of {data.root}: "
                             + ("validation needs at least 2 classes; set --val_share=0"
                                if len(held) < 2 else "raise it, or set it to 0"))
    split = {} if validation is None else {"val_classes": len(val_classes),
                                           "val_queries": len(validation.query_rows)}
    if cfg.loss in PAIRWISE_LOSSES:
        q = np.array([data.query_row[x] for x in cq])
        d = np.array([data.doc_row[x] for x in cd])
        return Samples(np.zeros(len(q), np.int8), q, np.arange(len(q)), len(q), d,
                       validation), {"pairs": int(len(q)), **split}
    if cfg.labels == "classes":
        stats = {**stats, **class_stats(classes), **split}
    else:
        classes = raw_click_classes(cq, cd, cn)
        stats = {"classes": len(classes), **split}
    kind, row, label = [], [], []
    for k, cl in enumerate(classes):
        for x in cl["query_ids"]:
            kind.append(0), row.append(data.query_row[x]), label.append(k)
        for x in cl["doc_ids"]:
            kind.append(1), row.append(data.doc_row[x]), label.append(k)
    if not classes:
        raise ValueError("no class survived class construction; loosen the ClassConfig")
    return Samples(np.array(kind, np.int8), np.array(row), np.array(label), len(classes),
                   validation=validation), stats


class EpochSampler:
    """Per epoch: at most ``cap`` samples of each label, in an order that is a function of
    (seed, epoch) alone, so a resumed run sees the same batches.

    ``per_class`` = 1: the samples shuffled one by one.  ``per_class`` = K > 1: each label's
    samples are cut into runs of K that stay together (P x K class-balanced batches, as
    pytorch-metric-learning's ``MPerClassSampler``), so a query photo and its class's docs
    share a batch; the epoch holds the same samples either way.
    """

    def __init__(self, labels: np.ndarray, cap: int, batch_size: int, seed: int,
                 per_class: int = 1):
        self.labels, self.cap, self.batch_size, self.seed = labels, cap, batch_size, seed
        self.per_class = per_class
        order = np.argsort(labels, kind="stable")
        self.groups = np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)
        self.epoch_len = int(sum(min(len(g), cap) for g in self.groups))
        self.steps_per_epoch = max(1, self.epoch_len // batch_size)
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        picked = [g if len(g) <= self.cap else rng.choice(g, self.cap, replace=False)
                  for g in self.groups]
        if self.per_class == 1:
            order = rng.permutation(np.concatenate(picked))
        else:
            k = self.per_class
            runs = [run for g in picked for run in np.array_split(
                rng.permutation(g), max(1, round(len(g) / k)))]
            order = np.concatenate([runs[i] for i in rng.permutation(len(runs))])
        self._cache = (epoch, order)
        return order

    def batch(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        lo = pos * self.batch_size
        out = order[lo: lo + self.batch_size]
        if len(out) < self.batch_size:  # tiny data: fewer samples than one batch
            out = np.resize(order, self.batch_size)
        return out


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The steps a run trains: ``cfg.steps`` when set, else ``cfg.epochs`` of the sampler."""
    return cfg.steps or max(1, int(round(cfg.epochs * steps_per_epoch)))


def augment(x: torch.Tensor, step: int, seed: int, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and shift (reflect-padded crop), seeded by (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n, _, h, w = x.shape
    if n == 0:  # a micro-batch with no docs (raw-click labels) or no photos
        return x
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    out = torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(n)])
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def _distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); under torchrun, joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device != "auto":
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise ValueError(f"--device={cfg.device}: not a device name (auto, cpu, cuda, "
                             f"cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device={cfg.device}: torch sees no CUDA GPU "
                             f"(torch.cuda.is_available() is False); use --device=cpu (or auto)")
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not torch.distributed.is_initialized():
        # By the device, not by what the machine has: --device=cpu on a GPU machine needs gloo.
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, device


# Settings that change how a run is executed, not what it computes: a resumed run may differ.
RUNTIME_KEYS = ("device", "threads", "loader_threads", "preload_images", "stop_after",
                "eval_at_end")


# What a finished run leaves beside its checkpoints: a folder holding any of these and no
# checkpoint is another run's, never reused (its index would answer for the old model).
RUN_OUTPUTS = ("model.pt", "eval.json", "val.json", "index")


def check_run_folder(out: Path, cfg: TrainConfig, resume: bool) -> dict | None:
    """Whether ``out`` may take this run, before anything is read or written; with ``resume``,
    the checkpoint to resume from, after checking that ``cfg`` is the run's config (any
    difference outside :data:`RUNTIME_KEYS` is refused: :func:`config.check_resumable`).

    A fresh run may go into a new folder, an empty one, or one whose run was killed before its
    first checkpoint (its config and log are then rewritten).
    """
    ckpt_path = out / "checkpoints" / "last.pt"
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"{ckpt_path}: nothing to resume")
        check_resumable(out, "train", cfg, RUNTIME_KEYS, "--out")
        return load_checkpoint(ckpt_path)
    if ckpt_path.exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume or choose a new --out")
    check_writable(out, "folder")
    left = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if left:
        raise FileExistsError(f"{out} holds the outputs of an earlier run ({', '.join(left)}) "
                              f"but no checkpoint to resume from; delete it or choose a new "
                              f"--out")
    return None


def refuse_other_run(run: Path, cfg: TrainConfig, advice: str) -> None:
    """A clear error when the folder ``run`` holds a run (finished or not) trained with other
    settings than ``cfg``: a cached run is reused only when it is the run asked for."""
    if (run / "config.json").exists():
        diff = config_diff(saved_config(run, "train"), cfg)
        if diff:
            raise FileExistsError(f"{run} was trained with another config (differs in "
                                  f"{', '.join(diff)}); {advice}")


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded to the CPU (``set_rng_state`` takes CPU tensors only;
    ``load_state_dict`` moves the rest); a damaged or foreign file is an error naming it."""
    ck = load_torch(path, "checkpoint", "delete it to train the run from the start")
    return require_keys(ck, ("model", "optimizer", "scheduler", "step", "torch_rng"), path,
                        "checkpoint")


def diverged_message(step: int, loss: float, cfg: TrainConfig, last_ckpt: int, out) -> str:
    """What a user is told when the loss stops being a number: the step, the settings that most
    often cause it, and what of the run is kept."""
    suspects = [f"--lr={cfg.lr:g}", f"--centre_lr={cfg.centre_lr:g}"]
    if cfg.loss in ("cosface", "arcface"):
        suspects += [f"--scale={cfg.scale:g}", f"--margin={cfg.margin_value:g}"]
    elif cfg.loss == "infonce":
        suspects.append(f"--temperature={cfg.temperature:g}")
    kept = (f"its last checkpoint (step {last_ckpt}) is kept, no model.pt is written"
            if last_ckpt else "no checkpoint was written")
    return (f"training diverged: the loss is {loss} at step {step} of {out}; lower the "
            f"learning rate first (likely settings: {', '.join(suspects)}, "
            f"--clip_grad={cfg.clip_grad:g}); {kept}")


def check_batch_memory(model, cfg: TrainConfig, world: int, device: torch.device,
                       available: int | None = None) -> int:
    """Refuse a batch whose training step cannot fit in memory; returns the estimate (bytes).

    The estimate: the output of every module for one image (a no-grad forward with hooks),
    times 3 (kept for backward, its gradient, temporaries), times the images a rank encodes
    per micro-batch.  Rough, but it turns a batch that would be killed for memory minutes
    later into an error now.
    """
    per_image = [0]

    def hook(_module, _inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                per_image[0] += t.numel() * t.element_size()

    leaves = [m for m in model.image_encoder.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            size = cfg.model.image_size
            model.encode_images(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    images = cfg.batch_size // world // cfg.grad_accum * (2 if cfg.loss in PAIRWISE_LOSSES else 1)
    need = 3 * per_image[0] * images
    if available is None:
        available = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
                     else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if need > 0.9 * available:
        raise ValueError(f"batch_size={cfg.batch_size}: a training step needs about "
                         f"{need / 2**30:.1f} GiB for activations (estimated), and "
                         f"{available / 2**30:.1f} GiB are free on {device}; lower --batch_size "
                         f"or raise --grad_accum")
    return need


def build_model(data: ShopData, samples: Samples, cfg: TrainConfig) -> MixerModel:
    torch.manual_seed(cfg.seed)
    tok = None
    if cfg.model.text_encoder == "scratch" and cfg.model.fusion != "image_only":
        tok = WordTokenizer.fit([data.doc_texts[int(r)] for r in samples.doc_rows()],
                                max_size=cfg.model.vocab_size)
    model = MixerModel(cfg.model, tok)
    load_image_weights(model.image_encoder, cfg.model)  # after the seeded init: same RNG draws
    return model


def train(data_dir: str | Path, out: str | Path, cfg: TrainConfig, resume: bool = False,
          progress: bool | None = None, preset: str = "custom") -> dict:
    """Train on the dataset folder ``data_dir``; everything the run makes goes under ``out``.

    Runs at ``cfg.threads`` torch threads and gives the caller's count back at the end."""
    with torch_threads(cfg.threads):
        return _train(data_dir, out, cfg, resume, progress, preset)


def _train(data_dir, out, cfg: TrainConfig, resume: bool, progress, preset: str) -> dict:
    out = Path(out)
    ckpt_path = out / "checkpoints" / "last.pt"
    ck = check_run_folder(out, cfg, resume)  # before any data is read
    rank, world, device = _distributed(cfg)
    data = load_dataset(data_dir)  # every image opened now, not in the end-of-run evaluation
    fingerprint = data_fingerprint(data_dir)
    recorded = json.loads((out / "config.json").read_text()).get("data_fingerprint") \
        if resume else None  # read whole by check_run_folder; older runs lack the key
    if recorded not in (None, fingerprint):
        raise ValueError(f"{out}: --resume on other data than the run's ({data_dir} has "
                         f"fingerprint {fingerprint}, {out / 'config.json'} records "
                         f"{recorded}); resume on the run's data, or start a new --out")
    samples, label_stats = make_samples(data, cfg)
    model = build_model(data, samples, cfg).to(device)
    check_batch_memory(model, cfg, world, device)
    pairwise = samples.pair_doc is not None
    classifier = None if pairwise else MarginClassifier(
        samples.num_classes, cfg.model.embed_dim, cfg.loss, cfg.margin_value, cfg.scale,
        cfg.sample_rate, model_parallel=world > 1, seed=cfg.seed).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = EpochSampler(samples.label, cfg.max_per_class, cfg.batch_size, cfg.seed,
                           cfg.samples_per_class)
    total = total_steps(cfg, sampler.steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, cfg.warmup_frac))
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=True)
        if classifier is not None:  # the sharded loss is the global mean already
            net.register_comm_hook(None, sum_gradients_hook)

    # One writer per run folder, from its first file to its last (files.folder_lock).
    with folder_lock(out, "train") if rank == 0 else contextlib.nullcontext():
        start = 0
        # What a killed writer left.  Rank 0 is the only writer: another rank cleaning up could
        # delete the temporary file of a config or checkpoint that rank 0 is writing right now.
        if rank == 0:
            for folder in (out, out / "checkpoints"):
                remove_stale_temporaries(folder)
        if resume:
            model.load_state_dict(ck["model"])
            if classifier is not None:
                classifier.load_state_dict(ck["classifier"][rank] if world > 1
                                           else ck["classifier"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            torch.set_rng_state(ck["torch_rng"])
            if device.type == "cuda" and ck.get("cuda_rng") is not None:  # dropout on the GPU
                torch.cuda.set_rng_state(ck["cuda_rng"], device)
            start = ck["step"]
            if rank == 0:  # steps logged after the checkpoint will be logged again
                truncate_log(out / "metrics.jsonl", start)
        elif rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "config.json", {"preset": preset,
                                             "data": str(Path(data_dir).resolve()),
                                             "data_fingerprint": fingerprint,
                                             "train": dataclasses.asdict(cfg),
                                             "labels": label_stats, "steps": total,
                                             "steps_per_epoch": sampler.steps_per_epoch})
        show_progress = rank == 0 and progress is not False
        val = samples.validation
        q_rows = np.unique(samples.row[samples.kind == 0])
        # Validation searches every doc, so the doc table then holds them all.
        d_rows = np.arange(len(data.docs)) if val is not None else samples.doc_rows()
        images_q = ImageTable(image_paths(data, "queries", q_rows), cfg.model.image_size,
                              cfg.preload_images, cfg.loader_threads,
                              progress=show_progress, desc="query photos")
        images_d = ImageTable(image_paths(data, "docs", d_rows), cfg.model.image_size,
                              cfg.preload_images, cfg.loader_threads,
                              progress=show_progress, desc="doc images")
        images_val = None if val is None else ImageTable(
            image_paths(data, "queries", val.query_rows), cfg.model.image_size, cfg.preload_images,
            cfg.loader_threads, progress=show_progress, desc="validation photos")
        q_pos = {int(r): i for i, r in enumerate(q_rows)}
        d_pos = {int(r): i for i, r in enumerate(d_rows)}
        texts = data.doc_texts
        table_texts = [texts[int(r)] for r in d_rows]
        if classifier is not None and cfg.centre_init == "docs" and not resume:
            # Embedded as a training step would (BatchNorm on batch statistics): at initialisation
            # the running statistics are still 0 / 1 and would leave the shared component in.
            emb = embed_docs(model, images_d, table_texts, device=device, batch_stats=True)
            doc = samples.kind == 1
            classifier.imprint(torch.from_numpy(emb[[d_pos[int(r)] for r in samples.row[doc]]]),
                               torch.from_numpy(samples.label[doc]))

        amp = cfg.amp and device.type == "cuda"
        local_bs = cfg.batch_size // world
        micro = local_bs // cfg.grad_accum
        # A fresh run starts its log anew (a run killed before its first checkpoint left one).
        metrics_f = open(out / "metrics.jsonl", "a" if resume else "w") if rank == 0 else None
        bar = tqdm(total=total, initial=start, desc="train", mininterval=2.0) \
            if show_progress else None
        t0, step = time.time(), start
        last_ckpt = start
        if metrics_f and val is not None and cfg.val_every and start == 0:  # the initial weights
            metrics_f.write(strict_json({"step": 0, **validate(model, val, images_val, images_d,
                                                                 table_texts, device)}) + "\n")
        model.train()
        try:
            for step in range(start, total):
                if cfg.stop_after is not None and step >= cfg.stop_after:
                    break
                batch = sampler.batch(step)[rank * local_bs: (rank + 1) * local_bs]
                opt.zero_grad(set_to_none=True)
                if classifier is not None:
                    classifier.clear_used()
                    classifier.margin = margin_at(step, total, cfg.margin_value,
                                                  cfg.margin_warmup_frac)
                loss_sum = 0.0
                for m in range(cfg.grad_accum):
                    idx = batch[m * micro: (m + 1) * micro]
                    # DDP reduces gradients once, on the last micro-batch of the step.
                    sync = net.no_sync() if world > 1 and m < cfg.grad_accum - 1 \
                        else contextlib.nullcontext()
                    with sync:
                        loss, emb = _step_loss(net, model, classifier, samples, idx, images_q,
                                               images_d, q_pos, d_pos, texts, cfg,
                                               step * cfg.grad_accum + m, device, amp)
                        (loss / cfg.grad_accum).backward()
                    loss_sum += float(loss.detach()) / cfg.grad_accum
                if not math.isfinite(loss_sum):
                    raise ValueError(diverged_message(step + 1, loss_sum, cfg, last_ckpt, out))
                log_now = (step + 1) % cfg.log_every == 0 or step + 1 == total
                health = _health(classifier, *emb) if metrics_f and log_now else {}
                if cfg.clip_grad:
                    clip_global_norm(model, classifier if cfg.clip_centres else None,
                                      cfg.clip_grad, world)
                lr = sched.get_last_lr()[0]
                opt.step()
                if classifier is not None:  # its own row-wise optimiser, same schedule
                    classifier.step(cfg.centre_lr * lr / cfg.lr, cfg.centre_optimizer,
                                    weight_decay=cfg.centre_weight_decay)
                sched.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum:.3f}")
                record = {}
                if metrics_f and log_now:
                    record = {"step": step + 1, "epoch": (step + 1) / sampler.steps_per_epoch,
                              "loss": loss_sum, "lr": sched.get_last_lr()[0], **health}
                if val is not None and rank == 0 and (
                        step + 1 == total or cfg.val_every and (step + 1) % cfg.val_every == 0):
                    record.update(step=step + 1, **validate(model, val, images_val, images_d,
                                                            table_texts, device))
                    model.train()
                if metrics_f and record:
                    record["seconds"] = round(time.time() - t0, 2)
                    metrics_f.write(strict_json(record) + "\n")
                    metrics_f.flush()
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
                    _checkpoint(ckpt_path, model, classifier, opt, sched, step + 1, rank, world,
                                device)
                    last_ckpt = step + 1
            else:
                step = total
        finally:
            if bar is not None:
                bar.close()
            if metrics_f:
                metrics_f.close()
        finished = step >= total and last_ckpt == total
        result = {"run": str(out), "steps": total, "stopped_at": step, "finished": finished,
                  "labels": label_stats}
        if finished and val is not None and rank == 0:
            result["validation"] = {k: v for k, v in read_log(out / "metrics.jsonl")[-1].items()
                                    if k.startswith("val_")}
            write_json(out / "val.json", result["validation"])
        if finished and rank == 0:
            save_torch({"export": model.export_config(), "state_dict": model.state_dict()},
                         out / "model.pt")
            if cfg.eval_at_end and len(data.qrels):
                metrics = evaluate_model(model, data, device=device,
                                         batch_size=256, progress=bool(progress))
                write_json(out / "eval.json", metrics)
                result["eval"] = metrics
        if world > 1:
            torch.distributed.barrier()
        return result


def _step_loss(net, model, classifier, samples, idx, images_q, images_d, q_pos, d_pos, texts,
               cfg, step, device, amp):
    kind = samples.kind[idx]
    if samples.pair_doc is not None:
        q_img = images_q[[q_pos[int(r)] for r in samples.row[idx]]]
        d_img = images_d[[d_pos[int(r)] for r in samples.pair_doc[idx]]]
        doc_rows = samples.pair_doc[idx]
    else:
        q_img = images_q[[q_pos[int(r)] for r in samples.row[idx][kind == 0]]]
        d_img = images_d[[d_pos[int(r)] for r in samples.row[idx][kind == 1]]]
        doc_rows = samples.row[idx][kind == 1]
    if cfg.augment:
        q_img, d_img = augment(q_img, 2 * step, cfg.seed), augment(d_img, 2 * step + 1, cfg.seed)
    tokens = model.tokenize([texts[int(r)] for r in doc_rows]) if len(doc_rows) else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        q_emb, d_emb = net(q_img.to(device, non_blocking=True),
                           d_img.to(device, non_blocking=True), tokens)
    if samples.pair_doc is not None:
        fn = info_nce if cfg.loss == "infonce" else triplet_loss
        arg = cfg.temperature if cfg.loss == "infonce" else cfg.margin_value
        q_emb, d_emb = q_emb.float(), d_emb.float()
        return fn(q_emb, d_emb, arg), (q_emb.detach(), d_emb.detach())
    emb = torch.empty(len(idx), cfg.model.embed_dim, device=device)
    kind_t = torch.from_numpy(kind).to(device)
    if q_emb is not None:
        emb[kind_t == 0] = q_emb.float()
    if d_emb is not None:
        emb[kind_t == 1] = d_emb.float()
    labels = torch.from_numpy(samples.label[idx]).to(device)
    return classifier(emb, labels, step), (emb.detach(), labels)


def _health(classifier, a: torch.Tensor, b: torch.Tensor) -> dict:
    """What shows a failing recipe early, from the step's last micro-batch.

    Classification (``a`` = embeddings, ``b`` = labels): the centres' mean norm, the mean cosine
    of a sample to its own centre and to other centres.  Pairwise (``a`` = queries, ``b`` =
    their docs): the mean cosine of matched and of unmatched pairs.  Both: the mean cosine
    between the batch's embeddings (near 1 = collapse onto one point).
    """
    if classifier is None:
        q, d = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        sim = q @ d.t()
        off = ~torch.eye(len(q), dtype=torch.bool, device=q.device)
        out = {"cos_own": float(sim.diagonal().mean()),
               "cos_other": float(sim[off].mean()) if off.any() else float("nan")}
        emb = torch.cat([q, d])
    else:
        out, emb = classifier.diagnostics(a, b), a
    return {**out, "cos_batch": mean_pairwise_cosine(emb)}


def validate(model, val: Validation, query_images, doc_images, doc_texts, device) -> dict:
    """Recall@1/10 of the held-out classes' photos against every doc (exact search)."""
    doc_emb = embed_docs(model, doc_images, doc_texts, device=device)
    query_emb = embed_queries(model, query_images, device=device)
    _, ranked = exact_search(doc_emb, query_emb, 10)
    m = ranking_metrics(ranked, val.relevant, ks=(1, 10))
    return {"val_recall@1": m["recall@1"], "val_recall@10": m["recall@10"]}


def _checkpoint(path, model, classifier, opt, sched, step, rank, world, device):
    clf_state = None
    if classifier is not None:
        clf_state = classifier.state_dict()
        if world > 1:  # every rank's shard goes into the one file
            shards = [None] * world
            torch.distributed.all_gather_object(shards, {k: v.cpu() for k, v in
                                                         clf_state.items()})
            clf_state = shards
    if rank == 0:
        save_torch({"model": model.state_dict(), "classifier": clf_state,
                      "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "torch_rng": torch.get_rng_state(), "step": step,
                      "cuda_rng": (torch.cuda.get_rng_state(device) if device.type == "cuda"
                                   else None)}, path)
