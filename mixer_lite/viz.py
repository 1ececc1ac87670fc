"""Figures for students and reviewers (matplotlib only, no logic beyond plotting).

Every function takes plain arrays, a loaded dataset or (the attention gallery) a trained model,
draws one figure with a title and labelled axes, and saves it when given a path.  The Agg backend is used when no display is set, so the
functions run the same in CI, in a notebook, and on a headless GPU box.
"""
from __future__ import annotations

import os
import textwrap

import matplotlib

if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend().lower():
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .files import atomic_path  # noqa: E402


def _finish(fig, path: str | os.PathLike | None):
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | os.PathLike | None):
    """Write ``fig`` as a PNG to exactly ``path`` (no extension added), whole or not at all."""
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    return fig


def _finish_image_grid(fig, axes, title: str, fontsize: int, path, colorbar=None):
    """Image panels carry no axis ticks (pixels are not a unit worth reading); one title,
    with room kept for it above the first row's titles.

    ``colorbar``: (mappable, label) for one bar shared by every panel, right of the grid, in a
    margin of fixed inches (a share of the width clipped the label of a narrow grid)."""
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=fontsize)
    width = fig.get_figwidth()
    fig.tight_layout(rect=(0, 0, 1 - 1.0 / width if colorbar else 1, 0.96))
    if colorbar is not None:
        bar = fig.colorbar(colorbar[0], cax=fig.add_axes((1 - 0.85 / width, 0.15, 0.12 / width,
                                                          0.7)))
        bar.ax.tick_params(labelsize=8)
        bar.set_label(colorbar[1], fontsize=8)
    return _save(fig, path)


def query_doc_grid(data, n_queries: int = 6, n_docs: int = 3, seed: int = 0,
                   path: str | os.PathLike | None = None):
    """Test query photos (left column) beside the shop docs that ``qrels`` marks relevant.

    This is the domain gap at a glance: a user's photo against the studio shots and titles of
    the same product.
    """
    qrels = data.qrels
    if len(qrels) == 0:
        raise ValueError(f"{data.root}: qrels.jsonl is empty; no test query to show")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(qrels), size=min(n_queries, len(qrels)), replace=False)
    fig, axes = plt.subplots(len(rows), n_docs + 1, figsize=(2.6 * (n_docs + 1), 2.6 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        rel = qrels[int(row)]
        query = data.queries[data.query_row[rel["query_id"]]]
        ax = axes[r, 0]
        ax.imshow(query["image"])
        ax.set_title(f"query {rel['query_id']}\n(user photo)", fontsize=9, color="tab:red")
        for c in range(n_docs):
            ax = axes[r, c + 1]
            if c < len(rel["doc_ids"]):
                doc = data.docs[data.doc_row[rel["doc_ids"][c]]]
                ax.imshow(doc["image"])
                ax.set_title("\n".join(textwrap.wrap(doc["text"], 28)[:3]), fontsize=7)
            else:
                ax.axis("off")
    return _finish_image_grid(fig, axes, "Query photos (left) and the shop docs of the same "
                              "product (right): image plus title", 11, path)


def concept_attention(images, info: dict, token_strings: list[list[str]], n_docs: int = 4,
                      top_tokens: int = 3, titles: list[str] | None = None,
                      path: str | os.PathLike | None = None):
    """Per doc: its image, then each concept's text-to-image attention as a heatmap over it.

    ``info`` is what ``MixerModel.embed_docs(..., return_attention=True)`` returned;
    ``token_strings[i]`` are the tokens of doc i.  Each heatmap's title names the concept's
    ``top_tokens`` most-read tokens, so a reader sees *what* a concept picked up in the text and
    *where* it looked in the image.
    """
    t2i = info["text_to_image"].detach().float().cpu().numpy()
    t2c = info.get("token_to_concept")
    t2c = t2c.detach().float().cpu().numpy() if t2c is not None else None
    grid = info["grid"]
    n_docs = min(n_docs, len(t2i))
    n_concepts = t2i.shape[1]
    top = float(t2i[:n_docs].max())  # one colour scale for every map, so maps compare
    fig, axes = plt.subplots(n_docs, n_concepts + 1, squeeze=False,
                             figsize=(1.9 * (n_concepts + 1), 2.6 * n_docs))
    for r in range(n_docs):
        img = images[r].detach().float().cpu()
        img = (img / 255.0 if img.max() > 1.5 else img).permute(1, 2, 0).numpy()
        axes[r, 0].imshow(img)
        lines = textwrap.wrap(titles[r] if titles else "doc", 26)[:3]
        w = info.get("image_weight")
        if w is not None:  # its own line, never wrapped into the title
            lines.append(f"[image weight {float(w[r]):.2f}]")
        axes[r, 0].set_title("\n".join(lines), fontsize=7)
        toks = token_strings[r]
        for k in range(n_concepts):
            ax = axes[r, k + 1]
            ax.imshow(img)
            heat = t2i[r, k].reshape(grid, grid)
            shown = ax.imshow(heat, cmap="magma", alpha=0.6, vmin=0.0, vmax=top,
                              extent=(0, img.shape[1], img.shape[0], 0), interpolation="bilinear")
            if t2c is not None:
                order = np.argsort(-t2c[r, k, : len(toks)])[:top_tokens]
                label = ", ".join(toks[i] for i in order)
                # Wrapped: one line of three tokens overran the neighbouring panels' titles.
                ax.set_title("\n".join([f"concept {k}:", *textwrap.wrap(label, 22)[:2]]),
                             fontsize=7)
            else:
                ax.set_title(f"token '{toks[k]}'" if k < len(toks) else "(padding)", fontsize=7)
    return _finish_image_grid(fig, axes, "Text-to-image attention: where each text concept "
                              "looks in the doc image (brighter = more weight)", 10, path,
                              colorbar=(shown, f"attention weight of an image region "
                                                f"({grid}x{grid} regions; uniform = "
                                                f"{1 / grid ** 2:.3f})"))


def weak_label_class(data, members: dict, truth: dict[str, str], max_per_row: int = 6,
                     path: str | os.PathLike | None = None):
    """One weak-label class as a classifier sees it: its query photos (top row) and its docs
    (bottom row, with titles); a member whose true product is not the class's majority product
    (label noise) is framed red.

    ``members`` is a class of :func:`classes.build_classes_from_clicks` (``query_ids``,
    ``doc_ids``); ``truth`` maps every id to its product (:func:`synthshop.load_truth`).
    """
    ids = {"query photos": list(members["query_ids"]), "docs": list(members["doc_ids"])}
    products = [truth[i] for side in ids.values() for i in side]
    majority = max(set(products), key=products.count)
    fig, axes = plt.subplots(2, max_per_row, figsize=(2.0 * max_per_row, 4.9), squeeze=False)
    for r, (side, side_ids) in enumerate(ids.items()):
        table, row_of = ((data.queries, data.query_row) if side == "query photos" else
                         (data.docs, data.doc_row))
        for c in range(max_per_row):
            ax = axes[r, c]
            if c >= len(side_ids):
                ax.axis("off")
                continue
            item = table[row_of[side_ids[c]]]
            ax.imshow(item["image"])
            noisy = truth[side_ids[c]] != majority
            for edge in ax.spines.values():
                edge.set_edgecolor("tab:red" if noisy else "0.6")
                edge.set_linewidth(4 if noisy else 1)
            label = "\n".join(textwrap.wrap(item["text"], 24)[:2]) if side == "docs" else \
                side_ids[c]
            ax.set_title(("OTHER PRODUCT\n" if noisy else "") + label, fontsize=7,
                         color="tab:red" if noisy else "0.2")
        axes[r, 0].set_ylabel(f"{side}\n({len(side_ids)} in class)", fontsize=9)
    shown = sum(min(len(v), max_per_row) for v in ids.values())
    return _finish_image_grid(fig, axes, f"One weak-label class: {len(products)} samples "
                              f"({shown} shown), red frame = not the majority product "
                              f"(label noise)", 10, path)


def concept_map_change(image, before: np.ndarray, after: np.ndarray, titles: tuple[str, str],
                       concept: int, path: str | os.PathLike | None = None):
    """One concept's attention on one doc image under two titles, and the difference: where
    editing the title moved the concept's weight (red: gained, blue: lost).

    ``before`` and ``after`` are the concept's weights over the grid x grid regions."""
    img = np.asarray(image, dtype=float)
    img = (img / 255.0 if img.max() > 1.5 else img).transpose(1, 2, 0)
    grid = int(round(len(before) ** 0.5))
    extent = (0, img.shape[1], img.shape[0], 0)
    top = float(max(before.max(), after.max()))
    change = (after - before).reshape(grid, grid)
    span = float(np.abs(change).max()) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.9), squeeze=False)
    for ax, weights, title in zip(axes[0, :2], (before, after), titles):
        ax.imshow(img)
        heat = ax.imshow(weights.reshape(grid, grid), cmap="magma", alpha=0.6, vmin=0, vmax=top,
                         extent=extent, interpolation="bilinear")
        ax.set_title("\n".join(textwrap.wrap(title, 34)[:3]), fontsize=8)
    fig.colorbar(heat, ax=axes[0, 1], fraction=0.046, label="attention weight")
    ax = axes[0, 2]
    ax.imshow(img, alpha=0.35)
    moved = ax.imshow(change, cmap="RdBu_r", vmin=-span, vmax=span, alpha=0.8, extent=extent,
                      interpolation="bilinear")
    ax.set_title(f"change (after - before); {0.5 * np.abs(change).sum():.0%} of the weight moved",
                 fontsize=8)
    fig.colorbar(moved, ax=ax, fraction=0.046, label="weight gained (red) or lost (blue)")
    return _finish_image_grid(fig, axes, f"Concept {concept}: where it looks under each title",
                              10, path)


def scene_maps(images, masks: np.ndarray, columns: list[tuple[str, np.ndarray, list[int]]],
               titles: list[str], title: str, path: str | os.PathLike | None = None):
    """Scene docs (rows): the image, then the concepts' mean attention map under each title
    (``columns``: a heading, the maps [B, P] over a square grid, and per doc the index of the
    object that column's title names), every object outlined from its truth mask: the named one
    solid green, the others dashed white, so a reader sees whether the map follows the title.

    ``masks`` [B, O, H, W] are the objects' masks at the image's size (``doc_scene_masks``); an
    absent object is all zero.  The maps are shown as attention over uniform (1 = blind), on
    one colour scale from 0 for every panel."""
    n, n_obj = masks.shape[:2]
    grid = int(round(columns[0][1].shape[1] ** 0.5))
    top = max(float(maps.max()) for _, maps, _ in columns) * grid ** 2
    fig, axes = plt.subplots(n, len(columns) + 1, squeeze=False,
                             figsize=(2.4 * (len(columns) + 1), 2.6 * n))
    for r in range(n):
        img = np.asarray(images[r], dtype=float)
        img = (img / 255.0 if img.max() > 1.5 else img).transpose(1, 2, 0)
        extent = (-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5)
        panels = [(axes[r, 0], None, columns[0][2][r],
                   "\n".join(textwrap.wrap(titles[r], 30)[:2]))]
        panels += [(axes[r, c + 1], maps[r], named[r], heading)
                   for c, (heading, maps, named) in enumerate(columns)]
        for ax, weights, named, heading in panels:
            ax.imshow(img, alpha=1.0 if weights is None else 0.45)
            if weights is not None:
                shown = ax.imshow(weights.reshape(grid, grid) * grid ** 2, cmap="magma",
                                  alpha=0.75, vmin=0.0, vmax=top, extent=extent,
                                  interpolation="bilinear")
            for o in range(n_obj):
                if masks[r, o].max() >= 0.5:
                    ax.contour(masks[r, o], levels=[0.5], linewidths=1.6 if o == named else 1.0,
                               colors="lime" if o == named else "white",
                               linestyles="solid" if o == named else "dashed")
            ax.set_title(heading, fontsize=7)
    return _finish_image_grid(fig, axes, title, 10, path,
                              colorbar=(shown, "attention / uniform (1 = blind)"))


def image_rows(rows: list[tuple[str, list[tuple[str, str]]]], title: str,
               path: str | os.PathLike | None = None):
    """A row of captioned images per entry, ``(row label, [(image path, caption), ...])``, the
    label left of the row (for example one concept's docs and photos, by different sets)."""
    from PIL import Image

    width = max(len(cells) for _, cells in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(1.9 * width + 1.2, 2.2 * len(rows)),
                             squeeze=False)
    for r, (label, cells) in enumerate(rows):
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10)
        for c, ax in enumerate(axes[r]):
            if c >= len(cells):
                ax.axis("off")
                continue
            with Image.open(cells[c][0]) as im:
                ax.imshow(np.asarray(im.convert("RGB")))
            ax.set_title("\n".join(textwrap.fill(line, 24) for line in cells[c][1].split("\n")),
                         fontsize=7)
    return _finish_image_grid(fig, axes, title, 11, path)


def recall_curves(curves: dict, title: str = "Recall@K on test queries",
                  path: str | os.PathLike | None = None):
    """Recall@K (K = 1..len) of several runs on one axis, Recall@10 marked in the legend.

    A curve is one run's list of recalls, or one list per seed: then the line is the seeds'
    mean, the band spans their lowest to highest value, and the legend gives mean ± std."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    top = max((np.max(c) for c in curves.values() if np.size(c)), default=1.0) * 100
    for name, curve in curves.items():
        runs = np.atleast_2d(np.asarray(curve, dtype=float)) * 100
        k = np.arange(1, runs.shape[1] + 1)
        mean = runs.mean(axis=0)
        r10 = runs[:, 9] if runs.shape[1] >= 10 else np.full(len(runs), np.nan)
        label = (f"{name}: R@10 {r10.mean():.1f}% ± {r10.std():.1f} ({len(runs)} seeds)"
                 if len(runs) > 1 else f"{name}: R@10 {r10[0]:.1f}%")
        line, = ax.plot(k, mean, label=label, lw=2)
        if len(runs) > 1:
            ax.fill_between(k, runs.min(axis=0), runs.max(axis=0), color=line.get_color(),
                            alpha=0.2, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("K (docs returned, log scale)")
    ax.set_ylabel("Recall@K (% of test queries)")
    # Zoom to the data (low recalls would otherwise hug the floor of a 0-100% axis), leaving
    # room above the curves for the legend.
    ax.set_ylim(0, min(100, max(5, 1.6 * top)))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title)
    return _finish(fig, path)


def class_size_rank(sizes: dict[str, list[int]], query_cap: int | None = None,
                    path: str | os.PathLike | None = None):
    """Class sizes sorted by rank on log-log axes, one line per labelling (the long tail).

    ``query_cap``: the classes' cap on queries (``ClassConfig.max_queries_per_class``), drawn
    as a line, since it makes the head of the curve flat."""
    from .classes import gini

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, s in sizes.items():
        s = np.sort(np.asarray(s))[::-1]
        ax.loglog(np.arange(1, len(s) + 1), s, lw=2, label=f"{name} (Gini {gini(s):.2f})")
    if query_cap is not None:
        ax.axhline(query_cap, color="grey", ls=":", lw=1.5,
                   label=f"cap of {query_cap} queries per class (skew control)")
    ax.set_xlabel("class rank (largest first, log scale)")
    ax.set_ylabel("samples in the class (log scale)")
    ax.set_title("Class-size distribution: the long tail of weak labels")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def domain_projections(panels: dict[str, np.ndarray], n_queries: int,
                       path: str | os.PathLike | None = None):
    """2-D projections (e.g. PCA) of query and doc features, one panel per depth or model.

    ``panels[name]`` is ``[n, 2]`` with the query photos first (``n_queries`` of them).
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (name, xy) in zip(axes[0], panels.items()):
        ax.scatter(xy[:n_queries, 0], xy[:n_queries, 1], s=6, alpha=0.5, c="tab:red",
                   label="query photos")
        ax.scatter(xy[n_queries:, 0], xy[n_queries:, 1], s=6, alpha=0.5, c="tab:blue",
                   label="shop docs")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("principal component 1")
        ax.set_ylabel("principal component 2")
        ax.legend(fontsize=7, markerscale=2)
    fig.suptitle("Query photos vs shop docs in feature space (PCA, one dot per image)",
                 fontsize=11)
    return _finish(fig, path)


def logged(rows: list[dict], key: str) -> list[tuple]:
    """(step, value) of the log records that hold ``key`` (a validation record has no loss, a
    pairwise loss's records no centres)."""
    return [(r["step"], r[key]) for r in rows if key in r]


def training_curves(runs: dict[str, list[dict]], key: str = "loss",
                    ylabel: str = "training loss (per batch, nats)",
                    path: str | os.PathLike | None = None):
    """``key`` of each run's ``metrics.jsonl`` against training step, one line per run (the
    records that hold it: a validation record of the initial weights has no loss).

    Losses of different kinds have different scales (and chance levels): compare their shapes,
    or draw each kind on its own axis.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, rows in runs.items():
        ax.plot(*zip(*logged(rows, key)), lw=2, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"Training curves ({key})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path)


HEALTH_PANELS = (
    ("val_recall@10", "validation Recall@10 (fraction of held-out photos)"),
    ("centre_norm", "mean norm of the class centres"),
    ("cos_own", "mean cosine, sample to own centre (solid) / to others (dashed)"),
    ("cos_batch", "mean cosine between a batch's embeddings (1 = collapse)"),
)


def training_health(runs: dict[str, list[dict]], path: str | os.PathLike | None = None):
    """Four panels that show *why* a recipe fails or works, one line per run: validation
    Recall@10, centre norms, cosines to own and other centres, and embedding collapse.
    Runs without a logged quantity (pairwise losses have no centres) skip that panel."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes.flat, HEALTH_PANELS):
        for (name, rows), colour in zip(runs.items(), colours * 4):
            pts = logged(rows, key)
            if pts:
                ax.plot(*zip(*pts), lw=2, color=colour, label=name,
                        marker="o" if key.startswith("val_") else None)
            if key == "cos_own":
                pts = logged(rows, "cos_other")
                if pts:
                    ax.plot(*zip(*pts), lw=1.5, ls="--", color=colour)
        ax.set_xlabel("training step")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, alpha=0.3)
        # Fixed ranges where the quantity has one (a recall, a cosine), so noise of 1e-4 is
        # not drawn as a zig-zag across the panel; a norm starts at 0.
        low = min([0.0] + [y for line in ax.get_lines() for y in line.get_ydata()])
        ax.set_ylim(*{"val_recall@10": (0, 1), "cos_own": (min(-0.1, low), 1),
                      "cos_batch": (min(-0.1, low), 1)}.get(key, (0, None)))
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Training health: validation recall, class centres, embedding spread")
    fig.tight_layout()
    return _finish(fig, path)


def pretraining_curves(card: dict, path: str | os.PathLike | None = None):
    """The pretraining run of a weights file, from its card: the InfoNCE loss, and the
    held-out photo-to-studio Recall@1 of the frozen features (the probe ``pretrain`` logs)."""
    curves = card["curves"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(*zip(*curves["infonce"]), lw=1.5)
    a.set_xlabel("pretraining step")
    a.set_ylabel("InfoNCE loss (nats)")
    a.set_title("training loss")
    b.plot(*zip(*curves["probe_recall@1"]), marker="o", lw=2)
    b.axhline(1 / card["held_out_objects"], ls="--", color="grey", label="chance")
    b.set_xlabel("pretraining step")
    b.set_ylabel("Recall@1 (share of held-out objects)")
    b.set_title(f"probe: photo view -> studio view, {card['held_out_objects']} held-out objects",
                fontsize=9)
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Pretraining the cnn on {card['corpus']['objects']:,} drawings")
    return _finish(fig, path)


def _doc_panel(ax, image, title: str, relevant: bool) -> None:
    """A doc image in a results grid: framed green when relevant, grey when not."""
    ax.imshow(np.asarray(image).transpose(1, 2, 0))
    for side in ax.spines.values():
        side.set_edgecolor("tab:green" if relevant else "0.6")
        side.set_linewidth(4 if relevant else 1)
    ax.set_title(title, fontsize=7, color="tab:green" if relevant else "0.2")


def _short(text: str, width: int = 22) -> str:
    return "\n".join(textwrap.wrap(text, width)[:2])


def search_grid(query_images, doc_images, hits: np.ndarray, relevant: list[set[int]],
                titles: list[str] | None = None, index: str = "flat",
                doc_texts: list[str] | None = None, path: str | os.PathLike | None = None):
    """Each row: a query photo, then its top-k docs; relevant hits framed green, others grey.

    ``doc_images[i]`` is the image of doc row ``i`` and ``doc_texts[i]`` its title (shown under
    the rank when given, so look-alike docs can be told apart); ``hits[r]`` the ranked doc rows
    of query r; ``index`` names the FAISS index kind that answered (the title says it, and how
    many queries found their product).
    """
    n, k = hits.shape
    fig, axes = plt.subplots(n, k + 1, figsize=(1.9 * (k + 1), (2.5 if doc_texts else 2.1) * n),
                             squeeze=False)
    for r in range(n):
        axes[r, 0].imshow(np.asarray(query_images[r]).transpose(1, 2, 0))
        axes[r, 0].set_title(titles[r] if titles else "query photo", fontsize=8,
                             color="tab:red")
        for c in range(k):
            doc = int(hits[r, c])
            good = doc in relevant[r]
            _doc_panel(axes[r, c + 1], doc_images[doc],
                       f"#{c + 1}" + (" relevant" if good else "") +
                       (f"\n{_short(doc_texts[doc])}" if doc_texts else ""), good)
    found = sum(bool(set(map(int, hits[r])) & relevant[r]) for r in range(n))
    kind = "exact (flat) index" if index == "flat" else f"{index} ANN index"
    return _finish_image_grid(fig, axes, f"Search path: query photo -> {kind} -> top {k} docs "
                              f"(green frame = same product; {found} of {n} rows found "
                              f"theirs)", 10, path)


def missed_queries(query_images, doc_images, hits: np.ndarray, relevant: list[set[int]],
                   doc_texts: list[str], path: str | os.PathLike | None = None):
    """Queries a model misses: each row a query photo, its top-k docs (none relevant), then a
    doc of its own product in the last column, framed green, so what the model confused it with
    is seen beside what it should have found."""
    n, k = hits.shape
    fig, axes = plt.subplots(n, k + 2, figsize=(1.9 * (k + 2), 2.5 * n), squeeze=False)
    for r in range(n):
        axes[r, 0].imshow(np.asarray(query_images[r]).transpose(1, 2, 0))
        axes[r, 0].set_title("query photo", fontsize=8, color="tab:red")
        for c in range(k):
            doc = int(hits[r, c])
            _doc_panel(axes[r, c + 1], doc_images[doc], f"#{c + 1}\n{_short(doc_texts[doc])}",
                       doc in relevant[r])
        own = min(relevant[r])
        _doc_panel(axes[r, k + 1], doc_images[own], f"its product\n{_short(doc_texts[own])}",
                   True)
    return _finish_image_grid(fig, axes, f"Missed queries: the top {k} docs returned, and a doc "
                              f"of the query's own product (right, green)", 10, path)


def bars(values: dict[str, float], xlabel: str, title: str,
         path: str | os.PathLike | None = None):
    """A horizontal bar per entry (e.g. Recall@10 per model)."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(names) + 1.4))
    ax.barh(names, [values[n] for n in names], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    return _finish(fig, path)


def seed_bars(panels: dict[str, dict[str, list[float]]], xlabel: str, title: str,
              path: str | os.PathLike | None = None):
    """One panel per dataset, one horizontal bar per row at its seeds' mean, each seed a dot
    (the label counts them when there are several); every panel on one axis from 0, so a gap
    reads the same size in both."""
    top = max(max(v) for rows in panels.values() for v in rows.values())
    height = 0.45 * max(len(rows) for rows in panels.values()) + 1.4
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), height), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels.items()):
        labels = [f"{row} ({len(v)} seeds)" if len(v) > 1 else row for row, v in rows.items()]
        ax.barh(labels, [np.mean(v) for v in rows.values()], color="tab:blue", alpha=0.6)
        for y, v in enumerate(rows.values()):
            ax.plot(v, [y] * len(v), "o", color="black", ms=4)
        ax.invert_yaxis()
        ax.set_xlim(0, top * 1.1)
        ax.set_xlabel(xlabel)
        ax.set_title(name)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title)
    return _finish(fig, path)
