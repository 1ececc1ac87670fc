"""Figures for students and reviewers (matplotlib only, no logic beyond plotting).

Every function takes plain arrays or a loaded dataset, draws one figure with a title and labelled
axes, and saves it when given a path.  The Agg backend is used when no display is set, so the
functions run the same in CI, in a notebook, and on a headless GPU box.
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend().lower():
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _finish(fig, path: str | os.PathLike | None):
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


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
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Query photos (left) and the shop docs of the same product (right): "
                 "image plus title", fontsize=11)
    return _finish(fig, path)
