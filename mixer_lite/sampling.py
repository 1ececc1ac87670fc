"""What a training step sees: samples of the weak-label classes (or click pairs), the classes
held out for validation, the order of batches, augmentation, and the images behind them.

* **Samples.**  With ``labels=classes`` (Mixer) every query photo and every doc of a class built
  by :mod:`mixer_lite.classes` is one sample of that class; with ``labels=raw_clicks`` (the
  ablation) every clicked doc is a class and each click makes its query a sample of it.  The
  pairwise baselines (``infonce``, ``triplet``) train on the (query, doc) click pairs.
* **Validation.**  ``val_share`` of the weak-label classes are held out of training (their
  photos and docs); their photos search every doc at the initial weights, at the end and
  every ``val_every`` steps, so recipe choices never read the test queries
  (:class:`Validation`).
* **Sampler.**  Each epoch takes at most ``max_per_class`` samples of every class (skew control
  on top of the class caps), shuffled one by one or in runs of ``samples_per_class``; the order
  is a function of (seed, epoch) alone, so a resumed run sees the same batches.
* **Augmentation** (our choice; the paper names none): a random flip and a shift of up to 4
  pixels, for both domains, seeded by the step (``docs/EXPERIMENTS.md``, the recipe table).
  Two doc-side options for scene docs, off in every preset: ``doc_zoom_out`` (docs shrunk onto
  their background) and ``doc_mosaic`` (docs composed with other classes' docs, the title
  naming theirs); ``docs/EXPERIMENTS.md``, "Scene docs".
* **Micro-batches.**  What a step encodes (:class:`MicroBatches`), read through a torch
  ``DataLoader``: with ``loader_workers`` > 0 worker processes decode and augment the next
  batches while the model trains on this one, and the batches are the same whatever the count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .classes import build_classes_from_clicks, class_stats, raw_click_classes, stable_rank
from .dataset import ImageTable, ShopData, image_files
from .objectives import PAIRWISE_LOSSES

if TYPE_CHECKING:  # the config's type only: train imports this module
    from .train import TrainConfig


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

    def images_of(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (query rows, doc rows) a batch of samples encodes: a pair's photo and doc, or
        each class sample's own image (query photos first, then docs, each in batch order)."""
        if self.pair_doc is not None:
            return self.row[idx], self.pair_doc[idx]
        kind = self.kind[idx]
        return self.row[idx][kind == 0], self.row[idx][kind == 1]

    def doc_labels_of(self, idx: np.ndarray) -> np.ndarray:
        """The label of each doc image :meth:`images_of` gives for ``idx``, in its order."""
        if self.pair_doc is not None:
            return self.label[idx]
        return self.label[idx][self.kind[idx] == 1]


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
    # Every image's own crop in one gather: rows dy..dy+h and columns dx..dx+w of each.
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]
    return out.permute(0, 3, 1, 2).contiguous().to(x.dtype)


def border_colour(x: torch.Tensor) -> torch.Tensor:
    """Each image's background, (N, C): the (lower) median of its border pixels per channel."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    return border.median(dim=2).values


def zoom_out(x: torch.Tensor, step: int, seed: int, min_scale: float) -> torch.Tensor:
    """Half the images, at random, shrunk to a side of ``min_scale``-1 of theirs and placed
    anywhere on their own background (the median colour of their border), seeded by (seed,
    step): products at the scale a shot of several shows them (``docs/EXPERIMENTS.md``, "Scene
    docs", the region ceilings)."""
    n, _, h, w = x.shape
    if n == 0 or min_scale >= 1:
        return x
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 500_009)
    shrink = torch.rand(n, generator=g) < 0.5
    sides = (h * (min_scale + (1 - min_scale) * torch.rand(n, generator=g))).round().long()
    corners = torch.rand(n, 2, generator=g)
    xf = x.float()
    ground = border_colour(xf)
    out = xf.clone()
    for i in torch.nonzero(shrink).flatten().tolist():
        s = max(1, min(h, w, int(sides[i])))
        y, x0 = int(corners[i, 0] * (h - s + 1)), int(corners[i, 1] * (w - s + 1))
        out[i] = ground[i][:, None, None]
        out[i, :, y:y + s, x0:x0 + s] = F.interpolate(xf[i:i + 1], size=(s, s), mode="area")[0]
    return out.round().to(x.dtype)


def doc_mosaic(x: torch.Tensor, labels: np.ndarray, step: int, seed: int,
               share: float) -> torch.Tensor:
    """A ``share`` of the doc images, at random, each made a shot of several products: shrunk
    into one cell of a 2 x 2 layout (a side of 38-50% of the image, anywhere in its cell), with
    1-3 doc images of the batch's other classes in other cells, on the doc's own background
    (the median colour of its border); seeded by (seed, step).

    The doc keeps its title and class, so the title is what tells which object the doc sells:
    the situation of a shop image showing more than its product, made from any data (our choice;
    the paper is silent; ``docs/EXPERIMENTS.md``, "Docs composed with other products").
    """
    n, _, h, w = x.shape
    if n < 2 or share <= 0:
        return x
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 700_001)
    composed = torch.rand(n, generator=g) < share
    xf = x.float()
    ground = border_colour(xf)
    out = xf.clone()
    for i in torch.nonzero(composed).flatten().tolist():
        others = [j for j in torch.randperm(n, generator=g).tolist() if labels[j] != labels[i]]
        others = others[:int(torch.randint(1, 4, (1,), generator=g))]
        if not others:
            continue
        cells = torch.randperm(4, generator=g).tolist()
        out[i] = ground[i][:, None, None]
        for j, cell in zip([i, *others], cells):
            s = max(1, int(round(min(h, w) * (0.38 + 0.12 * float(torch.rand(1, generator=g))))))
            top, left = (cell // 2) * (h // 2), (cell % 2) * (w // 2)
            dy, dx = (torch.rand(2, generator=g) * torch.tensor(
                [max(0, h // 2 - s) + 1, max(0, w // 2 - s) + 1])).long().tolist()
            out[i, :, top + dy:top + dy + s, left + dx:left + dx + s] = F.interpolate(
                xf[j:j + 1], size=(s, s), mode="area")[0]
    return out.round().to(x.dtype)


@dataclass
class TrainingImages:
    """The images a run reads, decoded once (or per batch with ``preload_images=False``):
    training query photos, docs (every doc when validation searches them all) and the
    validation photos, with each row's position in its table."""

    queries: ImageTable
    docs: ImageTable
    validation: ImageTable | None
    query_pos: dict[int, int]
    doc_pos: dict[int, int]
    doc_texts: list[str]       # the title of each row of ``docs``

    def titles(self, doc_rows) -> list[str]:
        """The titles of these dataset doc rows."""
        return [self.doc_texts[self.doc_pos[int(r)]] for r in doc_rows]

    def batch(self, query_rows, doc_rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixels of these dataset rows: (query photos, doc images)."""
        return (self.queries[[self.query_pos[int(r)] for r in query_rows]],
                self.docs[[self.doc_pos[int(r)] for r in doc_rows]])


def training_images(data: ShopData, samples: Samples, cfg: TrainConfig,
                    progress: bool) -> TrainingImages:
    size, pre, threads = cfg.model.image_size, cfg.preload_images, cfg.loader_threads
    val = samples.validation
    q_rows = np.unique(samples.row[samples.kind == 0])
    # Validation searches every doc, so the doc table then holds them all.
    d_rows = np.arange(len(data.docs)) if val is not None else samples.doc_rows()
    table = lambda split, rows, desc: ImageTable(  # noqa: E731
        image_files(data, split, rows), size, pre, threads, progress=progress, desc=desc)
    return TrainingImages(
        table("queries", q_rows, "query photos"), table("docs", d_rows, "doc images"),
        None if val is None else table("queries", val.query_rows, "validation photos"),
        {int(r): i for i, r in enumerate(q_rows)}, {int(r): i for i, r in enumerate(d_rows)},
        [data.doc_texts[int(r)] for r in d_rows])


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``i`` of a run (step ``i // grad_accum``, part ``i % grad_accum``) as this
    rank encodes it: the sample indices, their doc rows, and the augmented pixels of their query
    photos and doc images.

    A function of ``i`` alone (the sampler's order and the augmentation are seeded by the step),
    so a ``DataLoader`` with any number of workers returns the same batches in the same order,
    and a resumed run starts at its step's first micro-batch."""

    def __init__(self, sampler: EpochSampler, samples: Samples, images: TrainingImages,
                 cfg: TrainConfig, total_steps: int, rank: int = 0, world: int = 1):
        self.sampler, self.samples, self.images, self.cfg = sampler, samples, images, cfg
        self.total, self.rank, self.world = total_steps * cfg.grad_accum, rank, world

    def __len__(self) -> int:
        return self.total

    def indices(self, i: int) -> np.ndarray:
        """The samples of micro-batch ``i``: this rank's slice of its step's global batch."""
        step, part = divmod(i, self.cfg.grad_accum)
        local = self.cfg.batch_size // self.world
        micro = local // self.cfg.grad_accum
        batch = self.sampler.batch(step)[self.rank * local: (self.rank + 1) * local]
        return batch[part * micro: (part + 1) * micro]

    def __getitem__(self, i: int):
        cfg, idx = self.cfg, self.indices(i)
        query_rows, doc_rows = self.samples.images_of(idx)
        q_img, d_img = self.images.batch(query_rows, doc_rows)
        if cfg.augment:
            q_img = augment(q_img, 2 * i, cfg.seed)
            d_img = augment(d_img, 2 * i + 1, cfg.seed)
        d_img = zoom_out(d_img, i, cfg.seed, cfg.doc_zoom_out)
        if cfg.doc_mosaic > 0:
            d_img = doc_mosaic(d_img, self.samples.doc_labels_of(idx), i, cfg.seed,
                               cfg.doc_mosaic)
        return idx, doc_rows, q_img, d_img


def _unchanged(item):
    """The DataLoader's collate function: a micro-batch is already a batch (the default
    would turn its numpy indices into tensors)."""
    return item


def micro_batch_loader(batches: MicroBatches, start: int, workers: int,
                       pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Micro-batches ``start`` to the end, in order; ``workers`` > 0 processes prepare up to 4
    each ahead of the step that needs them (0: each is made in this process when asked for).

    The loader draws its workers' seeds from a generator of its own: one from torch's global
    generator would shift every later draw (dropout, sampled centres) of a resumed run."""
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, len(batches)), num_workers=workers,
        collate_fn=_unchanged, pin_memory=pin_memory, prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(batches.cfg.seed))
