"""Training: classification over weak-label classes (Mixer), or pairwise baselines, one loop.

``mixer-lite train --data DIR --out RUN --config tiny-cpu [--key=value ...]``

The presets (one :class:`TrainConfig`, a tiny CPU scale and a full GPU scale) and :func:`train`,
a loop in labelled phases over the parts the other modules make: the samples, the validation
split and the batch order (:mod:`mixer_lite.sampling`), the objective (:mod:`mixer_lite.objectives`:
classification or pairwise, one interface), the schedule and clipping (:mod:`mixer_lite.optim`),
and the run folder with its checkpoints (:mod:`mixer_lite.runs`).

* **Optimiser.**  AdamW, linear warm-up then cosine decay, gradient clipping over the encoder
  and the centres, gradient accumulation; bf16 autocast on CUDA, or fp16 with a loss scale
  (:class:`optim.LossScale`) for GPUs without bf16.
* **Speed.**  Batches prepared by ``loader_workers`` processes ahead of the step
  (:class:`sampling.MicroBatches`); ``channels_last`` and ``compile`` for the image encoder.
  None of them changes what is computed beyond float order (``bench/train_speed.py``).
* **Health.**  ``metrics.jsonl`` logs the loss and the objective's health figures (for
  classification: the centres' mean norm, the mean cosine of a sample to its own and to other
  centres, the mean cosine within a batch) and the validation recall from the initial weights
  on, so a failing recipe shows why, and what the steps cost (:class:`Throughput`: images/s,
  the share spent waiting for data, peak memory).
* **Parallelism.**  Under ``torchrun`` the encoders are data-parallel (DDP) and the classifier
  model-parallel (each rank holds a shard of the centres; see :mod:`mixer_lite.losses`).  The
  classifier loss is already the global-batch mean, so encoder gradients are summed, not
  averaged, across ranks.
* **Checkpoints.**  ``RUN/checkpoints/last.pt`` is written atomically every
  ``checkpoint_every`` steps with model, classifier, optimiser, schedule and RNG state;
  ``--resume`` continues from it and ends with the same weights as an uninterrupted run.

Our choices where the paper is silent: the presets below (each setting of ``tiny-cpu`` measured
on validation photos, ``docs/EXPERIMENTS.md``; ``base-gpu`` is unmeasured), CosFace m=0.35 at
s=30 by default and s=20 in ``tiny-cpu``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm  # the plain bar (not tqdm.auto): notebooks need no widget extension

from .classes import ClassConfig
from .config import apply_overrides
from .dataset import ShopData, data_fingerprint, load_dataset
from .files import folder_lock, read_log, remove_stale_temporaries, strict_json, truncate_log, \
    write_json
from .encoders import WordTokenizer
from .model import MixerModel, ModelConfig
from .weights import load_image_weights
from .objectives import (DEFAULT_MARGIN, LOSSES, PAIRWISE_LOSSES, Objective, images_per_sample,
                         make_objective)
from .optim import (LossScale, clip_global_norm, frozen_then_warmup, sum_gradients_hook,
                    warmup_cosine)
from .retrieval import embed_docs, embed_queries, evaluate_model, validation_recall
from .runs import (check_run_folder, check_same_data, keep_freed_memory, restore_checkpoint,
                   save_checkpoint, setup_distributed, save_torch, torch_threads)
from .sampling import (EpochSampler, MicroBatches, Samples, TrainingImages, Validation,
                       make_samples, micro_batch_loader, total_steps, training_images)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
                                      # (EXPERIMENTS.md, "How the earlier tiny-cpu preset...")
    centre_lr: float = 2.0            # peak lr of the centres (same warm-up/cosine schedule)
    centre_weight_decay: float = 5e-4  # 0 was measured worse on validation (EXPERIMENTS.md)
    temperature: float = 0.05         # InfoNCE
    sample_rate: float = 1.0          # class-centre sampling (Partial FC); 1 = full softmax
    titles_move_centres: bool = True  # False: title samples (model.title_sample) follow their
                                      # class centres without moving them (EXPERIMENTS.md,
                                      # "The title anchored to its class centre")
    batch_size: int = 128             # global batch (split over ranks and accumulation steps)
    grad_accum: int = 1
    epochs: float = 4.0
    steps: int = 0                    # > 0: train exactly this many steps, whatever the epochs
    max_per_class: int = 16           # samples of one class per epoch
    samples_per_class: int = 1        # > 1: batches of P classes x K samples (class-balanced)
    val_share: float = 0.0            # share of the weak-label classes held out for validation
    val_every: int = 0                # validation Recall@10 every this many steps (0: at the end;
                                      # a fresh run also validates its initial weights)
    lr: float = 5e-4                  # 2e-3 collapsed the from-scratch ViT (EXPERIMENTS.md, idem)
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    encoder_frozen_frac: float = 0.0  # the image encoder's lr is 0 for this share of the steps
                                      # (optim.frozen_then_warmup; EXPERIMENTS.md, "A backbone
                                      # pretrained across designers")
    clip_grad: float = 5.0
    clip_centres: bool = True         # False: clip the encoder's gradients only (Partial FC)
    augment: bool = True
    doc_zoom_out: float = 1.0         # < 1: half the doc images shrunk to this-1 of their side
    doc_mosaic: float = 0.0           # > 0: this share of doc images composed with other
                                      # classes' docs (sampling.doc_mosaic)
    amp: bool = True                  # autocast to amp_dtype on CUDA (no effect on CPU)
    amp_dtype: str = "bf16"           # "fp16": for GPUs without bf16, with a loss scale
    channels_last: bool = False       # the image encoder's tensors in NHWC (convolutions)
    compile: bool = False             # torch.compile the image encoder (inductor)
    device: str = "auto"              # "auto" | "cpu" | "cuda" | "cuda:1" ...
    preload_images: bool = True       # False: decode per batch (real, large datasets)
    loader_threads: int = 4           # decoding threads of each process that decodes
    loader_workers: int = 0           # processes preparing the next batches (0: in the loop)
    threads: int = 0                  # torch CPU threads (0 = torch's default)
    checkpoint_every: int = 200
    log_every: int = 10
    tensorboard: bool = False         # also log to <out>/tensorboard (pip install tensorboard)
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
        if not self.titles_move_centres and (not self.model.trains_title or
                                             self.loss in PAIRWISE_LOSSES):
            problems.append("titles_move_centres=false anchors title samples to class centres: "
                            "it needs a classification loss and model.title_sample=true (or "
                            "model.region_choice=title)")
        if not 0 < self.doc_zoom_out <= 1:
            problems.append(f"doc_zoom_out must be in (0, 1] (1: off), got {self.doc_zoom_out}")
        if not 0 <= self.doc_mosaic <= 1:
            problems.append(f"doc_mosaic must be in [0, 1] (0: off), got {self.doc_mosaic}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            problems.append("checkpoint_every and log_every must be >= 1")
        if self.clip_grad < 0 or self.weight_decay < 0 or self.centre_weight_decay < 0:
            problems.append("clip_grad (0: off), weight_decay and centre_weight_decay must be "
                            ">= 0")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.margin_warmup_frac <= 1 \
                or not 0 <= self.encoder_frozen_frac < 1:
            problems.append(f"warmup_frac and encoder_frozen_frac must be in [0, 1) and "
                            f"margin_warmup_frac in [0, 1], got {self.warmup_frac}, "
                            f"{self.encoder_frozen_frac} and {self.margin_warmup_frac}")
        if self.scale <= 0 or self.temperature <= 0 or self.centre_lr <= 0:
            problems.append(f"scale, temperature and centre_lr must be positive, got "
                            f"{self.scale}, {self.temperature} and {self.centre_lr}")
        if self.margin is not None and self.margin < 0:
            problems.append(f"margin must be >= 0, got {self.margin}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            problems.append(f"--device={self.device}: not a device mixer-lite trains on (auto, "
                            f"cpu, cuda, cuda:N)")
        if self.threads < 0 or self.loader_threads < 1 or self.loader_workers < 0:
            problems.append(f"threads must be >= 0 (0: torch's default), loader_threads >= 1 "
                            f"and loader_workers >= 0, got {self.threads}, "
                            f"{self.loader_threads} and {self.loader_workers}")
        if self.steps < 0:
            problems.append(f"steps must be >= 0 (0: epochs decide), got {self.steps}")
        if self.amp_dtype not in AMP_DTYPES:
            problems.append(f"amp_dtype must be one of {tuple(AMP_DTYPES)}, got "
                            f"{self.amp_dtype!r}")
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
    # Many GPUs on real data: pretrained backbones by name, bf16, big batches, sampled centres,
    # batches decoded by worker processes, the CNN in channels_last (1.36x on a CPU,
    # bench/train_speed.py; unmeasured on a GPU).
    "base-gpu": TrainConfig(
        model=ModelConfig(image_size=224, image_encoder="torchvision:resnet50",
                          image_pretrained=True,
                          text_encoder="sentence-transformers/all-MiniLM-L6-v2",
                          max_text_len=48, n_concepts=16, embed_dim=256, dropout=0.1),
        classes=ClassConfig(max_queries_per_class=500),
        batch_size=1024, epochs=20, lr=3e-4, warmup_frac=0.02, sample_rate=0.1,
        max_per_class=32, preload_images=False, loader_threads=2, loader_workers=8,
        channels_last=True, checkpoint_every=1000,
        log_every=50),
}


# The image encoder from random weights needs steps more than pixels: 21 epochs at 32 px (about
# 1.2x tiny-cpu's training time) beat 3.5 at 64 px on validation photos; the pretrained encoder
# is the other way round (docs/EXPERIMENTS.md, item 15).
FROM_SCRATCH = ("--model.image_weights=none", "--model.image_size=32", "--epochs=21")
PRESETS["scratch-cpu"] = apply_overrides(PRESETS["tiny-cpu"], list(FROM_SCRATCH))


def config_from(name: str, overrides: list[str]) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {', '.join(PRESETS)}")
    return apply_overrides(PRESETS[name], overrides)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
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
    images = cfg.batch_size // world // cfg.grad_accum * images_per_sample(cfg.loss)
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

    Runs at ``cfg.threads`` torch threads and gives the caller's count back at the end; keeps
    freed memory in the process for the next step (:func:`runs.keep_freed_memory`)."""
    keep_freed_memory()
    with torch_threads(cfg.threads):
        return _train(data_dir, Path(out), cfg, resume, progress, preset)


@dataclass
class Run:
    """What the phases of :func:`train` share: the run's parts, made once in phase 2."""

    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    samples: Samples
    model: MixerModel
    net: nn.Module              # the model, or its DDP wrapper under torchrun
    objective: Objective
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    sampler: EpochSampler
    total: int
    loss_scale: LossScale
    images: TrainingImages | None = None
    doc_emb: np.ndarray | None = None  # every doc's embedding at the last validation pass


def _train(data_dir, out: Path, cfg: TrainConfig, resume: bool, progress, preset: str) -> dict:
    # 1. The run folder may take this run (before any data is read), and the processes join.
    ck = check_run_folder(out, cfg, resume)
    if cfg.tensorboard:
        tensorboard_writer_class()  # missing, it fails now rather than after the data's load
    rank, world, device = setup_distributed(cfg.device)
    # 2. Data, samples, model, objective and optimiser.
    data = load_dataset(data_dir)  # every image opened now, not in the end-of-run evaluation
    fingerprint = check_same_data(out, data_dir) if resume else data_fingerprint(data_dir)
    samples, label_stats = make_samples(data, cfg)
    run = _build(cfg, out, samples, build_model(data, samples, cfg).to(device), rank, world,
                 device)
    # One writer per run folder, from its first file to its last (files.folder_lock).
    with folder_lock(out, "train") if rank == 0 else contextlib.nullcontext():
        # 3. Resume from the checkpoint, or start the folder's config and log.
        if rank == 0:  # what a killed writer left; only rank 0 writes, so only it cleans up
            for folder in (out, out / "checkpoints"):
                remove_stale_temporaries(folder)
        if resume:
            start = restore_checkpoint(ck, out / "checkpoints" / "last.pt", run.model,
                                       run.objective, run.opt, run.sched, rank, world, device,
                                       run.loss_scale)
            if rank == 0:  # steps logged after the checkpoint will be logged again
                truncate_log(out / "metrics.jsonl", start)
        else:
            start = 0
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                write_json(out / "config.json", {
                    "preset": preset, "data": str(Path(data_dir).resolve()),
                    "data_fingerprint": fingerprint, "train": dataclasses.asdict(cfg),
                    "labels": label_stats, "steps": run.total,
                    "steps_per_epoch": run.sampler.steps_per_epoch})
        # 4. The images, decoded once; on a fresh run the objective starts from the model's
        #    embeddings (class centres imprinted from their docs).
        show_progress = rank == 0 and progress is not False
        run.images = training_images(data, samples, cfg, show_progress)
        if not resume:
            run.objective.initialise(run.model, run.images, samples, device)
        # 5. The steps.
        step, last_ckpt = _loop(run, start, show_progress)
        # 6. What a finished run leaves: val.json, model.pt, then eval.json (under torchrun
        #    every rank embeds its share of the docs and photos).
        finished = step >= run.total and last_ckpt == run.total
        result = {"run": str(out), "steps": run.total, "stopped_at": step,
                  "finished": finished, "labels": label_stats}
        if finished and rank == 0:
            result.update(_finish(run))
        if finished and cfg.eval_at_end and len(data.qrels):
            # A finished loop validated after its last step, embedding every doc in data order
            # (training_images) with these weights: one process searches those.
            result["eval"] = evaluate_model(run.model, data, device=device, batch_size=256,
                                            progress=rank == 0 and bool(progress),
                                            preload=cfg.preload_images, rank=rank, world=world,
                                            doc_emb=run.doc_emb if world == 1 else None)
            if rank == 0:
                write_json(out / "eval.json", result["eval"])
        if world > 1:
            torch.distributed.barrier()
        return result


def _build(cfg: TrainConfig, out: Path, samples: Samples, model: MixerModel, rank: int,
           world: int, device: torch.device) -> Run:
    """The objective, optimiser, sampler and schedule of a run, and the model's DDP wrapper."""
    check_batch_memory(model, cfg, world, device)
    if cfg.channels_last:
        model.image_encoder.to(memory_format=torch.channels_last)
    if cfg.compile:  # in place: the state dict keeps its keys
        model.image_encoder.compile()
    objective = make_objective(cfg, samples.num_classes, world).to(device)
    sampler = EpochSampler(samples.label, cfg.max_per_class, cfg.batch_size, cfg.seed,
                           cfg.samples_per_class)
    total = total_steps(cfg, sampler.steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = [warmup_cosine(total, cfg.warmup_frac)]
    if cfg.encoder_frozen_frac:  # a second group, the image encoder's, on its own schedule
        encoder = {id(p) for p in model.image_encoder.parameters()}
        params = [{"params": [p for p in params if id(p) not in encoder]},
                  {"params": [p for p in params if id(p) in encoder]}]
        schedule.append(frozen_then_warmup(total, cfg.warmup_frac, cfg.encoder_frozen_frac))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=True)
        if objective.global_loss:  # the sharded loss is the global mean already
            net.register_comm_hook(None, sum_gradients_hook)
    loss_scale = LossScale(autocast_dtype(cfg, device) == torch.float16)
    return Run(cfg, out, rank, world, device, samples, model, net, objective, opt, sched,
               sampler, total, loss_scale)


def _loop(run: Run, start: int, show_progress: bool) -> tuple[int, int]:
    """Steps ``start`` to the end (or ``stop_after``); returns (steps done, last checkpoint)."""
    cfg, out, val = run.cfg, run.out, run.samples.validation
    # A fresh run starts its log anew (a run killed before its first checkpoint left one).
    log = open(out / "metrics.jsonl", "a" if start else "w") if run.rank == 0 else None
    # TensorBoard's copy of the log; a resumed run drops the events after its checkpoint.
    board = tensorboard_writer_class()(str(out / "tensorboard"),
                                       purge_step=start + 1 if start else None) \
        if log and cfg.tensorboard else None
    bar = tqdm(total=run.total, initial=start, desc="train", mininterval=2.0) \
        if show_progress else None
    t0, step, last_ckpt = time.time(), start, start
    # The initial weights' validation recall, in every fresh run's log: the baseline its end is
    # read against (notebook 04's health claims).
    if log and val is not None and start == 0:
        log.write(strict_json({"step": 0, **_validate(run)}) + "\n")
    batches = iter(micro_batch_loader(
        MicroBatches(run.sampler, run.samples, run.images, cfg, run.total, run.rank, run.world),
        start * cfg.grad_accum, cfg.loader_workers, pin_memory=run.device.type == "cuda"))
    speed = Throughput(cfg.batch_size * images_per_sample(cfg.loss), run.device)
    run.model.train()
    try:
        for step in range(start, run.total):
            if cfg.stop_after is not None and step >= cfg.stop_after:
                break
            done = step + 1
            began = time.perf_counter()
            loss, waited = _forward_backward(run, step, batches)
            if not math.isfinite(loss):
                raise ValueError(diverged_message(done, loss, cfg, last_ckpt, out))
            log_now = log is not None and (done % cfg.log_every == 0 or done == run.total)
            health = run.objective.health() if log_now else {}
            scale = run.loss_scale.value
            finite = run.loss_scale.unscale(run.model, run.objective.centres(), run.world,
                                            run.device)
            if finite:  # else fp16 overflowed: this step is skipped on every rank
                if cfg.clip_grad:
                    clip_global_norm(run.model, run.objective.clipped(), cfg.clip_grad,
                                     run.world)
                run.opt.step()
                run.objective.step_extra(run.sched.get_last_lr()[0])  # this step's rate
            run.loss_scale.update(finite)
            with warnings.catch_warnings():  # a skipped step's schedule moves on, as with
                warnings.filterwarnings(      # GradScaler; torch would call that a misuse
                    "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                run.sched.step()
            speed.add(time.perf_counter() - began, waited)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            record = {"step": done, "epoch": done / run.sampler.steps_per_epoch, "loss": loss,
                      "lr": run.sched.get_last_lr()[0], **health, **speed.report()} \
                if log_now else {}
            if record and run.loss_scale.enabled:
                record.update(loss_scale=scale, skipped=not finite)
            if val is not None and run.rank == 0 and (
                    done == run.total or cfg.val_every and done % cfg.val_every == 0):
                record.update(step=done, **_validate(run))
                run.model.train()
            if log and record:
                record["seconds"] = round(time.time() - t0, 2)
                log.write(strict_json(record) + "\n")
                log.flush()
                if board is not None:
                    log_scalars(board, record)
            if done % cfg.checkpoint_every == 0 or done == run.total:
                save_checkpoint(out / "checkpoints" / "last.pt", run.model, run.objective,
                                run.opt, run.sched, done, run.rank, run.world, run.device,
                                run.loss_scale)
                last_ckpt = done
        else:
            step = run.total
    finally:
        del batches  # its worker processes end with it
        if bar is not None:
            bar.close()
        if log:
            log.close()
        if board is not None:
            board.close()
    return step, last_ckpt


def tensorboard_writer_class():
    """torch's TensorBoard ``SummaryWriter``; without the ``tensorboard`` package, an error
    that says how to get it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard=true needs the tensorboard package: pip install "
                         "tensorboard (or mixer-lite[tensorboard])") from None
    return SummaryWriter


def log_scalars(board, record: dict) -> None:
    """A ``metrics.jsonl`` record's numbers as TensorBoard scalars at its step, under the
    record's own names (``val_...``, health figures, throughput)."""
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            board.add_scalar(key, value, record["step"])
    board.flush()


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype of the forward under autocast, None for fp32: mixed precision on CUDA only
    (on a CPU the fp32 kernels are the fast ones)."""
    return AMP_DTYPES[cfg.amp_dtype] if cfg.amp and device.type == "cuda" else None


class Throughput:
    """What the steps since the last log cost: images encoded per second, the share of the
    step time spent waiting for the next batch, and the peak memory so far (CUDA's allocated
    memory on a GPU, the process's resident set on a CPU).  Step time runs from asking for
    the step's first batch to the optimiser's update; validation and checkpoints are outside."""

    def __init__(self, images_per_step: int, device: torch.device):
        self.images_per_step, self.device = images_per_step, device
        self.steps, self.seconds, self.waited = 0, 0.0, 0.0

    def add(self, seconds: float, waited: float) -> None:
        self.steps, self.seconds, self.waited = (self.steps + 1, self.seconds + seconds,
                                                 self.waited + waited)

    def report(self) -> dict:
        """The figures of the steps added since the last report, which starts a new window."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        out = {"images_per_s": round(self.steps * self.images_per_step / self.seconds, 1),
               "data_wait_share": round(self.waited / self.seconds, 4),
               "peak_mem_mib": round(peak / 2**20, 1)}
        self.steps, self.seconds, self.waited = 0, 0.0, 0.0
        return out


def _forward_backward(run: Run, step: int, batches) -> tuple[float, float]:
    """This rank's share of the step's batch, in ``grad_accum`` micro-batches read from
    ``batches`` (a :class:`MicroBatches` loader's iterator), forward and backward; returns the
    step's mean loss and the seconds spent waiting for the batches."""
    cfg = run.cfg
    run.opt.zero_grad(set_to_none=True)
    run.objective.begin_step(step, run.total)
    loss_sum, waited = 0.0, 0.0
    for m in range(cfg.grad_accum):
        asked = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - asked
        # DDP reduces gradients once, on the last micro-batch of the step.
        sync = run.net.no_sync() if run.world > 1 and m < cfg.grad_accum - 1 \
            else contextlib.nullcontext()
        with sync:
            loss = _micro_batch_loss(run, *batch, step * cfg.grad_accum + m)
            (loss * run.loss_scale.value / cfg.grad_accum).backward()
        loss_sum += float(loss.detach()) / cfg.grad_accum
    return loss_sum, waited


def _micro_batch_loss(run: Run, idx: np.ndarray, doc_rows: np.ndarray, q_img: torch.Tensor,
                      d_img: torch.Tensor, micro_step: int) -> torch.Tensor:
    """The objective's loss on the samples ``idx`` of one micro-batch (:class:`MicroBatches`:
    their augmented images): the docs' titles, one forward of both paths (autocast on CUDA)."""
    cfg = run.cfg
    tokens = run.model.tokenize(run.images.titles(doc_rows)) if len(doc_rows) else None
    dtype = autocast_dtype(cfg, run.device)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    with torch.autocast(run.device.type, dtype=dtype, enabled=dtype is not None):
        q_emb, d_emb = run.net(q_img.to(run.device, non_blocking=True, memory_format=layout),
                               d_img.to(run.device, non_blocking=True, memory_format=layout),
                               tokens)
    return run.objective(q_emb, d_emb, run.samples, idx, micro_step)


def _validate(run: Run) -> dict:
    """Rank 0's validation pass; it keeps the docs' embeddings in ``run.doc_emb`` (after the
    last step, the ones the end-of-run evaluation needs)."""
    recall, run.doc_emb = validate(run.model, run.samples.validation, run.images.validation,
                                   run.images.docs, run.images.doc_texts, run.device)
    return recall


def validate(model, val: Validation, query_images, doc_images, doc_texts,
             device) -> tuple[dict, np.ndarray]:
    """Recall@1/10 of the held-out classes' photos against every doc (exact search), and the
    docs' embeddings it searched."""
    doc_emb = embed_docs(model, doc_images, doc_texts, device=device)
    return validation_recall(doc_emb, embed_queries(model, query_images, device=device),
                             val.relevant), doc_emb


def _finish(run: Run) -> dict:
    """Rank 0's end of a finished run: ``val.json``, then ``model.pt``."""
    result = {}
    if run.samples.validation is not None:
        result["validation"] = {k: v for k, v in read_log(run.out / "metrics.jsonl")[-1].items()
                                if k.startswith("val_")}
        write_json(run.out / "val.json", result["validation"])
    save_torch({"export": run.model.export_config(), "state_dict": run.model.state_dict()},
               run.out / "model.pt")
    return result
