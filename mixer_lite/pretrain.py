"""Pretraining the image encoder on real drawings, so that fine-tuning starts from features.

Mixer (arXiv 2305.03972) fine-tunes backbones pretrained on large image sets; so does every
strong result in image retrieval.  An offline install cannot download ImageNet weights, so
mixer-lite makes its own from a corpus of real images that installs by name (Debian's
``openclipart-png``: drawings by many artists in a two-level folder taxonomy) and ships them
(``mixer_lite/weights/``, loaded with ``--model.image_weights``).

The method is our choice (the paper says nothing about pretraining); see
``mixer_lite/weights/MODEL_CARD.md`` for what it was measured against:

* **Objects, not pages.**  Each corpus image is cut out along its alpha channel and padded to a
  square, like a product cut-out.  Images over ``max_megapixels`` are skipped, not decoded
  (some ``openclipart-png`` files exceed 100 megapixels), as are tiny and empty ones; the counts
  go into the corpus's ``corpus.json``.
* **Shop views.**  Every object is rendered ``views`` times as a seller's studio shot (plain light
  background) and ``views`` times as a user's photo (clutter, scale, rotation, perspective,
  occlusion, colour cast, blur, noise): the photo-like degradations of SynthShop's query side,
  applied to real drawings.  The views are rendered once, in chunks seeded by
  ``(seed, chunk)``, so they are the same whatever the number of worker processes.
* **Instance discrimination across the domain gap.**  A batch holds one photo view and one
  studio view of each of ``batch_size`` objects; InfoNCE (both directions) asks each photo to
  find its own object's studio view among the batch's, through a projection head that is
  dropped after pretraining (SimCLR).  With ``taxonomy_weight > 0`` a linear head on the pooled
  features also classifies the corpus folder (supervised on the taxonomy).
* **Or across designers** (``positives="designers"``, the icon sets of :mod:`icon_sources`):
  an object is a name two or more sets drew, and a positive pair is two sets' drawings of it,
  each under SimCLR's generic augmentations (:func:`drawing_view`), so the encoder learns what
  stays the same when another designer draws the thing, and owes nothing to SynthShop's
  renderer or to the icons dataset's photos; drawings of names only one set drew join as
  objects whose pair is two views of the one drawing.  ``exclude_concepts`` names an icons
  dataset whose concepts (training, validation and test alike) are left out by name, so the
  dataset measures transfer to concepts the backbone never saw paired.
* **Beside coloured drawings** (``colour_corpus``, for example ``openclipart-png``): a seeded
  sample of ``colour_drawings`` drawings join the designers' corpus as objects whose pair is
  two hue-keeping views of one drawing, so colour, which two designers' drawings of a name do
  not share, still finds a drawing's other view (docs/EXPERIMENTS.md, "A backbone pretrained
  across designers").
* **A probe while it trains.**  ``held_out_share`` of the objects never train; every
  ``probe_every`` steps the log gets their photo-to-studio Recall@1 with the frozen pooled
  features (the features fine-tuning starts from), step 0 (random weights) included.

Checkpoints are atomic and a resumed run is exact: the batches and views of a step are drawn
from ``(seed, step)``, so a run killed and resumed makes the same weights as one that never
stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

from .config import check_resumable
from .encoders import ConvEncoder, normalise_pixels
from .files import atomic_path, read_log, remove_stale_temporaries, strict_json, truncate_log, \
    write_json
from .icons import (IconsConfig, drop_near_duplicates, ink_map, monochrome, rasterise,
                    read_drawings)
from .losses import info_nce
from .model import ModelConfig
from .optim import warmup_cosine
from .runs import environment, load_torch, require_keys, resolve_device, save_torch, torch_threads
from .shop_images import CANVAS, studio_shot, user_photo
from .weights import WEIGHTS_FORMAT, export_weights

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
_CHUNK = 256


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining settings; every field can be overridden (``--key=value``)."""

    image_size: int = 64             # the size the views are rendered at (tiny-cpu trains at 64)
    width: int = 128                 # the cnn's channels (ModelConfig.vit_dim of the model that
                                     # loads the weights must be the same)
    views: int = 4                   # studio and photo renders per object
    gap: float = 1.0                 # strength of the photo degradations (SynthShop's ``gap``)
    held_out_share: float = 0.05     # objects kept out of training, for the probe
    max_megapixels: float = 64.0     # larger images are skipped, not decoded
    batch_size: int = 128            # objects per step (two views each)
    steps: int = 3000
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.03
    temperature: float = 0.1
    projection_dim: int = 128
    taxonomy_weight: float = 0.0     # > 0: also classify the corpus folder (supervised)
    positives: str = "views"         # "views": a photo and a studio view of one image;
                                     # "designers": two icon sets' drawings of one name
    icon_packages: str = "data/.icon-packages/node_modules"  # designers: the npm sets
    icon_themes: str = "/usr/share/icons"                   # designers: the Debian themes
    icon_sets: str = ""              # designers: the sets to read, comma-separated ("": all)
    exclude_concepts: str = ""       # designers: a dataset folder whose concepts are left out
    single_drawings: int = 6000      # designers: drawings of names one set drew, as objects
    keep_colour: bool = False        # designers: views keep the drawing's hues (drawing_view)
    colour_corpus: str = ""          # designers: a folder of coloured drawings, each an object
                                     # of two hue-keeping views of itself ("": none)
    colour_drawings: int = 6000      # designers: how many of colour_corpus's drawings
    probe_every: int = 250
    checkpoint_every: int = 100
    log_every: int = 10
    workers: int = 2                 # processes rendering the views
    threads: int = 0                 # torch CPU threads (0 = torch's default)
    device: str = "auto"
    seed: int = 0
    stop_after: int | None = None    # stop (as if killed) after this many steps

    def __post_init__(self):
        problems = []
        if self.views < 1 or self.batch_size < 2 or self.steps < 1:
            problems.append("views >= 1, batch_size >= 2 and steps >= 1 are needed")
        if self.image_size % 8 or self.width % 4:
            problems.append("image_size must be a multiple of 8 and width of 4")
        if not 0 < self.held_out_share < 1:
            problems.append(f"held_out_share must be in (0, 1), got {self.held_out_share}")
        if self.temperature <= 0 or self.lr <= 0 or self.max_megapixels <= 0:
            problems.append("temperature, lr and max_megapixels must be positive")
        if self.probe_every < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            problems.append("probe_every, checkpoint_every and log_every must be >= 1")
        if self.positives not in ("views", "designers"):
            problems.append(f"positives must be 'views' or 'designers', got {self.positives!r}")
        if self.positives == "designers" and self.taxonomy_weight > 0:
            problems.append("taxonomy_weight needs positives='views' (a corpus with folders)")
        if self.keep_colour and self.positives != "designers":
            problems.append("keep_colour needs positives='designers' (it changes drawing_view)")
        if self.colour_corpus and self.positives != "designers":
            problems.append("colour_corpus needs positives='designers' (it joins their corpus)")
        if self.single_drawings < 0 or self.colour_drawings < 0:
            problems.append("single_drawings and colour_drawings must be >= 0")
        if problems:
            raise ValueError("PretrainConfig: " + "; ".join(problems))


PRESETS = {
    # About an hour and a half on 2 CPU cores (the shipped weights; MODEL_CARD.md).
    "cpu": PretrainConfig(),
    # Across designers (the icon sets; the icons dataset's concepts left out): about 45
    # minutes on 2 CPU cores (docs/EXPERIMENTS.md, "A backbone pretrained across designers").
    "designers-cpu": PretrainConfig(positives="designers", exclude_concepts="data/icons",
                                    views=8, steps=1500),
    # The same recipe for a GPU: longer, bigger batches (more negatives per photo).
    "gpu": PretrainConfig(views=8, batch_size=512, steps=20000, lr=3e-3, workers=8,
                          checkpoint_every=1000, probe_every=1000, log_every=50),
}

# The designers' recipe with views that keep the drawing's hues: measured, it keeps little more
# colour, since the pairs teach most of the blindness (docs/EXPERIMENTS.md, "A backbone
# pretrained across designers").
PRESETS["designers-colour-cpu"] = dataclasses.replace(PRESETS["designers-cpu"], keep_colour=True)
# ... and beside 6,000 of openclipart-png's coloured drawings, paired with themselves: more
# colour kept, but fine-tuned worse on both datasets (same section).
PRESETS["designers-openclipart-cpu"] = dataclasses.replace(
    PRESETS["designers-colour-cpu"], colour_corpus="/usr/share/openclipart/png")

# Settings that change how a run is executed, not what it computes.
RUNTIME_KEYS = ("workers", "threads", "device", "stop_after", "probe_every", "log_every",
                "checkpoint_every")


# --------------------------------------------------------------------------------------------
# The corpus: objects cut out of real drawings, rendered as shop views
# --------------------------------------------------------------------------------------------
def scan_corpus(roots: list[str | os.PathLike]) -> list[tuple[str, str]]:
    """``(path, label)`` of every image under ``roots``, sorted; the label is the image's first
    two folders below its root (``animals/fish``), the taxonomy of ``openclipart-png``."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such corpus folder (on Debian or Ubuntu, "
                                    f"`apt-get install openclipart-png` makes "
                                    f"/usr/share/openclipart/png)")
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                folders = p.relative_to(root).parts[:-1][:2]
                found.append((str(p), f"{root.name}:" + ("/".join(folders) or ".")))
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {', '.join(map(str, roots))}")
    return found


def load_object(path: str, max_megapixels: float, size: int = CANVAS):
    """The drawing at ``path`` as an RGBA object on a transparent ``size`` square, or
    ``(None, reason)`` when it is skipped.  The pixel count is read from the header, so an
    image over ``max_megapixels`` is never decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_megapixels * 1e6:
                    return None, f"over {max_megapixels:g} megapixels"
                if min(w, h) < 8:
                    return None, "under 8 pixels"
                im.draft("RGB", (size, size))  # JPEG: decode at reduced size
                im = im.convert("RGBA")
        except Image.DecompressionBombError:
            return None, f"over {max_megapixels:g} megapixels"
        except (OSError, ValueError, SyntaxError) as e:
            return None, f"unreadable ({type(e).__name__})"
    box = im.getchannel("A").getbbox()
    if box is None:
        return None, "fully transparent"
    im = im.crop(box)
    scale = size / max(im.size)  # the longer side fills the square, small drawings grow too
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas, None


def excluded_concepts(data_dir: str) -> set[str]:
    """The concept names of an icons dataset folder (``_truth/concepts.jsonl``), which
    ``positives="designers"`` leaves out of pretraining; empty for ``""``."""
    if not data_dir:
        return set()
    path = Path(data_dir) / "_truth" / "concepts.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; --exclude_concepts names a dataset folder "
                                f"made by `mixer-lite make-data --source icons`")
    names = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            names.add(json.loads(line)["concept"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}, line {n}: not a JSON object with a 'concept' field") \
                from None
    return names


def scan_icon_sets(cfg: PretrainConfig) -> list[tuple[str, str, tuple]]:
    """The ``positives="designers"`` corpus as ``(key, label, files)`` objects: every name that
    two or more icon sets drew (one drawing per set), then a seeded sample of
    ``single_drawings`` drawings of names only one set drew (two views of the same drawing,
    so the encoder also meets the many things no two sets share); the concepts of
    ``exclude_concepts`` are left out by name, whatever their split."""
    excluded = excluded_concepts(cfg.exclude_concepts)
    by_name: dict[str, dict[str, str]] = {}
    chosen = IconsConfig(**({"sets": cfg.icon_sets.split(",")} if cfg.icon_sets else {}))
    for d in read_drawings(chosen, Path(cfg.icon_packages), Path(cfg.icon_themes)):
        if d.name not in excluded:
            by_name.setdefault(d.name, {}).setdefault(d.set_name, d.path)
    named = sorted(by_name.items())
    shared = [(name, "designers", tuple(sets.values())) for name, sets in named if len(sets) > 1]
    single = [(f"{s}:{name}", "one set", (path,)) for name, sets in named if len(sets) == 1
              for s, path in sets.items()]
    pick = np.random.default_rng([cfg.seed, 3]).permutation(len(single))[:cfg.single_drawings]
    return shared + [single[i] for i in sorted(pick)] + coloured_drawings(cfg)


COLOURED = "coloured drawing"


def coloured_drawings(cfg: PretrainConfig) -> list[tuple[str, str, tuple]]:
    """A seeded sample of ``colour_drawings`` images under ``colour_corpus`` as objects
    labelled :data:`COLOURED`, whose pair is two hue-keeping views of the one drawing
    (:func:`_coloured_views`); none when ``colour_corpus`` is empty."""
    if not cfg.colour_corpus:
        return []
    found = scan_corpus([cfg.colour_corpus])
    pick = np.random.default_rng([cfg.seed, 4]).permutation(len(found))[:cfg.colour_drawings]
    return [(found[i][0], COLOURED, (found[i][0],)) for i in sorted(pick)]


def corpus_objects(roots: list[str | os.PathLike], cfg: PretrainConfig) -> list[tuple]:
    """``(key, label, files)`` of every object: an image under ``roots`` (``positives="views"``)
    or one name's drawings by the icon sets (``"designers"``, which takes no roots)."""
    if cfg.positives == "designers":
        if roots:
            raise ValueError("positives='designers' reads the icon sets (--icon_packages, "
                             "--icon_themes), not --corpus folders")
        return scan_icon_sets(cfg)
    if not roots:
        raise ValueError("positives='views' needs a corpus folder (--corpus DIR)")
    return [(path, label, (path,)) for path, label in scan_corpus(roots)]


def drawing_view(rgba: Image.Image, rng: np.random.Generator, size: int,
                 keep_colour: bool = False) -> Image.Image:
    """One view of a drawing for ``positives="designers"``: SimCLR's augmentations adapted to a
    drawing on a transparent canvas.  A ground of random colour (and, for a monochrome glyph,
    half the time ink of another), a random resized crop of the drawing padded by a quarter on
    each side (so it may come out larger or smaller), colour jitter, sometimes grey, sometimes
    blurred.  Neither SynthShop's renderer nor the icons dataset's photo model: what the
    encoder learns to ignore is generic, and what stays is what two designers drew alike.

    ``keep_colour``: no hue shift and no grey, and milder saturation jitter (0.8-1.2), so a
    coloured drawing keeps its hues; the ground and a monochrome glyph's ink, whose colours
    name nothing, still change.  For data whose classes differ by colour; measured, the
    encoder still learns to ignore most colour from its pairs (docs/EXPERIMENTS.md, "A
    backbone pretrained across designers")."""
    arr = np.asarray(rgba).astype(np.float32)
    if monochrome(arr) and rng.random() < 0.5:
        arr[..., :3] = rng.integers(0, 256, size=3)
    pad = CANVAS // 4
    side = CANVAS + 2 * pad
    canvas = Image.new("RGBA", (side, side), tuple(int(v) for v in rng.integers(0, 256, 3)))
    canvas.alpha_composite(Image.fromarray(arr.astype(np.uint8), "RGBA"), (pad, pad))
    area = side * side * rng.uniform(0.25, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w = min(side, round(float(np.sqrt(area * aspect))))
    h = min(side, round(float(np.sqrt(area / aspect))))
    x, y = (int(v) for v in rng.integers(0, (side - w + 1, side - h + 1)))
    img = canvas.convert("RGB").crop((x, y, x + w, y + h)).resize((CANVAS, CANVAS),
                                                                   Image.BILINEAR)
    if rng.random() < 0.8:
        img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.6, 1.4)))
        img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.6, 1.4)))
        saturation = (0.8, 1.2) if keep_colour else (0.6, 1.4)
        img = ImageEnhance.Color(img).enhance(float(rng.uniform(*saturation)))
        if not keep_colour:
            hsv = np.asarray(img.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-25, 26))) % 256
            img = Image.fromarray(hsv, "HSV").convert("RGB")
    if not keep_colour and rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.1, 2.0))))
    return img.resize((size, size), Image.BOX)


def _shop_views(files: tuple, rng: np.random.Generator, cfg: PretrainConfig):
    """``positives="views"``: the image cut out, then ``views`` user photos and studio shots."""
    obj, reason = load_object(files[0], cfg.max_megapixels)
    if obj is None:
        return None, reason
    query, doc = [], []
    for _ in range(cfg.views):
        doc.append(np.asarray(studio_shot(obj, rng, cfg.image_size)[0]))
        query.append(np.asarray(user_photo(obj, rng, cfg.image_size, cfg.gap)))
    return (np.stack(query), np.stack(doc)), None


def _designer_views(files: tuple, rng: np.random.Generator, cfg: PretrainConfig):
    """``positives="designers"``: each of the ``views`` pairs shows two different sets'
    drawings of the name (a set that copied another is dropped first, as in the icons
    dataset); a name left with one drawing pairs two views of it."""
    pictures = [p for p in map(rasterise, files) if p is not None]
    if not pictures:
        return None, "not drawable"
    kept = drop_near_duplicates(list(range(len(pictures))),
                                {i: ink_map(p) for i, p in enumerate(pictures)},
                                IconsConfig.duplicate_threshold)
    query, doc = [], []
    for _ in range(cfg.views):
        i, j = rng.choice(kept, size=2, replace=False) if len(kept) > 1 else kept * 2
        query.append(np.asarray(drawing_view(pictures[i], rng, cfg.image_size, cfg.keep_colour)))
        doc.append(np.asarray(drawing_view(pictures[j], rng, cfg.image_size, cfg.keep_colour)))
    return (np.stack(query), np.stack(doc)), None


def _coloured_views(files: tuple, rng: np.random.Generator, cfg: PretrainConfig):
    """A :data:`COLOURED` object: ``views`` pairs of two hue-keeping views of the drawing."""
    obj, reason = load_object(files[0], cfg.max_megapixels)
    if obj is None:
        return None, reason
    query, doc = ([np.asarray(drawing_view(obj, rng, cfg.image_size, keep_colour=True))
                   for _ in range(cfg.views)] for _ in range(2))
    return (np.stack(query), np.stack(doc)), None


def _render_chunk(task) -> dict:
    objects, chunk, cfg = task
    rng = np.random.default_rng([cfg.seed, chunk])
    default = _designer_views if cfg.positives == "designers" else _shop_views
    s = cfg.image_size
    query = np.zeros((len(objects), cfg.views, 3, s, s), dtype=np.uint8)
    doc = np.zeros_like(query)
    kept, skipped = [], {}
    for i, (key, label, files) in enumerate(objects):
        views, reason = (_coloured_views if label == COLOURED else default)(files, rng, cfg)
        if views is None:
            skipped[key] = reason
            continue
        query[len(kept)], doc[len(kept)] = (v.transpose(0, 3, 1, 2) for v in views)
        kept.append(i)
    n = len(kept)
    return {"chunk": chunk, "kept": kept, "skipped": skipped, "query": query[:n],
            "doc": doc[:n]}


@dataclass
class Corpus:
    keys: list[str]              # an image's path, or (designers) a name or set:name
    labels: np.ndarray           # [N] taxonomy label index
    label_names: list[str]
    held_out: np.ndarray         # [N] bool
    query_views: np.ndarray      # [N, views, 3, S, S] uint8: photo views (or one set's drawing)
    doc_views: np.ndarray        # [N, views, 3, S, S] uint8: studio views (or another set's)
    card: dict


def _corpus_key(found: list[tuple], cfg: PretrainConfig) -> dict:
    h = hashlib.sha256()
    for key, label, files in found:
        sizes = ",".join(str(os.path.getsize(f)) for f in files)
        h.update(f"{key}\0{label}\0{chr(0).join(files)}\0{sizes}\n".encode())
    return {"files": h.hexdigest()[:16], "positives": cfg.positives,
            "image_size": cfg.image_size, "views": cfg.views, "gap": cfg.gap,
            "max_megapixels": cfg.max_megapixels, "seed": cfg.seed,
            "held_out_share": cfg.held_out_share, "keep_colour": cfg.keep_colour}


def _is_held_out(key: str, share: float) -> bool:
    # By the file's name, not its position: adding images to a corpus moves no image across.
    digest = hashlib.sha256(Path(key).name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


def prepare_corpus(roots: list[str | os.PathLike], cache: str | os.PathLike, cfg: PretrainConfig,
                   progress: bool = True) -> Corpus:
    """Find the corpus's objects (:func:`corpus_objects`), render every object's views and keep
    them in ``cache`` (reused while the files and the view settings are the same)."""
    from tqdm import tqdm

    cache = Path(cache)
    found = corpus_objects(roots, cfg)
    where = ", ".join(map(str, roots)) or f"{cfg.icon_packages}, {cfg.icon_themes}"
    key = _corpus_key(found, cfg)
    card_path = cache / "corpus.json"
    if card_path.exists() and json.loads(card_path.read_text()).get("key") == key:
        card = json.loads(card_path.read_text())
        query = np.load(cache / "query_views.npy", mmap_mode="r")
        doc = np.load(cache / "doc_views.npy", mmap_mode="r")
    else:
        remove_stale_temporaries(cache)
        tasks = [(found[lo: lo + _CHUNK], lo // _CHUNK, cfg)
                 for lo in range(0, len(found), _CHUNK)]
        parts = []
        bar = tqdm(total=len(found), desc="rendering views", disable=not progress)
        if cfg.workers > 1:
            with get_context("spawn").Pool(cfg.workers) as pool:
                for part in pool.imap_unordered(_render_chunk, tasks):
                    parts.append(part)
                    bar.update(len(part["kept"]) + len(part["skipped"]))
        else:
            for task in tasks:
                parts.append(_render_chunk(task))
                bar.update(len(parts[-1]["kept"]) + len(parts[-1]["skipped"]))
        bar.close()
        parts.sort(key=lambda part: part["chunk"])
        kept = [found[part["chunk"] * _CHUNK + i] for part in parts for i in part["kept"]]
        skipped = {k: r for part in parts for k, r in part["skipped"].items()}
        query = np.concatenate([part["query"] for part in parts])
        doc = np.concatenate([part["doc"] for part in parts])
        if not kept:
            raise ValueError(f"no usable image under {where} "
                             f"(skipped: {sorted(set(skipped.values()))})")
        for name, arr in (("query_views.npy", query), ("doc_views.npy", doc)):
            with atomic_path(cache / name) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, arr)
        reasons = dict(Counter(skipped.values()))
        label_counts = dict(Counter(label for _, label, _ in kept))
        sources = [cfg.icon_packages, cfg.icon_themes] + ([cfg.colour_corpus]
                                                          if cfg.colour_corpus else [])
        card = {"key": key, "roots": [str(Path(r).resolve()) for r in roots] or sources,
                "images_found": len(found), "objects": len(kept), "skipped": reasons,
                "objects_per_label": label_counts if cfg.positives == "designers" else None,
                "skipped_files": sorted(skipped), "keys": [k for k, _, _ in kept],
                "labels": [lab for _, lab, _ in kept]}
        write_json(card_path, card)  # last: the arrays are whole when the card names them
    names = sorted(set(card["labels"]))
    index = {n: i for i, n in enumerate(names)}
    held = np.array([_is_held_out(k, cfg.held_out_share) for k in card["keys"]])
    return Corpus(card["keys"], np.array([index[n] for n in card["labels"]]), names, held,
                  query, doc, card)


# --------------------------------------------------------------------------------------------
# The network and its loss
# --------------------------------------------------------------------------------------------
def encoder_config(cfg: PretrainConfig) -> ModelConfig:
    """The ``ModelConfig`` whose ``cnn`` encoder this pretraining makes."""
    return ModelConfig(image_size=cfg.image_size, image_encoder="cnn", vit_dim=cfg.width)


class PretrainNet(nn.Module):
    """The ``cnn`` image encoder, a projection head for InfoNCE and an optional taxonomy head;
    only the encoder is kept (:func:`weights.export_weights`)."""

    def __init__(self, cfg: PretrainConfig, n_labels: int):
        super().__init__()
        self.encoder = ConvEncoder(encoder_config(cfg))
        d = self.encoder.out_dim
        self.projection = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.GELU(),
                                        nn.Linear(d, cfg.projection_dim))
        self.taxonomy = nn.Linear(d, n_labels) if cfg.taxonomy_weight > 0 else None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the pooled encoder features fine-tuning starts from."""
        return self.encoder(normalise_pixels(images))[1]


def training_batch(corpus: Corpus, train_rows: np.ndarray, step: int, cfg: PretrainConfig):
    """The objects, views and flips of ``step``: a function of (seed, step) only.  A
    ``"designers"`` object's query and doc view come from the same rendered pair (two sets'
    drawings); a ``"views"`` object's from any two."""
    per_epoch = max(1, len(train_rows) // cfg.batch_size)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([cfg.seed, 1, epoch]).permutation(len(train_rows))
    rows = np.sort(train_rows[order[i * cfg.batch_size: (i + 1) * cfg.batch_size]])
    rng = np.random.default_rng([cfg.seed, 2, step])
    vd, vq = rng.integers(0, cfg.views, size=(2, len(rows)))
    if cfg.positives == "designers":
        vq = vd
    doc = torch.from_numpy(np.stack([corpus.doc_views[r, v] for r, v in zip(rows, vd)]))
    query = torch.from_numpy(np.stack([corpus.query_views[r, v] for r, v in zip(rows, vq)]))
    flips = torch.from_numpy(rng.random((2, len(rows))) < 0.5)
    doc = torch.where(flips[0, :, None, None, None], doc.flip(3), doc)
    query = torch.where(flips[1, :, None, None, None], query.flip(3), query)
    return rows, query, doc


@torch.no_grad()
def probe_recall_at_1(net: PretrainNet, corpus: Corpus, device, batch: int = 256) -> float:
    """Photo-to-studio Recall@1 of the held-out objects (view 0 of each) with frozen pooled
    features, cosine similarity: how well the encoder alone crosses the domain gap."""
    rows = np.flatnonzero(corpus.held_out)
    was = net.training
    net.eval()
    feats = []
    for arr in (corpus.query_views, corpus.doc_views):
        out = [net.features(torch.from_numpy(np.asarray(arr[rows[lo: lo + batch], 0])).to(device))
               for lo in range(0, len(rows), batch)]
        feats.append(F.normalize(torch.cat(out).float(), dim=-1))
    net.train(was)
    hits = (feats[0] @ feats[1].T).argmax(dim=1).cpu().numpy() == np.arange(len(rows))
    return float(hits.mean())


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def pretrain(corpus_roots: list[str | os.PathLike], run: str | os.PathLike, weights_out,
             cfg: PretrainConfig, resume: bool = False, progress: bool = True,
             cache: str | os.PathLike | None = None) -> dict:
    """Pretrain the ``cnn`` encoder on the images under ``corpus_roots``.

    Everything the run makes goes under ``run`` (the log, checkpoints, and the rendered views
    in ``run/corpus`` unless ``cache`` names a folder runs share); the encoder's weights go to
    ``weights_out`` at the end.  Returns the
    weights' card (also stored inside the file).  Runs at ``cfg.threads`` torch threads and
    gives the caller's count back at the end.
    """
    with torch_threads(cfg.threads):
        return _pretrain(corpus_roots, run, weights_out, cfg, resume, progress, cache)


def _pretrain(corpus_roots, run, weights_out, cfg: PretrainConfig, resume: bool, progress: bool,
              cache) -> dict:
    from tqdm import tqdm

    run = Path(run)
    ckpt_path = run / "checkpoints" / "last.pt"
    if not resume and ckpt_path.exists():
        raise FileExistsError(f"{run} already holds a pretraining run; pass --resume or choose "
                              f"a new --run")
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"{ckpt_path}: nothing to resume")
        check_resumable(run, "pretrain", cfg, RUNTIME_KEYS, "--run")
    device = resolve_device(cfg.device)
    t0 = time.time()
    corpus = prepare_corpus(corpus_roots, cache or run / "corpus", cfg, progress)
    train_rows = np.flatnonzero(~corpus.held_out)
    if len(train_rows) < cfg.batch_size or corpus.held_out.sum() < 2:
        raise ValueError(f"corpus of {len(corpus.keys)} usable images: too few for a batch of "
                         f"{cfg.batch_size} and a held-out probe (held_out_share "
                         f"{cfg.held_out_share})")
    torch.manual_seed(cfg.seed)
    net = PretrainNet(cfg, len(corpus.label_names)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps, cfg.warmup_frac))
    for folder in (run, run / "checkpoints"):
        remove_stale_temporaries(folder)
    log_path = run / "metrics.jsonl"
    start, seconds_before = 0, 0.0
    if resume:
        ck = require_keys(load_torch(ckpt_path, "pretraining checkpoint",
                                     "delete it to pretrain from the start"),
                          ("net", "optimizer", "scheduler", "step", "seconds"), ckpt_path,
                          "pretraining checkpoint")
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, seconds_before = ck["step"], ck["seconds"]
        truncate_log(log_path, start)
    else:
        write_json(run / "config.json", {"pretrain": dataclasses.asdict(cfg),
                                         "corpus": [str(Path(r).resolve()) for r in corpus_roots]})
        with atomic_path(log_path) as tmp:
            tmp.write_text(strict_json({"step": 0, "probe_recall@1":
                                       probe_recall_at_1(net, corpus, device)}) + "\n")
    t_start = time.time()
    log = open(log_path, "a")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="pretraining",
               disable=not progress)
    for step in bar:
        loss, record = _loss(net, corpus, train_rows, step, cfg, device)
        if not torch.isfinite(loss):
            log.close()
            raise ValueError(f"pretraining diverged: the loss is {loss.item()} at step {step + 1} "
                             f"of {run}; lower --lr={cfg.lr:g} (or raise --temperature="
                             f"{cfg.temperature:g}); its last checkpoint is kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if done % cfg.probe_every == 0 or done == cfg.steps:
            record["probe_recall@1"] = probe_recall_at_1(net, corpus, device)
        if done % cfg.log_every == 0 or "probe_recall@1" in record:
            record["lr"] = sched.get_last_lr()[0]
            record["seconds"] = round(seconds_before + time.time() - t_start, 1)
            log.write(strict_json(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['infonce']:.3f}")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_torch({"net": net.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "step": done,
                          "seconds": seconds_before + time.time() - t_start}, ckpt_path)
        if cfg.stop_after is not None and done >= cfg.stop_after and done < cfg.steps:
            log.close()
            return {"stopped_at": done}
    log.close()
    card = _card(cfg, corpus, log_path, seconds_before + time.time() - t_start, t_start - t0,
                 device)
    sha = export_weights(net.encoder, encoder_config(cfg), card, weights_out)
    return {**card, "sha256": sha}


def _loss(net: PretrainNet, corpus: Corpus, train_rows: np.ndarray, step: int,
          cfg: PretrainConfig, device: torch.device) -> tuple[torch.Tensor, dict]:
    """One step's loss (InfoNCE between the photo and studio views, plus the weighted taxonomy
    cross-entropy when on) and its log record."""
    rows, query, doc = training_batch(corpus, train_rows, step, cfg)
    pooled = net.features(torch.cat([query, doc]).to(device))  # one batch: BN sees both
    z = net.projection(pooled)
    loss = info_nce(z[: len(rows)], z[len(rows):], cfg.temperature)
    record = {"step": step + 1, "infonce": loss.item()}
    if net.taxonomy is not None:
        labels = torch.from_numpy(corpus.labels[rows]).to(device).repeat(2)
        taxonomy = F.cross_entropy(net.taxonomy(pooled), labels)
        loss = loss + cfg.taxonomy_weight * taxonomy
        record["taxonomy"] = taxonomy.item()
    return loss, record


def _card(cfg: PretrainConfig, corpus: Corpus, log_path: Path, seconds: float,
          render_seconds: float, device: torch.device) -> dict:
    """What the weights file tells of how it was made: corpus, method, settings, time, machine,
    and the probe's and the loss's curves (a figure's worth of points)."""
    log_rows = read_log(log_path)
    probes = [[r["step"], r["probe_recall@1"]] for r in log_rows if "probe_recall@1" in r]
    losses = [[r["step"], round(r["infonce"], 4)] for r in log_rows if "infonce" in r]
    losses = losses[:: max(1, len(losses) // 100)]  # a figure's worth rides in the card
    card = {"format": WEIGHTS_FORMAT, "corpus": {k: corpus.card[k] for k in
                                                ("roots", "images_found", "objects", "skipped")},
            "held_out_objects": int(corpus.held_out.sum()),
            "method": ("InfoNCE between two icon sets' drawings of one name (or two views of "
                       "a drawing only one set made"
                       + (", or of a coloured drawing" if cfg.colour_corpus else "")
                       + "), SimCLR's augmentations"
                       if cfg.positives == "designers" else
                       "InfoNCE between a photo view and a studio view of each object")
                      + (f" + {cfg.taxonomy_weight:g} x taxonomy cross-entropy"
                         if cfg.taxonomy_weight > 0 else ""),
            "pretrain": dataclasses.asdict(cfg), "steps": cfg.steps,
            "train_seconds": round(seconds, 1), "render_seconds": round(render_seconds, 1),
            "device": str(device), "machine": json.loads(json.dumps(environment())),
            "probe_recall@1": {"initial": probes[0][1], "final": probes[-1][1]},
            "curves": {"probe_recall@1": probes, "infonce": losses}}
    return card
