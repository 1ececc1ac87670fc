"""SynthShop's products: the taxonomy and the words sellers use for it, and the drawing of one
product (silhouette, colour, pattern, accent trim, brand mark) on a transparent canvas.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from PIL import Image, ImageChops, ImageDraw, ImageFilter

from .shop_images import CANVAS

if TYPE_CHECKING:  # the catalogue's type only: synthshop imports this module
    from .synthshop import Catalogue

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


# --------------------------------------------------------------------------------------------
# Drawing: one product on a transparent canvas (RGBA), for its studio shots and user photos.
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _shape_mask(category: str, detail: int) -> Image.Image:
    """Silhouette of a product at 128 px: category sets the shape, detail a visible variant."""
    m = Image.new("L", (CANVAS, CANVAS), 0)
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
    base = Image.new("RGB", (CANVAS, CANVAS), rgb)
    if pattern == "solid":
        return base
    d = ImageDraw.Draw(base)
    if pattern == "striped":
        for y in range(0, CANVAS, 16):
            d.rectangle((0, y, CANVAS, y + 6), fill=ink)
    elif pattern == "dotted":
        for y in range(4, CANVAS, 16):
            for x in range(4 + (y // 16 % 2) * 8, CANVAS, 16):
                d.ellipse((x, y, x + 7, y + 7), fill=ink)
    elif pattern == "checked":
        for y in range(0, CANVAS, 16):
            for x in range((y // 16 % 2) * 16, CANVAS, 32):
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
