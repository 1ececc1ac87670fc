"""Training: classification over weak-label classes (Mixer), or pairwise baselines, one loop.

``mixer-lite train --data DIR --out RUN --config tiny-cpu [--key=value ...]``

* **Samples.**  With ``labels=classes`` (Mixer) every query photo and every doc of a class built
  by :mod:`mixer_lite.classes` is one sample of that class; with ``labels=raw_clicks`` (the
  ablation) every clicked doc is a class and each click makes its query a sample of it.  The
  pairwise baselines (``infonce``, ``triplet``) train on the (query, doc) click pairs.
* **Sampler.**  Each epoch takes at most ``max_per_class`` samples of every class (skew control
  on top of the class caps), shuffled; the order is a function of (seed, epoch) alone, so a
  resumed run sees the same batches.
* **Optimiser.**  AdamW, linear warm-up then cosine decay, gradient clipping, gradient
  accumulation; bf16 autocast on CUDA.
* **Parallelism.**  Under ``torchrun`` the encoders are data-parallel (DDP) and the classifier
  model-parallel (each rank holds a shard of the centres; see :mod:`mixer_lite.losses`).  The
  classifier loss is already the global-batch mean, so encoder gradients are summed, not
  averaged, across ranks.
* **Checkpoints.**  ``RUN/checkpoints/last.pt`` is written atomically every
  ``checkpoint_every`` steps with model, classifier, optimiser, schedule and RNG state;
  ``--resume`` continues from it and ends with the same weights as an uninterrupted run.

Our choices where the paper is silent: the presets below, CosFace s=30 m=0.35, a light
augmentation (flip, shift) for both domains that ``tiny-cpu`` turns off, and the "learning
strategy" experiments kept only where measurements showed a gain: class centres imprinted from
their docs (``centre_init="docs"``) was kept; re-imprinting them every epoch, an auxiliary
category head and heavier augmentation were not (README, "Training").
"""
from __future__ import annotations

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
from tqdm.auto import tqdm

from .classes import ClassConfig, build_classes_from_clicks, raw_click_classes
from .dataset import ImageTable, ShopData, image_paths, load_dataset
from .losses import MarginClassifier, info_nce, triplet_loss
from .model import MixerModel, ModelConfig, WordTokenizer
from .files import atomic_path, write_json
from .retrieval import embed_docs, evaluate_model

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
    centre_weight_decay: float = 5e-4
    temperature: float = 0.05         # InfoNCE
    sample_rate: float = 1.0          # class-centre sampling (Partial FC); 1 = full softmax
    batch_size: int = 128             # global batch (split over ranks and accumulation steps)
    grad_accum: int = 1
    epochs: float = 4.0
    steps: int = 0                    # > 0: train exactly this many steps, whatever the epochs
    max_per_class: int = 16           # samples of one class per epoch
    lr: float = 5e-4                  # 2e-3 collapsed the from-scratch ViT (README, "Training")
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    clip_grad: float = 5.0
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
        if self.steps < 0:
            problems.append(f"steps must be >= 0 (0: epochs decide), got {self.steps}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    @property
    def margin_value(self) -> float:
        return DEFAULT_MARGIN[self.loss] if self.margin is None else self.margin


PRESETS = {
    # Minutes on 2 CPU cores at 64x64: a small BatchNorm CNN and text transformer from scratch,
    # centres imprinted from the docs, no augmentation, 3.5 epochs.  Each choice was measured
    # on SynthShop small against the ViT preset it replaced (Recall@10 0.008 -> 0.029; README,
    # "Training"); 3.5 epochs keep `make demo` under 10 minutes on 2 cores.
    "tiny-cpu": TrainConfig(model=ModelConfig(image_encoder="cnn"), centre_init="docs",
                            epochs=3.5, augment=False),
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


def config_from(name: str, overrides: list[str]) -> TrainConfig:
    from .config import apply_overrides

    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {', '.join(PRESETS)}")
    return apply_overrides(PRESETS[name], overrides)


# --------------------------------------------------------------------------------------------
# Samples and the sampler
# --------------------------------------------------------------------------------------------
@dataclass
class Samples:
    """Training samples: kind 0 = query photo, 1 = doc; ``row`` into data.queries / data.docs."""

    kind: np.ndarray
    row: np.ndarray
    label: np.ndarray     # class index, or pair index for the pairwise losses
    num_classes: int
    pair_doc: np.ndarray | None = None  # pairwise losses: the doc row of each query's pair

    def doc_rows(self) -> np.ndarray:
        """The doc rows training uses, sorted, each once."""
        return np.unique(self.row[self.kind == 1] if self.pair_doc is None else self.pair_doc)


def make_samples(data: ShopData, cfg: TrainConfig) -> tuple[Samples, dict]:
    cq, cd, cn = data.clicks_columns()
    if len(cq) == 0:
        raise ValueError(f"{data.root}/clicks.jsonl has no clicks: nothing to train on")
    if cfg.loss in PAIRWISE_LOSSES:
        q = np.array([data.query_row[x] for x in cq])
        d = np.array([data.doc_row[x] for x in cd])
        return Samples(np.zeros(len(q), np.int8), q, np.arange(len(q)), len(q), d), \
            {"pairs": int(len(q))}
    if cfg.labels == "classes":
        classes, stats = build_classes_from_clicks(cq, cd, cn, cfg.classes)
    else:
        classes = raw_click_classes(cq, cd, cn)
        stats = {"classes": len(classes)}
    kind, row, label = [], [], []
    for k, cl in enumerate(classes):
        for x in cl["query_ids"]:
            kind.append(0), row.append(data.query_row[x]), label.append(k)
        for x in cl["doc_ids"]:
            kind.append(1), row.append(data.doc_row[x]), label.append(k)
    if not classes:
        raise ValueError("no class survived class construction; loosen the ClassConfig")
    return Samples(np.array(kind, np.int8), np.array(row), np.array(label), len(classes)), stats


class EpochSampler:
    """Per epoch: at most ``cap`` samples of each label, shuffled; a function of (seed, epoch)."""

    def __init__(self, labels: np.ndarray, cap: int, batch_size: int, seed: int):
        self.labels, self.cap, self.batch_size, self.seed = labels, cap, batch_size, seed
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
        order = rng.permutation(np.concatenate(picked))
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
        device = torch.device(cfg.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not torch.distributed.is_initialized():
        # By the device, not by what the machine has: --device=cpu on a GPU machine needs gloo.
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, device


def _sum_gradients_hook(state, bucket):
    """DDP comm hook: sum (not average) gradients across ranks."""
    fut = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _lr_lambda(total: int, warmup_frac: float):
    warm = max(1, int(total * warmup_frac))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return f


def _atomic_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def build_model(data: ShopData, samples: Samples, cfg: TrainConfig) -> MixerModel:
    torch.manual_seed(cfg.seed)
    tok = None
    if cfg.model.text_encoder == "scratch" and cfg.model.fusion != "image_only":
        tok = WordTokenizer.fit([data.doc_texts[int(r)] for r in samples.doc_rows()],
                                max_size=cfg.model.vocab_size)
    return MixerModel(cfg.model, tok)


def train(data_dir: str | Path, out: str | Path, cfg: TrainConfig, resume: bool = False,
          progress: bool | None = None, preset: str = "custom") -> dict:
    """Train on the dataset folder ``data_dir``; everything the run makes goes under ``out``."""
    out = Path(out)
    ckpt_path = out / "checkpoints" / "last.pt"
    if not resume and ckpt_path.exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume or choose a new --out")
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"{ckpt_path}: nothing to resume")
    rank, world, device = _distributed(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_dataset(data_dir, check_images=False)
    samples, label_stats = make_samples(data, cfg)
    model = build_model(data, samples, cfg).to(device)
    pairwise = samples.pair_doc is not None
    classifier = None if pairwise else MarginClassifier(
        samples.num_classes, cfg.model.embed_dim, cfg.loss, cfg.margin_value, cfg.scale,
        cfg.sample_rate, model_parallel=world > 1, seed=cfg.seed).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = EpochSampler(samples.label, cfg.max_per_class, cfg.batch_size, cfg.seed)
    total = total_steps(cfg, sampler.steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, cfg.warmup_frac))
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=True)
        if classifier is not None:  # the sharded loss is the global mean already
            net.register_comm_hook(None, _sum_gradients_hook)

    start = 0
    if resume:
        # Loaded to the CPU: set_rng_state takes CPU tensors only; load_state_dict moves the rest.
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        if classifier is not None:
            classifier.load_state_dict(ck["classifier"][rank] if world > 1 else ck["classifier"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["torch_rng"])
        if device.type == "cuda" and ck.get("cuda_rng") is not None:  # dropout draws on the GPU
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        start = ck["step"]
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"preset": preset, "data": str(Path(data_dir).resolve()),
                                         "train": dataclasses.asdict(cfg),
                                         "labels": label_stats, "steps": total,
                                         "steps_per_epoch": sampler.steps_per_epoch})
    show_progress = rank == 0 and progress is not False
    q_rows = np.unique(samples.row[samples.kind == 0])
    d_rows = samples.doc_rows()
    images_q = ImageTable(image_paths(data, "queries", q_rows), cfg.model.image_size,
                          cfg.preload_images, cfg.loader_threads,
                          progress=show_progress, desc="query photos")
    images_d = ImageTable(image_paths(data, "docs", d_rows), cfg.model.image_size, cfg.preload_images,
                          cfg.loader_threads, progress=show_progress, desc="doc images")
    q_pos = {int(r): i for i, r in enumerate(q_rows)}
    d_pos = {int(r): i for i, r in enumerate(d_rows)}
    texts = data.doc_texts
    if classifier is not None and cfg.centre_init == "docs" and not resume:
        # Embedded as a training step would (BatchNorm on batch statistics): at initialisation
        # the running statistics are still 0 / 1 and would leave the shared component in.
        emb = embed_docs(model, images_d, [texts[int(r)] for r in d_rows], device=device,
                         batch_stats=True)
        doc = samples.kind == 1
        classifier.imprint(torch.from_numpy(emb[[d_pos[int(r)] for r in samples.row[doc]]]),
                           torch.from_numpy(samples.label[doc]))

    amp = cfg.amp and device.type == "cuda"
    local_bs = cfg.batch_size // world
    micro = local_bs // cfg.grad_accum
    metrics_f = open(out / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=total, initial=start, desc="train", mininterval=2.0) \
        if show_progress else None
    t0, step = time.time(), start
    last_ckpt = start
    model.train()
    try:
        for step in range(start, total):
            if cfg.stop_after is not None and step >= cfg.stop_after:
                break
            batch = sampler.batch(step)[rank * local_bs: (rank + 1) * local_bs]
            opt.zero_grad(set_to_none=True)
            if classifier is not None:
                classifier.clear_used()
                classifier.margin = _margin_at(step, total, cfg)
            loss_sum = 0.0
            for m in range(cfg.grad_accum):
                idx = batch[m * micro: (m + 1) * micro]
                loss = _step_loss(net, model, classifier, samples, idx, images_q, images_d,
                                  q_pos, d_pos, texts, cfg, step * cfg.grad_accum + m, device,
                                  amp)
                (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach()) / cfg.grad_accum
            if cfg.clip_grad:
                _clip_global_norm(model, classifier, cfg.clip_grad, world)
            lr = sched.get_last_lr()[0]
            opt.step()
            if classifier is not None:  # its own row-wise optimiser, same schedule
                classifier.step(cfg.centre_lr * lr / cfg.lr, cfg.centre_optimizer,
                                weight_decay=cfg.centre_weight_decay)
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.3f}")
            if metrics_f and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
                metrics_f.write(json.dumps({"step": step + 1, "epoch": (step + 1) /
                                            sampler.steps_per_epoch, "loss": loss_sum,
                                            "lr": sched.get_last_lr()[0],
                                            "seconds": round(time.time() - t0, 2)}) + "\n")
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
    if finished and rank == 0:
        _atomic_save({"export": model.export_config(), "state_dict": model.state_dict()},
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
        return fn(q_emb.float(), d_emb.float(), arg)
    emb = torch.empty(len(idx), cfg.model.embed_dim, device=device)
    kind_t = torch.from_numpy(kind).to(device)
    if q_emb is not None:
        emb[kind_t == 0] = q_emb.float()
    if d_emb is not None:
        emb[kind_t == 1] = d_emb.float()
    labels = torch.from_numpy(samples.label[idx]).to(device)
    return classifier(emb, labels, step)


def _margin_at(step: int, total: int, cfg: TrainConfig) -> float:
    """The margin of this step: a linear ramp from 0 over ``margin_warmup_frac`` of the run."""
    warm = cfg.margin_warmup_frac * total
    return cfg.margin_value * (min(1.0, step / warm) if warm > 0 else 1.0)


def _clip_global_norm(model, classifier, max_norm: float, world: int) -> None:
    """Clip by the norm of *all* gradients: encoder ones are replicated after DDP's reduce,
    classifier ones are sharded, so their squared norms are summed over ranks."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sq = sum((g.float() ** 2).sum() for g in grads) if grads else torch.zeros(())
    if classifier is not None:
        shard = (classifier.used_rows()[1].float() ** 2).sum()
        if world > 1:
            torch.distributed.all_reduce(shard)
        sq = sq + shard.to(sq.device)
    factor = (max_norm / (torch.sqrt(sq) + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.to(g.device, g.dtype))
    if classifier is not None:
        classifier.scale_grad(factor)


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
        _atomic_save({"model": model.state_dict(), "classifier": clf_state,
                      "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "torch_rng": torch.get_rng_state(), "step": step,
                      "cuda_rng": (torch.cuda.get_rng_state(device) if device.type == "cuda"
                                   else None)}, path)
