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
# # 05 · Retrieval, ablations and baselines
#
# **The paper's claim.** Docs are embedded offline into an ANN index; a query photo is embedded
# online and answered from the index. Each of Mixer's parts (separate transforms, concept
# fusion, classification on weak-label classes) should show up as better retrieval than the
# version without it.
#
# Every row below is the `tiny-cpu` preset with one override (`mixer_lite.experiments.ROWS`),
# trained on the same clicks and evaluated on the same test queries, whose products never
# appear in a training click. `make reproduce` runs the same rows over three seeds.

# %% tags=["parameters"]
import os

fast = os.environ.get("MIXER_LITE_FAST", "0") == "1"  # CI sets MIXER_LITE_FAST=1
preset = "tiny" if fast else "small"
seed = 0
rows = ["Mixer (concept fusion, CosFace)", "shared transform (no domain split)",
        "image-only docs", "text-only docs", "concat fusion", "InfoNCE on click pairs"]
if not fast:  # left out of CI's fast mode for time (notebook 03 examines class construction)
    rows += ["ArcFace", "triplet on click pairs", "raw clicks as labels"]

# %%
if fast:
    os.environ["TQDM_DISABLE"] = "1"
import numpy as np
import torch
from mixer_lite.dataset import ImageTable, image_paths, load_dataset
from mixer_lite.experiments import ensure_data, ensure_row
from mixer_lite.retrieval import (build_index, embed_docs, embed_queries, evaluate_raw_pixels,
                                  judged_query_rows, load_run_model, relevance, search)
from mixer_lite.viz import bars, recall_curves, search_grid

torch.set_num_threads(2)
data_dir = ensure_data(preset, seed)
data = load_dataset(data_dir, check_images=False)

# %%
# NBVAL_CHECK_OUTPUT
results = {row: ensure_row(data_dir, preset, row, seed) for row in rows}
results["raw pixels (no learning)"] = evaluate_raw_pixels(data)
print(f"{'model':<36}{'R@1':>7}{'R@10':>7}{'mAP@10':>8}")
for name, r in results.items():
    print(f"{name:<36}{r['recall@1']:>7.3f}{r['recall@10']:>7.3f}{r['map@10']:>8.3f}")

# %%
fig = recall_curves({n: r["recall_curve"] for n, r in results.items()},
                    title=f"Recall@K, SynthShop {preset} test queries (seed {seed})")

# %% [markdown]
# *Figure: Recall@K (K = 1..50, log scale) of Mixer, its ablations and the baselines.*

# %%
fig = bars({n: r["recall@10"] * 100 for n, r in results.items()},
           xlabel="Recall@10 (% of test queries)", title="Recall@10 per model (one seed)")

# %% [markdown]
# *Figure: the same Recall@10 as bars, one seed; the README's table has three seeds.*
#
# ## The search path
# Offline: embed every doc and build a FAISS index. Online: embed a query photo and search.

# %%
model = load_run_model(results[rows[0]]["run"])
doc_images = ImageTable(image_paths(data, "docs"), model.cfg.image_size)
index = build_index(embed_docs(model, doc_images, data.doc_texts, progress=False), "flat")
q_rows = judged_query_rows(data)[:4]
q_images = ImageTable(image_paths(data, "queries", q_rows), model.cfg.image_size)[np.arange(4)]
_, hits = search(index, embed_queries(model, q_images, progress=False), 5)
fig = search_grid(q_images.numpy(), doc_images, hits, relevance(data, q_rows))

# %% [markdown]
# *Figure: four test query photos (left) and the top five docs the index returns; a green
# frame marks a doc of the query's product.*
#
# ## What the numbers say
# Read the table row by row against the Mixer row: a part of the method is supported where
# removing it lowers recall by more than the spread across seeds (the README's three-seed
# table). In the committed run (fast mode, SynthShop tiny, seed 0; 144 test queries, so one
# query is 0.007), no part is:
# * **Separate transforms**: Mixer 0.042 vs shared 0.049 Recall@10 (three seeds: 2.8% vs
#   5.6%), although notebook 01 shows the separate transforms do bring the two domains'
#   embeddings together.
# * **Concept fusion** 0.042 vs image-only 0.097, text-only 0.028 and concat 0.097: fusion
#   ranks below both image-only and concat (notebook 02 shows why: the title lets a doc be
#   classified without its image, the side a query photo must match).
# * **Classification vs InfoNCE** at the same images encoded: 0.042 vs 0.035 (notebook 04);
#   on small, InfoNCE is far ahead (README's table).
# * Mixer is only just above raw pixels (0.021) here, and over three seeds no better than its
#   own untrained weights (README). With the earlier ViT preset this ranking was reversed,
#   Mixer first: on `tiny` the ranking rests on a few queries. These are our measurements, not
#   the paper's numbers; `small` (README, "Training") is where they are firmer.
