"""Class construction on a large click log: time, peak memory, and scipy vs networkx components.

    python bench/classes.py --data data/synth-large     # make it: mixer-lite make-data --preset large

Prints, side by side in one run:
* the whole of ``build_classes_from_clicks`` (default ClassConfig): seconds and peak memory
  (tracemalloc for Python objects and NumPy arrays, plus the process's peak RSS);
* connected components of the same two graphs with ``scipy.sparse.csgraph`` (what classes.py
  uses) and with ``networkx`` (a well-kept pure-Python reference): the query-doc click graph,
  and the doc co-click graph classes.py builds; the component counts must agree.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from mixer_lite.classes import ClassConfig, build_classes_from_clicks, click_graph, filter_edges


def read_clicks(path: Path):
    q, d, n = [], [], []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            q.append(r["query_id"]), d.append(r["doc_id"]), n.append(r["count"])
    return q, d, n


def components_both(n_nodes: int, r: np.ndarray, c: np.ndarray, name: str) -> tuple:
    import networkx as nx

    t0 = time.perf_counter()
    adj = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(n_nodes, n_nodes))
    n_sp = connected_components(adj, directed=False)[0]
    t_sp = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = nx.Graph()
    g.add_nodes_from(range(n_nodes))
    g.add_edges_from(zip(r.tolist(), c.tolist()))
    n_nx = nx.number_connected_components(g)
    t_nx = time.perf_counter() - t0
    if n_sp != n_nx:
        raise SystemExit(f"{name}: scipy found {n_sp} components, networkx {n_nx}")
    return name, n_nodes, len(r), n_sp, t_sp, t_nx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synth-large")
    args = ap.parse_args()
    q, d, n = read_clicks(Path(args.data) / "clicks.jsonl")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    t0 = time.perf_counter()
    classes, stats = build_classes_from_clicks(q, d, n)
    t_build = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.data}: {len(q):,} click rows, {sum(n):,} click events")
    print(f"build_classes_from_clicks: {t_build:.1f} s, {stats['classes']:,} classes, "
          f"{stats['samples']:,} samples; peak traced memory {py_peak / 2 ** 20:.0f} MiB, "
          f"process peak RSS {rss:.0f} MiB (after reading the log: {rss0:.0f} MiB)")

    g = click_graph(q, d, n)
    nq = len(g.query_ids)
    rows = [components_both(nq + len(g.doc_ids), g.q, nq + g.d, "query-doc click graph")]
    keep = filter_edges(g, 1, ClassConfig().min_share)
    b = sp.csr_matrix((np.ones(int(keep.sum())), (g.q[keep], g.d[keep])),
                      shape=(nq, len(g.doc_ids)))
    co = (b.T @ b).tocoo()
    off = co.row < co.col
    rows.append(components_both(len(g.doc_ids), co.row[off], co.col[off], "doc co-click graph"))
    print(f"{'graph':<22} {'nodes':>9} {'edges':>10} {'components':>10} {'scipy s':>8} "
          f"{'networkx s':>10} {'speed-up':>9}")
    for name, nodes, edges, comps, t_sp, t_nx in rows:
        print(f"{name:<22} {nodes:>9,} {edges:>10,} {comps:>10,} {t_sp:>8.2f} {t_nx:>10.2f} "
              f"{t_nx / t_sp:>8.1f}x")


if __name__ == "__main__":
    main()
