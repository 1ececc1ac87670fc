"""Whether anything a trained concept-fusion run computes tells a scene doc from a single shot:
the signal a gate that weighs image against title per doc would have to read
(docs/EXPERIMENTS.md, "A gate that reads the agreement").

    python bench/gate_signal.py RUN [RUN ...] [--data data/synth-small-scenes30] [--docs 400]

For ``--docs`` scene docs and as many single-shot docs (drawn with ``--seed``), each doc's
title read by the run's concepts, four per-doc signals:

* ``vectors``: the cosine of the doc's image vector and its fused concepts, what
  ``--model.fusion_gate_input=agreement`` reads;
* ``transformed``: the cosine of the image vector and the concepts' attended patches (the mean
  over concepts), in the doc transform's space before the fusion's norm and feed-forward (and
  before any text content a ``concept_text`` other than ``none`` adds);
* ``encoder``: the cosine of the encoder's pooled vector and its patches weighted by the
  concepts' mean attention, before either transform;
* ``entropy``: the concepts' mean attention map's entropy over the image regions, as a share
  of a uniform map's (1 = looks everywhere).

Printed per signal: its mean (sd) on each kind of doc and the AUC, the chance that a random
scene doc scores below a random single shot (0.5: the signal cannot tell them apart; 1 or 0:
it always can).  No test query read.  Seconds a run on 2 cores.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mixer_lite.dataset import load_dataset, load_images
from mixer_lite.measures import has_image_text_gate, scene_doc_rows
from mixer_lite.runs import load_run_model

SIGNALS = ("vectors", "transformed", "encoder", "entropy")


@torch.no_grad()
def signals(model, data, rows) -> dict[str, np.ndarray]:
    """The four signals of the docs at ``rows`` (see the module's docstring), read by forward
    hooks from one ``embed_docs`` pass: the encoder's output, the concepts' attention and the
    gate's input, so each is what the model computed."""
    if not has_image_text_gate(model):
        raise ValueError(f"fusion={model.cfg.fusion!r}, fusion_gate={model.cfg.fusion_gate}: "
                         f"the signals are read where a gate mixes image and fused concepts")
    seen: dict = {}
    hooks = [model.image_encoder.register_forward_hook(
                 lambda m, args, out: seen.update(encoded=out)),
             model.fusion.attend.register_forward_hook(
                 lambda m, args, out: seen.update(attended=out)),
             model.fusion.gate.register_forward_hook(
                 lambda m, args, out: seen.update(gate_input=args[0]))]
    try:
        model.embed_docs(load_images(data, "docs", rows, model.cfg.image_size),
                         model.tokenize([data.doc_texts[int(r)] for r in rows]))
    finally:
        for hook in hooks:
            hook.remove()
    patches, pooled = seen["encoded"]
    attended, weights = seen["attended"]
    image_vec, fused = seen["gate_input"].chunk(2, dim=-1)
    mean_map = weights.mean(dim=1)                                         # [B, P]
    entropy = -(mean_map * mean_map.clamp_min(1e-12).log()).sum(-1) / math.log(mean_map.shape[1])
    return {"vectors": F.cosine_similarity(image_vec, fused, dim=-1).numpy(),
            "transformed": F.cosine_similarity(image_vec, attended.mean(dim=1), dim=-1).numpy(),
            "encoder": F.cosine_similarity(pooled, (mean_map[..., None] * patches).sum(1),
                                           dim=-1).numpy(),
            "entropy": entropy.numpy()}


def auc_below(a: np.ndarray, b: np.ndarray) -> float:
    """P(a random value of ``a`` < a random value of ``b``), ties counted half."""
    return float((a[:, None] < b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", default="data/synth-small-scenes30")
    p.add_argument("--docs", type=int, default=400, help="docs of each kind")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)
    data = load_dataset(args.data, check_images=False)
    scenes = scene_doc_rows(data, args.data)
    if not len(scenes):
        raise SystemExit(f"{args.data} has no scene docs: make it with --scene-share")
    rng = np.random.default_rng(args.seed)
    single = np.setdiff1d(np.arange(len(data.docs)), scenes)
    kinds = {kind: np.sort(rng.choice(pool, min(args.docs, len(pool)), replace=False))
             for kind, pool in (("scene", scenes), ("single", single))}
    print("| run | signal | scene docs: mean (sd) | single shots: mean (sd) | AUC scene < single |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        model = load_run_model(run).eval()
        got = {kind: signals(model, data, rows) for kind, rows in kinds.items()}
        for name in SIGNALS:
            s, g = got["scene"][name], got["single"][name]
            print(f"| {run.name} | {name} | {s.mean():.3f} ({s.std():.3f}) | {g.mean():.3f} "
                  f"({g.std():.3f}) | {auc_below(s, g):.2f} |")


if __name__ == "__main__":
    main()
