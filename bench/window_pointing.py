"""Which candidate window a trained model picks for a scene doc's title: the diagnosis behind
docs/EXPERIMENTS.md, "The title in the photos' space".

    python bench/window_pointing.py RUN [RUN ...] [--data data/synth-small-scenes30]

For 256 scene docs of a SynthShop folder with scene docs (``bench/scene_fusion.py`` makes one;
the docs and title swaps of :func:`mixer_lite.measures.scene_doc_sample`, seed 0), each of the
3 x 3 candidate windows of ``fusion="regions"`` (:func:`candidate_boxes`, at the run's
``region_side``) is given to the object that covers most of it (the truth masks). A run picks
one window per doc: a ``regions`` run the window its weights favour most (the whole image left
out), a ``text_only`` run the window whose photo embedding (the query tower) is nearest its
title's doc embedding. Printed: the share of docs whose picked window belongs to the product the
title names; the same with each title swapped for one of another object in the scene (the picked
window should then belong to that object); what a window drawn at random reaches; and the share
of docs where some window belongs to the product (the ceiling). Reads no query.
"""
from __future__ import annotations

import argparse

import torch

from mixer_lite.dataset import load_dataset, load_images
from mixer_lite.measures import scene_doc_sample
from mixer_lite.model import candidate_boxes, zoom_to
from mixer_lite.runs import load_run_model


@torch.no_grad()
def picked_windows(model, images, texts, windows) -> torch.Tensor:
    """[B] the window (of ``windows``) the model picks for each doc under ``texts``."""
    tokens = model.tokenize(texts)
    if model.cfg.fusion == "regions":
        _, info = model.embed_docs(images, tokens, return_attention=True)
        return info["region_weights"].float().mean(dim=1)[:, 1:].argmax(dim=-1)
    if model.cfg.fusion != "text_only":
        raise ValueError(f"fusion={model.cfg.fusion!r}: only regions and text_only runs pick "
                         f"a window")
    n, k = len(images), len(windows)
    cut = zoom_to(images.float().div(255).repeat_interleave(k, dim=0), windows.repeat(n, 1))
    photos = model.embed_queries(cut).view(n, k, -1)
    return torch.einsum("bd,bkd->bk", model.embed_docs(images, tokens), photos).argmax(dim=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--data", default="data/synth-small-scenes30")
    p.add_argument("--docs", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(2)
    data = load_dataset(args.data, check_images=False)
    print("| run | product's window | swapped title: that object's window | random window "
          "| some window the product's |\n|---|---|---|---|---|")
    for run in args.runs:
        model = load_run_model(run).eval()
        size = model.cfg.image_size
        windows = candidate_boxes(model.cfg.region_side)[1:]  # the run's own windows
        rows, masks, _, swap, swapped = scene_doc_sample(data, args.data, size, args.docs)
        b, o = masks.shape[:2]
        m = torch.from_numpy(masks).float().reshape(b * o, 1, size, size)
        share = zoom_to(m.repeat_interleave(len(windows), dim=0), windows.repeat(b * o, 1))
        owner = share.reshape(b, o, len(windows), -1).mean(-1).argmax(dim=1)  # [B, windows]
        swap = torch.from_numpy(swap)
        images = load_images(data, "docs", rows, size)
        at = torch.arange(b)
        title = picked_windows(model, images, [data.doc_texts[int(r)] for r in rows], windows)
        moved = picked_windows(model, images, swapped, windows)
        print(f"| {run} | {float((owner[at, title] == 0).float().mean()):.2f} "
              f"| {float((owner[at, moved] == swap).float().mean()):.2f} "
              f"| {float((owner == 0).float().mean()):.2f} "
              f"| {float((owner == 0).any(-1).float().mean()):.2f} |", flush=True)


if __name__ == "__main__":
    main()
