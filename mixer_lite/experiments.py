"""Experiments shared by the notebooks and ``make reproduce``: cached runs, backbone probes,
domain-gap measures.

The notebooks explain and plot; what they compute lives here, with tests.  Runs are cached by
name under one folder, so notebook 05 reuses the model notebook 01 trained, and a second
execution of a notebook retrains nothing (training is deterministic, so a cached run equals a
fresh one).

Reproduction rows (:data:`ROWS`) are the paper's claims, each a training override of the
``tiny-cpu`` preset on the same data and clicks:

* the shipped pretrained image encoder vs the same encoder from scratch;
* separate vs shared transforms (domain gap);
* concept fusion vs image-only, text-only and concat fusion;
* classification (CosFace, ArcFace, sampled centres) vs InfoNCE and triplet on the same clicks;
* weak-label classes vs raw clicks as labels.

Classification and the pairwise losses are compared at the **same number of images encoded**
(our choice; the paper states no budget).  A classification step encodes ``batch_size``
samples, a pairwise step ``batch_size`` photos *and* their clicked docs, so a pairwise row
trains half the steps of the Mixer row on the same data (:func:`row_overrides`); the raw-clicks
row, one sample per click, trains as many steps as the Mixer row.  Equal epochs would give the
pairwise rows 4.6x and the raw-clicks row 2.0x the Mixer row's images on SynthShop ``small``,
since an epoch of clicks is longer than an epoch of capped class samples.  The one row that
names its own budget is the encoder from scratch (:data:`FROM_SCRATCH`): 21 epochs at 32 px,
which its random encoder needs more than pixels (``docs/EXPERIMENTS.md``, item 15), at about
1.2x the Mixer row's training time.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageTable, image_paths, load_dataset
from .files import read_log
from .model import ModelConfig, build_image_encoder, load_image_weights, normalise_pixels
from .synthshop import load_truth, make_synthshop
from .train import (FROM_SCRATCH, PAIRWISE_LOSSES, EpochSampler, TrainConfig, build_model,
                    config_from, make_samples, refuse_other_run, total_steps, train)

# row -> (slug of its cached run folder, overrides of the tiny-cpu preset)
ROWS: dict[str, tuple[str, list[str]]] = {
    "Mixer (concept fusion, CosFace)": ("mixer", []),
    "Mixer, image encoder from scratch": ("scratch", list(FROM_SCRATCH)),
    "Mixer, softmax attention over regions": ("softmax_attention",
                                              ["--model.concept_attention=softmax"]),
    "shared transform (no domain split)": ("shared", ["--model.shared_transform=true"]),
    "image-only docs": ("image_only", ["--model.fusion=image_only"]),
    "text-only docs": ("text_only", ["--model.fusion=text_only"]),
    "concat fusion": ("concat", ["--model.fusion=concat"]),
    "ArcFace": ("arcface", ["--loss=arcface"]),
    "CosFace, centres sampled 0.1": ("sampled", ["--sample_rate=0.1"]),
    "InfoNCE on click pairs": ("infonce", ["--loss=infonce"]),
    "triplet on click pairs": ("triplet", ["--loss=triplet"]),
    "raw clicks as labels": ("raw_clicks", ["--labels=raw_clicks"]),
}
METRICS = ("recall@1", "recall@10", "map@10")

# The classification recipe, one change at a time on validation queries (docs/EXPERIMENTS.md):
# each step is (label, slug, the settings it varies).  Every step spells out *all* the varied
# settings, so its cached run means the same thing whatever the preset's defaults are now.
RECIPE_VARIED = {"centre_weight_decay": "5e-4", "model.concept_text": "residual",
                 "samples_per_class": "1", "clip_centres": "true", "margin_warmup_frac": "0",
                 "scale": "30", "model.image_weights": "none", "epochs": "3.5",
                 "model.concept_attention": "softmax", "augment": "false", "lr": "5e-4"}
_PRETRAINED = {"model.concept_text": "none", "model.image_weights": "openclipart-cnn"}
_COS20 = {**_PRETRAINED, "scale": "20", "model.concept_attention": "cosine"}
_AUG = {**_COS20, "augment": "true"}
_SCRATCH = {**_AUG, "model.image_weights": "none"}
RECIPE_STEPS: list[tuple[str, str, dict]] = [
    ("previous recipe", "prev", {}),
    ("no weight decay on the centres", "nowd", {"centre_weight_decay": "0"}),
    ("fused concepts keep no text content", "notext", {"model.concept_text": "none"}),
    ("class-balanced batches (K=4 per class)", "pk4",
     {"model.concept_text": "none", "samples_per_class": "4"}),
    ("clip the encoder's gradients only", "noclipc",
     {"model.concept_text": "none", "clip_centres": "false"}),
    ("margin warmed up over the first 10% of steps", "mwarm",
     {"model.concept_text": "none", "margin_warmup_frac": "0.1"}),
    ("the image encoder starts from the shipped pretrained weights", "pretrained", _PRETRAINED),
    ("concepts attend by scaled cosine", "cosine",
     {**_PRETRAINED, "model.concept_attention": "cosine"}),
    ("concepts compete for image regions (slot attention)", "slots",
     {**_PRETRAINED, "model.concept_attention": "slots"}),
    ("CosFace scale 20 instead of 30", "scale20", {**_PRETRAINED, "scale": "20"}),
    ("scale 20 and concepts attend by scaled cosine", "cos20", _COS20),
    ("cos20 with margin 0.2", "cos20m02", {**_COS20, "margin": "0.2"}),
    ("cos20 with margin 0.5", "cos20m05", {**_COS20, "margin": "0.5"}),
    ("cos20, fused concepts keep a learned share of the text (from 0)", "gated",
     {**_COS20, "model.concept_text": "gated"}),
    ("cos20 with flip-and-shift augmentation of both domains", "aug", _AUG),
    ("aug, twice the steps (7 epochs)", "long", {**_AUG, "epochs": "7"}),
    ("InfoNCE on click pairs without augmentation (its better setting), 434 steps",
     "infonce-long", {**_COS20, "loss": "infonce", "steps": "434"}),
    ("InfoNCE on click pairs without augmentation, twice the row's images (388 steps)",
     "infonce-2x", {**_COS20, "loss": "infonce", "steps": "388"}),
    # Not steps of the recipe: the encoder from scratch (the reproduction row), measured
    # against that row's seed-0 run.
    ("from scratch, lr 2e-3 instead of 5e-4", "scratch-lr2e3",
     {**_COS20, "model.image_weights": "none", "lr": "2e-3"}),
    ("from scratch, flip-and-shift augmentation", "scratch-aug",
     {**_COS20, "model.image_weights": "none", "augment": "true"}),
    ("from scratch, augmented, lr 2e-3", "scratch-aug-lr2e3", {**_SCRATCH, "lr": "2e-3"}),
    # Pixels against steps, at about the same training time (a 32-px step costs about a sixth
    # of a 64-px one, a 48-px step about half).
    ("from scratch, augmented, 48 px, 7 epochs", "scratch-48px-e7",
     {**_SCRATCH, "model.image_size": "48", "epochs": "7"}),
    ("from scratch, augmented, 32 px, 14 epochs", "scratch-32px-e14",
     {**_SCRATCH, "model.image_size": "32", "epochs": "14"}),
    ("from scratch, augmented, 32 px, 21 epochs (the scratch-cpu preset)", "scratch-32px-e21",
     {**_SCRATCH, "model.image_size": "32", "epochs": "21"}),
    ("pretrained, 32 px, 14 epochs", "pretrained-32px-e14",
     {**_AUG, "model.image_size": "32", "epochs": "14"}),
    ("pretrained, 32 px, 21 epochs", "pretrained-32px-e21",
     {**_AUG, "model.image_size": "32", "epochs": "21"}),
]
VALIDATION = ["--val_share=0.1", "--eval_at_end=false"]


def recipe_overrides(varied: dict, extra: list[str] = ()) -> list[str]:
    """The ``tiny-cpu`` overrides of one recipe step: validation on, test untouched."""
    settings = {**RECIPE_VARIED, **varied}
    return [*VALIDATION, *(f"--{k}={v}" for k, v in settings.items()), *extra]


def repo_root() -> Path:
    """The checkout's root, from the notebooks folder or the root itself."""
    here = Path.cwd()
    return here.parent if here.name == "notebooks" else here


def ensure_data(preset: str, seed: int = 0, root: str | Path | None = None) -> Path:
    """``data/synth-<preset>`` (generated once; every later call reads the same folder)."""
    out = Path(root or repo_root() / "data") / f"synth-{preset}"
    if not (out / "docs.jsonl").exists():
        make_synthshop(out, preset=preset, seed=seed, workers=min(2, os.cpu_count() or 1))
    return out


def ensure_run(data_dir: str | Path, name: str, overrides: list[str] = (),
               runs: str | Path | None = None) -> dict:
    """Train ``tiny-cpu`` with ``overrides`` into ``runs/experiments/<name>`` unless it is there already.

    Returns the run's evaluation (``eval.json``) plus ``run`` (its folder), ``seconds`` (the
    training time when it was trained) and ``steps``.  The whole resolved config a run was
    trained with is in its ``config.json`` (written by :func:`train`), so a run made with other
    overrides *or other defaults* (an older mixer-lite) is an error naming the differing keys,
    never silently reused.  A key an older ``config.json`` lacks counts as its default: a new
    option's default keeps the behaviour from before the option existed.
    """
    run = Path(runs or repo_root() / "runs" / "experiments") / name
    cfg = config_from("tiny-cpu", list(overrides))
    refuse_other_run(run, cfg, "delete it or choose another name")
    if not (run / ("eval.json" if cfg.eval_at_end else "model.pt")).exists():
        resume = (run / "checkpoints" / "last.pt").exists()
        t0 = time.time()
        train(data_dir, run, cfg, resume=resume, progress=False, preset="tiny-cpu")
        (run / "seconds.json").write_text(json.dumps(round(time.time() - t0, 1)))
    out = json.loads((run / "eval.json").read_text()) if cfg.eval_at_end else {}
    if (run / "val.json").exists():
        out["validation"] = json.loads((run / "val.json").read_text())
    out["run"] = str(run)
    out["seconds"] = json.loads((run / "seconds.json").read_text())
    out["steps"] = json.loads((run / "config.json").read_text())["steps"]
    return out


def claim(text: str, holds: bool, **values: float) -> str:
    """A notebook's claim, checked: raises AssertionError naming it when it does not hold.

    ``values`` are printed rounded to two decimals, so the printed line stays the same across
    CPUs whose last digits differ; the tolerance lives in the condition the caller states.
    """
    shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
    line = f"{text} ({shown})" if shown else text
    if not holds:
        raise AssertionError(f"claim does not hold: {line}")
    print(f"holds: {line}")
    return line


def read_metrics(run: str | Path) -> list[dict]:
    """The training log ``RUN/metrics.jsonl`` as a list of dicts."""
    return read_log(Path(run) / "metrics.jsonl")


# --------------------------------------------------------------------------------------------
# The pretrained backbone (notebook 00)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def pooled_features(encoder, images: ImageTable, batch_size: int = 256) -> np.ndarray:
    """The encoder's pooled vector of every image of ``images`` (eval mode, frozen)."""
    encoder.eval()
    out = [encoder(normalise_pixels(images[np.arange(lo, min(lo + batch_size, len(images)))]))[1]
           for lo in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def image_encoder_from(image_weights: str, seed: int = 0, vit_dim: int = 128):
    """A ``cnn`` image encoder with ``image_weights`` loaded (``"none"``: seeded random init)."""
    cfg = ModelConfig(image_encoder="cnn", vit_dim=vit_dim, image_weights=image_weights)
    torch.manual_seed(seed)
    encoder = build_image_encoder(cfg)
    load_image_weights(encoder, cfg)
    return encoder


def backbone_probe(encoder, data_dir: str | Path, n_train: int = 3000, seed: int = 0,
                   size: int = 64, split: str = "test") -> dict:
    """What a frozen image encoder knows of SynthShop before any fine-tuning.

    * ``category`` / ``colour``: accuracy of linear probes on the pooled features, fitted on
      ``n_train`` query photos of training products and scored on the photos of products
      none of those photos shows: the test products (``split="test"``), or, for choosing a
      pretraining recipe without reading the test photos, a tenth of the training products held
      out (``split="validation"``);
    * ``photo_to_doc_recall@10``: those photos searched among all docs by the cosine of the
      pooled features alone (no transform, no text); relevant are the docs of the same product;
    * ``domain_probe``: how well a linear probe tells those photos from doc images (0.5: not
      at all), as notebook 01 measures it.
    """
    from .retrieval import exact_search, ranking_metrics

    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    data = load_dataset(data_dir, check_images=False)
    truth = load_truth(data_dir)
    with open(Path(data_dir) / "_truth" / "products.jsonl") as f:
        products = {r["product_id"]: r for r in map(json.loads, f)}
    rng = np.random.default_rng(seed)
    product_of = np.array([truth[q] for q in data.query_ids])
    fit_rows, eval_rows = data.query_rows("train"), data.query_rows("test")
    if split == "validation":
        seen = np.unique(product_of[fit_rows])
        held = np.isin(product_of[fit_rows], rng.choice(seen, max(1, len(seen) // 10),
                                                         replace=False))
        fit_rows, eval_rows = fit_rows[~held], fit_rows[held]
    fit_rows = np.sort(rng.choice(fit_rows, min(n_train, len(fit_rows)), replace=False))
    feats = {name: pooled_features(encoder, ImageTable(image_paths(data, "queries", rows), size))
             for name, rows in (("fit", fit_rows), ("eval", eval_rows))}
    docs = pooled_features(encoder, ImageTable(image_paths(data, "docs"), size))
    out = {}
    for attr in ("category", "colour"):
        labels = {name: [products[product_of[r]][attr] for r in rows]
                  for name, rows in (("fit", fit_rows), ("eval", eval_rows))}
        out[attr] = linear_probe_accuracy(feats["fit"], labels["fit"], feats["eval"],
                                          labels["eval"])
    docs_of: dict[str, set[int]] = {}
    for row, d in enumerate(data.doc_ids):
        docs_of.setdefault(truth[d], set()).add(row)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    _, ranked = exact_search(unit(docs), unit(feats["eval"]), 10)
    out["photo_to_doc_recall@10"] = ranking_metrics(
        ranked, [docs_of[product_of[r]] for r in eval_rows], ks=(10,))["recall@10"]
    n = min(len(eval_rows), 500)
    d_rows = rng.choice(len(docs), n, replace=False)
    out["domain_probe"] = domain_probe_accuracy(np.concatenate([feats["eval"][:n], docs[d_rows]]),
                                                n, seed)
    out["fit_photos"], out["eval_photos"] = int(len(fit_rows)), int(len(eval_rows))
    return out


# --------------------------------------------------------------------------------------------
# Domain gap (notebook 01)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def domain_features(model, data, n: int = 400, seed: int = 0) -> dict[str, np.ndarray]:
    """Features of ``n`` test query photos and ``n`` docs at three depths of ``model``.

    ``encoder``: the shared image encoder's pooled vector (the same network for both domains);
    ``transform``: after the query / doc transform; ``embedding``: the final unit vectors.
    Each entry is ``[2n, d]``, queries first.
    """
    rng = np.random.default_rng(seed)
    q_rows = np.sort(rng.choice(len(data.queries), min(n, len(data.queries)), replace=False))
    d_rows = np.sort(rng.choice(len(data.docs), min(n, len(data.docs)), replace=False))
    size = model.cfg.image_size
    qi = ImageTable(image_paths(data, "queries", q_rows), size)[np.arange(len(q_rows))]
    di = ImageTable(image_paths(data, "docs", d_rows), size)[np.arange(len(d_rows))]
    model.eval()
    _, q_pool = model.encode_images(qi)
    _, d_pool = model.encode_images(di)
    q_emb = model.embed_queries(qi)
    d_emb = model.embed_docs(di, model.tokenize([data.doc_texts[int(r)] for r in d_rows]))
    return {"encoder": torch.cat([q_pool, d_pool]).numpy(),
            "transform": torch.cat([model.query_transform(q_pool),
                                    model.doc_transform(d_pool)]).numpy(),
            "embedding": torch.cat([q_emb, d_emb]).numpy(),
            "n_queries": len(q_rows)}


def linear_probe_accuracy(train_x, train_y, test_x, test_y, steps: int = 300,
                          l2: float = 1e-3) -> float:
    """Held-out accuracy of a softmax (logistic-regression) classifier on frozen features.

    Features are standardised with the training rows' statistics; LBFGS fits the weights with a
    small L2 penalty, so the result depends on the features only, not on a learning rate.
    """
    tr = torch.as_tensor(np.asarray(train_x), dtype=torch.float32)
    te = torch.as_tensor(np.asarray(test_x), dtype=torch.float32)
    classes, y = np.unique(np.asarray(train_y), return_inverse=True)
    y = torch.as_tensor(y)
    mu, sd = tr.mean(0), tr.std(0) + 1e-6
    tr, te = (tr - mu) / sd, (te - mu) / sd
    w = torch.zeros(tr.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(tr @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        predicted = classes[(te @ w + b).argmax(dim=1).numpy()]
    return float(np.mean(predicted == np.asarray(test_y)))


def domain_probe_accuracy(features: np.ndarray, n_queries: int, seed: int = 0,
                          steps: int = 300) -> float:
    """Held-out accuracy of a linear domain classifier (query photo vs doc).

    0.5 means the two domains are indistinguishable to a linear probe, 1.0 fully separable.
    Half of each domain trains the probe, the other half tests it.
    """
    y = np.zeros(len(features), dtype=np.int64)
    y[:n_queries] = 1
    perm = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).numpy()
    tr, te = perm[: len(features) // 2], perm[len(features) // 2:]
    return linear_probe_accuracy(features[tr], y[tr], features[te], y[te], steps)


def mmd_rbf(a: np.ndarray, b: np.ndarray) -> float:
    """Squared maximum mean discrepancy with an RBF kernel (median-distance bandwidth).

    The biased estimator: 0 when the two samples coincide, larger the further apart the two
    distributions are.  Features are L2-normalised first, so depths of different scale compare.
    """
    a = torch.nn.functional.normalize(torch.as_tensor(a, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.as_tensor(b, dtype=torch.float64), dim=1)
    z = torch.cat([a, b])
    d2 = torch.cdist(z, z) ** 2
    bandwidth = d2[d2 > 0].quantile(0.5)  # as numpy.median: the mean of the two middles
    k = torch.exp(-d2 / bandwidth)
    n = len(a)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


def pca_2d(features: np.ndarray) -> np.ndarray:
    """The first two principal components (for a domain-coloured scatter plot)."""
    x = features - features.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T



# --------------------------------------------------------------------------------------------
# Concept fusion (notebook 02)
# --------------------------------------------------------------------------------------------
def variant_pairs(data, data_dir: str | Path, max_pairs: int = 2000, seed: int = 0) -> dict:
    """Doc-row pairs from SynthShop's truth: ``same_product`` (two sellers of one product) and
    ``variant`` (same design, other brand or material: the look is the same, the title is not).

    A variant pair is the case where text decides: its images differ only by a small brand
    mark, its titles name another brand or material.
    """
    product = load_truth(data_dir)
    design = {}
    for line in open(Path(data_dir) / "_truth" / "products.jsonl"):
        r = json.loads(line)
        design[r["product_id"]] = (r["category"], r["design"])
    by_design: dict = {}
    for doc_id, row in data.doc_row.items():
        by_design.setdefault(design[product[doc_id]], []).append((product[doc_id], row))
    same, variant = [], []
    for members in by_design.values():
        for i, (p, a) in enumerate(members):
            for q, b in members[i + 1:]:
                (same if p == q else variant).append((a, b))
    rng = np.random.default_rng(seed)
    out = {}
    for name, pairs in (("same_product", same), ("variant", variant)):
        pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        if len(pairs) > max_pairs:
            pairs = pairs[np.sort(rng.choice(len(pairs), max_pairs, replace=False))]
        out[name] = pairs
    return out


def pair_cosines(emb: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine of each pair of rows of the unit-norm ``emb``."""
    return np.einsum("ij,ij->i", emb[pairs[:, 0]], emb[pairs[:, 1]])


# --------------------------------------------------------------------------------------------
# Cost of the classifier as classes grow (notebook 04)
# --------------------------------------------------------------------------------------------
def classifier_step_seconds(num_classes: int, sample_rate: float, dim: int = 128,
                            batch: int = 256, steps: int = 3, seed: int = 0) -> float:
    """Median wall time of one classifier step (forward, backward, centre update) on random
    unit embeddings: the part of a training step that grows with the number of classes.
    ``bench/partial_fc.py`` measures the same with memory, in separate processes."""
    from .losses import MarginClassifier

    torch.manual_seed(seed)
    clf = MarginClassifier(num_classes, dim, sample_rate=sample_rate, seed=seed)
    x = torch.nn.functional.normalize(torch.randn(batch, dim), dim=1)
    y = torch.randint(0, num_classes, (batch,))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        clf(x, y, step=i).backward()
        clf.step(lr=0.1)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


@torch.no_grad()
def doc_image_weights(model, data, batch_size: int = 256) -> np.ndarray:
    """Every doc's image weight (the fusion gate's mean; 1 = image only), in doc-row order."""
    images = ImageTable(image_paths(data, "docs"), model.cfg.image_size)
    model.eval()
    out = []
    for lo in range(0, len(data.docs), batch_size):
        rows = np.arange(lo, min(lo + batch_size, len(data.docs)))
        tokens = model.tokenize([data.doc_texts[int(r)] for r in rows])
        _, info = model.embed_docs(images[rows], tokens, return_attention=True)
        out.append(info["image_weight"].float().numpy())
    return np.concatenate(out)



@torch.no_grad()
def attention_on_objects(model, data, data_dir: str | Path, n_docs: int = 256,
                         seed: int = 0) -> dict:
    """Whether the concepts' text-to-image attention means something, on SynthShop docs
    (whose generator knows each object's mask, :func:`synthshop.doc_object_masks`).

    ``object_lift``: the attention mass a concept puts inside the object, divided by the
    object's share of the image (soft, per image region), averaged over concepts and docs:
    1.0 is attention blind to the object, above 1 looks at it.  ``concept_correlation``: the
    mean Pearson correlation between two concepts' maps of one doc: 1.0 is every concept
    looking at the same place, below 0.5 concepts that look at different things.
    """
    from .synthshop import doc_object_masks

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(data.docs), min(n_docs, len(data.docs)), replace=False))
    size = model.cfg.image_size
    images = ImageTable(image_paths(data, "docs", rows), size)[np.arange(len(rows))]
    model.eval()
    _, info = model.embed_docs(images, model.tokenize([data.doc_texts[int(r)] for r in rows]),
                               return_attention=True)
    if "text_to_image" not in info:
        raise ValueError(f"fusion={model.cfg.fusion!r} has no text-to-image attention")
    att = info["text_to_image"].float()                      # [B, K, P]
    g = info["grid"]
    masks = torch.from_numpy(doc_object_masks(data_dir, [data.doc_ids[int(r)] for r in rows],
                                              size))
    cover = masks.reshape(len(rows), g, size // g, g, size // g).mean((2, 4)).flatten(1)
    share = cover.mean(dim=1)                                # the object's share of the image
    lift = (att * cover[:, None, :]).sum(-1) / share[:, None]
    centred = att - att.mean(-1, keepdim=True)
    unit = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    corr = unit @ unit.transpose(1, 2)                       # [B, K, K]
    k = corr.shape[1]
    off = ~torch.eye(k, dtype=torch.bool)
    return {"object_lift": float(lift.mean()),
            "concept_correlation": float(corr[:, off].mean()) if k > 1 else float("nan"),
            "object_share": float(share.mean()), "docs": int(len(rows))}


def run_name(preset: str, row: str, seed: int) -> str:
    """The cache folder name of a reproduction row: ``<preset>-<slug>-s<seed>``."""
    return f"{preset}-{ROWS[row][0]}-s{seed}"


def row_overrides(data_dir: str | Path, row: str, seed: int) -> list[str]:
    """The ``tiny-cpu`` overrides of one row of :data:`ROWS` with ``seed``.

    A row whose own epochs would encode another number of images than the Mixer row on the
    same data (the pairwise rows, two images a pair; raw clicks, one sample a click) also gets
    ``--steps`` that match the Mixer row's images (module docstring); a row that names its own
    ``--epochs`` or ``--steps`` keeps them.
    """
    overrides = [f"--seed={seed}", *ROWS[row][1]]
    cfg, mixer = config_from("tiny-cpu", overrides), config_from("tiny-cpu", [f"--seed={seed}"])
    own_budget = (cfg.epochs, cfg.steps) != (mixer.epochs, mixer.steps)
    if own_budget or _sampling(cfg) == _sampling(mixer):  # nothing to match, nothing to load
        return overrides
    root = str(Path(data_dir).resolve())
    steps, per_step = _steps_and_images_per_step(root, *_sampling(cfg))
    budget = math.prod(_steps_and_images_per_step(root, *_sampling(mixer)))
    if steps * per_step != budget:
        overrides.append(f"--steps={max(1, budget // per_step)}")
    return overrides


def _sampling(cfg: TrainConfig) -> tuple:
    """The fields of a config that decide its samples, steps and images per step."""
    return (cfg.labels, cfg.loss in PAIRWISE_LOSSES, cfg.classes, cfg.val_share,
            cfg.max_per_class, cfg.batch_size, cfg.epochs, cfg.steps)


@functools.lru_cache(maxsize=None)
def _steps_and_images_per_step(data_root: str, labels, pairwise, classes, val_share,
                               max_per_class, batch_size, epochs, steps) -> tuple[int, int]:
    cfg = TrainConfig(labels=labels, loss=PAIRWISE_LOSSES[0] if pairwise else "cosface",
                      classes=classes, val_share=val_share, max_per_class=max_per_class,
                      batch_size=batch_size, epochs=epochs, steps=steps)
    samples, _ = make_samples(_load(data_root), cfg)
    sampler = EpochSampler(samples.label, max_per_class, batch_size, cfg.seed)
    return total_steps(cfg, sampler.steps_per_epoch), batch_size * (2 if pairwise else 1)


@functools.lru_cache(maxsize=1)
def _load(data_root: str):
    return load_dataset(data_root, check_images=False)


def ensure_row(data_dir: str | Path, preset: str, row: str, seed: int,
               runs: str | Path | None = None) -> dict:
    """:func:`ensure_run` of one row of :data:`ROWS` with ``seed`` (notebooks and reproduce)."""
    return ensure_run(data_dir, run_name(preset, row, seed), row_overrides(data_dir, row, seed),
                      runs)


def evaluate_untrained(data, seed: int = 0, overrides: list[str] = ()) -> dict:
    """Test metrics of the ``tiny-cpu`` model (plus ``overrides``) as initialised with ``seed``,
    before any training step: the floor a trained run must clearly beat."""
    from .retrieval import evaluate_model

    cfg = config_from("tiny-cpu", [f"--seed={seed}", *overrides])
    samples, _ = make_samples(data, cfg)  # the scratch tokenizer's vocabulary comes from them
    return evaluate_model(build_model(data, samples, cfg), data)
