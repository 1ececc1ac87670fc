"""Weak-label class construction from click logs: the paper's data-governance step.

Mixer trains by classification, so it needs classes; the only labels are clicks, which are
skewed (head products get most of the traffic) and noisy (users click look-alikes, or at
random).  The paper says classes are organised from this behaviour data and that this deals with
skew and noise from the data side; it gives no algorithm.  Ours, step by step (each step's
effect is measurable against SynthShop's truth with :func:`analyse`):

1. **Edge filtering.**  A (query, doc) click edge is kept when its count is at least
   ``min_count`` and it holds at least ``min_share`` of the query's click events.
2. **Doc co-click graph.**  Two docs are linked when at least ``min_support`` queries kept an
   edge to both, and that support is at least ``min_association`` of the larger doc's query
   count.  The normalisation by the *larger* doc is what stops noise: a head product's many
   stray clicks onto a tail product's doc are a tiny share of the head doc's traffic.
3. **Connected components** of that graph (``scipy.sparse.csgraph``, vectorised) are the doc
   side of the classes.  Queries never link docs, so one stray click cannot merge two products.
4. **Query assignment.**  Each query joins the class that holds the largest share of its click
   events, if that share reaches ``min_share``; otherwise it is left out (ambiguous).
5. **Skew control.**  Components with more than ``max_docs_per_class`` docs are split by raising
   the association threshold inside them, weakest links first (then into connected chunks);
   classes with fewer than ``min_class_size`` samples are dropped; each class keeps at most
   ``max_queries_per_class`` queries, chosen by a hash of the id so the choice does not depend
   on input order.

Everything here is plain graph and array logic over ids and counts; no model object.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from .files import atomic_path


@dataclass(frozen=True)
class ClassConfig:
    """Thresholds of :func:`build_classes_from_clicks` (defaults measured on SynthShop small:
    ``docs/EXPERIMENTS.md``, "Weak-label classes against raw clicks").  ``min_support=2`` means two
    independent queries must agree before two docs share a class."""

    min_count: int = 1
    min_share: float = 0.25
    min_support: int = 2
    min_association: float = 0.2
    max_docs_per_class: int = 64
    min_class_size: int = 2
    max_queries_per_class: int = 200

    def __post_init__(self):
        ok = (self.min_count >= 1 and 0 <= self.min_share <= 1 and self.min_support >= 1
              and 0 <= self.min_association <= 1 and self.max_docs_per_class >= 1
              and self.min_class_size >= 1 and self.max_queries_per_class >= 1)
        if not ok:
            raise ValueError(f"ClassConfig: a threshold is out of range: {self}")


@dataclass
class ClickGraph:
    """Aggregated clicks as index arrays over sorted unique ids (order-independent)."""

    query_ids: np.ndarray   # sorted unique query ids
    doc_ids: np.ndarray     # sorted unique doc ids
    q: np.ndarray           # edge -> query index
    d: np.ndarray           # edge -> doc index
    count: np.ndarray       # edge -> click events

    @property
    def query_events(self) -> np.ndarray:
        return np.bincount(self.q, weights=self.count, minlength=len(self.query_ids))


def click_graph(query_ids, doc_ids, counts, known_queries=None, known_docs=None) -> ClickGraph:
    """Aggregate click rows (duplicates summed) into a :class:`ClickGraph`.

    Raises ``ValueError`` naming the row for a non-positive or non-integer count, or for an id
    outside ``known_queries`` / ``known_docs`` when those are given.
    """
    query_ids = np.asarray(query_ids, dtype=object)
    doc_ids = np.asarray(doc_ids, dtype=object)
    counts = np.asarray(counts)
    if not (len(query_ids) == len(doc_ids) == len(counts)):
        raise ValueError("click_graph: query_ids, doc_ids and counts differ in length")
    if len(counts) and (counts.dtype.kind not in "iu" or counts.min() < 1):
        bad = int(np.flatnonzero([not (isinstance(c, (int, np.integer)) and c >= 1)
                                  for c in counts.tolist()])[0])
        raise ValueError(f"clicks row {bad + 1}: count must be a positive integer, "
                         f"got {counts.tolist()[bad]!r}")
    for name, ids, known in (("query_id", query_ids, known_queries),
                             ("doc_id", doc_ids, known_docs)):
        if known is not None:
            known = set(known)
            for i, x in enumerate(ids.tolist()):
                if x not in known:
                    raise ValueError(f"clicks row {i + 1}: unknown {name} {x!r}")
    uq, qi = np.unique(query_ids.astype(str), return_inverse=True)
    ud, di = np.unique(doc_ids.astype(str), return_inverse=True)
    m = sp.coo_matrix((counts.astype(np.int64), (qi, di)), shape=(len(uq), len(ud))).tocsr()
    m.sum_duplicates()
    m = m.tocoo()
    return ClickGraph(uq, ud, m.row.astype(np.int64), m.col.astype(np.int64),
                      m.data.astype(np.int64))


def filter_edges(g: ClickGraph, min_count: int, min_share: float) -> np.ndarray:
    """Boolean mask of kept edges; raising either threshold can only remove edges."""
    share = g.count / g.query_events[g.q]
    return (g.count >= min_count) & (share >= min_share)


def co_click_doc_classes(g: ClickGraph, keep: np.ndarray, cfg: ClassConfig):
    """Doc class labels (-1 = doc without kept edges) from the co-click graph: two docs are
    linked when at least ``min_support`` queries click both and those are ``min_association``
    of the queries of either doc; linked groups are the classes, an oversized one is split."""
    n_q, n_d = len(g.query_ids), len(g.doc_ids)
    b = sp.csr_matrix((np.ones(int(keep.sum())), (g.q[keep], g.d[keep])), shape=(n_q, n_d))
    co = (b.T @ b).tocoo()                      # docs x docs: queries clicking both
    degree = np.asarray(b.sum(axis=0)).ravel()  # queries per doc
    off = co.row < co.col
    r, c, s = co.row[off], co.col[off], co.data[off]
    assoc = s / np.maximum(degree[r], degree[c])
    strong = (s >= cfg.min_support) & (assoc >= cfg.min_association)
    r, c, assoc = r[strong], c[strong], assoc[strong]
    labels = _components(n_d, r, c)
    labels = _split_oversized(labels, r, c, assoc, cfg.max_docs_per_class)
    labels[degree == 0] = -1
    return labels


def _components(n: int, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    adj = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n))
    return connected_components(adj, directed=False)[1]


def _split_oversized(labels, r, c, assoc, cap):
    """Re-cut every component above ``cap`` docs by dropping its weakest links (the edges at
    its lowest association) until it falls apart into parts within the cap, then by chunks."""
    labels = labels.copy()
    assoc = assoc.copy()
    while True:
        sizes = np.bincount(labels)
        cut_any = False
        for comp in np.flatnonzero(sizes > cap):
            members = np.flatnonzero(labels == comp)
            inside = (labels[r] == comp) & (labels[c] == comp) & (assoc >= 0)
            if not inside.any():
                continue
            weakest = assoc[inside].min()
            keep_e = inside & (assoc > weakest)
            if not keep_e.any():
                continue  # every link ties: dropping them all would leave singletons
            assoc = np.where(inside & ~keep_e, -1.0, assoc)
            local = {m: i for i, m in enumerate(members)}
            rr = np.array([local[x] for x in r[keep_e]], dtype=np.int64)
            cc = np.array([local[x] for x in c[keep_e]], dtype=np.int64)
            labels[members] = labels.max() + 1 + _components(len(members), rr, cc)
            cut_any = True
        if not cut_any:
            break
    # Whatever still exceeds the cap (edges of equal weight) is cut into chunks of ``cap`` docs
    # in breadth-first order from its lowest doc, so a chunk holds docs that link to each other
    # (a chain of docs becomes runs along the chain, not scattered singletons).
    sizes = np.bincount(labels)
    for comp in np.flatnonzero(sizes > cap):
        members = _breadth_first(np.flatnonzero(labels == comp), r, c)
        labels[members] = labels.max() + 1 + np.arange(len(members)) // cap
    return labels


def _breadth_first(members: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``members`` (doc indices of one component) in breadth-first order over the edges (r, c),
    from the lowest index, neighbours in index order; members the edges do not reach follow."""
    inside = np.isin(r, members) & np.isin(c, members)
    neighbours: dict[int, list[int]] = {int(m): [] for m in members}
    for a, b in zip(r[inside].tolist(), c[inside].tolist()):
        neighbours[a].append(b)
        neighbours[b].append(a)
    order, seen = [], set()
    for root in sorted(neighbours):
        if root in seen:
            continue
        seen.add(root)
        queue = [root]
        while queue:
            node = queue.pop(0)
            order.append(node)
            for nb in sorted(neighbours[node]):
                if nb not in seen:
                    seen.add(nb)
                    queue.append(nb)
    return np.array(order, dtype=np.int64)


def stable_rank(ids) -> np.ndarray:
    """A pseudo-random but input-order-free ordering key for ids."""
    return np.array([int(hashlib.blake2b(str(x).encode(), digest_size=8).hexdigest(), 16)
                     for x in ids], dtype=np.uint64)


def build_classes_from_clicks(query_ids, doc_ids, counts, cfg: ClassConfig = ClassConfig(),
                              known_queries=None, known_docs=None) -> tuple[list[dict], dict]:
    """Classes (each ``{"class_id", "query_ids", "doc_ids"}``) and a stats summary.

    The result is a partition of the kept samples, and does not depend on the order of the
    input rows.  ``stats["dropped_click_events"]`` says where every removed click event went.
    """
    g = click_graph(query_ids, doc_ids, counts, known_queries, known_docs)
    by_count = g.count >= cfg.min_count
    keep = filter_edges(g, cfg.min_count, cfg.min_share)
    doc_label = co_click_doc_classes(g, keep, cfg)
    n_classes = int(doc_label.max()) + 1 if len(doc_label) else 0

    # A query joins the class holding the largest share of *all* its click events.
    edge_class = doc_label[g.d]
    ok = keep & (edge_class >= 0)
    qc = sp.csr_matrix((g.count[ok].astype(float), (g.q[ok], edge_class[ok])),
                       shape=(len(g.query_ids), max(n_classes, 1)))
    best = np.asarray(qc.argmax(axis=1)).ravel()
    best_events = np.asarray(qc.max(axis=1).todense()).ravel()
    assigned = (best_events > 0) & (best_events / np.maximum(g.query_events, 1) >= cfg.min_share)
    query_label = np.where(assigned, best, -1)

    # Size control: drop tiny classes, cap queries per class (hash order, input-order free).
    q_size = np.bincount(query_label[assigned], minlength=n_classes)
    d_size = np.bincount(doc_label[doc_label >= 0], minlength=n_classes)
    big_enough = (q_size + d_size) >= cfg.min_class_size
    rank = stable_rank(g.query_ids)
    capped = np.zeros(len(g.query_ids), dtype=bool)
    classes = []
    order = np.argsort(doc_label, kind="stable")
    bounds = np.searchsorted(doc_label[order], np.arange(n_classes + 1))
    q_order = np.argsort(query_label, kind="stable")
    q_bounds = np.searchsorted(query_label[q_order], np.arange(n_classes + 1))
    for k in range(n_classes):
        if not big_enough[k]:
            continue
        docs = g.doc_ids[order[bounds[k]:bounds[k + 1]]]
        qs = q_order[q_bounds[k]:q_bounds[k + 1]]
        if len(qs) > cfg.max_queries_per_class:
            by_rank = qs[np.argsort(rank[qs], kind="stable")]
            capped[by_rank[cfg.max_queries_per_class:]] = True
            qs = by_rank[: cfg.max_queries_per_class]
        classes.append({"query_ids": sorted(g.query_ids[qs].tolist()),
                        "doc_ids": sorted(docs.tolist())})

    # Where every click event went: mutually exclusive reasons, in pipeline order.
    q_ok = assigned[g.q]
    same = keep & q_ok & (edge_class == query_label[g.q])
    small = np.zeros_like(same)
    small[same] = ~big_enough[edge_class[same]]
    reasons = {
        "below_min_count": ~by_count,
        "below_min_share": by_count & ~keep,
        "query_ambiguous": keep & ~q_ok,
        "outside_query_class": keep & q_ok & (edge_class != query_label[g.q]),
        "class_too_small": small,
        "query_over_class_cap": same & ~small & capped[g.q],
    }
    dropped = {k: int(g.count[m].sum()) for k, m in reasons.items()}
    classes.sort(key=lambda c: c["doc_ids"][0] if c["doc_ids"] else c["query_ids"][0])
    for i, c in enumerate(classes):
        c["class_id"] = i
    stats = class_stats(classes)
    stats.update(input_click_rows=int(len(np.asarray(counts))),
                 input_click_events=int(g.count.sum()), dropped_click_events=dropped,
                 kept_click_events=int(g.count.sum()) - sum(dropped.values()),
                 config=asdict(cfg))
    return [{"class_id": c["class_id"], "query_ids": c["query_ids"], "doc_ids": c["doc_ids"]}
            for c in classes], stats


def gini(x) -> float:
    """Gini coefficient of non-negative sizes (0 = all equal, towards 1 = one holds all)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    if len(x) == 0 or x.sum() == 0:
        return 0.0
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def class_stats(classes: list[dict]) -> dict:
    sizes = np.array([len(c["query_ids"]) + len(c["doc_ids"]) for c in classes])
    if not len(sizes):
        return {"classes": 0, "samples": 0, "queries": 0, "docs": 0}
    return {"classes": len(classes), "samples": int(sizes.sum()),
            "queries": int(sum(len(c["query_ids"]) for c in classes)),
            "docs": int(sum(len(c["doc_ids"]) for c in classes)),
            "size": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                     "p90": float(np.percentile(sizes, 90)), "max": int(sizes.max()),
                     "gini": round(gini(sizes), 4)}}


def raw_click_classes(query_ids, doc_ids, counts) -> list[dict]:
    """The baseline: every clicked doc is a class of itself plus the queries that clicked it."""
    g = click_graph(query_ids, doc_ids, counts)
    order = np.argsort(g.d, kind="stable")
    bounds = np.searchsorted(g.d[order], np.arange(len(g.doc_ids) + 1))
    return [{"class_id": k, "doc_ids": [g.doc_ids[k]],
             "query_ids": sorted(g.query_ids[g.q[order[bounds[k]:bounds[k + 1]]]].tolist())}
            for k in range(len(g.doc_ids))]


def analyse(classes: list[dict], truth: dict[str, str]) -> dict:
    """Quality of classes against the true product of every sample (SynthShop's ``_truth``).

    * ``purity``: share of samples whose product is their class's majority product;
    * ``pair_noise``: share of same-class (query, doc) pairs whose products differ: the label
      noise a classifier sees as "positive pairs";
    * ``pair_recall``: share of the true same-product (query, doc) pairs among the classes'
      samples that share a class (a sample in several classes counts if any is shared).
    """
    correct = total = wrong_pairs = pairs = 0
    together: set[tuple[str, str]] = set()
    for c in classes:
        prods_q = [truth[x] for x in c["query_ids"]]
        prods_d = [truth[x] for x in c["doc_ids"]]
        members = prods_q + prods_d
        if not members:
            continue
        values, counts = np.unique(members, return_counts=True)
        correct += int(counts.max())
        total += len(members)
        dq = dict(zip(*np.unique(prods_q, return_counts=True))) if prods_q else {}
        dd = dict(zip(*np.unique(prods_d, return_counts=True))) if prods_d else {}
        n_pairs = len(prods_q) * len(prods_d)
        pairs += n_pairs
        wrong_pairs += n_pairs - sum(n * dd.get(p, 0) for p, n in dq.items())
        for qx in c["query_ids"]:
            for dx in c["doc_ids"]:
                if truth[qx] == truth[dx]:
                    together.add((qx, dx))
    queries = {x for c in classes for x in c["query_ids"]}
    docs = {x for c in classes for x in c["doc_ids"]}
    docs_of: dict[str, int] = {}
    for x in docs:
        docs_of[truth[x]] = docs_of.get(truth[x], 0) + 1
    true_pairs = sum(docs_of.get(truth[x], 0) for x in queries)
    return {"purity": correct / max(total, 1), "pair_noise": wrong_pairs / max(pairs, 1),
            "pair_recall": len(together) / max(true_pairs, 1),
            "samples": total, "queries": len(queries), "docs": len(docs)}


def write_classes(path: str | Path, classes: list[dict]) -> None:
    """One JSON line per class, written atomically (a temp file renamed into place)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for c in classes:
            f.write(json.dumps(c) + "\n")


def analyse_steps(query_ids, doc_ids, counts, truth: dict[str, str],
                  cfg: ClassConfig = ClassConfig()) -> list[dict]:
    """Quality after each step: raw clicks, filtered edges, final classes (for the notebook)."""
    g = click_graph(query_ids, doc_ids, counts)
    keep = filter_edges(g, cfg.min_count, cfg.min_share)
    classes, _ = build_classes_from_clicks(query_ids, doc_ids, counts, cfg)
    steps = [("raw clicks (each clicked doc a class)", raw_click_classes(query_ids, doc_ids,
                                                                         counts)),
             ("after edge filtering", raw_click_classes(g.query_ids[g.q[keep]],
                                                        g.doc_ids[g.d[keep]], g.count[keep])),
             ("co-click classes (final)", classes)]
    out = []
    for name, cls in steps:
        sizes = [len(c["query_ids"]) + len(c["doc_ids"]) for c in cls]
        out.append({"step": name, "classes": len(cls), **analyse(cls, truth),
                    "gini": gini(sizes), "sizes": sizes})
    return out
