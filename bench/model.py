"""Parameters and forward+backward throughput of the tiny model and each ablation, side by side.

    python bench/model.py [--batch 64] [--steps 5] [--threads 2]

One step embeds a batch of query photos and a batch of docs (image + title), takes a CosFace-free
stand-in loss (the sum of matched inner products) and back-propagates: the cost profile of a
training step without the classifier, which bench/partial_fc.py measures on its own.
"""
from __future__ import annotations

import argparse
import time

import torch

from mixer_lite.encoders import WordTokenizer
from mixer_lite.model import FUSIONS, MixerModel, ModelConfig

TITLES = ["norvik crimson polka dot cotton crew neck tee hot sale", "alba blue ceramic mug",
          "kestrel black leather tote bag free shipping 2024 gift"]


def variants():
    yield "mixer (concept fusion)", ModelConfig()
    for fusion in FUSIONS[1:]:
        yield f"ablation: {fusion}", ModelConfig(fusion=fusion)
    yield "ablation: shared transform", ModelConfig(shared_transform=True)


def throughput(cfg: ModelConfig, batch: int, steps: int) -> tuple[int, float]:
    torch.manual_seed(0)
    model = MixerModel(cfg, WordTokenizer.fit(TITLES)).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size)
    tokens = model.tokenize([TITLES[i % 3] for i in range(batch)])

    def step():
        opt.zero_grad()
        (model.embed_queries(x) * model.embed_docs(x, tokens)).sum().backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    return sum(p.numel() for p in model.parameters()), 2 * batch * steps / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [(name, *throughput(cfg, args.batch, args.steps)) for name, cfg in variants()]
    base = rows[0][2]
    print(f"tiny config, 64x64 images, batch {args.batch} queries + {args.batch} docs, "
          f"{args.threads} threads; samples/s counts queries and docs")
    print(f"{'variant':<28} {'params':>10} {'samples/s':>10} {'vs mixer':>9}")
    for name, params, rate in rows:
        print(f"{name:<28} {params:>10,} {rate:>10.0f} {rate / base:>8.2f}x")


if __name__ == "__main__":
    main()
