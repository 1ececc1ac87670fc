"""SynthShop: a synthetic e-commerce image search log that has the paper's four difficulties.

Mixer (arXiv 2305.03972) is trained on Alibaba's private image-search logs. SynthShop stands in
for them, written in the project's dataset folder format (``docs/DATASET_FORMAT.md``), with one
knob per difficulty the paper names:

1. **Domain gap** (``gap``): doc images are clean studio shots; query images are "user photos"
   of the same product: clutter, scale and crop, rotation, perspective, colour cast, blur,
   sensor noise, occlusion and JPEG.
2. **Unequal modalities** (``p_omit_colour``, ``p_omit_pattern``, ``variants_per_design``):
   brand and material live only in the title (the brand's image mark is a few pixels), pattern and
   colour are sometimes only in the image; products of one *design* look alike and differ by brand
   or material, so for them the text decides.  Titles carry synonyms, shuffled word order and
   seller spam.
3. **Skew** (``zipf_exponent``): the number of queries per product follows a Zipf law over a
   random popularity ranking; within a product, clicks favour its first sellers (exposure bias).
   **Noise** (``noise_confusable``, ``noise_random``): a known share of click events go to a
   confusable product (same category and colour) or to a random doc.
4. **Unseen products at test time** (``test_product_share``): test queries are of products that
   no training click touches; ``docs.jsonl`` indexes every product.

One more knob gives the paper's concept-aware fusion something to choose: **scene docs**
(``scene_share``, ``scene_objects``): that share of docs is a styled shot of the product among
1-3 products of other categories, placed and sized alike, whose title names only the product;
query photos stay of the product alone.  Only the title tells which object is sold.

The truth (product of every doc and query, product attributes) goes to ``_truth/``, which readers
ignore: only analysis and tests use it, never training.

Generation streams products in chunks (bounded memory), each chunk with its own RNG seeded from
(seed, chunk), so the output is byte-identical for a seed whatever the number of workers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .files import build_new_folder
from .shop_images import encode_image, object_labels, scene_shot, studio_shot, user_photo
from .synth_products import (ACCENT_NAMES, ACCENTS, BRANDS, CATEGORIES, CATEGORY_NAMES,
                             COLOUR_NAMES, COLOURS, PATTERN_NAMES, PATTERNS, SPAM_WORDS,
                             render_product)

# --------------------------------------------------------------------------------------------
# Configuration and presets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthConfig:
    """Every knob of the generator.  Presets differ in size only, not in difficulty."""

    n_products: int = 3000
    docs_per_product: tuple[int, int] = (2, 4)   # sellers per product, inclusive range
    variants_per_design: float = 0.7             # mean extra brand/material variants of a look
    n_queries: int = 24000                       # query photos drawn by popularity (before caps)
    zipf_exponent: float = 0.9                   # queries per product ~ popularity_rank ** -a
    seller_zipf_exponent: float = 1.0            # exposure skew across a product's sellers
    clicks_per_query: float = 1.5                # click events per query: 1 + Poisson(this)
    noise_confusable: float = 0.12               # share of click events on a look-alike product
    noise_random: float = 0.05                   # share of click events on a random doc
    test_product_share: float = 0.2
    max_test_queries_per_product: int = 3        # keeps evaluation from being a few head products
    gap: float = 1.0                             # strength of the user-photo degradations, 0..1.5
    p_omit_colour: float = 0.2
    p_omit_pattern: float = 0.4
    p_omit_detail: float = 0.3
    p_accent_in_title: float = 0.4
    p_spam: float = 0.5
    p_shuffle: float = 0.5
    scene_share: float = 0.0                     # share of docs shot among other products
    scene_objects: tuple[int, int] = (1, 3)      # other products in a scene doc, inclusive range
    image_size: int = 64
    chunk_products: int = 500

    def __post_init__(self):
        checks = {
            "n_products": self.n_products >= 10,
            "n_queries": self.n_queries >= 1,
            "docs_per_product": 1 <= self.docs_per_product[0] <= self.docs_per_product[1],
            "noise_confusable": 0 <= self.noise_confusable,
            "noise_random": 0 <= self.noise_random,
            "noise_confusable + noise_random": self.noise_confusable + self.noise_random < 1,
            "test_product_share": 0 < self.test_product_share < 1,
            "zipf_exponent": self.zipf_exponent >= 0,
            "gap": 0 <= self.gap <= 1.5,
            "image_size": 16 <= self.image_size <= 512,
            "scene_share": 0 <= self.scene_share <= 1,
            "scene_objects": 1 <= self.scene_objects[0] <= self.scene_objects[1]
            <= len(CATEGORIES) - 1,
            "chunk_products": self.chunk_products >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"SynthConfig: invalid value for {', '.join(bad)}: {self}")


PRESETS = {
    "tiny": SynthConfig(n_products=300, n_queries=2400, chunk_products=100),
    "small": SynthConfig(n_products=3000, n_queries=24000),
    # 100k products need ~8 brand/material variants per look (the taxonomy has 13,824 looks).
    "large": SynthConfig(n_products=100_000, n_queries=450_000, clicks_per_query=3.0,
                         variants_per_design=7.0, chunk_products=1000),
}


# --------------------------------------------------------------------------------------------
# The product catalogue (global, small arrays: O(n_products) integers)
# --------------------------------------------------------------------------------------------
@dataclass
class Catalogue:
    category: np.ndarray
    colour: np.ndarray
    pattern: np.ndarray
    accent: np.ndarray
    detail: np.ndarray
    brand: np.ndarray
    material: np.ndarray
    design: np.ndarray          # products of one design look alike (same image attributes)
    popularity_rank: np.ndarray  # 1 = most queried
    is_test: np.ndarray
    n_docs: np.ndarray
    doc_offset: np.ndarray      # first global doc index of each product
    n_queries: np.ndarray       # query photos of each product (test ones capped)
    query_offset: np.ndarray


def build_catalogue(cfg: SynthConfig, seed: int) -> Catalogue:
    rng = np.random.default_rng([seed, 0])
    n = cfg.n_products
    looks = len(CATEGORIES) * len(COLOURS) * len(PATTERNS) * len(ACCENTS) * 3
    variants_per_look = len(BRANDS) * 4
    # Designs are distinct looks; each design gets 1 + Poisson(v) brand/material variants.
    family = 1 + rng.poisson(cfg.variants_per_design, size=n)
    family = np.minimum(family, variants_per_look)
    n_designs = int(np.searchsorted(np.cumsum(family), n) + 1)
    if n_designs > looks:
        raise ValueError(f"SynthConfig: n_products={n} needs {n_designs} distinct looks, "
                         f"the taxonomy has {looks}; raise variants_per_design")
    family = family[:n_designs]
    family[-1] -= int(family.sum() - n)
    look_ids = rng.choice(looks, size=n_designs, replace=False)
    design = np.repeat(np.arange(n_designs), family)
    look = look_ids[design]
    cat, rest = np.divmod(look, len(COLOURS) * len(PATTERNS) * len(ACCENTS) * 3)
    colour, rest = np.divmod(rest, len(PATTERNS) * len(ACCENTS) * 3)
    pattern, rest = np.divmod(rest, len(ACCENTS) * 3)
    accent, detail = np.divmod(rest, 3)
    # Within a design, variants take distinct (brand, material) pairs.
    variant = np.empty(n, dtype=np.int64)
    start = 0
    for size in family:
        variant[start:start + size] = rng.choice(variants_per_look, size=size, replace=False)
        start += size
    brand, material = np.divmod(variant, 4)

    popularity_rank = rng.permutation(n) + 1
    is_test = rng.random(n) < cfg.test_product_share
    n_docs = rng.integers(cfg.docs_per_product[0], cfg.docs_per_product[1] + 1, size=n)
    weights = popularity_rank.astype(np.float64) ** -cfg.zipf_exponent
    n_queries = rng.multinomial(cfg.n_queries, weights / weights.sum())
    n_queries = np.where(is_test, np.minimum(n_queries, cfg.max_test_queries_per_product),
                         n_queries)
    return Catalogue(
        category=cat, colour=colour, pattern=pattern, accent=accent, detail=detail, brand=brand,
        material=material, design=design, popularity_rank=popularity_rank, is_test=is_test,
        n_docs=n_docs, doc_offset=np.concatenate([[0], np.cumsum(n_docs)[:-1]]),
        n_queries=n_queries, query_offset=np.concatenate([[0], np.cumsum(n_queries)[:-1]]),
    )


def doc_id(i: int) -> str:
    return f"d{i:07d}"


def query_id(i: int) -> str:
    return f"q{i:07d}"


def product_id(i: int) -> str:
    return f"p{i:06d}"


# --------------------------------------------------------------------------------------------
# Titles
# --------------------------------------------------------------------------------------------
def make_title(cat: Catalogue, p: int, cfg: SynthConfig, rng: np.random.Generator) -> str:
    category = CATEGORY_NAMES[cat.category[p]]
    names, details, materials = CATEGORIES[category]
    colour = COLOUR_NAMES[cat.colour[p]]
    words = [BRANDS[cat.brand[p]]]
    if rng.random() >= cfg.p_omit_colour:
        words.append(_pick(rng, COLOURS[colour][1]))
    if rng.random() >= cfg.p_omit_pattern:
        words.append(_pick(rng, PATTERNS[PATTERN_NAMES[cat.pattern[p]]]))
    words.append(materials[cat.material[p]])
    if rng.random() < cfg.p_accent_in_title:
        words.append(f"{ACCENT_NAMES[cat.accent[p]]} trim")
    if rng.random() >= cfg.p_omit_detail:
        words.append(details[cat.detail[p]])
    words.append(_pick(rng, names))
    if rng.random() < cfg.p_shuffle:
        words = [words[i] for i in rng.permutation(len(words))]
    if rng.random() < cfg.p_spam:
        spam = [SPAM_WORDS[i] for i in rng.choice(len(SPAM_WORDS), size=int(rng.integers(1, 4)),
                                                   replace=False)]
        words = spam[: len(spam) // 2] + words + spam[len(spam) // 2:]
    return " ".join(words)


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------------------------
# One chunk of products -> its files' lines and image bytes
# --------------------------------------------------------------------------------------------
_STATE: dict = {}


def _init_worker(cfg: SynthConfig, cat: Catalogue, seed: int, out: str) -> None:
    _STATE.update(cfg=cfg, cat=cat, seed=seed, out=Path(out), confusable=_confusable_index(cat),
                  by_category=[np.flatnonzero(cat.category == c) for c in range(len(CATEGORIES))])


def _confusable_index(cat: Catalogue) -> dict[int, np.ndarray]:
    """Train products sharing a category and colour, keyed by category * n_colours + colour.

    Noise clicks only land on train products: test products must stay unclicked.
    """
    train = np.flatnonzero(~cat.is_test)
    key = cat.category[train] * len(COLOURS) + cat.colour[train]
    order = np.argsort(key, kind="stable")
    groups = np.split(train[order], np.flatnonzero(np.diff(key[order])) + 1)
    return {int(cat.category[g[0]] * len(COLOURS) + cat.colour[g[0]]): g for g in groups}


def _render_chunk(chunk: int) -> dict:
    cfg, cat, seed, out = _STATE["cfg"], _STATE["cat"], _STATE["seed"], _STATE["out"]
    confusable = _STATE["confusable"]
    rng = np.random.default_rng([seed, 1, chunk])
    # Scenes draw from their own stream: with scene_share=0 the folder is what it was before
    # scene docs existed, byte for byte.
    scene_rng = np.random.default_rng([seed, 2, chunk])
    lo = chunk * cfg.chunk_products
    hi = min(lo + cfg.chunk_products, cfg.n_products)
    lines = {k: [] for k in ("docs", "queries", "clicks", "qrels", "truth_docs", "truth_queries",
                             "truth_products")}
    train_products = np.flatnonzero(~cat.is_test)
    stats = {"click_events": 0, "noise_events": 0, "images": 0}
    for p in range(lo, hi):
        obj = render_product(cat, p)
        category = CATEGORY_NAMES[cat.category[p]]
        docs = [int(cat.doc_offset[p]) + j for j in range(int(cat.n_docs[p]))]
        for j, d in enumerate(docs):
            rel = f"images/docs/{doc_id(d)}.png"
            if scene_rng.random() < cfg.scene_share:
                shown = [p] + scene_companions(cat, p, cfg, scene_rng, _STATE["by_category"])
                objs = [obj] + [render_product(cat, o) for o in shown[1:]]
                shot, boxes, order = scene_shot(objs, scene_rng, cfg.image_size)
            else:
                shown, objs, order = [p], [obj], [0]
                shot, box = studio_shot(obj, rng, cfg.image_size)
                boxes = [box]
            _write(out / rel, encode_image(shot, "PNG", rng, 0))
            object_labels(objs, boxes, order).save(out / "_truth" / "masks" / f"{doc_id(d)}.png")
            lines["docs"].append({"doc_id": doc_id(d), "image": rel,
                                  "text": make_title(cat, p, cfg, rng), "category": category})
            lines["truth_docs"].append({
                "doc_id": doc_id(d), "product_id": product_id(p), "seller_rank": j + 1,
                "objects": [{"product_id": product_id(o),
                             "category": CATEGORY_NAMES[cat.category[o]], "box": b}
                            for o, b in zip(shown, boxes)]})
        split = "test" if cat.is_test[p] else "train"
        seller_w = np.arange(1, len(docs) + 1, dtype=np.float64) ** -cfg.seller_zipf_exponent
        seller_w /= seller_w.sum()
        group = confusable.get(int(cat.category[p] * len(COLOURS) + cat.colour[p]), np.empty(0))
        look_alikes = group[group != p]
        for k in range(int(cat.n_queries[p])):
            q = int(cat.query_offset[p]) + k
            rel = f"images/queries/{query_id(q)}.jpg"
            photo = user_photo(obj, rng, cfg.image_size, cfg.gap)
            _write(out / rel, encode_image(photo, "JPEG", rng, cfg.gap))
            lines["queries"].append({"query_id": query_id(q), "image": rel, "split": split})
            lines["truth_queries"].append({"query_id": query_id(q), "product_id": product_id(p)})
            if split == "test":
                lines["qrels"].append({"query_id": query_id(q),
                                       "doc_ids": [doc_id(d) for d in docs]})
                continue
            counts = click_counts(rng, cfg, docs, seller_w, look_alikes, train_products,
                                  cat.doc_offset, cat.n_docs)
            for d, c in counts.items():
                lines["clicks"].append({"query_id": query_id(q), "doc_id": doc_id(d), "count": c})
                stats["click_events"] += c
                if not docs[0] <= d <= docs[-1]:
                    stats["noise_events"] += c
        stats["images"] += len(docs) + int(cat.n_queries[p])
        lines["truth_products"].append({
            "product_id": product_id(p), "category": category,
            "colour": COLOUR_NAMES[cat.colour[p]], "pattern": PATTERN_NAMES[cat.pattern[p]],
            "accent": ACCENT_NAMES[cat.accent[p]],
            "detail": CATEGORIES[category][1][cat.detail[p]], "brand": BRANDS[cat.brand[p]],
            "material": CATEGORIES[category][2][cat.material[p]], "design": int(cat.design[p]),
            "popularity_rank": int(cat.popularity_rank[p]), "split": split})
    return {"lines": {k: "".join(json.dumps(r, separators=(", ", ": ")) + "\n" for r in v)
                      for k, v in lines.items()}, "stats": stats}


def scene_companions(cat: Catalogue, p: int, cfg: SynthConfig, rng: np.random.Generator,
                     by_category: list[np.ndarray]) -> list[int]:
    """The products shown beside product ``p`` in a scene doc: ``cfg.scene_objects`` of them,
    each of a different category and none of ``p``'s, so the title's category word names one
    object in the scene."""
    n = int(rng.integers(cfg.scene_objects[0], cfg.scene_objects[1] + 1))
    others = [c for c in range(len(CATEGORIES)) if c != cat.category[p]]
    chosen = rng.choice(others, size=n, replace=False)
    return [int(by_category[c][rng.integers(len(by_category[c]))]) for c in chosen]


def click_counts(rng: np.random.Generator, cfg, docs: list[int], seller_w: np.ndarray,
                 look_alikes: np.ndarray, train_items: np.ndarray, doc_offset: np.ndarray,
                 n_docs: np.ndarray) -> dict[int, int]:
    """One train query's clicks, doc -> count: ``1 + Poisson(cfg.clicks_per_query)`` events,
    each on a look-alike item's doc (``cfg.noise_confusable``), a random train item's doc
    (``cfg.noise_random``), or else one of the query's own ``docs``, the first sellers favoured
    by ``seller_w`` (exposure bias).  Items' docs are ``doc_offset[i] + range(n_docs[i])``."""
    counts: dict[int, int] = {}
    for _ in range(1 + int(rng.poisson(cfg.clicks_per_query))):
        u = rng.random()
        if u < cfg.noise_confusable and len(look_alikes):
            other = int(look_alikes[rng.integers(len(look_alikes))])
            d = int(doc_offset[other] + rng.integers(n_docs[other]))
        elif u < cfg.noise_confusable + cfg.noise_random:
            other = int(train_items[rng.integers(len(train_items))])
            d = int(doc_offset[other] + rng.integers(n_docs[other]))
        else:
            d = docs[int(rng.choice(len(docs), p=seller_w))]
        counts[d] = counts.get(d, 0) + 1
    return counts


def write_chunks(out: Path, outputs: dict[str, str], render_chunk, n_chunks: int, workers: int,
                 init, initargs: tuple, n_images: int, desc: str, progress: bool) -> dict:
    """Run ``render_chunk(i)`` for every chunk, in ``workers`` forked processes (each set up by
    ``init(*initargs)``), and append the chunks' lines, in chunk order, to the files
    ``outputs`` names (key -> path under ``out``).  The files are written as ``.part`` and
    renamed when whole.  Returns the chunks' ``stats`` summed."""
    files = {k: open(out / (v + ".part"), "w", encoding="utf-8") for k, v in outputs.items()}
    totals: dict = {}
    pool = None
    try:
        if workers > 1:
            pool = get_context("fork").Pool(workers, initializer=init, initargs=initargs)
            results = pool.imap(render_chunk, range(n_chunks))
        else:
            init(*initargs)
            results = map(render_chunk, range(n_chunks))
        with tqdm(total=n_images, unit="img", desc=desc, disable=not progress) as bar:
            for res in results:
                for k, text in res["lines"].items():
                    files[k].write(text)
                for k, v in res["stats"].items():
                    totals[k] = totals.get(k, 0) + v
                bar.update(res["stats"]["images"])
    finally:
        for f in files.values():
            f.close()
        if pool is not None:
            pool.close()
            pool.join()
    for v in outputs.values():  # the jsonl files appear only once complete
        os.replace(out / (v + ".part"), out / v)
    return totals


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
_OUTPUTS = {"docs": "docs.jsonl", "queries": "queries.jsonl", "clicks": "clicks.jsonl",
            "qrels": "qrels.jsonl", "truth_docs": "_truth/docs.jsonl",
            "truth_queries": "_truth/queries.jsonl", "truth_products": "_truth/products.jsonl"}


def generator_config(base, overrides: dict, seed):
    """``base`` (a generator's config dataclass) with ``overrides``; an unknown field or a seed
    that is not a whole number >= 0 is an error naming it."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(base)}
    if unknown:
        raise ValueError(f"unknown {type(base).__name__} field(s): {sorted(unknown)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a whole number >= 0, got {seed!r}")
    return dataclasses.replace(base, **overrides)


def make_synthshop(out: str | os.PathLike, preset: str = "small", seed: int = 0,
                   workers: int = 1, progress: bool = True, **overrides) -> dict:
    """Write a SynthShop dataset folder and return its measured statistics.

    ``overrides`` replace fields of the preset's :class:`SynthConfig` (``n_products=...``).
    The folder must be new or empty: an existing dataset is never overwritten.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = generator_config(PRESETS[preset], overrides, seed)
    return build_new_folder(out, "make-data",
                            lambda partial: _write_synthshop(partial, cfg, preset, seed, workers,
                                                             progress))


def _write_synthshop(out: Path, cfg: SynthConfig, preset: str, seed: int, workers: int,
                     progress: bool) -> dict:
    for sub in ("images/docs", "images/queries", "_truth/masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    cat = build_catalogue(cfg, seed)
    totals = write_chunks(out, _OUTPUTS, _render_chunk, math.ceil(cfg.n_products /
                                                                   cfg.chunk_products),
                          workers, _init_worker, (cfg, cat, seed, str(out)),
                          int(cat.n_docs.sum() + cat.n_queries.sum()), f"synthshop {preset}",
                          progress)
    stats = {"preset": preset, "seed": seed, "products": cfg.n_products,
             **click_log_stats(cfg, cat, totals)}
    (out / "_truth" / "config.json").write_text(
        json.dumps({"preset": preset, "seed": seed, **dataclasses.asdict(cfg)}, indent=2) + "\n")
    (out / "_truth" / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def click_log_stats(cfg, items, totals: dict) -> dict:
    """What a generated log measures: docs and queries, click events, the noise share and the
    Zipf exponent measured against those asked for.  ``items`` has per item (product, concept)
    ``n_docs``, ``n_queries``, ``is_test`` and ``popularity_rank``; ``totals`` the summed
    ``click_events`` and ``noise_events``."""
    train = ~items.is_test
    return {
        "docs": int(items.n_docs.sum()),
        "train_queries": int(items.n_queries[train].sum()),
        "test_queries": int(items.n_queries[items.is_test].sum()),
        "click_events": totals["click_events"],
        "noise_share_requested": cfg.noise_confusable + cfg.noise_random,
        "noise_share_measured": totals["noise_events"] / max(1, totals["click_events"]),
        "zipf_exponent_requested": cfg.zipf_exponent,
        "zipf_exponent_measured": zipf_exponent_mle(
            np.repeat(items.popularity_rank[train], items.n_queries[train]),
            np.sort(items.popularity_rank[train])),
    }


def zipf_exponent_mle(ranks: np.ndarray, support: np.ndarray) -> float:
    """Maximum-likelihood Zipf exponent of samples ``ranks`` drawn with p(r) ~ r**-a on ``support``.

    The likelihood's stationary point is mean(log r_i) = E_a[log r]; E_a[log r] falls as a
    rises, so bisection finds it.
    """
    target = float(np.mean(np.log(ranks)))
    log_support = np.log(np.asarray(support, dtype=np.float64))

    def expected_log(a: float) -> float:
        w = np.exp(-a * (log_support - log_support.min()))
        return float((w * log_support).sum() / w.sum())

    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if expected_log(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def doc_object_masks(root: str | os.PathLike, doc_ids: list[str], size: int) -> np.ndarray:
    """Each doc's product mask [N, size, size] (share of each pixel the product covers, 0-1),
    from ``_truth/masks/`` (analysis only, as every ``_truth`` reader)."""
    return doc_scene_masks(root, doc_ids, size)[0][:, 0]


def doc_scene_masks(root: str | os.PathLike, doc_ids: list[str],
                    size: int) -> tuple[np.ndarray, list[list[dict]]]:
    """Every object's mask in each doc, from ``_truth/masks/`` and ``_truth/docs.jsonl``:
    ``[N, O, size, size]`` (share of each pixel object ``o`` covers; ``O`` the most objects any
    of these docs shows, absent objects all zero) and each doc's ``objects`` records (product
    id, category, box), the product first (analysis only)."""
    root = Path(root)
    objects = doc_objects(root)
    missing = [d for d in doc_ids if not objects.get(d)
               or not (root / "_truth" / "masks" / f"{d}.png").exists()]
    if missing:
        raise ValueError(f"{root}/_truth has no object masks for {missing[:3]}: a folder from an "
                         f"older generator (or not a SynthShop folder); make it again")
    n_obj = max(len(objects[d]) for d in doc_ids) if doc_ids else 1
    out = np.zeros((len(doc_ids), n_obj, size, size), dtype=np.float32)
    for i, d in enumerate(doc_ids):
        labels = np.asarray(Image.open(root / "_truth" / "masks" / f"{d}.png"))
        for o in range(len(objects[d])):
            one = Image.fromarray((labels == o + 1).astype(np.float32))  # mode F
            out[i, o] = np.asarray(one.resize((size, size), Image.BOX))
    return out, [objects[d] for d in doc_ids]


def doc_objects(root: str | os.PathLike) -> dict[str, list[dict] | None]:
    """``{doc id: its objects}`` from a SynthShop folder's ``_truth/docs.jsonl``: each object's
    product id, category and box, the product the title names first; None for a folder from a
    generator before object records (analysis only)."""
    path = Path(root) / "_truth" / "docs.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no truth here; truth-based analysis needs a "
                                f"SynthShop folder")
    with open(path) as f:
        return {r["doc_id"]: r.get("objects") for r in map(json.loads, f)}


def load_truth(root: str | os.PathLike) -> dict[str, str]:
    """``{doc or query id: product id}`` from a SynthShop folder's ``_truth/`` (analysis only)."""
    root = Path(root)
    truth = {}
    for name, key in (("docs.jsonl", "doc_id"), ("queries.jsonl", "query_id")):
        path = root / "_truth" / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: no truth here; truth-based analysis needs a "
                                    f"SynthShop folder")
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                truth[r[key]] = r["product_id"]
    return truth
