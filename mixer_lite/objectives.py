"""What a training step minimises, behind one interface: the embeddings of a batch in, a loss
out, and the health figures of the last batch for the log.

* :class:`Classification` (Mixer): query photos and docs are samples of the same classes, and
  each meets the class centres of a :class:`losses.MarginClassifier` (CosFace or ArcFace,
  optionally sampled, sharded over ranks under torchrun).  The centres carry their own
  row-wise optimiser, stepped by :meth:`Objective.step_extra`.
* :class:`Pairwise` (the baselines): a click's photo and doc are a matched pair, other pairs in
  the batch are negatives (:func:`losses.info_nce`, :func:`losses.triplet_loss`).

The loop calls the same methods in the same order for both, so it holds no branch on the loss.
:func:`images_per_sample` is what a sample costs in encoded images (the budget the ablations
match between the two).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import MarginClassifier, info_nce, mean_pairwise_cosine, triplet_loss
from .optim import margin_at
from .retrieval import embed_docs

if TYPE_CHECKING:  # types only: sampling and train import this module
    from .sampling import Samples, TrainingImages
    from .train import TrainConfig

PAIRWISE_LOSSES = ("infonce", "triplet")  # trained on (query, doc) click pairs, not classes
LOSSES = ("cosface", "arcface", *PAIRWISE_LOSSES)
DEFAULT_MARGIN = {"cosface": 0.35, "arcface": 0.5, "triplet": 0.2, "infonce": 0.0}


def images_per_sample(loss: str) -> int:
    """Images a training sample of ``loss`` encodes: a class sample is one image, a click pair
    two (its photo and its doc)."""
    return 2 if loss in PAIRWISE_LOSSES else 1


class Objective(nn.Module):
    """One training objective.  Per step the loop calls :meth:`begin_step`, then ``forward`` on
    each micro-batch, then (on logging steps) :meth:`health`, then :meth:`step_extra` after
    the optimiser's step."""

    #: True when the loss is the global-batch mean already (a sharded classifier), so DDP must
    #: sum encoder gradients over ranks instead of averaging them.
    global_loss = False

    def initialise(self, model, images: TrainingImages, samples: Samples, device) -> None:
        """Start from what the model already embeds, on a fresh run (nothing by default)."""

    def begin_step(self, step: int, total: int) -> None:
        """Per-step state before the first micro-batch (nothing by default)."""

    def forward(self, query_emb, doc_emb, samples: Samples, idx: np.ndarray,
                step: int) -> torch.Tensor:
        raise NotImplementedError

    def health(self) -> dict:
        """Figures of the last micro-batch that show a failing recipe early (see subclasses),
        and for both: the mean cosine between the batch's embeddings (near 1 = collapse)."""
        raise NotImplementedError

    def step_extra(self, lr: float) -> None:
        """Update parameters the encoder's optimiser does not hold (nothing by default);
        ``lr`` is the encoder's learning rate this step."""

    def centres(self) -> MarginClassifier | None:
        """The class centres, whose gradients live outside the model (None: there are none)."""
        return None

    def clipped(self) -> MarginClassifier | None:
        """The module whose gradients count in the global-norm clip besides the model's."""
        return None

    def state(self):
        """What a checkpoint keeps of the objective (None: nothing)."""
        return None

    def load(self, shards: list) -> None:
        """Restore :meth:`state` from every rank's, in rank order (one entry for one process),
        whatever the number of ranks that saved them."""


class Classification(Objective):
    """Margin softmax over class centres; ``embeddings[i]`` is sample ``idx[i]``, a query photo
    or a doc (the model returns photos and docs apart; they are put back in batch order)."""

    global_loss = True

    def __init__(self, cfg: TrainConfig, num_classes: int, model_parallel: bool):
        super().__init__()
        self.cfg = cfg
        self.classifier = MarginClassifier(num_classes, cfg.model.embed_dim, cfg.loss,
                                           cfg.margin_value, cfg.scale, cfg.sample_rate,
                                           model_parallel=model_parallel, seed=cfg.seed)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def initialise(self, model, images, samples, device) -> None:
        """With ``centre_init="docs"``, each class centre starts at the mean embedding of its
        docs, embedded as a training step would (BatchNorm on batch statistics: at
        initialisation the running statistics are still 0 / 1 and would leave the shared
        component in)."""
        if self.cfg.centre_init != "docs":
            return
        emb = embed_docs(model, images.docs, images.doc_texts, device=device, batch_stats=True)
        doc = samples.kind == 1
        self.classifier.imprint(
            torch.from_numpy(emb[[images.doc_pos[int(r)] for r in samples.row[doc]]]),
            torch.from_numpy(samples.label[doc]))

    def begin_step(self, step: int, total: int) -> None:
        self.classifier.clear_used()
        self.classifier.margin = margin_at(step, total, self.cfg.margin_value,
                                           self.cfg.margin_warmup_frac)

    def forward(self, query_emb, doc_emb, samples, idx, step):
        device = self.classifier.weight.device
        emb = torch.empty(len(idx), self.cfg.model.embed_dim, device=device)
        kind = torch.from_numpy(samples.kind[idx]).to(device)
        labels = torch.from_numpy(samples.label[idx]).to(device)
        doc_emb, beside = split_beside(doc_emb)
        if query_emb is not None:
            emb[kind == 0] = query_emb.float()
        if doc_emb is not None:
            emb[kind == 1] = doc_emb.float()
        anchored = None
        if beside is not None:  # each title (and chosen window) a sample of its doc's class too
            n, (b, m, d) = len(emb), beside.shape
            if not self.cfg.titles_move_centres:  # the titles, not the windows: images move them
                anchored = torch.arange(n + b * m, device=device)
                anchored = (anchored >= n) & (anchored < n + b)
            emb = torch.cat([emb, beside.float().transpose(0, 1).reshape(b * m, d)])
            labels = torch.cat([labels, labels[kind == 1].repeat(m)])
        self.last = (emb.detach(), labels)
        return self.classifier(emb, labels, step, anchored=anchored)

    def health(self) -> dict:
        """The centres' mean norm, the mean cosine of a sample to its own centre and to other
        centres (:meth:`losses.MarginClassifier.diagnostics`), and the batch's mean cosine."""
        emb, labels = self.last
        return {**self.classifier.diagnostics(emb, labels), "cos_batch": mean_pairwise_cosine(emb)}

    def step_extra(self, lr: float) -> None:
        """The centres' own row-wise optimiser, on the encoder's schedule."""
        self.classifier.step(self.cfg.centre_lr * lr / self.cfg.lr, self.cfg.centre_optimizer,
                             weight_decay=self.cfg.centre_weight_decay)

    def centres(self):
        return self.classifier

    def clipped(self):
        return self.classifier if self.cfg.clip_centres else None

    def state(self):
        return self.classifier.state_dict()

    def load(self, shards: list) -> None:
        self.classifier.load_shards(shards)


class Pairwise(Objective):
    """InfoNCE or triplet on (photo, clicked doc) pairs: row i of both batches is one pair."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.loss, self.arg = ((info_nce, cfg.temperature) if cfg.loss == "infonce"
                               else (triplet_loss, cfg.margin_value))
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, query_emb, doc_emb, samples, idx, step):
        doc_emb, beside = split_beside(doc_emb)
        q, d = query_emb.float(), doc_emb.float()
        self.last = (q.detach(), d.detach())
        loss = self.loss(q, d, self.arg)
        if beside is None:
            return loss
        for j in range(beside.shape[1]):  # each title (and chosen window) paired too
            loss = loss + self.loss(q, beside[:, j].float(), self.arg)
        return loss / (1 + beside.shape[1])

    def health(self) -> dict:
        """The mean cosine of matched and of unmatched pairs, and the batch's mean cosine."""
        q, d = (F.normalize(x, dim=-1) for x in self.last)
        sim = q @ d.t()
        off = ~torch.eye(len(q), dtype=torch.bool, device=q.device)
        return {"cos_own": float(sim.diagonal().mean()),
                "cos_other": float(sim[off].mean()) if off.any() else float("nan"),
                "cos_batch": mean_pairwise_cosine(torch.cat([q, d]))}


def split_beside(doc_emb):
    """(docs, samples beside them or None) of what the model's training forward returns for
    docs: [B, D], or [B, 1 + m, D] when each doc's title embedding comes beside it
    (``region_choice="title"`` or ``title_sample``) and then its chosen window
    (``window_sample``, :meth:`mixer_lite.model.MixerModel.forward`): the docs [B, D] and the
    samples beside them [B, m, D], the title first."""
    if doc_emb is None or doc_emb.dim() == 2:
        return doc_emb, None
    return doc_emb[:, 0], doc_emb[:, 1:]


def make_objective(cfg: TrainConfig, num_classes: int, world: int) -> Objective:
    """The objective ``cfg.loss`` names; a classifier is sharded over ``world`` ranks."""
    if cfg.loss in PAIRWISE_LOSSES:
        return Pairwise(cfg)
    return Classification(cfg, num_classes, model_parallel=world > 1)
