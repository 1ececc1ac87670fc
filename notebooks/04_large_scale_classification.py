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
rows = ["mixer", "infonce"]  # slugs of mixer_lite.ablations.ROWS
if not fast:
    rows += ["sampled", "triplet"]
val_every = 100  # steps between validation passes on the health curves (full mode)
# For the health curves full mode trains the Mixer row again with a validation pass every
# `val_every` steps, and the earlier recipe of docs/EXPERIMENTS.md beside it; fast mode reads
# the Mixer row's own log (validated at its start and its end).
named_runs = [] if fast else [f"{preset}-{kind}-health-s{seed}" for kind in ("mixer", "prev")]

# %%
if fast:
    os.environ["TQDM_DISABLE"] = "1"
from IPython.display import Markdown, display
from mixer_lite.notebooks import made_with, show_code
display(Markdown(made_with(preset, fast, seed)))
import matplotlib.pyplot as plt
import numpy as np
import torch
from mixer_lite.ablations import ROWS, recipe_overrides, row_overrides
from mixer_lite.losses import MarginClassifier, margin_logits
from mixer_lite.measures import claim, classifier_step_seconds
from mixer_lite.reproduce import recorded_metrics
from mixer_lite.train import config_from
from mixer_lite.runcache import ensure_data, ensure_row, ensure_run, read_metrics
from mixer_lite.viz import recall_curves, training_curves, training_health

torch.set_num_threads(2)
data_dir = ensure_data(preset, seed)

# %% [markdown]
# ## Same data, same clicks: classification vs pairwise losses
# CosFace over the weak-label classes (notebook 03), against symmetric InfoNCE (CLIP-style,
# in-batch negatives) and a triplet loss with the hardest in-batch negative, both on the raw
# (query, clicked doc) pairs. Same model, same preset, and the **same number of images
# encoded**: a pairwise step encodes a photo and a doc per pair, so the pairwise rows train half
# the Mixer row's steps (our choice; the paper gives no budget). With equal epochs they would
# see several times the images, since there are more click pairs than capped class samples. A
# run not cached in `runs/experiments/` is trained first: about 5 to 10 minutes each on `small`
# with 2 cores.
#
# **CosFace**, the preset's classification loss: for an embedding x of class y and unit class
# centres w_j, the logits are s·cos(x, w_j) for every other class and s·(cos(x, w_y) - m) for
# its own; the loss is the cross-entropy over them. The margin m asks a sample to be closer to
# its own centre than to any other by m in cosine; the scale s sharpens the softmax. ArcFace
# puts the margin on the angle instead, s·cos(θ_y + m). The lines that make the logits:

# %%
show_code(margin_logits)

# %% [markdown]
# With a million classes, every step cannot afford every centre: **class-centre sampling**
# keeps the centres of the classes in the batch and fills up to a share of all centres with
# random others (the negatives a step sees):

# %%
show_code(MarginClassifier.sample_centres)

# %% [markdown]
# ## The runs

# %%
runs = {ROWS[slug].label: ensure_row(data_dir, preset, slug, seed) for slug in rows}
for name, r in runs.items():
    print(f"{name:<32} steps {r['steps']:>4}  Recall@1 {r['recall@1']:.2f}  "
          f"Recall@10 {r['recall@10']:.2f}  mAP@10 {r['map@10']:.2f}")

# %%
fig = training_curves({name: read_metrics(r["run"]) for name, r in runs.items()},
                      ylabel="training loss (nats; each loss has its own scale)")
plt.show()  # the figure, then its caption
cfg = config_from("tiny-cpu", [])
Markdown(f"*Figure: training loss per step of the {len(runs)} runs above. Their losses are on "
         f"different scales (CosFace's includes the margin times the scale, "
         f"{cfg.margin_value} x {cfg.scale:g} = {cfg.margin_value * cfg.scale:g} nats in the "
         f"preset), so compare shapes, not heights.*")

# %% [markdown]
# **The scale.** CosFace multiplies its cosines by a scale s before the softmax, as InfoNCE
# divides by a temperature (s = 1/temperature). The preset's scale was chosen on `small`'s
# validation photos, as was its augmentation (each photo and studio shot flipped and shifted
# by a few pixels); `docs/EXPERIMENTS.md` has both measurements. A plausible reason why
# augmentation helps the classifier more than the pairwise losses, not isolated: a class
# centre averages the views of a class, while a pairwise loss must pull each augmented doc
# onto its photo. Losses are in **nats**, the unit of a cross-entropy taken with the natural
# logarithm (ln 2 nats = 1 bit).

# %%
fig = recall_curves({name: r["recall_curve"] for name, r in runs.items()},
                    title=f"Recall@K on SynthShop {preset} test queries (unseen products)")

# %% [markdown]
# *Figure: Recall@K of the losses on the test queries, whose products no training click ever
# touched.*
#
# ## What a healthy classification run looks like
# A recipe that fails shows it long before the test: `metrics.jsonl` logs, every few steps,
# the mean norm of the class centres, the mean cosine of a sample to its own centre and to the
# other centres, the mean cosine between a batch's embeddings (near 1 = everything collapsed
# onto one point), and Recall@10 of the validation photos (10% of the weak-label classes, held
# out of training) at the run's initial weights and at its end. Below, the log of the Mixer row
# trained again with a validation pass every `val_every` steps, and the earlier recipe of
# `docs/EXPERIMENTS.md` beside it (fast mode: the Mixer row's own log, without retraining it;
# validation passes change nothing a run learns, `tests/test_train.py` checks it).

# %%
mixer_row = ROWS["mixer"].label
if fast:
    health = {"this recipe": runs[mixer_row]}
else:
    validated = row_overrides(data_dir, "mixer", seed) + [f"--val_every={val_every}"]
    health = {"this recipe": ensure_run(data_dir, named_runs[0], validated),
              "earlier recipe": ensure_run(data_dir, named_runs[1], recipe_overrides() +
                                           [f"--val_every={val_every}", f"--seed={seed}"])}
fig = training_health({name: read_metrics(r["run"]) for name, r in health.items()})

# %% [markdown]
# *Figure: validation Recall@10 (dots: each validation pass), the centres' mean norm, the
# mean cosine of a sample to its own centre (solid) and to other centres (dashed), and the
# mean cosine within a batch, against training step.* A working run pulls samples towards
# their own centre while the other centres stay near cosine 0 and the batch stays spread out;
# validation recall then rises with the own-centre cosine.
#
# ## Cost per step as the classes grow
# The classifier's step (forward, backward, centre update) on random embeddings, batch 256,
# dimension 128, with every centre (full softmax) and with a 10% sample of the negative
# centres. Times are those of the computer running the notebook and vary between runs;
# `bench/partial_fc.py` measures the same with memory, side by side in one run.

# %%
print(f"{'classes':>10}{'full (ms)':>12}{'sampled 0.1 (ms)':>18}{'ratio':>8}")
step_ratio = {}
for c in class_counts:
    full, sampled = classifier_step_seconds(c, 1.0), classifier_step_seconds(c, 0.1)
    step_ratio[c] = sampled / full
    print(f"{c:>10,}{full * 1e3:>12.1f}{sampled * 1e3:>18.1f}{sampled / full:>8.2f}")

# %% [markdown]
# ## What the numbers say

# %%
most, fewest = max(class_counts), min(class_counts)
cos_r10, nce_r10 = runs[mixer_row]["recall@10"], runs[ROWS["infonce"].label]["recall@10"]
n_test = runs[mixer_row]["queries"]
seeds = (0, 1, 2)
small_r10 = {slug: [100 * m["recall@10"] for m in recorded_metrics("small", slug, seeds)]
             for slug in ("mixer", "infonce")}
small = {slug: np.mean(v) for slug, v in small_r10.items()}
small_std = {slug: np.std(v) for slug, v in small_r10.items()}
log = read_metrics(health["this recipe"]["run"])
vals = [x["val_recall@10"] for x in log if "val_recall@10" in x]
steps = [x for x in log if "cos_own" in x]
claim("samples move towards their own centre", steps[-1]["cos_own"] > steps[0]["cos_own"] + 0.05,
      first=steps[0]["cos_own"], last=steps[-1]["cos_own"])
claim("while the other centres stay orthogonal and the embeddings do not collapse",
      abs(steps[-1]["cos_other"]) < 0.05 and steps[-1]["cos_batch"] < 0.5,
      cos_other=steps[-1]["cos_other"], cos_batch=steps[-1]["cos_batch"])
claim("validation Recall@10 ends well above the initial weights'", vals[-1] > vals[0] + 0.05,
      start=vals[0], end=vals[-1])
val_text = (f"validation Recall@10 went from {vals[0]:.3f} at the initial weights to "
            f"{vals[-1]:.3f}")
Markdown(f"""
* Sampling 10% of the centres took {step_ratio[most]:.2f}x the full classifier step's time at
  {most:,} classes and {step_ratio[fewest]:.2f}x at {fewest:,} (this computer, one timing each,
  which a busy machine moves; `bench/README.md` measures time and memory side by side). The
  more classes, the more of the step is the centres, which sampling cuts.
* At the same number of images encoded, CosFace over the weak-label classes reaches test
  Recall@10 {cos_r10:.3f} and InfoNCE on the click pairs {nce_r10:.3f} (seed {seed},
  `{preset}`: one query is {1 / n_test:.4f}). On `small`, over seeds {seeds} (the committed
  records): {small['mixer']:.1f}% ± {small_std['mixer']:.1f} against
  {small['infonce']:.1f}% ± {small_std['infonce']:.1f}, the data where the claim is judged.
* The health curves: the mean cosine of a sample to its own centre rose from
  {steps[0]['cos_own']:.2f} to {steps[-1]['cos_own']:.2f} while other centres stayed near
  {steps[-1]['cos_other']:.2f}; {val_text}.
""")
