"""Serving: queries per second and Recall@10 of FAISS indexes against exact search, side by side.

    python bench/retrieval.py [--sizes 1e5,1e6] [--dim 128] [--threads 2]

Embeddings are synthetic but shaped like a trained model's: docs are unit vectors around one
centre per product (4 docs a product, cosine ~0.8 to their centre), and each query is a noisy
view of one product (a "user photo").  Recall@10 is the share of queries with a doc of their
product in the top 10 (the evaluator's definition); ``overlap@10`` is the share of the exact
top 10 the index returns.  For each size the indexes run one after the other in this process;
QPS is measured on the same queries (flat on a subset, as it is slow), memory is the serialised
index size, build includes training.
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from mixer_lite.retrieval import build_index, ranking_metrics, search


def make_data(n_docs: int, dim: int, n_queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    per = 4
    n_prod = n_docs // per
    centres = rng.standard_normal((n_prod, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    product = np.repeat(np.arange(n_prod), per)
    docs = centres[product] + 0.045 * rng.standard_normal((n_prod * per, dim), dtype=np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    qp = rng.integers(0, n_prod, n_queries)
    queries = centres[qp] + 0.06 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    relevant = [set(range(p * per, p * per + per)) for p in qp]
    return docs, queries, relevant


def timed_search(index, queries, k=10):
    t0 = time.perf_counter()
    _, rows = search(index, queries, k)
    return rows, len(queries) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e5,1e6")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--flat-queries", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    settings = {"flat": {}, "ivf": {"nprobe": 8}, "hnsw": {"hnsw_m": 16, "ef_search": 64},
                "ivfpq": {"nprobe": 16}}
    for size in [int(float(s)) for s in args.sizes.split(",")]:
        docs, queries, relevant = make_data(size, args.dim, args.queries)
        print(f"\n{size:,} docs, dim {args.dim}, {args.queries:,} queries, "
              f"{args.threads} threads")
        print(f"{'index':<7} {'build s':>8} {'MiB':>8} {'QPS':>10} {'x exact':>8} "
              f"{'R@10':>6} {'% exact':>8} {'overlap@10':>10}")
        exact_rows = exact_qps = exact_r10 = None
        for kind, params in settings.items():
            t0 = time.perf_counter()
            index = build_index(docs, kind, **params)
            build = time.perf_counter() - t0
            mib = faiss.serialize_index(index).nbytes / 2 ** 20
            if kind == "flat":
                _, qps = timed_search(index, queries[: args.flat_queries])
                rows, _ = search(index, queries, 10)
                exact_rows, exact_qps = rows, qps
            else:
                rows, qps = timed_search(index, queries)
            r10 = ranking_metrics(rows, relevant, ks=(10,))["recall@10"]
            exact_r10 = exact_r10 if exact_r10 is not None else r10
            overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact_rows)])
            print(f"{kind:<7} {build:>8.1f} {mib:>8.0f} {qps:>10,.0f} {qps / exact_qps:>8.1f} "
                  f"{r10:>6.3f} {100 * r10 / exact_r10:>7.1f}% {overlap:>10.3f}")
    print("\ntarget at 1e6 docs: an approximate index with >= 20x exact QPS and >= 95% of exact "
          "Recall@10")


if __name__ == "__main__":
    main()
