# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Large-scale classification instead of pairwise learning
#
# **The paper's claim.** Instead of contrastive or triplet learning on (query, doc) pairs,
# Mixer trains retrieval as **classification**: every query photo and every doc of a class is
# a sample of that class, and each sample meets *class centres* rather than other samples.
# At up to 1e8 classes this needs a learning strategy made for it: **class-centre sampling**
# (each step uses the batch's classes plus a share of the others) and **hybrid parallelism**
# (data-parallel encoders, a model-parallel classifier). Code: `mixer_lite/losses.py`
# (`MarginClassifier`, `info_nce`, `triplet_loss`), `mixer_lite/train.py`.

# %% tags=["parameters"]
import os

fast = os.environ.get("MIXER_LITE_FAST", "0") == "1"  # CI sets MIXER_LITE_FAST=1
preset = "tiny" if fast else "small"
seed = 0
class_counts = [1_000, 10_000, 100_000] if fast else [1_000, 10_000, 100_000, 1_000_000]
# Fast mode (CI) drops the rows that only this notebook trains and that cost the most.
rows = ["Mixer (concept fusion, CosFace)", "InfoNCE on click pairs"]
if not fast:
    rows += ["CosFace, centres sampled 0.1", "triplet on click pairs"]

# %%
if fast:
    os.environ["TQDM_DISABLE"] = "1"
import torch
from mixer_lite.experiments import classifier_step_seconds, ensure_data, ensure_row, read_metrics
from mixer_lite.viz import recall_curves, training_curves

torch.set_num_threads(2)
data_dir = ensure_data(preset, seed)

# %% [markdown]
# ## Same data, same clicks: classification vs pairwise losses
# CosFace over the weak-label classes (notebook 03), against symmetric InfoNCE (CLIP-style,
# in-batch negatives) and a triplet loss with the hardest in-batch negative, both on the raw
# (query, clicked doc) pairs. Same model, same preset, and the **same number of images
# encoded**: a pairwise step encodes a photo and a doc per pair, so the pairwise rows train half
# the Mixer row's steps (`experiments.row_overrides`; our choice, the paper gives no budget).
# With equal epochs they would see 4.6x the images on SynthShop small, since there are more
# click pairs than capped class samples.

# %%
# NBVAL_CHECK_OUTPUT
runs = {row: ensure_row(data_dir, preset, row, seed) for row in rows}
for name, r in runs.items():
    print(f"{name:<32} steps {r['steps']:>4}  Recall@1 {r['recall@1']:.3f}  "
          f"Recall@10 {r['recall@10']:.3f}  mAP@10 {r['map@10']:.3f}")

# %%
fig = training_curves({name: read_metrics(r["run"]) for name, r in runs.items()},
                      ylabel="training loss (nats; each loss has its own scale)")

# %% [markdown]
# *Figure: training loss per step. The three losses are on different scales (CosFace's
# includes the margin times the scale s=30), so compare shapes, not heights.*

# %%
fig = recall_curves({name: r["recall_curve"] for name, r in runs.items()},
                    title=f"Recall@K on SynthShop {preset} test queries (unseen products)")

# %% [markdown]
# *Figure: Recall@K of the three losses on the test queries, whose products no training
# click ever touched.*
#
# ## Cost per step as the classes grow
# The classifier's step (forward, backward, centre update) on random embeddings, batch 256,
# dimension 128, with every centre (full softmax) and with a 10% sample of the negative
# centres. Times are this machine's and vary between runs (not checked by CI);
# `bench/partial_fc.py` measures the same with memory, side by side in one run.

# %%
print(f"{'classes':>10}{'full (ms)':>12}{'sampled 0.1 (ms)':>18}{'ratio':>8}")
for c in class_counts:
    full, sampled = classifier_step_seconds(c, 1.0), classifier_step_seconds(c, 0.1)
    print(f"{c:>10,}{full * 1e3:>12.1f}{sampled * 1e3:>18.1f}{sampled / full:>8.2f}")

# %% [markdown]
# ## What the numbers say
# * Sampling 10% of the centres cuts the classifier's step roughly in proportion once the
#   centres dominate the cost (at 1e6 classes the README's bench measures 0.10x time and
#   memory); at a thousand classes the fixed costs dominate and sampling buys much less.
# * Which loss retrieves better, at the same number of images encoded: in the committed run
#   (fast mode, SynthShop tiny, seed 0) CosFace reached Recall@10 0.042 and InfoNCE 0.035 in
#   half the steps (raw pixels 0.021); over three seeds (README's table) 2.8% against 3.7%,
#   within the spread: 46 steps on 144 test queries cannot separate them.
# * On SynthShop small (1,261 test queries; README's table, seeds 0, 1 and 2) InfoNCE
#   reaches Recall@10 13.4% against CosFace's 2.9% at the same 55,552 images, and triplet
#   1.3%. This **does not reproduce the paper's claim** that classification beats pairwise
#   learning: with about 6 samples per class and encoders trained from scratch, InfoNCE on
#   the clicks wins here. Image-only docs under CosFace reach 14.2% on small, so the
#   classification loss is not the main obstacle: fusing the title in lets docs be classified
#   without their image (notebook 02). The paper's regime (pretrained encoders, many samples per class, 1e8
#   classes) is far from this one; the README's "Training" section has every run.
