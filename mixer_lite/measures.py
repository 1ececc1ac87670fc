"""What the notebooks measure, with tests: probes of the image encoder, the domain gap
(linear probes, MMD, PCA), the concepts' attention on the object, the classifier's cost as
classes grow, the untrained floor, and :func:`claim`, the notebooks' checked statements.

The notebooks explain and plot; what they compute lives here.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageTable, image_files, load_dataset, load_images
from .encoders import build_image_encoder, normalise_pixels
from .model import (ConstantGate, ModelConfig, boxes_on_grid, candidate_boxes, window_grid,
                    zoom_to)
from .weights import load_image_weights
from .shop_images import CANVAS
from .synthshop import doc_object_masks, doc_objects, doc_scene_masks, load_truth


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


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (cosine search); an all-zero row stays zero."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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
    feats = {name: pooled_features(encoder, ImageTable(image_files(data, "queries", rows), size))
             for name, rows in (("fit", fit_rows), ("eval", eval_rows))}
    docs = pooled_features(encoder, ImageTable(image_files(data, "docs"), size))
    out = {}
    for attr in ("category", "colour"):
        labels = {name: [products[product_of[r]][attr] for r in rows]
                  for name, rows in (("fit", fit_rows), ("eval", eval_rows))}
        out[attr] = linear_probe_accuracy(feats["fit"], labels["fit"], feats["eval"],
                                          labels["eval"])
    docs_of: dict[str, set[int]] = {}
    for row, d in enumerate(data.doc_ids):
        docs_of.setdefault(truth[d], set()).add(row)
    _, ranked = exact_search(unit_rows(docs), unit_rows(feats["eval"]), 10)
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
    qi, di = load_images(data, "queries", q_rows, size), load_images(data, "docs", d_rows, size)
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


def has_image_text_gate(model) -> bool:
    """Whether ``model``'s docs mix their image vector and their fused concepts through a gate
    that :func:`doc_gates` reads (a gated ``concept`` or ``direct`` fusion)."""
    return model.cfg.fusion in ("concept", "direct") and model.cfg.fusion_gate


@torch.no_grad()
def doc_gates(model, data, batch_size: int = 256) -> np.ndarray:
    """Every doc's image/text gate, per dimension (1 = image only), [docs, embed_dim] in doc-row
    order."""
    if not has_image_text_gate(model):
        raise ValueError(f"fusion={model.cfg.fusion!r}, fusion_gate={model.cfg.fusion_gate}: "
                         f"this model has no image/text gate")
    images = ImageTable(image_files(data, "docs"), model.cfg.image_size)
    model.eval()
    out = []
    for lo in range(0, len(data.docs), batch_size):
        rows = np.arange(lo, min(lo + batch_size, len(data.docs)))
        tokens = model.tokenize([data.doc_texts[int(r)] for r in rows])
        _, info = model.embed_docs(images[rows], tokens, return_attention=True)
        out.append(info["gate"].float().numpy())
    return np.concatenate(out)


def doc_image_weights(model, data, batch_size: int = 256) -> np.ndarray:
    """Every doc's image weight (the fusion gate's mean over dimensions; 1 = image only), in
    doc-row order."""
    return doc_gates(model, data, batch_size).mean(axis=1)


@contextlib.contextmanager
def _gate_forced(model, logits, dim: int):
    """Within the block, the fusion gate of ``model`` (a gated one, :func:`doc_gates` checks)
    gives every doc the logits ``logits`` (a number, or one per each of the ``dim``
    dimensions); the trained gate is put back after."""
    fusion = model.fusion
    device = next(model.parameters()).device
    trained, fusion.gate = fusion.gate, ConstantGate(dim, logits).to(device)
    try:
        yield model
    finally:
        fusion.gate = trained


@torch.no_grad()
def fusion_halves(model, data, validation) -> dict:
    """Whether a gated doc weighs its two halves by the doc or mixes them at fixed shares:
    validation Recall@1/10 with every doc embedded as trained; with each gate dimension fixed
    at its mean over all docs (``constant``: what the gate's variation between docs adds); as
    its image vector alone (the gate forced to 1); and as its fused concepts alone (forced to
    0).  Also the spread of the gate: each doc's image weight (its mean over dimensions: mean,
    standard deviation, extremes over all docs), and per dimension, the standard deviation
    across docs (``across_docs``, the mean over dimensions) and that variance's share of the
    gate's whole variance (``doc_share``; the rest lies between dimensions).
    ``docs/EXPERIMENTS.md``, "The gate mixes at fixed shares".
    ``validation``: a run's held-out photos (``make_samples(data, cfg)[0].validation``)."""
    from .retrieval import embed_docs, embed_queries, validation_recall

    model.eval()
    size = model.cfg.image_size
    gates = doc_gates(model, data)  # refuses a model without a gate
    weights = gates.mean(axis=1)
    mean_gate = torch.from_numpy(gates.mean(axis=0)).double()
    docs = ImageTable(image_files(data, "docs"), size)
    queries = embed_queries(model, ImageTable(image_files(data, "queries",
                                                          validation.query_rows), size))
    out = {"image_weight": {"mean": float(weights.mean()), "std": float(weights.std()),
                            "min": float(weights.min()), "max": float(weights.max())},
           "gate_spread": {"across_docs": float(gates.std(axis=0).mean()),
                           "doc_share": float(gates.var(axis=0).mean() / gates.var())}}
    for half, logits in (("trained", None), ("constant", torch.logit(mean_gate).float()),
                         ("image", math.inf), ("concepts", -math.inf)):
        with contextlib.nullcontext() if logits is None else \
                _gate_forced(model, logits, gates.shape[1]):
            out[half] = validation_recall(embed_docs(model, docs, data.doc_texts), queries,
                                          validation.relevant)
    return out


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
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(data.docs), min(n_docs, len(data.docs)), replace=False))
    size = model.cfg.image_size
    images = load_images(data, "docs", rows, size)
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


def scene_doc_rows(data, data_dir: str | Path) -> np.ndarray:
    """Rows of ``data.docs`` that are scene docs: more than one object in the shot (SynthShop's
    ``scene_share``, from ``_truth/``)."""
    objects = doc_objects(data_dir)
    return np.array([r for r, d in enumerate(data.doc_ids) if len(objects.get(d) or ()) > 1],
                    dtype=np.int64)


def scene_doc_sample(data, data_dir: str | Path, size: int, n_docs: int = 256,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, list, np.ndarray, list]:
    """``n_docs`` scene docs drawn with ``seed`` (sorted rows), their object masks and records
    at ``size`` (:func:`doc_scene_masks`), and a title swap for each: one of its other objects
    (its index among the doc's objects) and the title of that object's product's first doc."""
    scenes = scene_doc_rows(data, data_dir)
    if not len(scenes):
        raise ValueError(f"{data_dir} has no scene docs: make it with scene_share > 0")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(scenes, min(n_docs, len(scenes)), replace=False))
    masks, objects = doc_scene_masks(data_dir, [data.doc_ids[int(r)] for r in rows], size)
    first_doc: dict[str, str] = {}
    for d, objs in doc_objects(data_dir).items():
        if objs:
            first_doc.setdefault(objs[0]["product_id"], d)
    swap = np.array([1 + int(rng.integers(len(objs) - 1)) for objs in objects])
    swapped = [data.doc_texts[data.doc_row[first_doc[objs[j]["product_id"]]]]
               for objs, j in zip(objects, swap)]
    return rows, masks, objects, swap, swapped


@torch.no_grad()
def scene_attention(model, data, data_dir: str | Path, n_docs: int = 256,
                    seed: int = 0) -> dict:
    """Whether the title decides where a scene doc's concepts look (SynthShop scene docs,
    whose ``_truth/`` holds every object's mask).

    The map measured is the concepts' text-to-image attention averaged over the concepts.
    ``product_lift``: the attention mass on the product the title names over its share of the
    image (1.0: blind to it); ``other_lift``: the same for the other objects in the scene;
    ``product_above_others``: the share of docs where the product's lift exceeds every other
    object's.  **The title swap**: each doc's title is replaced by the title of one of the other
    objects' products (its first doc's, at random among the others), the image unchanged;
    ``swap_moved`` is the share of docs where that object then holds more attention mass than
    any other object *and* more than under the original title; ``named_mass_before`` and
    ``named_mass_after`` its mean mass under each title.  ``per_doc`` keeps, per doc measured,
    its row, the product's lift, the swapped-in object and title and whether the attention
    moved, with what the measures read: the image (uint8 [B, 3, size, size]), the objects'
    masks and records (:func:`scene_doc_sample`) and the mean map under each title (``maps``
    and ``maps_swapped``, [B, P] over the square grid of regions), so a figure shows the
    maps that were measured.
    """
    size = model.cfg.image_size
    rows, masks, objects, swap, swapped = scene_doc_sample(data, data_dir, size, n_docs, seed)
    images = load_images(data, "docs", rows, size)
    model.eval()

    def mean_map(texts):
        _, info = model.embed_docs(images, model.tokenize(texts), return_attention=True)
        if "text_to_image" not in info:
            raise ValueError(f"fusion={model.cfg.fusion!r} has no text-to-image attention")
        return info["text_to_image"].float().mean(dim=1), info["grid"]   # [B, P]

    att, g = mean_map([data.doc_texts[int(r)] for r in rows])
    att_swap, _ = mean_map(swapped)
    b, o = masks.shape[:2]
    cover = torch.from_numpy(masks).reshape(b, o, g, size // g, g, size // g).mean((3, 5))
    cover = cover.flatten(2)                                         # [B, O, P]
    share = cover.mean(-1)
    present = torch.tensor([[i < len(objs) for i in range(o)] for objs in objects]) & (share > 0)
    mass = torch.where(present, (att[:, None, :] * cover).sum(-1), torch.nan)
    mass_swap = torch.where(present, (att_swap[:, None, :] * cover).sum(-1), torch.nan)
    lift = mass / share
    other = lift[:, 1:]
    idx = torch.arange(b)
    top_after = torch.nan_to_num(mass_swap, nan=-1.0).argmax(-1).numpy()
    moved = (top_after == swap) & (mass_swap[idx, swap] > mass[idx, swap]).numpy()
    return {"product_lift": float(lift[:, 0].nanmean()),
            "other_lift": float(other.nanmean()),
            "product_above_others": float(
                (lift[:, 0] > torch.nan_to_num(other, nan=-1.0).amax(-1)).float().mean()),
            "swap_moved": float(moved.mean()),
            "named_mass_before": float(mass[idx, swap].nanmean()),
            "named_mass_after": float(mass_swap[idx, swap].nanmean()),
            "product_share": float(share[:, 0].mean()), "docs": int(b),
            "per_doc": {"rows": rows, "product_lift": lift[:, 0].numpy(), "swap": swap,
                        "moved": moved, "swapped_titles": swapped, "images": images,
                        "masks": masks, "objects": objects,
                        "maps": att.numpy(), "maps_swapped": att_swap.numpy()}}


@torch.no_grad()
def scene_docs_redrawn(data, data_dir: str | Path, size: int, paint_others: bool = True,
                       crop: bool = False) -> torch.Tensor:
    """Every doc image at ``size`` (uint8 [N, 3, size, size]), each scene doc redrawn from its
    ``_truth`` masks.  ``paint_others``: its other objects painted over with its own background
    (the median colour of the pixels no object covers): the shot as it would be with the
    product alone, where it stands.  ``crop``: cut to the product's box and a margin of 5% of
    its side on each side (where the canvas allows), framed as a single-product studio shot
    is; without ``paint_others``, the objects that overlap that box stay in it."""
    images = ImageTable(image_files(data, "docs"), size)[np.arange(len(data.docs))]
    rows = scene_doc_rows(data, data_dir)
    if not len(rows):
        return images
    side = CANVAS if crop else size  # the boxes are on the canvas: cut there, then shrink
    masks, objects = doc_scene_masks(data_dir, [data.doc_ids[r] for r in rows], side)
    x = ImageTable(image_files(data, "docs", rows), side)[np.arange(len(rows))].float()
    if paint_others:
        others = torch.from_numpy(masks[:, 1:].sum(1).clip(0, 1))[:, None]
        free = torch.from_numpy(masks.sum(1) < 1e-6)
        ground = torch.stack([x[i][:, free[i]].median(dim=1).values for i in range(len(rows))])
        x = x * (1 - others) + ground[:, :, None, None] * others
    if crop:
        cut = []
        for i, objs in enumerate(objects):
            bx, by, s = objs[0]["box"]
            m = round(0.05 * s)
            piece = x[i:i + 1, :, max(0, by - m):by + s + m, max(0, bx - m):bx + s + m]
            cut.append(torch.nn.functional.interpolate(piece, size=(size, size), mode="area"))
        x = torch.cat(cut)
    images[rows] = x.round().clamp(0, 255).to(torch.uint8)
    return images


# 75 candidate windows (sides 1/2, 5/8 and 3/4, 5 x 5 places each): the finer choice the
# ceiling "windowed_fine" measures against the nine windows of ``fusion="regions"``.
FINE_WINDOWS = window_grid((0.5, 0.625, 0.75), 5)


def pointed_window(weights: torch.Tensor, grid: int, window: int) -> torch.Tensor:
    """The square of ``window`` x ``window`` regions that holds the most of each doc's mean
    attention map (``weights`` [B, K, P] over a ``grid`` x ``grid`` of regions, row-major), as
    boxes [B, 3] = (centre x, centre y, half side) in ``grid_sample``'s coordinates (-1..1);
    ties go to the first square in row-major order."""
    maps = weights.float().mean(dim=1).reshape(-1, 1, grid, grid)
    mass = torch.nn.functional.avg_pool2d(maps, window, stride=1).flatten(1)
    best = mass.argmax(dim=1)
    places = grid - window + 1
    top, left = best // places, best % places
    half = window / grid
    centre = lambda start: (start + window / 2) / grid * 2 - 1  # noqa: E731
    return torch.stack([centre(left.float()), centre(top.float()),
                        torch.full_like(left, half, dtype=torch.float32)], dim=-1)


def cut_from_canvas(data, rows, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The doc images of ``rows`` each cut to its box (``boxes`` [len(rows), 3], centre x,
    centre y, half side in ``grid_sample``'s coordinates) from the 128 px canvas and shrunk to
    ``size`` by area (uint8 [len(rows), 3, size, size])."""
    canvas = load_images(data, "docs", rows, CANVAS).float()
    cut = torch.nn.functional.interpolate(zoom_to(canvas, boxes), size=(size, size), mode="area")
    return cut.round().clamp(0, 255).to(torch.uint8)


def pointed_crops(model, data, rows, size: int, window: int = 5,
                  batch_size: int = 256) -> torch.Tensor:
    """The doc images of ``rows`` cut to the window their own concepts' attention points at
    (:func:`pointed_window`, on the model's map of each doc with its title), from the 128 px
    canvas, and shrunk to ``size`` (uint8 [len(rows), 3, size, size]): what the model's own
    attention, used as a hard pointer, would show the doc tower."""
    rows = np.asarray(rows, dtype=np.int64)
    model.eval()
    out = []
    for lo in range(0, len(rows), batch_size):
        part = rows[lo: lo + batch_size]
        images = load_images(data, "docs", part, model.cfg.image_size)
        with torch.no_grad():
            _, info = model.embed_docs(images, model.tokenize([data.doc_texts[int(r)]
                                                               for r in part]),
                                       return_attention=True)
        out.append(cut_from_canvas(data, part, pointed_window(info["text_to_image"],
                                                              info["grid"], window), size))
    return torch.cat(out)


def truth_windows(data, data_dir: str | Path, rows, size: int, windows: torch.Tensor,
                  batch_size: int = 256) -> torch.Tensor:
    """The doc images of ``rows`` (scene docs) each cut to the one of ``windows`` (boxes
    [W, 3], :func:`window_grid`) that best shows its product by the truth masks, from the 128
    px canvas and shrunk to ``size`` (uint8 [len(rows), 3, size, size]): the best a choice among
    those windows could show the doc tower, against the product cut out and framed
    (:func:`scene_docs_redrawn`).  Best: the most of the product less the other objects, over
    the union of the window and the product (the product's overlap over union where nothing
    else is in the window), so among windows of several sizes the one that fits the product
    wins, not the largest that holds it."""
    grid = 32  # the masks' resolution for scoring the windows
    cover = boxes_on_grid(windows, grid)                     # [W, grid * grid], each sums to 1
    cells = (windows[:, 2] * grid) ** 2                      # each window's area in cells
    rows = np.asarray(rows, dtype=np.int64)
    out = []
    for lo in range(0, len(rows), batch_size):
        part = rows[lo: lo + batch_size]
        masks, _ = doc_scene_masks(data_dir, [data.doc_ids[int(r)] for r in part], grid)
        masks = torch.from_numpy(masks).flatten(2)               # [docs, objects, cells]
        inside = masks @ cover.T * cells                         # [docs, objects, windows]
        product = inside[:, 0]
        union = cells + masks[:, 0].sum(dim=1, keepdim=True) - product
        best = ((product - inside[:, 1:].sum(dim=1)) / union).argmax(dim=1)
        out.append(cut_from_canvas(data, part, windows[best], size))
    return torch.cat(out)


# How :func:`recall_by_doc_kind` can show the scene docs to the doc tower: as shot, or redrawn
# from the truth or the model's own attention (the ceilings of choosing the region).
SCENE_DOCS_AS = ("shot", "painted", "cropped", "boxed", "windowed", "windowed_fine", "pointed")


def recall_by_doc_kind(model, data, data_dir: str | Path, validation=None,
                       scene_docs_as: str = "shot", pointed_beside: bool = False) -> dict:
    """Metrics (Recall@1, Recall@10, mAP@10) of the judged test queries, or of the held-out
    photos of a :class:`~mixer_lite.sampling.Validation`, grouped by their relevant docs:
    ``scene`` (at least one is a scene doc), ``single`` (all show the product alone), and
    ``all``; and ``scene_docs``: the ``scene`` queries with only their scene docs counted as
    hits, so a single-object doc of the same product cannot answer for them.  Where fusion
    should help (a scene doc's image holds other objects a photo of the product does not) and
    where it has nothing to choose.

    ``scene_docs_as`` (:data:`SCENE_DOCS_AS`): how the scene docs are embedded.  ``"shot"``:
    as they are.  From the truth (:func:`scene_docs_redrawn`), what a doc tower that chose the
    region perfectly could reach (``docs/EXPERIMENTS.md``, "Scene docs"): the other objects
    painted out, the product where it stands (``"painted"``); the product cut out and framed as
    a single shot (``"cropped"``); the product's box cut, what overlaps it left in
    (``"boxed"``).  Cut to the window that best shows the product (:func:`truth_windows`):
    among ``fusion="regions"``'s nine (``"windowed"``), among :data:`FINE_WINDOWS`' 75
    (``"windowed_fine"``).  Cut where the model's own attention points (``"pointed"``,
    :func:`pointed_crops`, no truth used): what that attention is worth as a hard pointer.
    ``pointed_beside``: every doc, scene or not (a server cannot tell), is indexed twice, as
    shot and cut where its attention points, and scores the better of its two entries: the
    pointer as a second vector per doc rather than a replacement."""
    from .retrieval import (embed_docs, embed_queries, exact_search, judged_query_rows,
                            ranking_metrics, relevance)

    objects = doc_objects(data_dir)
    if validation is None:
        rows = judged_query_rows(data)
        relevant = relevance(data, rows)
    else:
        rows, relevant = validation.query_rows, validation.relevant
    size = model.cfg.image_size
    if scene_docs_as not in SCENE_DOCS_AS:
        raise ValueError(f"scene_docs_as must be one of {', '.join(SCENE_DOCS_AS)}, got "
                         f"{scene_docs_as!r}")
    if pointed_beside and scene_docs_as != "shot":
        raise ValueError(f"pointed_beside indexes the docs as shot beside their pointed crops; "
                         f"it does not combine with scene_docs_as={scene_docs_as!r}")
    if scene_docs_as in ("painted", "cropped", "boxed"):
        docs = scene_docs_redrawn(data, data_dir, size, paint_others=scene_docs_as != "boxed",
                                  crop=scene_docs_as != "painted")
    else:
        docs = ImageTable(image_files(data, "docs"), size)
        if scene_docs_as != "shot":
            docs = docs[np.arange(len(data.docs))]
            scenes = scene_doc_rows(data, data_dir)
            docs[torch.from_numpy(scenes)] = (
                pointed_crops(model, data, scenes, size) if scene_docs_as == "pointed" else
                truth_windows(data, data_dir, scenes, size,
                              candidate_boxes(model.cfg.region_side)[1:]
                              if scene_docs_as == "windowed" else FINE_WINDOWS))
    doc_emb = embed_docs(model, docs, data.doc_texts)
    query_emb = embed_queries(model, ImageTable(image_files(data, "queries", rows), size))
    if pointed_beside:
        crops = pointed_crops(model, data, np.arange(len(data.docs)), size)
        scores = np.maximum(query_emb @ doc_emb.T,
                            query_emb @ embed_docs(model, crops, data.doc_texts).T)
        ranked = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    else:
        _, ranked = exact_search(doc_emb, query_emb, 10)
    scene_docs = [{d for d in rel if len(objects[data.doc_ids[d]] or ()) > 1} for rel in relevant]
    scene = np.array([bool(s) for s in scene_docs])
    out = {}
    for name, chosen, hits in (("all", np.ones_like(scene), relevant),
                               ("scene", scene, relevant), ("single", ~scene, relevant),
                               ("scene_docs", scene, scene_docs)):
        if chosen.any():
            out[name] = ranking_metrics(ranked[chosen], [hits[i] for i in np.flatnonzero(chosen)],
                                        ks=(1, 10))
    return out


def evaluate_untrained(data, seed: int = 0, overrides: list[str] = ()) -> dict:
    """Test metrics of the ``tiny-cpu`` model (plus ``overrides``) as initialised with ``seed``,
    before any training step: the floor a trained run must clearly beat."""
    from .retrieval import evaluate_model
    from .sampling import make_samples
    from .train import build_model, config_from

    cfg = config_from("tiny-cpu", [f"--seed={seed}", *overrides])
    samples, _ = make_samples(data, cfg)  # the scratch tokenizer's vocabulary comes from them
    return evaluate_model(build_model(data, samples, cfg), data)


@torch.no_grad()
def evaluate_frozen_backbone(data, image_weights: str = "openclipart-cnn", seed: int = 0,
                             size: int = 64) -> dict:
    """Test metrics of the image encoder alone, frozen: docs and photos embedded by its pooled
    features (no transform, no text, no training), searched by cosine.  The floor fine-tuning
    must beat: what the pretrained weights already know of the data."""
    from .retrieval import evaluate_image_features

    encoder = image_encoder_from(image_weights, seed)
    return evaluate_image_features(data, lambda images: unit_rows(pooled_features(encoder, images)),
                                   size)


def evaluate_frozen_validation(data, train_cfg, image_weights: str = "openclipart-cnn",
                               seed: int = 0, size: int = 64) -> dict:
    """Validation Recall@1/10 of the image encoder alone, frozen: the photos of the classes
    ``train_cfg`` holds out for validation searched among every doc by the cosine of pooled
    features, a hit a doc of the photo's class (:func:`retrieval.validation_recall`, as a run).
    How a pretraining recipe is chosen without reading the test photos."""
    from .retrieval import validation_recall
    from .sampling import make_samples

    validation = make_samples(data, train_cfg)[0].validation
    if validation is None:
        raise ValueError("the training config holds out no validation classes (--val_share=0)")
    encoder = image_encoder_from(image_weights, seed)
    docs = unit_rows(pooled_features(encoder, ImageTable(image_files(data, "docs"), size)))
    queries = unit_rows(pooled_features(encoder, ImageTable(
        image_files(data, "queries", validation.query_rows), size)))
    return validation_recall(docs, queries, validation.relevant)


@torch.no_grad()
def doc_attention(model, data, n_docs: int = 4, seed: int = 0,
                  among: np.ndarray | None = None) -> dict:
    """What :func:`viz.concept_attention` draws, for ``n_docs`` docs of products never seen in
    training (each the first relevant doc of a random test query; with ``among``, random docs
    of those rows relevant to a test query, such as the scene docs): their images, the model's
    attention (``embed_docs(..., return_attention=True)``), their tokens, titles and rows."""
    rel = data.qrels
    rng = np.random.default_rng(seed)
    if among is None:
        rows = [data.doc_row[rel[int(i)]["doc_ids"][0]]
                for i in rng.choice(len(rel), size=min(n_docs, len(rel)), replace=False)]
    else:
        tested = {data.doc_row[d] for r in rel for d in r["doc_ids"]}
        pool = sorted(tested.intersection(int(r) for r in among))
        if not pool:
            raise ValueError("doc_attention: none of the rows given is a doc of a test query")
        rows = [int(r) for r in np.sort(rng.choice(pool, min(n_docs, len(pool)),
                                                    replace=False))]
    images = load_images(data, "docs", rows, model.cfg.image_size)
    titles = [data.doc_texts[r] for r in rows]
    return {"images": images, **attention_of_docs(model, images, titles), "titles": titles,
            "rows": rows}


def attention_of_docs(model, images, titles: list[str]) -> dict:
    """The model's attention on docs (``embed_docs(..., return_attention=True)``, in eval mode,
    without gradients) and each doc's tokens as strings: ``{"info", "token_strings"}``."""
    tokens = model.tokenize(titles)
    model.eval()
    with torch.no_grad():
        _, info = model.embed_docs(images, tokens, return_attention=True)
    strings = [model.tokenizer.convert_ids_to_tokens(ids[m]) for ids, m in
               zip(tokens["input_ids"], tokens["attention_mask"])] if tokens else \
        [[] for _ in titles]
    return {"info": info, "token_strings": strings}
