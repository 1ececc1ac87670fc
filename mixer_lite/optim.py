"""What the training loops share around the optimiser: the learning-rate schedule, the margin
ramp, and clipping by the norm of all gradients when the classifier is sharded over ranks."""
from __future__ import annotations

import math

import torch


def warmup_cosine(total: int, warmup_frac: float):
    """The schedule's factor of the peak learning rate at each step (for ``LambdaLR``): linear
    warm-up over ``warmup_frac`` of ``total`` steps (at least one), then cosine decay to 0."""
    warm = max(1, int(total * warmup_frac))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
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
