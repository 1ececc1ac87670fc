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
# # 02 · Concept-aware modality fusion
#
# **The paper's claim.** A shop doc has an image *and* a title, and the two are not equally
# informative: the title names brand and material that the picture barely shows, while the
# picture shows shape and colour that titles often omit. Mixer extracts high-level
# **concepts** from the title with an **external learnable memory** (K slots that read the
# tokens) and fuses them into the image through **text-to-image attention**, with a learned
# weighting of image against text.
#
# In `mixer_lite/model.py`: `ConceptMemory` (slots read the title), `ConceptFusion` (each
# concept attends over the image regions, the encoder's 8x8 output grid; a per-dimension gate
# weighs image against fused text). Here we open a trained model and look at what it does.
#
# **Our choice where the paper is silent: how a concept attends.** The textbook form,
# softmax(q·k/√d) over the regions, trained into maps that are flat: every concept spread its
# weight evenly over the image, the fused vector became one more average of the image, and
# nothing a reviewer could read came out of it. The preset uses *scaled cosine* attention
# (`--model.concept_attention=cosine`): the score is the cosine of concept and region times a
# learned temperature that starts at 10, so maps are sharp from the first step whatever the
# features' norms. Below, the same model with the textbook form is measured beside it.

# %% tags=["parameters"]
import os

fast = os.environ.get("MIXER_LITE_FAST", "0") == "1"  # CI sets MIXER_LITE_FAST=1
preset = "tiny" if fast else "small"
seed = 0

# %%
if fast:
    os.environ["TQDM_DISABLE"] = "1"
import numpy as np
import torch
import matplotlib.pyplot as plt
from mixer_lite.dataset import ImageTable, image_paths, load_dataset
from IPython.display import Markdown
from mixer_lite.measures import (attention_on_objects, claim, doc_attention, doc_image_weights,
                                 pair_cosines, variant_pairs)
from mixer_lite.retrieval import embed_docs
from mixer_lite.runcache import ensure_data, ensure_row
from mixer_lite.runs import load_run_model
from mixer_lite.viz import concept_attention

torch.set_num_threads(2)
data_dir = ensure_data(preset, seed)
data = load_dataset(data_dir, check_images=False)
mixer = ensure_row(data_dir, preset, "mixer", seed)
image_only = ensure_row(data_dir, preset, "image_only", seed)
softmax_row = ensure_row(data_dir, preset, "softmax_attention", seed)
model = load_run_model(mixer["run"])

# %% [markdown]
# ## Where each concept looks
# Docs of products never seen in training. Each row: the doc image with its title, then one
# heatmap per concept over the image, titled with the tokens that concept read most.

# %%
shown = doc_attention(model, data, n_docs=3, seed=seed)
fig = concept_attention(shown["images"], shown["info"], shown["token_strings"], n_docs=3,
                        titles=shown["titles"])

# %% [markdown]
# *Figure: text-to-image attention of each concept over the 8x8 grid of image regions (one
# colour scale for all panels, bar on the right); the concept's three most-read title tokens
# are in each panel's title.*
#
# ## Does the attention mean something?
# SynthShop's generator knows where the object is in every doc image, so two numbers can say
# what the maps show, over 256 docs: the **object lift**, the attention mass inside the object
# divided by the object's share of the image (1.0 = attention blind to the object, above 1 =
# looks at it), and the **concept correlation**, the mean correlation between two concepts'
# maps of one doc (1.0 = every concept looks at the same place). Our goals: a lift of at least
# 1.5 and a correlation below 0.5. Measured for the preset (scaled cosine) and for the same
# model with the textbook softmax attention.

# %%
attention = {}
print(f"{'attention':<24}{'object lift':>12}{'concept correlation':>21}{'test Recall@10':>16}")
for name, r, m in (("scaled cosine (preset)", mixer, model),
                   ("softmax", softmax_row, load_run_model(softmax_row["run"]))):
    a = attention[name] = attention_on_objects(m, data, data_dir, n_docs=256, seed=seed)
    print(f"{name:<24}{a['object_lift']:>12.2f}{a['concept_correlation']:>21.2f}"
          f"{r['recall@10']:>16.3f}")
print(f"the object covers {a['object_share']:.0%} of a doc image")

# %% [markdown]
# ## How much each doc relies on its image
# The gate's mean is the doc's "image weight" (1 = image only, 0 = fused text only).

# %%
weights = doc_image_weights(model, data)
fig, ax = plt.subplots(figsize=(6.4, 3.6))
ax.hist(weights, bins=40, color="tab:blue")
ax.set(xlabel="image weight (mean gate; 1 = image only)", ylabel="docs",
       title="Learned image-vs-text weighting across all docs")
print(f"image weight: mean {weights.mean():.2f}, 5%-95% range "
      f"{np.quantile(weights, 0.05):.2f}-{np.quantile(weights, 0.95):.2f}")

# %% [markdown]
# *Figure: distribution of the image weight over every doc of the dataset.*
#
# ## Where text decides
# SynthShop has **variants**: products of the same design (same shape, colour and pattern)
# sold under another brand or material. Their images differ only by a small brand mark; their
# titles differ in words. A doc embedding that uses the text should push variants apart while
# keeping two sellers of the *same* product together. We compare the cosine of such pairs for
# the fused model and the image-only ablation.

# %%
pairs = variant_pairs(data, data_dir, seed=seed)
variant_gap = {}
for name, r in (("concept fusion", mixer), ("image only", image_only)):
    m = load_run_model(r["run"])
    images = ImageTable(image_paths(data, "docs"), m.cfg.image_size)
    emb = embed_docs(m, images, data.doc_texts, progress=False)
    same, var = (pair_cosines(emb, pairs[k]).mean() for k in ("same_product", "variant"))
    variant_gap[name] = same - var
    print(f"{name:<15} same product {same:.2f}  variant {var:.2f}  gap {same - var:.2f}  "
          f"(test Recall@10 {r['recall@10']:.2f})")

# %% [markdown]
# ## What the numbers say

# %%
fused_r10, image_r10 = mixer["recall@10"], image_only["recall@10"]
cos, soft = attention["scaled cosine (preset)"], attention["softmax"]
claim("scaled cosine attention puts more of its weight on the object than softmax attention",
      cos["object_lift"] > soft["object_lift"] + 0.2,
      cosine=cos["object_lift"], softmax=soft["object_lift"])
# Judged on `small` only: in `tiny`'s short run (300 products) the concepts of either
# attention stay alike; on `small` they separate on every seed (docs/EXPERIMENTS.md).
if not fast:
    claim("and its concepts look at more different places than softmax attention's",
          cos["concept_correlation"] < soft["concept_correlation"] - 0.2,
          cosine=cos["concept_correlation"], softmax=soft["concept_correlation"])
goal = "meets" if cos["object_lift"] >= 1.5 else "falls short of"
corr_goal = "below" if cos["concept_correlation"] < 0.5 else "not yet below"
Markdown(f"""
* **Attention**: with scaled cosine the concepts put {cos['object_lift']:.2f}x the object's
  share of the image on the object (1.0 would be blind to it; softmax attention
  {soft['object_lift']:.2f}x), which {goal} the goal of 1.5, and two concepts of a doc
  correlate at {cos['concept_correlation']:.2f} (softmax {soft['concept_correlation']:.2f};
  1.0 = all look at the same place), {corr_goal} the goal of 0.5. On `small`, three seeds of
  the preset: lift 1.54 on each, correlation 0.15-0.23
  (`docs/EXPERIMENTS.md`). Retrieval: test Recall@10 {fused_r10:.3f} against
  {softmax_row['recall@10']:.3f} with softmax attention here (seed {seed}); on `small`'s
  validation photos sharp maps cost 1.6 and 3.7 points of Recall@10 on two seeds.
* **Text and variants**: the fused model separates a product's variants from its own other
  sellers by a cosine gap of {variant_gap['concept fusion']:.2f}, the image-only model by
  {variant_gap['image only']:.2f}. In this recipe the concepts carry no text content into the
  doc vector (`docs/EXPERIMENTS.md`): the title decides *where* the model looks, so brand and
  material, which only the title names, separate variants only as far as the image shows them.
* **Retrieval**: test Recall@10 {fused_r10:.3f} with concept fusion against {image_r10:.3f}
  with image-only docs (seed {seed}, `{preset}`). On `small`, over three seeds, the two are
  level: test Recall@10 53.7 against 53.4, validation 48.1 against 47.9, image-only 2 points
  above on Recall@1 and mAP@10. The paper's fusion claim is not shown there. The measured
  reason: the fused concepts carry no text content (with it, validation Recall@10 was 2.8x
  lower; a learned share of it stays at zero), so the fused vector is a second,
  attention-weighted look at the doc image (README, `docs/EXPERIMENTS.md`).
* **The gate**: the image weight averages {weights.mean():.2f} (5-95% range
  {np.quantile(weights, 0.05):.2f}-{np.quantile(weights, 0.95):.2f}).
""")
