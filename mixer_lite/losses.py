"""Large-scale classification losses, class-centre sampling, a model-parallel classifier, baselines.

The paper trains retrieval as classification over up to 1e8 classes: query photos and multi-modal
docs are samples of the same classes, and each sample meets *class centres* instead of other
samples.  Here:

* :func:`margin_logits`: normalised-softmax logits with a CosFace (``cos - m``) or ArcFace
  (``cos(theta + m)``) margin on the target class, scaled by ``s``.
* :class:`MarginClassifier`: the class centres, with **class-centre sampling** in the style of
  Partial FC (An et al., 2021): each step keeps every class present in the batch and a
  ``sample_rate`` share of the others, so a step's cost and memory scale with the sample, not
  with the number of classes.  Device-agnostic: the sampling runs on the centres' device with
  an explicit generator.  The centres carry their own row-wise optimiser (:meth:`step`: SGD
  with momentum by default, lazy AdamW as an option), which touches only the rows a step
  used: a dense optimiser over all centres would cost as much as the full softmax it replaces.
* **Model parallel**: the same class, constructed under ``torch.distributed``, holds only its
  rank's shard of the centres; embeddings and labels are all-gathered and the softmax
  cross-entropy is computed across shards (max, sum of exponentials and target logit reduced
  over ranks), as in the paper's hybrid parallel training (data-parallel encoders,
  model-parallel classifier).  gloo on CPU, NCCL on GPU.
* Baselines on the same clicks: :func:`info_nce` (symmetric, CLIP-style, in-batch negatives) and
  :func:`triplet_loss` (hardest in-batch negative).

Our choices where the paper is silent: the margin type and values (CosFace m=0.35 / ArcFace
m=0.5, s=30 by default; ``tiny-cpu`` uses s=20, ``docs/EXPERIMENTS.md``), unit-norm centres
(see :func:`_init_rows`), and per-rank sampling of negatives (each rank samples
``sample_rate`` of its own shard, as Partial FC does).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

MARGINS = ("cosface", "arcface")


def margin_logits(cosine: torch.Tensor, target_mask: torch.Tensor, kind: str, margin: float,
                  scale: float) -> torch.Tensor:
    """``scale`` * cosine, with the margin applied where ``target_mask`` is True.

    ArcFace beyond theta = pi - m, where cos(theta + m) would stop falling, uses the usual
    ``cos(theta) - m * sin(m)`` so the target logit stays monotonic in the angle.
    """
    if kind not in MARGINS:
        raise ValueError(f"margin kind must be one of {MARGINS}, got {kind!r}")
    # Only the target entries change: compute them alone, never a second [B, C] margin matrix.
    where = target_mask.nonzero(as_tuple=True)
    t = cosine[where]
    if kind == "cosface":
        t = t - margin
    else:
        cos = t.clamp(-1 + 1e-7, 1 - 1e-7)
        sin = torch.sqrt(1.0 - cos * cos)
        plus = cos * math.cos(margin) - sin * math.sin(margin)
        t = torch.where(cos > math.cos(math.pi - margin), plus, cos - margin * math.sin(margin))
    return (cosine * scale).index_put(where, t * scale)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_rows(start: int, count: int, dim: int, seed: int, block: int = 8192) -> torch.Tensor:
    """Rows [start, start + count) of a random unit-norm matrix, seeded per block of rows.

    Each centre's initial value depends only on its global row, so any sharding over ranks
    starts from the same classifier, and no rank ever builds the whole matrix.  Unit norm
    matters: the gradient through the normalisation scales as 1/||w||, so small centres (the
    common N(0, 0.01) init has ||w|| ~ 0.1) take angular steps ~100x larger than intended and
    jump onto whatever the encoder last produced (measured: training collapsed on SynthShop
    small with 3.6k classes).
    """
    out = torch.empty(count, dim)
    for b in range(start // block, (start + count - 1) // block + 1 if count else 0):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        rows = F.normalize(torch.randn(block, dim, generator=g), dim=1)
        lo, hi = max(start, b * block), min(start + count, (b + 1) * block)
        out[lo - start: hi - start] = rows[lo - b * block: hi - b * block]
    return out


class MarginClassifier(nn.Module):
    """Class centres with a margin softmax, optional centre sampling and model parallelism.

    ``num_classes`` is the global count.  Under an initialised process group with
    ``model_parallel=True`` this rank holds centres ``[start, start + shard)``; ``forward``
    then expects this rank's local batch and gathers the others itself.
    """

    def __init__(self, num_classes: int, dim: int, kind: str = "cosface", margin: float = 0.35,
                 scale: float = 30.0, sample_rate: float = 1.0, model_parallel: bool = False,
                 seed: int = 0):
        super().__init__()
        if kind not in MARGINS:
            raise ValueError(f"margin kind must be one of {MARGINS}, got {kind!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if num_classes < 1:
            raise ValueError("MarginClassifier needs at least one class")
        self.rank, self.world = _world() if model_parallel else (0, 1)
        self.num_classes, self.kind, self.margin, self.scale = num_classes, kind, margin, scale
        self.sample_rate = sample_rate
        base, extra = divmod(num_classes, self.world)
        self.shard = base + (1 if self.rank < extra else 0)
        self.start = self.rank * base + min(self.rank, extra)
        self.weight = nn.Parameter(_init_rows(self.start, self.shard, dim, seed))
        self.seed = seed
        # Row-wise AdamW state (see :meth:`step`): persistent, checkpointed with the weights.
        self.register_buffer("exp_avg", torch.zeros(self.shard, dim))
        self.register_buffer("exp_avg_sq", torch.zeros(self.shard, dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._used: list[tuple[torch.Tensor, torch.Tensor]] = []

    def load_shards(self, shards: list[dict]) -> None:
        """This rank's centres and their optimiser state, cut from the ``state_dict`` of every
        shard of a classifier over any number of ranks (in rank order): a run resumed on
        another number of GPUs continues with the same centres."""
        sizes = [len(s["weight"]) for s in shards]
        if sum(sizes) != self.num_classes:
            raise ValueError(f"the saved shards hold {sum(sizes)} class centres "
                             f"({' + '.join(map(str, sizes))}), this classifier has "
                             f"{self.num_classes}")
        own = {}
        for key, mine in self.state_dict().items():
            if mine.dim() == 0:  # a step count: the same on every rank
                values = {float(s[key]) for s in shards}
                if len(values) > 1:
                    raise ValueError(f"the saved shards disagree on {key} ({sorted(values)})")
                own[key] = shards[0][key]
                continue
            parts, lo = [], 0
            for s, n in zip(shards, sizes):  # the rows of [start, start + shard) each holds
                a, b = max(lo, self.start), min(lo + n, self.start + self.shard)
                if a < b:
                    parts.append(s[key][a - lo: b - lo])
                lo += n
            own[key] = torch.cat(parts)
        self.load_state_dict(own)

    # ---- class-centre sampling ----------------------------------------------------------
    def sample_centres(self, local_labels: torch.Tensor, step: int) -> torch.Tensor:
        """Indices (into this shard, sorted) of the centres used this step.

        Every shard class present in ``local_labels`` is kept; the rest are filled with random
        negatives up to ``ceil(sample_rate * shard)``.
        """
        if self.sample_rate >= 1.0:
            return torch.arange(self.shard, device=self.weight.device)
        n_keep = max(1, math.ceil(self.sample_rate * self.shard))
        g = torch.Generator(device=self.weight.device)
        g.manual_seed(self.seed * 1_000_003 + step * 131 + self.rank)
        score = torch.rand(self.shard, generator=g, device=self.weight.device)
        positives = torch.unique(local_labels)
        score[positives] = 2.0  # above any random score: positives always survive
        n_keep = max(n_keep, len(positives))
        return torch.sort(torch.topk(score, n_keep).indices).values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int = 0,
                anchored: torch.Tensor | None = None):
        """Mean margin-softmax cross-entropy of ``embeddings`` [B, d] with global ``labels``.

        ``anchored`` [B] (bool, optional): samples whose loss moves them towards their centre
        and away from the others but never moves a centre (the centres see those samples'
        cosines as constants), so that they learn where a class is without deciding it."""
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        if anchored is not None and anchored.shape != labels.shape:
            raise ValueError(f"anchored must hold one flag per label, got {tuple(anchored.shape)}"
                             f" for {tuple(labels.shape)}")
        if self.world > 1:
            from torch.distributed.nn.functional import all_gather

            embeddings = torch.cat(all_gather(embeddings))
            labels = _gather_flat(labels)
            anchored = None if anchored is None else _gather_flat(anchored.to(torch.uint8)).bool()
        x = F.normalize(embeddings, dim=-1)
        local = labels - self.start
        mine = (local >= 0) & (local < self.shard)
        idx = self.sample_centres(local[mine], step)
        remap = torch.full((self.shard,), -1, dtype=torch.long, device=idx.device)
        remap[idx] = torch.arange(len(idx), device=idx.device)
        target = torch.where(mine, remap[local.clamp(0, self.shard - 1)],
                             torch.full_like(local, -1))
        if torch.is_grad_enabled() and self.weight.requires_grad:
            # The sampled rows become a leaf of their own: backward then touches only them, never
            # a dense gradient of all centres (see step()).
            rows = self.weight.detach()[idx].requires_grad_(True)
            self._used.append((idx, rows))
        else:
            rows = self.weight[idx]
        w = F.normalize(rows, dim=-1).to(x.dtype)
        cosine = x @ w.t()
        if anchored is not None and bool(anchored.any()):
            cosine = torch.where(anchored.to(cosine.device)[:, None], x @ w.detach().t(), cosine)
        mask = torch.zeros(len(target), len(idx), dtype=torch.bool, device=cosine.device)
        has = torch.nonzero(target >= 0).flatten()
        mask[has, target[has]] = True
        logits = margin_logits(cosine.float(), mask, self.kind, self.margin, self.scale)
        if self.world == 1:
            return F.cross_entropy(logits, target)
        return _sharded_cross_entropy(logits, mask)

    @torch.no_grad()
    def imprint(self, embeddings: torch.Tensor, labels: torch.Tensor) -> int:
        """Set each centre of this shard that ``labels`` (global) names to the unit-norm mean
        of its ``embeddings`` ("weight imprinting", Qi et al. 2018); other centres keep their
        values.  Every rank passes the same full set.  Returns how many centres were set.

        Why (``TrainConfig.centre_init="docs"``): a random centre is a target no doc or query
        is near, so early steps only move samples towards arbitrary points; a centre that
        starts at its docs gives a query photo a target its clicked docs already share.
        """
        local = labels.to(self.weight.device) - self.start
        mine = (local >= 0) & (local < self.shard)
        sums = torch.zeros_like(self.weight).index_add_(
            0, local[mine], embeddings.to(self.weight)[mine])
        hit = torch.zeros(self.shard, dtype=torch.bool, device=self.weight.device)
        hit[local[mine]] = True
        self.weight[hit] = F.normalize(sums[hit], dim=-1)
        return int(hit.sum())

    @torch.no_grad()
    def diagnostics(self, embeddings: torch.Tensor, labels: torch.Tensor,
                    max_others: int = 4096) -> dict:
        """The centres' health on a batch (training logs it): ``centre_norm``, their mean norm
        (shrinking centres take ever larger angular steps); ``cos_own``, the mean cosine of a
        sample to its own centre; ``cos_other``, to other centres (up to ``max_others`` of this
        shard, a fixed choice that draws nothing from the training RNG)."""
        x = F.normalize(embeddings.float(), dim=-1)
        w = self.weight.detach().float()
        local = labels.to(w.device) - self.start
        mine = (local >= 0) & (local < self.shard)
        own = (x[mine] * F.normalize(w[local[mine]], dim=-1)).sum(-1)
        g = torch.Generator(device=w.device).manual_seed(0)
        pick = torch.randperm(self.shard, generator=g, device=w.device)[:max_others]
        other = x @ F.normalize(w[pick], dim=-1).t()
        not_own = local[:, None] != pick[None, :]
        return {"centre_norm": float(w.norm(dim=1).mean()),
                "cos_own": float(own.mean()) if len(own) else float("nan"),
                "cos_other": float(other[not_own].mean()) if not_own.any() else float("nan")}

    # ---- the row-wise optimiser ---------------------------------------------------------
    def used_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, summed gradients) of every centre used since the last :meth:`step`."""
        if not self._used:
            return (torch.zeros(0, dtype=torch.long, device=self.weight.device),
                    torch.zeros(0, self.weight.shape[1], device=self.weight.device))
        idx = torch.cat([i for i, _ in self._used])
        grad = torch.cat([r.grad if r.grad is not None else torch.zeros_like(r)
                          for _, r in self._used])
        rows, inverse = torch.unique(idx, return_inverse=True)
        summed = torch.zeros(len(rows), grad.shape[1], device=grad.device, dtype=grad.dtype)
        summed.index_add_(0, inverse, grad)
        return rows, summed

    def dense_grad(self) -> torch.Tensor:
        """The gradient as a full [shard, dim] tensor (for tests and inspection)."""
        rows, grad = self.used_rows()
        out = torch.zeros_like(self.weight)
        out[rows] = grad.to(out.dtype)
        return out

    def scale_grad(self, factor) -> None:
        for _, r in self._used:
            if r.grad is not None:
                r.grad.mul_(factor)

    def clear_used(self) -> None:
        self._used.clear()

    @torch.no_grad()
    def step(self, lr: float, optimizer: str = "sgd", momentum: float = 0.9, betas=(0.9, 0.999),
             eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        """Update the centres used since the last step; the others and their state wait.

        ``sgd`` (the default, as in Partial FC): SGD with momentum and decoupled-free L2 weight
        decay, ``torch.optim.SGD`` exactly when every row is used.  ``adamw``: "lazy" AdamW,
        ``torch.optim.AdamW`` exactly when every row is used.  Either way a step costs in
        proportion to the sampled centres, not to all classes.

        Why SGD by default: with thousands of classes most centres see only tiny, negative-only
        gradients in a step, and Adam's per-coordinate normalisation turns those into full-size
        steps away from every embedding, their own class's included.  On SynthShop small
        (3.6k classes) that collapsed training (test Recall@10 0.003); SGD trains.
        """
        rows, g = self.used_rows()
        self._used.clear()
        if not len(rows):
            return
        self.steps += 1
        if optimizer == "sgd":
            w = self.weight.data[rows]
            g = g + weight_decay * w
            buf = self.exp_avg[rows].mul_(momentum).add_(g)  # a zero buffer starts at g
            self.exp_avg[rows] = buf
            self.weight.data[rows] = w - lr * buf
            return
        if optimizer != "adamw":
            raise ValueError(f"centre optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        t = int(self.steps)
        b1, b2 = betas
        m = self.exp_avg[rows].mul_(b1).add_(g, alpha=1 - b1)
        v = self.exp_avg_sq[rows].mul_(b2).addcmul_(g, g, value=1 - b2)
        self.exp_avg[rows], self.exp_avg_sq[rows] = m, v
        w = self.weight.data[rows].mul_(1 - lr * weight_decay)
        denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
        w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        self.weight.data[rows] = w


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is the identity.

    Every rank computes the same (replicated) loss from the reduced value, so each rank's
    upstream gradient already is the full one; summing it again, as a plain differentiable
    all_reduce does, would scale gradients by the world size.
    """

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def _gather_flat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape on each, no gradient), concatenated in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def _sharded_cross_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy whose classes are spread over ranks (each holds some columns).

    Gradients match the single-process loss: the centres' exactly, the embeddings' after the
    all-gather's backward sums the shards' contributions.
    """
    all_reduce = _SumOverRanks.apply
    with torch.no_grad():  # the max only shifts for stability: no gradient flows through it
        row_max = logits.max(dim=1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    shifted = logits - row_max[:, None]
    sum_exp = all_reduce(shifted.exp().sum(dim=1))
    target = all_reduce((shifted * mask).sum(dim=1))
    return (torch.log(sum_exp) - target).mean()


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine between distinct rows: near 1 when the embeddings collapse onto one point."""
    x = F.normalize(embeddings.detach().float(), dim=-1)
    n = len(x)
    if n < 2:
        return float("nan")
    total = x.sum(dim=0)
    return float(((total @ total) - n) / (n * (n - 1)))  # sum of all cosines minus the diagonal


# --------------------------------------------------------------------------------------------
# Pairwise baselines
# --------------------------------------------------------------------------------------------
def info_nce(queries: torch.Tensor, docs: torch.Tensor, temperature: float = 0.05):
    """Symmetric InfoNCE over matched (query_i, doc_i) pairs; other rows are negatives."""
    q, d = F.normalize(queries, dim=-1), F.normalize(docs, dim=-1)
    logits = q @ d.t() / temperature
    target = torch.arange(len(q), device=q.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def triplet_loss(queries: torch.Tensor, docs: torch.Tensor, margin: float = 0.2):
    """Hinge on cosine: each query's matched doc must beat its hardest in-batch doc by ``margin``."""
    q, d = F.normalize(queries, dim=-1), F.normalize(docs, dim=-1)
    sim = q @ d.t()
    pos = sim.diagonal()
    neg = sim.masked_fill(torch.eye(len(q), dtype=torch.bool, device=q.device), -2.0)
    return F.relu(margin - pos + neg.max(dim=1).values).mean()
