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
# # 00 · A pretrained image backbone, made from real drawings
#
# **Why.** Mixer fine-tunes image backbones that were pretrained on large image sets, as every
# strong image-retrieval result does. A shop with a few thousand products, or a student with
# `small`, has far too few photos to learn what objects look like from scratch. An offline
# install cannot download ImageNet weights, so mixer-lite makes its own and ships them in
# `mixer_lite/weights/` (the `tiny-cpu` preset loads them: `--model.image_weights=openclipart-cnn`;
# `none` trains from scratch).
#
# **How** (our choice; the paper says nothing about pretraining; `mixer_lite/pretrain.py`):
# the corpus is Debian's `openclipart-png` (public-domain drawings by many artists, installed by
# name, never SynthShop images). Each drawing is cut out along its alpha channel and rendered as a
# shop would see it: a seller's studio shot and a user's photo (clutter, rotation, perspective,
# occlusion, colour cast, blur, noise). The encoder learns to find each photo's own drawing among
# the studio shots of a batch with **InfoNCE**: for a batch of B pairs, the loss is the
# cross-entropy of picking the right studio view among the B, with logits the cosines divided
# by a temperature (a contrastive loss, as in CLIP). One command rebuilds the weights:
#
# ```
# apt-get install openclipart-png
# mixer-lite pretrain --corpus /usr/share/openclipart/png --out weights.pt
# ```
#
# This notebook reads the shipped weights' card, then asks what the backbone knows about SynthShop
# photos **before any fine-tuning**, against the same network at random initialisation.

# %% tags=["parameters"]
import os

fast = os.environ.get("MIXER_LITE_FAST", "0") == "1"  # CI sets MIXER_LITE_FAST=1
preset = "tiny" if fast else "small"  # SynthShop size
seed = 0
n_train = 1000 if fast else 3000  # query photos of training products that fit the probes
rows = ["mixer"]  # the runs this notebook reads (slugs of mixer_lite.ablations.ROWS)

# %%
if fast:
    os.environ["TQDM_DISABLE"] = "1"  # quiet progress bars in CI
from IPython.display import Markdown, display
from mixer_lite.notebooks import made_with
display(Markdown(made_with(preset, fast, seed)))
import torch
from mixer_lite.measures import backbone_probe, claim, image_encoder_from
from mixer_lite.weights import weights_card
from mixer_lite.runcache import ensure_data, ensure_row
from mixer_lite.runs import load_run_model
from mixer_lite.viz import pretraining_curves

torch.set_num_threads(2)  # fixed, so printed metrics are the same on every run
card = weights_card("openclipart-cnn")
c = card["corpus"]
print(f"corpus: {c['objects']:,} drawings used of {c['images_found']:,} found; skipped {c['skipped']}")
print(f"method: {card['method']}")
print(f"{card['steps']:,} steps in {card['train_seconds'] / 60:.0f} min on {card['device']}; "
      f"held-out Recall@1 {card['probe_recall@1']['initial']:.3f} -> {card['probe_recall@1']['final']:.3f}")
fig = pretraining_curves(card)

# %% [markdown]
# *Figure: left, the InfoNCE loss of the pretraining run; right, how often a held-out drawing's
# photo view finds its own studio view among all held-out drawings with the frozen features
# (these drawings never trained). Both come from the card stored inside the weights file.*
#
# ## What the backbone knows of SynthShop before fine-tuning
# Three image encoders of the same architecture, each frozen:
#
# * **random init**: the `cnn` as a from-scratch run starts;
# * **pretrained**: the shipped weights, as a `tiny-cpu` run starts;
# * **pretrained + fine-tuned**: the encoder of the Mixer model trained on this data
#   (notebooks 01 and 05 use the same run).
#
# For each:
#
# * **linear probes** for the product's **category** and **colour**: a logistic-regression
#   classifier trained on the frozen features of query photos of training products, scored on
#   photos of products no training photo shows. Its accuracy says what the features already
#   encode in a form a single linear layer can read;
# * **photo-to-doc Recall@10**: the share of test photos whose product has a doc among the 10
#   docs nearest in cosine, with the raw pooled features (no transform, no text);
# * the **domain probe** of notebook 01: a linear probe that tells query photos from shop
#   images (0.5: indistinguishable, 1.0: fully separable).

# %%
data_dir = ensure_data(preset, seed)
mixer = ensure_row(data_dir, preset, "mixer", seed)
encoders = {"random init": image_encoder_from("none", seed),
            "pretrained": image_encoder_from("openclipart-cnn"),
            "pretrained + fine-tuned": load_run_model(mixer["run"]).image_encoder}
probe = {name: backbone_probe(enc, data_dir, n_train, seed) for name, enc in encoders.items()}
print(f"{'encoder':<26}{'category':>10}{'colour':>9}{'R@10':>8}{'domain probe':>14}")
for name, p in probe.items():
    print(f"{name:<26}{p['category']:>10.3f}{p['colour']:>9.3f}"
          f"{p['photo_to_doc_recall@10']:>8.3f}{p['domain_probe']:>14.2f}")
print(f"(probes fitted on {p['fit_photos']} photos of training products, scored on "
      f"{p['eval_photos']} photos of test products)")

# %% [markdown]
# ## What the numbers say
# Checked when the notebook runs, with margins for the spread between CPUs.

# %%
scratch, pre, tuned = (probe[k] for k in encoders)
claim("pretraining teaches the category of an unseen product's photo",
      pre["category"] > scratch["category"] + 0.05,
      pretrained=pre["category"], random=scratch["category"])
claim("frozen pretrained features already retrieve better than random ones",
      pre["photo_to_doc_recall@10"] > scratch["photo_to_doc_recall@10"],
      pretrained=pre["photo_to_doc_recall@10"], random=scratch["photo_to_doc_recall@10"])
Markdown(f"""
* Before any SynthShop photo, the pretrained encoder's features tell the category of a product
  it never saw {pre['category']:.0%} of the time, against {scratch['category']:.0%} at random
  init (chance 1/12); colour {pre['colour']:.0%} against {scratch['colour']:.0%}.
* Frozen, with no transform and no text, its features put a photo's own product among the top 10
  docs for {pre['photo_to_doc_recall@10']:.1%} of test photos ({scratch['photo_to_doc_recall@10']:.1%}
  at random init).
* The domain probe: {scratch['domain_probe']:.2f} (random), {pre['domain_probe']:.2f}
  (pretrained), {tuned['domain_probe']:.2f} (fine-tuned): the shared encoder keeps the two domains
  apart; the query and doc transforms after it close the gap (notebook 01).
* What the backbone buys in retrieval after fine-tuning is in the README's reproduction table
  (the Mixer row against the "encoder from scratch" row).
""")

# %% [markdown]
# ## On real drawings: the icons dataset
# SynthShop's photos come from our own generator, and the pretraining views above were rendered
# by SynthShop's own studio and photo functions. So the backbone may know SynthShop's renderer
# rather than images. The second built-in dataset (`data/README.md`, built by `make
# data-icons`) is made of real drawings by the designers of 18 open icon sets. A **concept** is
# a name that several sets drew. A **doc** is one set's drawing, titled with that set's own
# name and tags. A **query photo** is another set's drawing of the concept, made photo-like by a
# perturbation written for drawings, not SynthShop's. Concepts are split into training and test
# concepts, and no click touches a test concept.

# %%
from IPython.display import Image as Picture
from mixer_lite.runcache import repo_root

Picture(filename=str(repo_root() / "docs" / "icons_concepts.png"), width=900)

# %% [markdown]
# *Figure: four concepts drawn at random, one per row. Each row shows a doc or two, with their
# titles, then photos of other sets' drawings of the same concept. Only sets whose licences
# ask no more than attribution are shown (Tabler, Lucide, Bootstrap, Phosphor, Iconoir,
# Feather, Ionicons, Octicons: `MIT` or `ISC`; Remix and Material Design Icons: `Apache-2.0`;
# Font Awesome Free: `CC-BY-4.0`; Tango: public domain). Made by `python -m mixer_lite.icons
# --examples data/icons 4 0 docs/icons_concepts.png`.*
#
# ## What the backbone buys on each dataset
# The committed records of `make reproduce` (`PRESET=small` and `PRESET=icons`) and of
# `bench/backbone_transfer.py` (the `designers-cnn` backbone, pretrained across the icon sets'
# designers with the icons dataset's concepts left out) give every row's test Recall@10. The
# figure reads them, whatever data this notebook ran on.

# %%
import numpy as np
from mixer_lite.reproduce import read_record, recorded_metrics, records_dir
from mixer_lite.viz import seed_bars

seeds = (0, 1, 2)


def recall10(preset, slug, seeds=seeds):
    return [m["recall@10"] * 100 for m in recorded_metrics(preset, slug, seeds)]


def floor10(preset, name):
    return [read_record(records_dir(preset) / f"{preset}-{name}.json")["metrics"]["recall@10"]
            * 100]


PRE, FROZEN = "Mixer, shipped backbone", "shipped backbone, frozen (no training)"
SCRATCH, RANDOM = "Mixer from scratch (scratch-cpu)", "Mixer, random weights (tiny-cpu)"
DESIGNERS = "Mixer, designers-cnn backbone"
transfer = [read_record(repo_root() / "results" / "transfer" / f"icons-designers-cnn-s{s}.json")
            for s in seeds]
gains = {
    "SynthShop small": {PRE: recall10("small", "mixer"), SCRATCH: recall10("small", "scratch"),
                        FROZEN: floor10("small", "frozen_backbone")},
    "icons (real drawings)": {
        PRE: recall10("icons", "mixer"), SCRATCH + ", seed 0": recall10("icons", "scratch", (0,)),
        FROZEN: floor10("icons", "frozen_backbone"), RANDOM: recall10("icons", "random_weights"),
        DESIGNERS: [t["metrics"]["recall@10"] * 100 for t in transfer]},
}
fig = seed_bars(gains, xlabel="test Recall@10 (% of test photos)",
                title="Fine-tuned from the shipped backbone, from scratch, and frozen (records)")

# %% [markdown]
# *Figure: test Recall@10 on each dataset, a bar at the mean of the seeds recorded and a dot per
# seed; both panels share one axis from 0.*

# %%
small, icons = ({row: float(np.mean(v)) for row, v in rows.items()} for rows in gains.values())
over_scratch = {"small": small[PRE] - small[SCRATCH],
                "icons": icons[PRE] - icons[SCRATCH + ", seed 0"]}
over_random = icons[PRE] - icons[RANDOM]
claim("the shipped backbone is worth more than 5 points over random weights on real drawings",
      over_random > 5, pretrained=icons[PRE], random=icons[RANDOM])
claim("its gain over the from-scratch recipe is several times smaller on real drawings",
      over_scratch["icons"] < over_scratch["small"] / 3, **over_scratch)
claim("pretraining across designers fine-tunes better on real drawings",
      icons[DESIGNERS] > icons[PRE] + 3, designers=icons[DESIGNERS], shipped=icons[PRE])
Markdown(f"""
* **The backbone helps on both datasets, much less on real drawings.** On SynthShop `small`,
  Mixer fine-tuned from the shipped backbone is {over_scratch['small']:.1f} points above the
  recipe made for random weights (`scratch-cpu`), over three seeds each. On the icons dataset
  its mean is {over_scratch['icons']:.1f} points above that recipe's one seed, and
  {over_random:.1f} points above the `tiny-cpu` recipe started from random weights (a recipe
  made for a pretrained start).
* **Frozen, its features know less of real drawings**: {icons[FROZEN]:.1f}% of the icons
  dataset's test photos find their concept in the top 10, against {small[FROZEN]:.1f}% on
  SynthShop. Part of what it knows of SynthShop is
  SynthShop's renderer, whose views it was pretrained on.
* **A backbone pretrained across designers** (`designers-cnn`: two icon sets' drawings of one
  name as a positive pair, the dataset's concepts left out) reaches
  {icons[DESIGNERS]:.1f} on the icons dataset. It stays out of `tiny-cpu`:
  the pairs teach it to ignore colour, which tells SynthShop's products apart
  (`docs/EXPERIMENTS.md`, "A backbone pretrained across designers").
""")
