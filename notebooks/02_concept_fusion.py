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
#
# The next cells train three runs unless `runs/experiments/` holds them (the preset, image-only
# docs, softmax attention): about 5 to 10 minutes each on `small` with 2 cores.

# %% tags=["parameters"]
import os

fast = os.environ.get("MIXER_LITE_FAST", "0") == "1"  # CI sets MIXER_LITE_FAST=1
preset = "tiny" if fast else "small"
seed = 0
rows = ["mixer", "image_only", "softmax_attention"]  # slugs of mixer_lite.ablations.ROWS
lift_goal, correlation_goal = 1.5, 0.5  # what we call attention that means something

# %%
if fast:
    os.environ["TQDM_DISABLE"] = "1"
from IPython.display import Markdown, display
from mixer_lite.notebooks import attention_viewer, made_with, show_code
display(Markdown(made_with(preset, fast, seed)))
import numpy as np
import torch
import matplotlib.pyplot as plt
from mixer_lite.dataset import ImageTable, image_files, load_dataset, load_images
from mixer_lite.measures import (attention_of_docs, attention_on_objects, claim, doc_attention,
                                 doc_image_weights, pair_cosines, variant_pairs)
from mixer_lite.model import ConceptFusion, ConceptImageAttention, ConceptMemory
from mixer_lite.reproduce import recorded_metrics
from mixer_lite.retrieval import embed_docs
from mixer_lite.runcache import ensure_data, ensure_row
from mixer_lite.runs import load_run_model
from mixer_lite.viz import concept_attention, concept_map_change

torch.set_num_threads(2)
data_dir = ensure_data(preset, seed)
data = load_dataset(data_dir, check_images=False)
mixer = ensure_row(data_dir, preset, "mixer", seed)
image_only = ensure_row(data_dir, preset, "image_only", seed)
softmax_row = ensure_row(data_dir, preset, "softmax_attention", seed)
model = load_run_model(mixer["run"])

# %% [markdown]
# ## The code: concepts read the title, then look at the image
# The memory's K slots each attend over the title's tokens (softmax over tokens: which words
# this concept reads) and add what they read to themselves:

# %%
show_code(ConceptMemory.forward)

# %% [markdown]
# Each concept then attends over the image's regions. With scaled cosine attention the weight
# of region j for concept i is softmax_j(t · cos(q_i, k_j)), t a learned temperature:

# %%
show_code(ConceptImageAttention.weights, ConceptImageAttention.forward, ConceptFusion.forward)

# %% [markdown]
# `seen` is what each concept found in the image; with the preset's `concept_text=none` the
# concept's own text vector is not added back, so the title chooses *where* to look and the
# doc vector is built from image content a photo can match. The gate, a sigmoid of
# [image vector; fused vector] per dimension, mixes the image's pooled vector with the fused one.
#
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
# ## Edit the title, watch the maps move
# The title decides where the concepts look. Below, a doc image under its own title and under
# the title of a doc of another category: the concept whose map moved most, and the share of
# its weight that moved (half the summed absolute change; 0% = unchanged, 100% = all of it).

# %%
viewer_rows = [data.doc_row[data.qrels[i]["doc_ids"][0]] for i in range(12)]
category = data.column("docs", "category")
row = viewer_rows[0]
other = next(r for r in viewer_rows if category[r] != category[row])
own, swapped = data.doc_texts[row], data.doc_texts[other]
images = load_images(data, "docs", [row, row], model.cfg.image_size)
maps = attention_of_docs(model, images, [own, swapped])["info"]["text_to_image"].float().numpy()
moved = 0.5 * np.abs(maps[1] - maps[0]).sum(-1)  # per concept: share of its weight that moved
k = int(moved.argmax())
fig = concept_map_change(images[0], maps[0, k], maps[1, k],
                         (f"own title: {own}", f"another doc's title: {swapped}"), k)
print("weight moved per concept: " + ", ".join(f"{m:.0%}" for m in moved))

# %% [markdown]
# *Figure: one concept's attention over the doc image under its own title (left) and under
# another category's title (middle), and the change (right).* When the notebook runs in
# Jupyter, the viewer below lets you choose the doc and the concept and type any title; a page
# without a kernel shows only the figure above.

# %%
attention_viewer(model, data, viewer_rows, start_title=swapped)

# %% [markdown]
# ## Does the attention mean something?
# SynthShop's generator knows where the object is in every doc image, so two numbers can say
# what the maps show, over 256 docs: the **object lift**, the attention mass inside the object
# divided by the object's share of the image (1.0 = attention blind to the object, above 1 =
# looks at it), and the **concept correlation**, the mean correlation between two concepts'
# maps of one doc (1.0 = every concept looks at the same place). Our goals (`lift_goal`,
# `correlation_goal` above) ask for clearly more than blind and for concepts that look at
# different places. Measured for the preset (scaled cosine) and for the same model with the
# textbook softmax attention.

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
ax.hist(weights, bins=np.linspace(0, 1, 51), color="tab:blue")
ax.set(xlim=(0, 1), xlabel="image weight (mean gate; 1 = image only, 0 = text only)",
       ylabel="docs", title="Learned image-vs-text weighting across all docs")
print(f"image weight: mean {weights.mean():.2f}, 5%-95% range "
      f"{np.quantile(weights, 0.05):.2f}-{np.quantile(weights, 0.95):.2f}")

# %% [markdown]
# *Figure: distribution of the image weight over every doc of the dataset, on the gate's whole
# range (0 to 1), so a gate that does not vary between docs shows as one narrow bar.*
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
    images = ImageTable(image_files(data, "docs"), m.cfg.image_size)
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
goal = "meets" if cos["object_lift"] >= lift_goal else "falls short of"
corr_goal = "below" if cos["concept_correlation"] < correlation_goal else "not yet below"
gate_spread = np.quantile(weights, 0.95) - np.quantile(weights, 0.05)
gate_reading = ("it barely varies between docs, so it weighs image against text the same way "
                "for every doc" if gate_spread < 0.1 else
                "it varies between docs: some rely on their image more than others")
seeds = (0, 1, 2)  # the committed records of `small` (make reproduce), whatever preset runs here
small = {slug: recorded_metrics("small", slug, seeds) for slug in ("mixer", "image_only")}
mean = {slug: {k: 100 * np.mean([m[k] for m in ms]) for k in ("recall@1", "recall@10", "map@10")}
        | {"val": 100 * np.mean([m["validation"]["val_recall@10"] for m in ms])}
        for slug, ms in small.items()}
Markdown(f"""
* **Attention**: with scaled cosine the concepts put {cos['object_lift']:.2f}x the object's
  share of the image on the object (1.0 would be blind to it; softmax attention
  {soft['object_lift']:.2f}x), which {goal} our goal of {lift_goal}, and two concepts of a doc
  correlate at {cos['concept_correlation']:.2f} (softmax {soft['concept_correlation']:.2f};
  1.0 = all look at the same place), {corr_goal} the goal of {correlation_goal}
  (`docs/EXPERIMENTS.md` has both over three seeds). Retrieval: test Recall@10
  {fused_r10:.3f} against {softmax_row['recall@10']:.3f} with softmax attention here (seed
  {seed}).
* **Text and variants**: the fused model separates a product's variants from its own other
  sellers by a cosine gap of {variant_gap['concept fusion']:.2f}, the image-only model by
  {variant_gap['image only']:.2f}. In this recipe the concepts carry no text content into the
  doc vector (`docs/EXPERIMENTS.md`): the title decides *where* the model looks, so brand and
  material, which only the title names, separate variants only as far as the image shows them.
* **Retrieval**: test Recall@10 {fused_r10:.3f} with concept fusion against {image_r10:.3f}
  with image-only docs (seed {seed}, `{preset}`). On `small`, over seeds {seeds} (the committed
  records), test Recall@10 is {mean['mixer']['recall@10']:.1f}% against
  {mean['image_only']['recall@10']:.1f}% and validation {mean['mixer']['val']:.1f}% against
  {mean['image_only']['val']:.1f}%; Recall@1 {mean['mixer']['recall@1']:.1f}% against
  {mean['image_only']['recall@1']:.1f}%. Level within the spread between seeds: the paper's
  fusion claim is not shown on SynthShop, whose doc images show one product on a plain
  background, so there is nothing for the title to choose; the fused vector is a second,
  attention-weighted look at the doc image (`docs/EXPERIMENTS.md`, "Scene docs", follows the
  claim onto doc images that show more than the product).
* **The gate**: the image weight averages {weights.mean():.2f} (5-95% range
  {np.quantile(weights, 0.05):.2f}-{np.quantile(weights, 0.95):.2f}): {gate_reading}.
""")
