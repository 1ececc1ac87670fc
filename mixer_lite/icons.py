"""The icons dataset: real drawings by many designers, the same retrieval task as SynthShop.

A *concept* is one name that at least ``min_sets`` icon sets drew (``icon_sources``): Tabler's
``camera``, Lucide's ``camera``, Papirus's ``camera``... are one concept, by different
designers.  The docs of a concept are the drawings of a few of its sets, each titled with that
set's own name and tags for it (human-written text); its query photos are drawings of its
*other* sets, made photo-like by :func:`photo_of_drawing`, so a query never shows a doc's
drawing and the model must recognise the thing across designers, as a user's photo of a product
must be matched to a seller's shot of another unit.

- **Matching names.**  A concept is an exact name after lower-casing and writing separators as
  ``-``; no synonyms or stemming, so precision comes first (measured on a hand-checked sample,
  ``docs/EXPERIMENTS.md``, "The icons dataset").  Within a concept, a drawing that is nearly the
  same picture as another set's (one set forked from another) is dropped.
- **Split by concept**: ``test_concept_share`` of the concepts are test concepts, whose photos
  are the test queries and never clicked; ``_truth/concepts.jsonl`` lists each concept's split,
  so pretraining can leave the test concepts out by name.
- **Skewed, noisy clicks** as in SynthShop (:func:`synthshop.click_counts`): Zipf popularity
  over concepts, exposure bias over a concept's docs, clicks on a look-alike concept (one that
  shares the first word of the name: ``arrow-left`` for ``arrow-right``) or on a random doc.

Deterministic for a seed whatever the number of workers: drawings are rasterised without
randomness, and every chunk of concepts draws from its own RNG seeded by (seed, chunk).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from .files import build_new_folder
from .icon_sources import (ICON_SETS, RENDERER_PACKAGE, Drawing, install_commands,
                           installed_version, package_folder)
from .shop_images import CANVAS, perspective_coeffs
from .synthshop import (click_counts, click_log_stats, doc_id, generator_config, query_id,
                        write_chunks)


@dataclass(frozen=True)
class IconsConfig:
    """The generator's knobs; the click model's defaults are SynthShop's."""

    sets: tuple = tuple(ICON_SETS)
    min_sets: int = 3                      # a concept needs this many sets' drawings
    max_doc_sets: int = 3                  # docs: 1..this many sets, at least one set left
    queries_per_concept: float = 8.0       # mean query photos per concept, before the caps
    zipf_exponent: float = 0.9
    seller_zipf_exponent: float = 1.0
    clicks_per_query: float = 1.5
    noise_confusable: float = 0.12
    noise_random: float = 0.05
    test_concept_share: float = 0.2
    max_test_queries_per_concept: int = 3
    max_concepts: int = 0                  # 0: every concept; else a seeded sample of this many
    max_tags: int = 6                      # of a set's own tags in a doc's title
    duplicate_threshold: float = 0.1       # ink difference share at 24 px: "the same picture"
    image_size: int = 64
    chunk_concepts: int = 100

    def __post_init__(self):
        object.__setattr__(self, "sets", tuple(self.sets))  # a list (from JSON, the CLI) too
        unknown = set(self.sets) - set(ICON_SETS)
        if unknown:
            raise ValueError(f"IconsConfig.sets: unknown set(s) {sorted(unknown)}; "
                             f"known: {sorted(ICON_SETS)}")
        if self.min_sets < 2:
            raise ValueError("IconsConfig.min_sets must be >= 2 (a doc set and a query set)")


# --------------------------------------------------------------------------------------------
# Rasterising: every drawing to a 128 px RGBA picture, no randomness
# --------------------------------------------------------------------------------------------
def rasterise(path: str) -> Image.Image | None:
    """The drawing as a ``CANVAS`` px RGBA image, fitted and centred; None when it cannot be
    drawn or draws (almost) nothing."""
    try:
        if path.endswith(".svg"):
            out = subprocess.run(["rsvg-convert", "-w", str(CANVAS), "-h", str(CANVAS), "-a",
                                  path], capture_output=True, check=False, timeout=60)
            if out.returncode != 0:
                return None
            img = Image.open(io.BytesIO(out.stdout))
        else:
            img = Image.open(path)
        img = img.convert("RGBA")
    except (OSError, subprocess.TimeoutExpired, Image.DecompressionBombError):
        return None
    scale = CANVAS / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.LANCZOS)
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    canvas.paste(img, ((CANVAS - img.width) // 2, (CANVAS - img.height) // 2))
    if (np.asarray(canvas)[..., 3] > 32).mean() < 0.005:
        return None
    return canvas


def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def ink_map(rgba: Image.Image) -> np.ndarray:
    """The drawing's ink on white at 24 px (0 = white, 1 = black), what :func:`same_picture`
    compares."""
    return 1 - np.asarray(_on_white(rgba).convert("L").resize((24, 24), Image.BOX),
                          np.float32) / 255


def _rasterise_task(path: str) -> tuple[bytes, np.ndarray] | None:
    img = rasterise(path)
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), ink_map(img)


# --------------------------------------------------------------------------------------------
# The two views: a doc's clean picture and a query's photo of another designer's drawing
# --------------------------------------------------------------------------------------------
def monochrome(rgba: np.ndarray) -> bool:
    """Whether an RGBA drawing's ink (its opaque pixels) is grey, as a glyph set's is: what
    may be recoloured."""
    ink = rgba[..., :3][rgba[..., 3] > 128]
    return bool(len(ink)) and float(np.ptp(ink, axis=1).mean()) < 20


def doc_picture(rgba: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """A listing's picture: the drawing on a white ground, small framing changes."""
    bg = int(rng.integers(240, 256))
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (bg, bg, bg, 255))
    s = int(CANVAS * rng.uniform(0.78, 0.92))
    off = (CANVAS - s) // 2 + rng.integers(-4, 5, size=2)
    canvas.alpha_composite(rgba.resize((s, s), Image.LANCZOS), tuple(int(v) for v in off))
    return canvas.convert("RGB").resize((size, size), Image.BOX)


def photo_of_drawing(rgba: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """A phone photo of the drawing printed or shown on a surface: the surface's colour and
    texture, ink of another colour for a monochrome glyph, scale, rotation and perspective,
    uneven light, blur, sensor noise.  Written for drawings (SynthShop's ``user_photo`` is for
    its products): no clutter objects, which an icon's flat ground would not have."""
    # The surface: a colour, a gradient towards a darker shade and a low-frequency texture.
    c0 = rng.integers(90, 256, size=3).astype(np.float32)
    arr = np.asarray(rgba).astype(np.float32)
    if monochrome(arr) and rng.random() < 0.7:
        colour = rng.integers(0, 256, size=3).astype(np.float32)
        if abs((colour - c0).mean()) < 90:  # a print is legible: ink darker than the surface
            colour *= 0.3
        arr[..., :3] = colour
    drawing = Image.fromarray(arr.astype(np.uint8), "RGBA")
    c1 = c0 * rng.uniform(0.6, 1.0)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / CANVAS
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    texture = np.asarray(Image.fromarray(rng.normal(0, 1, (8, 8)).astype(np.float32), "F")
                         .resize((CANVAS, CANVAS), Image.BICUBIC))[..., None]
    surface = c0 * (1 - t) + c1 * t + texture * rng.uniform(0, 18)
    canvas = Image.fromarray(np.clip(surface, 0, 255).astype(np.uint8)).convert("RGBA")
    # The drawing on it: scale, placement, rotation.
    s = int(CANVAS * rng.uniform(0.5, 0.9))
    layer = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    off = ((CANVAS - s) * rng.uniform(0.2, 0.8, size=2)).astype(int)
    layer.paste(drawing.resize((s, s), Image.BILINEAR), tuple(int(v) for v in off))
    canvas.alpha_composite(layer.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR))
    img = canvas.convert("RGB")
    # The camera: perspective, light falling off across the frame, focus, noise.
    corners = np.array([[0, 0], [CANVAS, 0], [CANVAS, CANVAS], [0, CANVAS]], dtype=np.float64)
    moved = corners + rng.uniform(-0.1, 0.1, size=(4, 2)) * CANVAS
    img = img.transform((CANVAS, CANVAS), Image.PERSPECTIVE, perspective_coeffs(corners, moved),
                        Image.BILINEAR, fillcolor=tuple(int(v) for v in c1))
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.6))))
    light = rng.uniform(0.7, 1.0) + rng.uniform(0, 0.35) * t
    noise = rng.normal(0, rng.uniform(2, 10), (CANVAS, CANVAS, 3))
    out = np.asarray(img, np.float32) * light + noise
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).resize((size, size), Image.BOX)


def _title(drawing: Drawing, max_tags: int) -> str:
    """The set's own name for the drawing, then its own tags (those not already in the name)."""
    name = drawing.name.replace("-", " ")
    tags = [t for t in drawing.tags if t not in name.split() and t != name][:max_tags]
    return " ".join([name] + tags)


# --------------------------------------------------------------------------------------------
# The catalogue: concepts, their doc sets and query sets, split, popularity
# --------------------------------------------------------------------------------------------
@dataclass
class Concepts:
    names: list
    members: list          # per concept: its drawings' indices, the n_docs doc drawings first
    is_test: np.ndarray
    popularity_rank: np.ndarray
    n_docs: np.ndarray     # one doc per doc drawing
    doc_offset: np.ndarray
    n_queries: np.ndarray
    query_offset: np.ndarray


def read_drawings(cfg: IconsConfig, npm_root: Path, theme_root: Path) -> list[Drawing]:
    """Every drawing of the chosen sets, each set read from its installed package."""
    drawings = []
    for name in cfg.sets:
        s = ICON_SETS[name]
        try:
            drawings += s.read(package_folder(s, npm_root, theme_root))
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"icon set {name!r} ({s.kind} package {s.package}) not found: {e}. Install the "
                f"sets with `make data-icons`, or:\n  "
                + "\n  ".join(" ".join(c) for c in install_commands())
                + "\nor choose fewer with IconsConfig(sets=...)") from None
    return drawings


def candidate_concepts(drawings: list[Drawing], min_sets: int) -> dict[str, list[int]]:
    """name -> indices of its drawings, for the names at least ``min_sets`` sets drew."""
    by_name = defaultdict(list)
    for i, d in enumerate(drawings):
        by_name[d.name].append(i)
    return {n: idx for n, idx in sorted(by_name.items())
            if len({drawings[i].set_name for i in idx}) >= min_sets}


def same_picture(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
    """Two drawings' ink maps differ by less than ``threshold`` of the larger one's ink: one set
    copied the other (relative to the ink, so two thin line drawings on white are not "the same"
    merely because both are mostly white)."""
    return float(np.abs(a - b).sum()) < threshold * max(float(a.sum()), float(b.sum()), 1e-6)


def drop_near_duplicates(idx: list[int], ink: dict[int, np.ndarray], threshold: float) -> list:
    """Keep a concept's drawings in set order, dropping one that is the same picture as a kept
    one (:func:`same_picture`)."""
    kept = []
    for i in idx:
        if not any(same_picture(ink[i], ink[j], threshold) for j in kept):
            kept.append(i)
    return kept


def build_concepts(names: list[str], members: list[list[int]], cfg: IconsConfig,
                   seed: int) -> Concepts:
    """Each concept's split, popularity, doc drawings (1 to ``max_doc_sets``, in a random order
    of its sets, at least one set left for the photos) and number of photos."""
    rng = np.random.default_rng([seed, 0])
    n = len(names)
    is_test = rng.random(n) < cfg.test_concept_share
    popularity_rank = rng.permutation(n) + 1
    ordered, n_doc = [], np.empty(n, dtype=np.int64)
    for c, idx in enumerate(members):
        ordered.append([idx[i] for i in rng.permutation(len(idx))])
        n_doc[c] = min(int(rng.integers(1, cfg.max_doc_sets + 1)), len(idx) - 1)
    weights = popularity_rank.astype(np.float64) ** -cfg.zipf_exponent
    n_queries = rng.multinomial(int(round(cfg.queries_per_concept * n)), weights / weights.sum())
    n_queries = np.where(is_test, np.clip(n_queries, 1, cfg.max_test_queries_per_concept),
                         n_queries)
    return Concepts(names=names, members=ordered, is_test=is_test,
                    popularity_rank=popularity_rank, n_docs=n_doc,
                    doc_offset=np.concatenate([[0], np.cumsum(n_doc)[:-1]]),
                    n_queries=n_queries,
                    query_offset=np.concatenate([[0], np.cumsum(n_queries)[:-1]]))


def _look_alikes(con: Concepts) -> dict[str, np.ndarray]:
    """Train concepts by the first word of their name (noise clicks land on train docs only)."""
    groups = defaultdict(list)
    for c in np.flatnonzero(~con.is_test):
        groups[con.names[c].split("-")[0]].append(c)
    return {k: np.array(v) for k, v in groups.items()}


# --------------------------------------------------------------------------------------------
# One chunk of concepts -> its files' lines and images
# --------------------------------------------------------------------------------------------
_STATE: dict = {}


def _render_chunk(chunk: int) -> dict:
    cfg, con, drawings, pictures = (_STATE[k] for k in ("cfg", "con", "drawings", "pictures"))
    out, seed, look_alikes = _STATE["out"], _STATE["seed"], _STATE["look_alikes"]
    rng = np.random.default_rng([seed, 1, chunk])
    train = np.flatnonzero(~con.is_test)
    lines = defaultdict(list)
    stats = {"click_events": 0, "noise_events": 0, "images": 0}
    lo, hi = chunk * cfg.chunk_concepts, min((chunk + 1) * cfg.chunk_concepts, len(con.names))
    for c in range(lo, hi):
        name, members, n_doc = con.names[c], con.members[c], int(con.n_docs[c])
        docs = [int(con.doc_offset[c]) + j for j in range(n_doc)]
        for d, m in zip(docs, members[:n_doc]):
            rel = f"images/docs/{doc_id(d)}.png"
            doc_picture(pictures(m), rng, cfg.image_size).save(out / rel, format="PNG")
            lines["docs"].append({"doc_id": doc_id(d), "image": rel,
                                  "text": _title(drawings[m], cfg.max_tags)})
            lines["truth_docs"].append({"doc_id": doc_id(d), "concept": name,
                                        "set": drawings[m].set_name})
        split = "test" if con.is_test[c] else "train"
        seller_w = np.arange(1, n_doc + 1, dtype=np.float64) ** -cfg.seller_zipf_exponent
        seller_w /= seller_w.sum()
        group = look_alikes.get(name.split("-")[0], np.empty(0, dtype=np.int64))
        query_members = members[n_doc:]
        for k in range(int(con.n_queries[c])):
            q = int(con.query_offset[c]) + k
            m = query_members[int(rng.integers(len(query_members)))]
            rel = f"images/queries/{query_id(q)}.jpg"
            photo = photo_of_drawing(pictures(m), rng, cfg.image_size)
            photo.save(out / rel, format="JPEG", quality=int(rng.integers(35, 91)))
            lines["queries"].append({"query_id": query_id(q), "image": rel, "split": split})
            lines["truth_queries"].append({"query_id": query_id(q), "concept": name,
                                           "set": drawings[m].set_name})
            if split == "test":
                lines["qrels"].append({"query_id": query_id(q),
                                       "doc_ids": [doc_id(d) for d in docs]})
                continue
            counts = click_counts(rng, cfg, docs, seller_w, group[group != c], train,
                                  con.doc_offset, con.n_docs)
            for d, n in counts.items():
                lines["clicks"].append({"query_id": query_id(q), "doc_id": doc_id(d), "count": n})
                stats["click_events"] += n
                stats["noise_events"] += n if d not in docs else 0
        stats["images"] += n_doc + int(con.n_queries[c])
        lines["truth_concepts"].append({
            "concept": name, "split": split, "popularity_rank": int(con.popularity_rank[c]),
            "doc_sets": [drawings[m].set_name for m in members[:n_doc]],
            "query_sets": [drawings[m].set_name for m in query_members]})
    return {"lines": {k: "".join(json.dumps(r) + "\n" for r in v) for k, v in lines.items()},
            "stats": stats}


_OUTPUTS = {"docs": "docs.jsonl", "queries": "queries.jsonl", "clicks": "clicks.jsonl",
            "qrels": "qrels.jsonl", "truth_docs": "_truth/docs.jsonl",
            "truth_queries": "_truth/queries.jsonl", "truth_concepts": "_truth/concepts.jsonl"}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def make_icons(out, npm_root="data/.icon-packages/node_modules", theme_root="/usr/share/icons",
               seed: int = 0, workers: int = 1, progress: bool = True, **overrides) -> dict:
    """Write the icons dataset folder from the installed icon sets; return its statistics.

    ``overrides`` replace :class:`IconsConfig` fields (``max_concepts=40`` for a slice).  The
    folder must be new or empty."""
    cfg = generator_config(IconsConfig(), overrides, seed)
    if shutil.which("rsvg-convert") is None:
        raise FileNotFoundError(f"rsvg-convert not found: the SVG drawings are rendered with "
                                f"librsvg (`apt-get install {RENDERER_PACKAGE}`)")
    npm_root, theme_root = Path(npm_root), Path(theme_root)
    drawings = read_drawings(cfg, npm_root, theme_root)
    return build_new_folder(out, "make-data", lambda partial: _write_icons(
        partial, cfg, drawings, npm_root, seed, workers, progress))


def _write_icons(out: Path, cfg: IconsConfig, drawings: list[Drawing], npm_root: Path,
                 seed: int, workers: int, progress: bool) -> dict:
    start = time.time()
    candidates = candidate_concepts(drawings, cfg.min_sets)
    if cfg.max_concepts:
        pick = np.random.default_rng([seed, 2]).permutation(len(candidates))[:cfg.max_concepts]
        candidates = dict(sorted(list(candidates.items())[i] for i in pick))
    needed = sorted({i for idx in candidates.values() for i in idx})
    pool = get_context("fork").Pool(workers) if workers > 1 else None
    try:
        mapper = pool.imap if pool is not None else map
        paths = [drawings[i].path for i in needed]
        rendered = dict(zip(needed, tqdm(mapper(_rasterise_task, paths), total=len(needed),
                                         unit="drawing", desc="rasterise", disable=not progress)))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    failed = [i for i, r in rendered.items() if r is None]
    ink = {i: r[1] for i, r in rendered.items() if r is not None}
    names, members, duplicates = [], [], 0
    for name, idx in candidates.items():
        drawn = [i for i in idx if i in ink]
        kept = drop_near_duplicates(drawn, ink, cfg.duplicate_threshold)
        duplicates += len(drawn) - len(kept)
        if len({drawings[i].set_name for i in kept}) >= cfg.min_sets:
            names.append(name)
            members.append(kept)
    con = build_concepts(names, members, cfg, seed)
    pngs = {i: r[0] for i, r in rendered.items() if r is not None}
    del rendered, ink
    for sub in ("images/docs", "images/queries", "_truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    state = dict(cfg=cfg, con=con, drawings=drawings, out=out, seed=seed,
                 look_alikes=_look_alikes(con),
                 pictures=lambda i: Image.open(io.BytesIO(pngs[i])).convert("RGBA"))
    try:
        totals = write_chunks(out, _OUTPUTS, _render_chunk,
                              math.ceil(len(names) / cfg.chunk_concepts), workers, _STATE.update,
                              (state,), int(con.n_docs.sum() + con.n_queries.sum()), "icons",
                              progress)
    finally:
        _STATE.clear()
    stats = _statistics(cfg, con, drawings, failed, duplicates, totals, seed)
    stats["build_seconds"] = round(time.time() - start, 1)
    card = {"config": dataclasses.asdict(cfg), "seed": seed,
            "sets": {s: {"package": ICON_SETS[s].package, "kind": ICON_SETS[s].kind,
                         "version": installed_version(ICON_SETS[s], npm_root),
                         "licence": ICON_SETS[s].licence} for s in cfg.sets},
            "stats": stats}
    (out / "_truth" / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(data_card(card))
    return stats


def _statistics(cfg: IconsConfig, con: Concepts, drawings: list[Drawing], failed: list,
                duplicates: int, totals: dict, seed: int) -> dict:
    used = defaultdict(lambda: {"doc_drawings": 0, "query_drawings": 0})
    for members, n_doc in zip(con.members, con.n_docs):
        for j, m in enumerate(members):
            used[drawings[m].set_name]["doc_drawings" if j < n_doc else "query_drawings"] += 1
    return {
        "seed": seed, "concepts": len(con.names), "test_concepts": int(con.is_test.sum()),
        **click_log_stats(cfg, con, totals),
        "drawings_not_rendered": len(failed), "near_duplicates_dropped": duplicates,
        "per_set": {s: used[s] for s in cfg.sets},
    }


def data_card(card: dict) -> str:
    """The dataset folder's README: where every picture comes from and what is held out."""
    s, cfg = card["stats"], card["config"]
    rows = "\n".join(f"| {name} | {v['kind']} `{v['package']}` | {v['version']} | {v['licence']} "
                     f"| {s['per_set'][name]['doc_drawings']} | "
                     f"{s['per_set'][name]['query_drawings']} |"
                     for name, v in card["sets"].items())
    return f"""# The icons dataset (seed {card['seed']})

Made by `mixer-lite make-data --source icons` (`mixer_lite/icons.py`) from installed icon sets.
Docs are one set's drawing of a concept, titled with that set's own name and tags; query photos
are the same concept drawn by the concept's other sets, made photo-like (`icons.photo_of_drawing`).

| | count |
|---|---|
| concepts (names drawn by >= {cfg['min_sets']} sets) | {s['concepts']} |
| test concepts (their photos are the test queries, never clicked) | {s['test_concepts']} |
| docs | {s['docs']} |
| train / test query photos | {s['train_queries']} / {s['test_queries']} |
| click events (noise share measured) | {s['click_events']} ({s['noise_share_measured']:.3f}) |
| drawings that did not render | {s['drawings_not_rendered']} |
| near-duplicate drawings dropped | {s['near_duplicates_dropped']} |

| set | package | version | licence | doc drawings | query drawings |
|---|---|---|---|---|---|
{rows}

Held out: the test concepts, by name, in `_truth/concepts.jsonl` (`split`), so that pretraining
can leave them out. Emoji sets and fonts are not used; `openclipart-png` is not used (the
shipped backbone was pretrained on it).
"""


def match_sheet(data_dir, n_concepts: int, seed: int, npm_root="data/.icon-packages/node_modules",
                theme_root="/usr/share/icons", cell: int = 48) -> Image.Image:
    """A contact sheet for checking the name matching by eye: ``n_concepts`` concepts of the
    dataset at ``data_dir`` drawn at random (``seed``), one row each, every set's drawing of it,
    clean, doc sets first (``docs/EXPERIMENTS.md``, "The icons dataset", counts them)."""
    from PIL import ImageDraw

    data_dir = Path(data_dir)
    card = json.loads((data_dir / "_truth" / "card.json").read_text())
    cfg = IconsConfig(**card["config"])
    drawings = {(d.name, d.set_name): d for d in read_drawings(cfg, Path(npm_root),
                                                               Path(theme_root))}
    concepts = [json.loads(line) for line in
                (data_dir / "_truth" / "concepts.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(seed)
    pick = [concepts[i] for i in rng.choice(len(concepts), n_concepts, replace=False)]
    width = max(len(c["doc_sets"]) + len(c["query_sets"]) for c in pick)
    sheet = Image.new("RGB", (170 + cell * width, cell * len(pick)), "white")
    pen = ImageDraw.Draw(sheet)
    for row, c in enumerate(pick):
        pen.text((2, row * cell + cell // 3), c["concept"][:26], fill="black")
        for col, s in enumerate(c["doc_sets"] + c["query_sets"]):
            picture = _on_white(rasterise(drawings[(c["concept"], s)].path))
            sheet.paste(picture.resize((cell - 2, cell - 2)), (170 + col * cell, row * cell))
    return sheet


def concept_examples(data_dir, n_concepts: int, seed: int, sets: tuple[str, ...] | None = None,
                     columns: int = 5) -> list[tuple[str, list[tuple[str, str]]]]:
    """What a concept of the dataset at ``data_dir`` looks like across designers:
    ``n_concepts`` concepts drawn at random (``seed``) among those with a doc and two photos
    (and, given ``sets``, drawn by those sets alone), each as ``(concept, cells)``, a cell an
    image path and its caption: the docs (set and title), then the photos (set), ``columns`` at
    most, two of them photos."""
    data_dir = Path(data_dir)

    def rows(name):
        return [json.loads(line) for line in (data_dir / name).read_text().splitlines()]

    texts = {d["doc_id"]: d for d in rows("docs.jsonl")}
    photos = {q["query_id"]: q for q in rows("queries.jsonl")}
    cells = defaultdict(lambda: ([], []))
    for d in rows("_truth/docs.jsonl"):
        doc = texts[d["doc_id"]]
        cells[d["concept"]][0].append((str(data_dir / doc["image"]),
                                       f"doc · {d['set']}\n\"{doc['text']}\""))
    for q in rows("_truth/queries.jsonl"):
        cells[q["concept"]][1].append((str(data_dir / photos[q["query_id"]]["image"]),
                                       f"photo · {q['set']}"))
    fits = [c["concept"] for c in rows("_truth/concepts.jsonl")
            if len(cells[c["concept"]][0]) >= 1 and len(cells[c["concept"]][1]) >= 2
            and (sets is None or set(c["doc_sets"] + c["query_sets"]) <= set(sets))]
    if len(fits) < n_concepts:
        raise ValueError(f"{data_dir}: {len(fits)} concepts with a doc and two photos"
                         + (f" drawn by {', '.join(sets)} alone" if sets else "")
                         + f", {n_concepts} asked")
    pick = sorted(np.random.default_rng(seed).choice(len(fits), n_concepts, replace=False))
    shown = []
    for concept in (fits[i] for i in pick):
        docs = cells[concept][0][:max(1, columns - 2)]  # room for two photos at least
        shown.append((concept, docs + cells[concept][1][:columns - len(docs)]))
    return shown


if __name__ == "__main__":
    # python -m mixer_lite.icons DATA N SEED OUT.png: a match sheet;
    # ... --examples DATA N SEED OUT.png: concept_examples of the sets FIGURE_LICENCES allow.
    import sys

    from .icon_sources import FIGURE_LICENCES
    from .viz import image_rows

    if sys.argv[1] == "--examples":
        data, n, seed, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        sets = tuple(s.name for s in ICON_SETS.values() if s.licence in FIGURE_LICENCES)
        image_rows(concept_examples(data, n, seed, sets), "The icons dataset: one concept, "
                   "several designers (a doc with its title, photos of other sets' drawings)",
                   out)
    else:
        match_sheet(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])).save(sys.argv[4])
