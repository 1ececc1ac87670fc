"""What the training loops share around the optimiser: the learning-rate schedule, the margin
ramp, clipping by the norm of all gradients when the classifier is sharded over ranks, and the
loss scale of fp16 training."""
from __future__ import annotations

import math

import torch


def warmup_steps(total: int, warmup_frac: float) -> int:
    """The steps of a linear warm-up over ``warmup_frac`` of ``total`` steps (at least one)."""
    return max(1, int(total * warmup_frac))


def warmup_cosine(total: int, warmup_frac: float):
    """The schedule's factor of the peak learning rate at each step (for ``LambdaLR``): linear
    warm-up over :func:`warmup_steps`, then cosine decay to 0."""
    warm = warmup_steps(total, warmup_frac)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return factor


def frozen_then_warmup(total: int, warmup_frac: float, frozen_frac: float):
    """The image encoder's factor of the peak learning rate when it starts frozen: 0 for the
    first ``frozen_frac`` of the steps (the transforms and centres fit the pretrained features
    first, so their random start sends no large gradients into the backbone), then a linear
    warm-up as long as the run's into the run's :func:`warmup_cosine` schedule.  The weights
    stay put while frozen; BatchNorm's running statistics still follow the batches.  Measured
    lower on the icons dataset's validation photos, so off in every preset (docs/EXPERIMENTS.md,
    "A backbone pretrained across designers")."""
    base, frozen = warmup_cosine(total, warmup_frac), int(total * frozen_frac)
    warm = warmup_steps(total, warmup_frac)

    def factor(step: int) -> float:
        return 0.0 if step < frozen else base(step) * min(1.0, (step - frozen + 1) / warm)
    return factor


def margin_at(step: int, total: int, margin: float, warmup_frac: float) -> float:
    """The margin of this step: a linear ramp from 0 over ``warmup_frac`` of the run."""
    warm = warmup_frac * total
    return margin * (min(1.0, step / warm) if warm > 0 else 1.0)


def clip_global_norm(model, classifier, max_norm: float, world: int) -> float:
    """Clip by the norm of *all* gradients, as ``torch.nn.utils.clip_grad_norm_`` over the
    encoder and every centre would; returns the norm before clipping.

    Encoder gradients are replicated after DDP's reduce; classifier gradients are sharded (each
    rank holds some centres), so their squared norms are summed over ranks first.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sq = sum((g.float() ** 2).sum() for g in grads) if grads else torch.zeros(())
    if classifier is not None:
        shard = (classifier.used_rows()[1].float() ** 2).sum()
        if world > 1:
            torch.distributed.all_reduce(shard)
        sq = sq + shard.to(sq.device)
    norm = torch.sqrt(sq)
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.to(g.device, g.dtype))
    if classifier is not None:
        classifier.scale_grad(factor)
    return float(norm)


def sum_gradients_hook(state, bucket):
    """DDP comm hook: sum (not average) gradients across ranks (the sharded classifier's loss is
    the global-batch mean already)."""
    fut = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class LossScale:
    """Dynamic loss scaling for fp16 autocast (what ``torch.amp.GradScaler`` does), over the
    encoder's gradients and the class centres' alike, with one decision for every rank.

    The loss is multiplied by :attr:`value` before backward, so that small gradients survive
    fp16; :meth:`unscale` divides the gradients back before clipping and says whether all are
    finite.  A step with an inf or nan gradient is skipped and the scale halved; after
    ``growth_interval`` finite steps in a row it doubles.  The centres' optimiser is not a
    ``torch.optim`` optimiser and their gradients are sharded over ranks (each rank sees its
    own), so ``GradScaler`` would neither unscale them nor skip a step on every rank at once:
    here the finiteness is reduced over ranks.  Disabled (bf16, fp32), it scales by 1 and never
    skips.
    """

    def __init__(self, enabled: bool, init: float = 2.0 ** 16, growth_interval: int = 2000):
        self.enabled, self.growth_interval = enabled, growth_interval
        self.value, self.good_steps = (init if enabled else 1.0), 0

    def unscale(self, model, centres, world: int, device: torch.device) -> bool:
        """Divide this step's gradients (the model's, and ``centres``' rows used this step) by
        the scale; True when every one is finite on every rank."""
        if not self.enabled:
            return True
        inverse = 1.0 / self.value
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        for g in grads:
            g.mul_(inverse)
        checks = [torch.isfinite(g).all() for g in grads]
        if centres is not None:
            centres.scale_grad(inverse)
            checks.append(torch.isfinite(centres.used_rows()[1]).all().to(device))
        finite = torch.stack(checks).all().float() if checks else torch.ones((), device=device)
        if world > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite)

    def update(self, finite: bool) -> None:
        """After a step: halve the scale when it overflowed, double it after a finite run."""
        if not self.enabled:
            return
        self.good_steps = self.good_steps + 1 if finite else 0
        if not finite:
            self.value /= 2
        elif self.good_steps == self.growth_interval:
            self.value, self.good_steps = self.value * 2, 0

    def state_dict(self) -> dict:
        return {"value": self.value, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.good_steps = float(state["value"]), int(state["good_steps"])
