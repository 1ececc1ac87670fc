"""Serving: queries per second and Recall@10 of FAISS indexes against exact search, side by side.

    python bench/retrieval.py [--sizes 1e5,1e6] [--dim 128] [--threads 2]

Embeddings are synthetic but shaped like a trained model's: products cluster by category
(sibling products at cosine ~0.6), each product has 4 docs around it (cosine ~0.9) and each
query is a noisier view of one product (cosine ~0.75, a "user photo").  Recall@10 is the share of queries with a doc of their
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
    """Category centres -> product centres (siblings at cosine ~0.6) -> 4 docs a product (cosine
    ~0.9 to it) and queries (cosine ~0.75 to their product): look-alike products compete."""
    rng = np.random.default_rng(seed)

    def around(centres, idx, sigma):
        x = centres[idx] + sigma * rng.standard_normal((len(idx), dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    per = 4
    n_prod = n_docs // per
    cats = around(np.zeros((1, dim), np.float32) + 0, np.zeros(max(1, n_prod // 250), int), 1.0)
    products = around(cats, rng.integers(0, len(cats), n_prod), 0.072)
    product = np.repeat(np.arange(n_prod), per)
    docs = around(products, product, 0.042)
    qp = rng.integers(0, n_prod, n_queries)
    queries = around(products, qp, 0.078)
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
                _, rows = search(index, queries, 10)
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
