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

The truth (product of every doc and query, product attributes) goes to ``_truth/``, which readers
ignore: only analysis and tests use it, never training.

Generation streams products in chunks (bounded memory), each chunk with its own RNG seeded from
(seed, chunk), so the output is byte-identical for a seed whatever the number of workers.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from tqdm import tqdm

from .files import LOCK_FILE, check_writable, folder_lock

# --------------------------------------------------------------------------------------------
# Vocabulary: the product taxonomy and the words sellers use for it.
# --------------------------------------------------------------------------------------------
CATEGORIES = {
    # category: (title synonyms, three shape-detail phrases, materials)
    "tshirt": (["t-shirt", "tee", "tshirt"], ["crew neck", "v-neck", "long sleeve"],
               ["cotton", "linen", "polyester", "bamboo"]),
    "mug": (["mug", "cup", "coffee mug"], ["short", "tall", "wide handle"],
            ["ceramic", "porcelain", "enamel", "stoneware"]),
    "bag": (["tote bag", "handbag", "bag"], ["top handle", "shoulder strap", "bucket"],
            ["leather", "canvas", "suede", "nylon"]),
    "shoe": (["sneaker", "shoe", "trainer"], ["low top", "high top", "heeled"],
             ["leather", "mesh", "suede", "canvas"]),
    "hat": (["hat", "cap", "headwear"], ["baseball", "bucket", "beanie"],
            ["wool", "cotton", "straw", "felt"]),
    "lamp": (["lamp", "table lamp", "desk light"], ["cone shade", "drum shade", "dome shade"],
             ["brass", "steel", "ceramic", "wood"]),
    "bottle": (["bottle", "water bottle", "flask"], ["slim", "wide", "sport cap"],
               ["steel", "glass", "plastic", "aluminium"]),
    "watch": (["watch", "wristwatch", "timepiece"], ["round face", "square face", "thin strap"],
              ["steel", "leather", "titanium", "silicone"]),
    "chair": (["chair", "seat", "armchair"], ["high back", "low back", "stool"],
              ["oak", "walnut", "plastic", "rattan"]),
    "vase": (["vase", "flower vase", "planter"], ["round", "tall", "flared"],
             ["glass", "ceramic", "porcelain", "terracotta"]),
    "phonecase": (["phone case", "phone cover", "case"], ["one lens", "two lens", "three lens"],
                  ["silicone", "leather", "plastic", "carbon"]),
    "umbrella": (["umbrella", "parasol", "brolly"], ["straight handle", "hook handle", "compact"],
                 ["nylon", "polyester", "canvas", "vinyl"]),
}
CATEGORY_NAMES = list(CATEGORIES)

COLOURS = {
    # colour: (RGB, title synonyms)
    "red": ((200, 30, 40), ["red", "crimson", "scarlet"]),
    "orange": ((240, 130, 20), ["orange", "tangerine"]),
    "yellow": ((240, 210, 40), ["yellow", "mustard"]),
    "green": ((40, 150, 60), ["green", "emerald"]),
    "teal": ((20, 150, 150), ["teal", "turquoise"]),
    "blue": ((40, 90, 210), ["blue", "azure", "cobalt"]),
    "navy": ((25, 35, 100), ["navy", "dark blue"]),
    "purple": ((120, 50, 160), ["purple", "violet"]),
    "pink": ((240, 120, 170), ["pink", "rose"]),
    "brown": ((120, 75, 40), ["brown", "chocolate"]),
    "black": ((30, 30, 30), ["black", "jet black"]),
    "grey": ((140, 140, 140), ["grey", "gray", "charcoal"]),
}
COLOUR_NAMES = list(COLOURS)

PATTERNS = {
    "solid": ["solid", "plain"],
    "striped": ["striped", "stripe", "pinstripe"],
    "dotted": ["polka dot", "dotted", "spotted"],
    "checked": ["plaid", "checked", "checkered"],
}
PATTERN_NAMES = list(PATTERNS)

ACCENTS = {  # trim and pattern ink colour: visible, named in some titles ("gold trim")
    "white": (245, 245, 245), "black": (20, 20, 20), "gold": (212, 175, 55),
    "silver": (192, 192, 200), "red": (220, 20, 30), "blue": (30, 60, 230),
    "green": (20, 180, 60), "pink": (250, 100, 190),
}
ACCENT_NAMES = list(ACCENTS)

BRANDS = ["norvik", "alba", "kestrel", "lumo", "brava", "tessel", "orbis", "vanta",
          "quill", "mardi", "solen", "fjord", "pavo", "zenit", "corra", "ember",
          "halden", "ivra", "juno", "kova", "lark", "mosi", "nuvo", "rhea"]
# A brand's image mark: a tiny shape in one of a few colours; 3 shapes x 8 colours = 24 marks.
_MARK_COLOURS = [(250, 250, 250), (250, 220, 0), (0, 200, 255), (255, 0, 200),
                 (0, 255, 100), (255, 120, 0), (150, 0, 255), (255, 60, 60)]

SPAM_WORDS = ["hot sale", "free shipping", "2024", "new arrival", "best seller", "limited offer",
              "top quality", "wholesale", "gift", "trending", "cheap", "100% authentic"]

_CANVAS = 128  # objects are drawn at 128 px and downsampled, for anti-aliasing.


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
# Drawing: one object on a transparent canvas (RGBA), shared by studio shots and user photos.
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _shape_mask(category: str, detail: int) -> Image.Image:
    """Silhouette of a product at 128 px: category sets the shape, detail a visible variant."""
    m = Image.new("L", (_CANVAS, _CANVAS), 0)
    d = ImageDraw.Draw(m)
    if category == "tshirt":
        d.polygon([(40, 24), (88, 24), (112, 50), (98, 62), (90, 54), (90, 108), (38, 108),
                   (38, 54), (30, 62), (16, 50)], fill=255)
        if detail == 0:
            d.ellipse((54, 18, 74, 34), fill=0)
        elif detail == 1:
            d.polygon([(52, 24), (76, 24), (64, 44)], fill=0)
        else:
            d.polygon([(16, 50), (30, 62), (12, 100), (2, 92)], fill=255)
            d.polygon([(112, 50), (98, 62), (116, 100), (126, 92)], fill=255)
    elif category == "mug":
        top = 30 if detail != 0 else 46
        d.rectangle((34, top, 84, 106), fill=255)
        w = 16 if detail == 2 else 8
        d.ellipse((74, 48, 108, 88), fill=255)
        d.ellipse((74 + w, 48 + w, 108 - w // 2, 88 - w), fill=0)
    elif category == "bag":
        d.polygon([(28, 56), (100, 56), (110, 110), (18, 110)], fill=255)
        if detail == 0:
            d.arc((42, 26, 86, 80), 180, 360, fill=255, width=7)
        elif detail == 1:
            d.line([(28, 58), (64, 12), (100, 58)], fill=255, width=5)
        else:
            d.ellipse((22, 44, 106, 70), fill=255)
    elif category == "shoe":
        d.polygon([(14, 96), (116, 96), (116, 108), (14, 108)], fill=255)
        if detail == 0:
            d.polygon([(20, 96), (40, 66), (80, 70), (114, 86), (114, 96)], fill=255)
        elif detail == 1:
            d.polygon([(20, 96), (24, 36), (54, 36), (64, 70), (114, 84), (114, 96)], fill=255)
        else:
            d.polygon([(20, 96), (40, 60), (70, 76), (114, 88), (114, 96)], fill=255)
            d.rectangle((18, 96, 30, 124), fill=255)
    elif category == "hat":
        if detail == 0:
            d.chord((30, 34, 98, 102), 180, 360, fill=255)
            d.polygon([(90, 66), (124, 72), (90, 76)], fill=255)
            d.rectangle((30, 66, 98, 76), fill=255)
        elif detail == 1:
            d.polygon([(40, 34), (88, 34), (98, 78), (30, 78)], fill=255)
            d.ellipse((14, 70, 114, 92), fill=255)
        else:
            d.chord((30, 28, 98, 110), 180, 360, fill=255)
            d.rectangle((30, 68, 98, 92), fill=255)
            d.ellipse((56, 16, 72, 32), fill=255)
    elif category == "lamp":
        d.rectangle((60, 62, 68, 104), fill=255)
        d.ellipse((38, 100, 90, 116), fill=255)
        if detail == 0:
            d.polygon([(52, 18), (76, 18), (100, 64), (28, 64)], fill=255)
        elif detail == 1:
            d.rectangle((34, 20, 94, 64), fill=255)
        else:
            d.chord((26, 20, 102, 100), 180, 360, fill=255)
    elif category == "bottle":
        half = 14 if detail == 0 else 24
        d.rounded_rectangle((64 - half, 44, 64 + half, 118), radius=8, fill=255)
        d.rectangle((56, 24, 72, 46), fill=255)
        if detail == 2:
            d.rectangle((50, 10, 78, 26), fill=255)
        else:
            d.rectangle((54, 16, 74, 26), fill=255)
    elif category == "watch":
        strap = 10 if detail == 2 else 18
        d.rectangle((64 - strap, 6, 64 + strap, 122), fill=255)
        if detail == 1:
            d.rectangle((36, 36, 92, 92), fill=255)
        else:
            d.ellipse((34, 34, 94, 94), fill=255)
    elif category == "chair":
        d.rectangle((30, 68, 98, 78), fill=255)
        for x in (32, 90):
            d.rectangle((x, 78, x + 6, 118), fill=255)
        if detail == 0:
            d.rectangle((30, 12, 40, 70), fill=255)
            d.rectangle((30, 12, 98, 24), fill=255)
        elif detail == 1:
            d.rectangle((30, 44, 98, 56), fill=255)
            d.rectangle((30, 44, 38, 70), fill=255)
            d.rectangle((90, 44, 98, 70), fill=255)
    elif category == "vase":
        if detail == 0:
            d.ellipse((28, 44, 100, 116), fill=255)
            d.rectangle((52, 22, 76, 54), fill=255)
        elif detail == 1:
            d.rounded_rectangle((44, 14, 84, 118), radius=14, fill=255)
        else:
            d.polygon([(28, 14), (100, 14), (76, 70), (84, 118), (44, 118), (52, 70)], fill=255)
    elif category == "phonecase":
        d.rounded_rectangle((36, 8, 92, 120), radius=12, fill=255)
        for k in range(detail + 1):
            d.ellipse((44, 16 + 16 * k, 56, 28 + 16 * k), fill=0)
    elif category == "umbrella":
        d.chord((12, 24, 116, 100), 180, 360, fill=255)
        d.rectangle((62, 60, 66, 112 if detail != 2 else 92), fill=255)
        if detail == 1:
            d.arc((50, 100, 66, 120), 0, 180, fill=255, width=4)
    else:  # pragma: no cover - CATEGORIES is closed
        raise KeyError(category)
    return m


def _pattern_fill(pattern: str, rgb: tuple[int, int, int],
                  ink: tuple[int, int, int]) -> Image.Image:
    base = Image.new("RGB", (_CANVAS, _CANVAS), rgb)
    if pattern == "solid":
        return base
    d = ImageDraw.Draw(base)
    if pattern == "striped":
        for y in range(0, _CANVAS, 16):
            d.rectangle((0, y, _CANVAS, y + 6), fill=ink)
    elif pattern == "dotted":
        for y in range(4, _CANVAS, 16):
            for x in range(4 + (y // 16 % 2) * 8, _CANVAS, 16):
                d.ellipse((x, y, x + 7, y + 7), fill=ink)
    elif pattern == "checked":
        for y in range(0, _CANVAS, 16):
            for x in range((y // 16 % 2) * 16, _CANVAS, 32):
                d.rectangle((x, y, x + 15, y + 15), fill=ink)
    return base


def _brand_mark(d: ImageDraw.ImageDraw, brand: int, x: int, y: int) -> None:
    shape, colour = divmod(brand, len(_MARK_COLOURS))
    c = _MARK_COLOURS[colour]
    box = (x, y, x + 7, y + 7)
    if shape == 0:
        d.ellipse(box, fill=c)
    elif shape == 1:
        d.rectangle(box, fill=c)
    else:
        d.polygon([(x, y + 7), (x + 7, y + 7), (x + 3, y)], fill=c)


_MARK_SPOT = {  # where each category carries its brand mark (a spot inside its silhouette)
    "tshirt": (60, 60), "mug": (50, 80), "bag": (60, 84), "shoe": (70, 98), "hat": (60, 56),
    "lamp": (60, 40), "bottle": (60, 80), "watch": (60, 60), "chair": (60, 70), "vase": (60, 86),
    "phonecase": (70, 96), "umbrella": (60, 48),
}


def render_product(cat: Catalogue, p: int) -> Image.Image:
    """The product itself, RGBA at 128 px, transparent outside its silhouette."""
    category = CATEGORY_NAMES[cat.category[p]]
    rgb = COLOURS[COLOUR_NAMES[cat.colour[p]]][0]
    mask = _shape_mask(category, int(cat.detail[p]))
    accent = ACCENTS[ACCENT_NAMES[cat.accent[p]]]
    obj = _pattern_fill(PATTERN_NAMES[cat.pattern[p]], rgb, accent)
    outline = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(5)))  # inner rim
    obj.paste(accent, mask=outline)
    _brand_mark(ImageDraw.Draw(obj), int(cat.brand[p]), *_MARK_SPOT[category])
    obj.putalpha(mask)
    return obj


def studio_shot(obj: Image.Image, rng: np.random.Generator, size: int) -> tuple[Image.Image, list]:
    """A seller's clean shot: light plain background, object centred, small framing changes.

    Also returns where the object went, ``[x, y, side]`` on the 128 px canvas, so its mask can
    be rebuilt for analysis (:func:`doc_object_mask`)."""
    bg = int(rng.integers(235, 256))
    canvas = Image.new("RGB", (_CANVAS, _CANVAS), (bg, bg, bg - int(rng.integers(0, 6))))
    scale = rng.uniform(0.82, 0.98)
    s = int(_CANVAS * scale)
    o = obj.resize((s, s), Image.BILINEAR)
    off = (_CANVAS - s) // 2
    dx, dy = rng.integers(-4, 5, size=2)
    box = [off + int(dx), off + int(dy), s]
    canvas.paste(o, tuple(box[:2]), o)
    arr = np.asarray(canvas, dtype=np.float32) * rng.uniform(0.96, 1.04)
    canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return canvas.resize((size, size), Image.BOX), box


def _cluttered_background(rng: np.random.Generator) -> Image.Image:
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    t = np.linspace(0, 1, _CANVAS, dtype=np.float32)[:, None, None]
    grad = (c0 * (1 - t) + c1 * t) * np.ones((1, _CANVAS, 1), dtype=np.float32)
    bg = Image.fromarray(grad.astype(np.uint8))
    d = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(-20, _CANVAS, size=2)
        w, h = rng.integers(10, 60, size=2)
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            d.rectangle((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=fill)
        else:
            d.ellipse((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=fill)
    return bg


def user_photo(obj: Image.Image, rng: np.random.Generator, size: int, gap: float) -> Image.Image:
    """A user's photo of the product: every degradation scales with ``gap``."""
    canvas = _cluttered_background(rng) if rng.random() < min(1.0, gap) else \
        Image.new("RGB", (_CANVAS, _CANVAS), (240, 240, 240))
    scale = 1.0 - gap * rng.uniform(0.0, 0.45)
    s = max(16, int(_CANVAS * scale))
    o = obj.rotate(float(gap * rng.uniform(-35, 35)), resample=Image.BILINEAR, expand=False)
    o = o.resize((s, s), Image.BILINEAR)
    shift = int(gap * 0.25 * _CANVAS)
    x = (_CANVAS - s) // 2 + int(rng.integers(-shift, shift + 1))
    y = (_CANVAS - s) // 2 + int(rng.integers(-shift, shift + 1))
    canvas.paste(o, (x, y), o)
    # Perspective: move the four corners by up to 12% of the side.
    k = gap * 0.12 * _CANVAS
    src = np.array([[0, 0], [_CANVAS, 0], [_CANVAS, _CANVAS], [0, _CANVAS]], dtype=np.float64)
    dst = src + rng.uniform(-k, k, size=(4, 2))
    canvas = canvas.transform((_CANVAS, _CANVAS), Image.PERSPECTIVE,
                              _perspective_coeffs(src, dst), Image.BILINEAR)
    if rng.random() < 0.5 * min(1.0, gap):  # partial occlusion: a thumb, a bag strap, a cup...
        d = ImageDraw.Draw(canvas)
        w, h = (rng.uniform(0.15, 0.35, size=2) * _CANVAS).astype(int)
        x0, y0 = rng.integers(0, _CANVAS - 10, size=2)
        d.ellipse((int(x0), int(y0), int(x0 + w), int(y0 + h)),
                  fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    canvas = canvas.resize((size, size), Image.BOX)
    blur = gap * rng.uniform(0.0, 1.2)
    if blur > 0.2:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(canvas, dtype=np.float32)
    cast = 1.0 + gap * rng.uniform(-0.25, 0.25, size=3)       # white balance
    arr = arr * cast * (1.0 + gap * rng.uniform(-0.3, 0.2))    # exposure
    arr = arr + rng.normal(0.0, gap * rng.uniform(0, 10), size=arr.shape)  # sensor noise
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """Coefficients PIL wants: they map output (src) corners to input (dst) corners."""
    a = []
    for (x, y), (u, v) in zip(src, dst):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.array(a), dst.reshape(-1)).tolist()


def encode_image(img: Image.Image, fmt: str, rng: np.random.Generator, gap: float) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=int(95 - gap * rng.uniform(10, 60)))
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


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
    _STATE.update(cfg=cfg, cat=cat, seed=seed, out=Path(out), confusable=_confusable_index(cat))


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
            shot, box = studio_shot(obj, rng, cfg.image_size)
            _write(out / rel, encode_image(shot, "PNG", rng, 0))
            lines["docs"].append({"doc_id": doc_id(d), "image": rel,
                                  "text": make_title(cat, p, cfg, rng), "category": category})
            lines["truth_docs"].append({"doc_id": doc_id(d), "product_id": product_id(p),
                                        "seller_rank": j + 1, "object_box": box})
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
            counts: dict[int, int] = {}
            for _ in range(1 + int(rng.poisson(cfg.clicks_per_query))):
                u = rng.random()
                if u < cfg.noise_confusable and len(look_alikes):
                    other = int(look_alikes[rng.integers(len(look_alikes))])
                    d = int(cat.doc_offset[other] + rng.integers(cat.n_docs[other]))
                elif u < cfg.noise_confusable + cfg.noise_random:
                    other = int(train_products[rng.integers(len(train_products))])
                    d = int(cat.doc_offset[other] + rng.integers(cat.n_docs[other]))
                else:
                    d = docs[int(rng.choice(len(docs), p=seller_w))]
                counts[d] = counts.get(d, 0) + 1
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


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
_OUTPUTS = {"docs": "docs.jsonl", "queries": "queries.jsonl", "clicks": "clicks.jsonl",
            "qrels": "qrels.jsonl", "truth_docs": "_truth/docs.jsonl",
            "truth_queries": "_truth/queries.jsonl", "truth_products": "_truth/products.jsonl"}


def make_synthshop(out: str | os.PathLike, preset: str = "small", seed: int = 0,
                   workers: int = 1, progress: bool = True, **overrides) -> dict:
    """Write a SynthShop dataset folder and return its measured statistics.

    ``overrides`` replace fields of the preset's :class:`SynthConfig` (``n_products=...``).
    The folder must be new or empty: an existing dataset is never overwritten.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SynthConfig)}
    if unknown:
        raise ValueError(f"unknown SynthConfig field(s): {sorted(unknown)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a whole number >= 0, got {seed!r}")
    cfg = dataclasses.replace(PRESETS[preset], **overrides)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new folder")
    # Written into a hidden sibling, renamed into place when whole: a killed run leaves no
    # half dataset under the name asked for, and the next run starts that sibling afresh.
    partial = out.parent / f".{out.name}.partial"
    check_writable(partial, "folder")
    with folder_lock(partial, "make-data"):
        for stale in partial.iterdir():
            if stale.name != LOCK_FILE:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        stats = _write_synthshop(partial, cfg, preset, seed, workers, progress)
        (partial / LOCK_FILE).unlink()
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(partial, out)
    return stats


def _write_synthshop(out: Path, cfg: SynthConfig, preset: str, seed: int, workers: int,
                     progress: bool) -> dict:
    for sub in ("images/docs", "images/queries", "_truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    cat = build_catalogue(cfg, seed)
    n_chunks = math.ceil(cfg.n_products / cfg.chunk_products)
    files = {k: open(out / (v + ".part"), "w", encoding="utf-8") for k, v in _OUTPUTS.items()}
    totals = {"click_events": 0, "noise_events": 0, "images": 0}
    initargs = (cfg, cat, seed, str(out))
    try:
        if workers > 1:
            pool = get_context("fork").Pool(workers, initializer=_init_worker, initargs=initargs)
            results = pool.imap(_render_chunk, range(n_chunks))
        else:
            pool = None
            _init_worker(*initargs)
            results = map(_render_chunk, range(n_chunks))
        bar = tqdm(total=int(cat.n_docs.sum() + cat.n_queries.sum()), unit="img",
                   desc=f"synthshop {preset}", disable=not progress)
        for res in results:
            for k, text in res["lines"].items():
                files[k].write(text)
            for k, v in res["stats"].items():
                totals[k] += v
            bar.update(res["stats"]["images"])
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        for f in files.values():
            f.close()
    for k, v in _OUTPUTS.items():  # the jsonl files appear only once complete
        os.replace(out / (v + ".part"), out / v)
    stats = {
        "preset": preset, "seed": seed,
        "products": cfg.n_products, "docs": int(cat.n_docs.sum()),
        "train_queries": int(cat.n_queries[~cat.is_test].sum()),
        "test_queries": int(cat.n_queries[cat.is_test].sum()),
        "click_events": totals["click_events"],
        "noise_share_requested": cfg.noise_confusable + cfg.noise_random,
        "noise_share_measured": totals["noise_events"] / max(1, totals["click_events"]),
        "zipf_exponent_requested": cfg.zipf_exponent,
        "zipf_exponent_measured": zipf_exponent_mle(
            np.repeat(cat.popularity_rank[~cat.is_test], cat.n_queries[~cat.is_test]),
            np.sort(cat.popularity_rank[~cat.is_test])),
    }
    (out / "_truth" / "config.json").write_text(
        json.dumps({"preset": preset, "seed": seed, **dataclasses.asdict(cfg)}, indent=2) + "\n")
    (out / "_truth" / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


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
    """Each doc's object mask [N, size, size] (share of each pixel the object covers, 0-1),
    rebuilt from ``_truth/`` (the generator's config and each doc's ``object_box``) by drawing
    the product again: analysis only, as every ``_truth`` reader."""
    root = Path(root)
    conf = json.loads((root / "_truth" / "config.json").read_text())
    seed = conf.pop("seed")
    conf.pop("preset")
    cfg = SynthConfig(**{**conf, "docs_per_product": tuple(conf["docs_per_product"])})
    truth = {}
    for line in open(root / "_truth" / "docs.jsonl"):
        r = json.loads(line)
        truth[r["doc_id"]] = r
    missing = [d for d in doc_ids if "object_box" not in truth.get(d, {})]
    if missing:
        raise ValueError(f"{root}/_truth/docs.jsonl has no object_box for {missing[:3]}: "
                         f"a folder from an older generator; make it again")
    cat = build_catalogue(cfg, seed)
    out = np.zeros((len(doc_ids), size, size), dtype=np.float32)
    for i, d in enumerate(doc_ids):
        p = int(truth[d]["product_id"].lstrip("p"))
        x, y, s = truth[d]["object_box"]
        alpha = render_product(cat, p).getchannel("A").resize((s, s), Image.BILINEAR)
        canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
        canvas.paste(alpha, (x, y))
        out[i] = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0
    return out


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
