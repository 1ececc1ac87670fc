"""Retrieval: embed docs offline, index them with FAISS, search query photos, score the ranking.

The paper's fourth challenge is serving: thousands of image queries a second against a large
candidate set.  Docs are embedded once, offline (:func:`embed_docs`); a FAISS index answers
queries by inner product on the unit-norm embeddings.  Exact search (``flat``) is the default
and the reference; ``ivf`` (IVF-Flat), ``hnsw`` and ``ivfpq`` (IVF with product quantisation)
trade a little recall for speed and memory on large indexes (``bench/retrieval.py``).

Metrics (:func:`ranking_metrics`), per test query with relevant docs R from ``qrels.jsonl``:

* ``recall@K``: 1 if any doc of R is in the top K (the hit rate used in image retrieval; a
  product's docs are interchangeable answers), averaged over queries;
* ``map@10``: average precision in the top 10, normalised by min(|R|, 10);
* ``mrr``: 1 / rank of the first relevant doc within the searched depth (0 if none).

Ranked lists are taken as given: breaking score ties is the search's job (the flat index and
:func:`exact_search` both put the lower doc row first).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .dataset import data_fingerprint
from .encoders import batchnorm_layers
from .files import atomic_path, remove_stale_temporaries, write_json

KS = (1, 5, 10, 20, 50)
INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------
def _in_batches(model, n: int, batch_size: int, desc: str, progress: bool, embed,
                batch_stats: bool = False) -> np.ndarray:
    """Run ``embed(rows)`` over ``range(n)`` in batches, without gradients, in eval mode.

    ``batch_stats``: BatchNorm layers normalise each batch by its own statistics, as in a
    training step; the model's running statistics are restored afterwards.
    """
    model.eval()
    # Only BatchNorm layers change state in a training-mode forward: keep and restore theirs.
    saved = [(m, {k: v.clone() for k, v in m.state_dict().items()})
             for m in (batchnorm_layers(model) if batch_stats else [])]
    for m, _ in saved:
        m.train()
    out = []
    with torch.no_grad():
        for lo in tqdm(range(0, n, batch_size), desc=desc, disable=not progress):
            out.append(embed(np.arange(lo, min(lo + batch_size, n))).float().cpu())
    for m, state in saved:
        m.load_state_dict(state)
        m.eval()
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.embed_dim), np.float32)


def embed_queries(model, images, batch_size: int = 256, device="cpu",
                  progress: bool = False) -> np.ndarray:
    """Unit-norm embeddings of query photos; ``images`` is a :class:`dataset.ImageTable` or a
    tensor."""
    return _in_batches(model, len(images), batch_size, "embedding queries", progress,
                       lambda idx: model.embed_queries(images[idx].to(device)))


def embed_docs(model, images, texts: list[str], batch_size: int = 256, device="cpu",
               progress: bool = False, batch_stats: bool = False) -> np.ndarray:
    """Unit-norm embeddings of docs (image + text), computed offline in batches."""
    return _in_batches(model, len(images), batch_size, "embedding docs", progress,
                       lambda idx: model.embed_docs(images[idx].to(device),
                                                    model.tokenize([texts[i] for i in idx])),
                       batch_stats)


def raw_pixel_embeddings(images, side: int = 16, batch_size: int = 1024,
                         mean_image: bool = False) -> np.ndarray:
    """The no-learning baselines: images shrunk to ``side`` x ``side``, unit norm, each centred
    on its own mean pixel value, or (``mean_image``) on the collection's mean image: the part
    every picture of the collection shares (a white ground, a photo's surface) taken away."""
    out = []
    for lo in range(0, len(images), batch_size):
        x = images[np.arange(lo, min(lo + batch_size, len(images)))].float() / 255.0
        out.append(torch.nn.functional.adaptive_avg_pool2d(x, side).flatten(1))
    x = torch.cat(out)
    x = x - (x.mean(dim=0, keepdim=True) if mean_image else x.mean(dim=1, keepdim=True))
    return torch.nn.functional.normalize(x, dim=1).numpy()


# --------------------------------------------------------------------------------------------
# Indexes and search
# --------------------------------------------------------------------------------------------
def check_index_kind(kind: str, n_docs: int) -> None:
    """Refuse an index kind that cannot be built over ``n_docs`` docs (before any embedding)."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    if kind == "ivfpq" and n_docs < 256:
        raise ValueError(f"an ivfpq index needs at least 256 docs (each code book has 256 "
                         f"entries to train), and there are {n_docs}; use flat, ivf or hnsw")


def build_index(doc_emb: np.ndarray, kind: str = "flat", nlist: int | None = None,
                nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 128, pq_m: int | None = None,
                seed: int = 0):
    """A FAISS inner-product index over ``doc_emb`` [N, d] (float32, unit norm)."""
    import faiss

    x = np.ascontiguousarray(doc_emb, dtype=np.float32)
    n, d = x.shape
    check_index_kind(kind, n)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        # FAISS wants ~39 training points per list; small indexes get fewer lists.
        nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            pq_m = pq_m or next(m for m in (d // 2, d // 4, d // 8, 1) if m and d % m == 0)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = min(nprobe, nlist)
    index.add(x)
    return index


_GPU_RESOURCES: dict[int, object] = {}  # faiss GPU resources by device, kept for the process


def index_on_device(index, device="cpu"):
    """``index`` searched on ``device``'s GPU where faiss has GPU support (the faiss-gpu build:
    ``StandardGpuResources``), else ``index`` unchanged: faiss-cpu, the package's dependency,
    has none, and neither has faiss-gpu for HNSW, so those search on the CPU."""
    import faiss

    device = torch.device(device)
    if device.type != "cuda" or not hasattr(faiss, "StandardGpuResources"):
        return index
    gpu = device.index or 0
    if gpu not in _GPU_RESOURCES:
        _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES[gpu], gpu, index)
    except RuntimeError:  # an index kind faiss cannot put on a GPU (HNSW)
        return index


def search(index, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, doc rows) per query; rows of -1 mark fewer than k results."""
    k = min(k, index.ntotal)
    scores, rows = index.search(np.ascontiguousarray(query_emb, dtype=np.float32), k)
    # FAISS leaves the order of equal scores open: put the lower doc row first, as exact_search.
    order = np.lexsort((rows, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def exact_search(doc_emb, query_emb, k: int) -> tuple[np.ndarray, np.ndarray]:
    """torch matmul + top-k: the reference the FAISS indexes are checked against."""
    s = torch.from_numpy(np.asarray(query_emb, np.float32)) @ \
        torch.from_numpy(np.asarray(doc_emb, np.float32)).t()
    k = min(k, s.shape[1])
    # Stable sort: equal scores keep the lower doc row first.
    order = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    return torch.gather(s, 1, order).numpy(), order.numpy()


INDEX_FILE, INDEX_META = "docs.faiss", "meta.json"


def save_index(index, folder: str | Path, meta: dict) -> None:
    """``folder/docs.faiss`` then ``folder/meta.json``, each written atomically.

    The two are one unit: ``meta.json`` (written last) records the number of vectors and the
    sha256 of the very bytes of ``docs.faiss``, so a reader tells an index from a half-finished
    or concurrent rebuild (new vectors beside old ids) and refuses it instead of printing other
    docs' rows under the wrong ids.
    """
    import faiss

    folder = Path(folder)
    remove_stale_temporaries(folder)  # what an index killed mid-write left
    blob = faiss.serialize_index(index).tobytes()
    with atomic_path(folder / INDEX_FILE) as tmp:
        tmp.write_bytes(blob)
    write_json(folder / INDEX_META, {**meta, "vectors": int(index.ntotal),
                                     "faiss_sha256": hashlib.sha256(blob).hexdigest()})


def load_index(folder: str | Path) -> tuple[object, dict]:
    """(the FAISS index, its metadata) of ``folder``, checked to belong together."""
    import faiss

    folder = Path(folder)
    meta_path, index_path = folder / INDEX_META, folder / INDEX_FILE
    rebuild = "rebuild it with `mixer-lite index`"
    if not meta_path.exists() or not index_path.exists():
        raise FileNotFoundError(f"{meta_path if not meta_path.exists() else index_path}: no "
                                f"saved index; run `mixer-lite index --run RUN` first")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: damaged index metadata ({e}); {rebuild}") from None
    wanted = {"doc_ids": list, "vectors": int, "faiss_sha256": str, "kind": str}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t)
                                         for k, t in wanted.items()):
        raise ValueError(f"{meta_path}: not index metadata (needs {', '.join(wanted)} of the "
                         f"right types); {rebuild}")
    blob = index_path.read_bytes()  # read once: what is checked is what is loaded
    if hashlib.sha256(blob).hexdigest() != meta["faiss_sha256"]:
        raise ValueError(f"{index_path}: not the index {meta_path} describes (an `index` was "
                         f"interrupted, or is running now); {rebuild}")
    try:
        index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    except RuntimeError as e:
        raise ValueError(f"{index_path}: damaged index ({str(e).splitlines()[0]}); {rebuild}") \
            from None
    if index.ntotal != meta["vectors"] or len(meta["doc_ids"]) != index.ntotal:
        raise ValueError(f"{index_path}: {index.ntotal} vectors, where {meta_path} records "
                         f"{meta['vectors']} and lists {len(meta['doc_ids'])} doc ids; {rebuild}")
    return index, meta


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def ranking_metrics(ranked: np.ndarray, relevant: list[set[int]], ks=KS) -> dict:
    """Recall@K, mAP@10 and MRR of ranked doc rows [Q, depth] against relevant row sets."""
    ranked = np.asarray(ranked)
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} ranked lists but {len(relevant)} relevance sets")
    if len(ranked) == 0:
        raise ValueError("no queries to evaluate")
    hits = np.zeros(ranked.shape, dtype=bool)
    for i, rel in enumerate(relevant):
        hits[i] = np.isin(ranked[i], list(rel))
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), -1)
    out = {f"recall@{k}": float(np.mean((first >= 0) & (first < k))) for k in ks}
    top = hits[:, :10]
    prec = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    denom = np.array([min(len(r), 10) for r in relevant], dtype=np.float64)
    out["map@10"] = float(np.mean((prec * top).sum(axis=1) / denom))
    out["mrr"] = float(np.mean(np.where(first >= 0, 1.0 / np.maximum(first + 1, 1), 0.0)))
    out["queries"] = int(len(ranked))
    return out


def validation_recall(doc_emb, query_emb, relevant: list[set[int]]) -> dict:
    """``val_recall@1`` and ``val_recall@10`` of query embeddings searched exactly among every
    doc: how a run's held-out classes are scored, whatever produced the embeddings."""
    m = ranking_metrics(exact_search(doc_emb, query_emb, 10)[1], relevant, ks=(1, 10))
    return {"val_recall@1": m["recall@1"], "val_recall@10": m["recall@10"]}


def relevance(data, query_rows: np.ndarray) -> list[set[int]]:
    """Relevant doc rows of each query row, from ``qrels``; a query without qrels is an error."""
    rel = {r["query_id"]: r["doc_ids"] for r in data.qrels}
    out = []
    for q in query_rows:
        qid = data.query_ids[int(q)]
        if qid not in rel:
            raise ValueError(f"query {qid!r} has no line in {data.root}/qrels.jsonl")
        out.append({data.doc_row[d] for d in rel[qid]})
    return out


def per_category(ranked: np.ndarray, relevant: list[set[int]], doc_category: list) -> dict:
    """Recall@10 per category of the query's relevant docs (docs without category skipped)."""
    groups: dict[str, list[int]] = {}
    for i, rel in enumerate(relevant):
        cat = doc_category[min(rel)]
        if cat is not None:
            groups.setdefault(cat, []).append(i)
    return {c: {"recall@10": ranking_metrics(ranked[idx], [relevant[i] for i in idx],
                                             ks=(10,))["recall@10"], "queries": len(idx)}
            for c, idx in sorted(groups.items())}


def evaluate_embeddings(data, doc_emb: np.ndarray, query_emb: np.ndarray,
                        query_rows: np.ndarray, index_kind: str = "flat", device="cpu",
                        **index_params) -> dict:
    """Search ``query_emb`` (rows ``query_rows`` of ``data.queries``) and score against qrels
    (the index on ``device``'s GPU where faiss can: :func:`index_on_device`)."""
    if len(doc_emb) != len(data.docs):
        raise ValueError(f"{len(doc_emb)} doc embeddings for {len(data.docs)} docs in "
                         f"{data.root}/docs.jsonl: the index was built from another dataset")
    relevant = relevance(data, query_rows)
    index = index_on_device(build_index(doc_emb, index_kind, **index_params), device)
    _, ranked = search(index, query_emb, max(KS))
    metrics = ranking_metrics(ranked, relevant)
    metrics["docs"] = int(len(doc_emb))
    metrics["index"] = index_kind
    metrics["data"] = {"path": str(Path(data.root).resolve()),
                       "fingerprint": data_fingerprint(data.root)}
    metrics["per_category"] = per_category(ranked, relevant, data.column("docs", "category"))
    metrics["recall_curve"] = [round(float(v), 6) for v in recall_curve(ranked, relevant)]
    return metrics


def judged_query_rows(data) -> np.ndarray:
    """Rows of ``data.queries`` that ``qrels`` judges (the test split), sorted."""
    rows = np.array(sorted({data.query_row[r["query_id"]] for r in data.qrels}), dtype=np.int64)
    if not len(rows):
        raise ValueError(f"{data.root}/qrels.jsonl is empty: no test queries to evaluate")
    return rows


def shard_rows(n: int, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of ``range(n)``, in rank order (the first ``n % world``
    ranks take one more)."""
    per, extra = divmod(n, world)
    lo = rank * per + min(rank, extra)
    return np.arange(lo, lo + per + (rank < extra), dtype=np.int64)


def gather_rows(part: np.ndarray, n: int, world: int, device="cpu") -> np.ndarray:
    """Every rank's ``part`` (the rows :func:`shard_rows` gave it) stacked in rank order into
    [n, d], on every rank (``torch.distributed``'s all_gather, padded to the largest share)."""
    if world == 1:
        return part
    size = len(shard_rows(n, 0, world))
    padded = torch.zeros(size, part.shape[1], device=device)
    padded[: len(part)] = torch.from_numpy(part).to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([g[: len(shard_rows(n, r, world))] for r, g in enumerate(gathered)]) \
        .cpu().numpy()


def evaluate_model(model, data, device="cpu", batch_size: int = 256, index_kind: str = "flat",
                   progress: bool = False, preload: bool = True, rank: int = 0,
                   world: int = 1, doc_emb: np.ndarray | None = None) -> dict:
    """Embed every doc and every judged query with ``model``, search, and score.

    Under ``world`` processes (torchrun), each embeds its share of the docs and of the queries
    (:func:`shard_rows`), decoding only those images, and every process gets all embeddings
    (:func:`gather_rows`) and the same metrics.  ``doc_emb``: every doc's embedding by this
    very model, where the caller has it already (a run's last validation pass), so the docs
    are neither decoded nor embedded a second time."""
    from .dataset import ImageTable, image_files

    size = model.cfg.image_size
    rows = judged_query_rows(data)
    if doc_emb is None:
        my_docs = shard_rows(len(data.docs), rank, world)
        docs = ImageTable(image_files(data, "docs", my_docs), size, preload, progress=progress,
                          desc="docs")
        doc_emb = embed_docs(model, docs, [data.doc_texts[i] for i in my_docs], batch_size,
                             device, progress)
        doc_emb = gather_rows(doc_emb, len(data.docs), world, device)
    my_queries = rows[shard_rows(len(rows), rank, world)]
    queries = ImageTable(image_files(data, "queries", my_queries), size, preload,
                         progress=progress, desc="queries")
    query_emb = embed_queries(model, queries, batch_size, device, progress)
    query_emb = gather_rows(query_emb, len(rows), world, device)
    return evaluate_embeddings(data, doc_emb, query_emb, rows, index_kind, device)


def evaluate_image_features(data, features, size: int = 64, index_kind: str = "flat") -> dict:
    """A baseline that sees images only, in the same evaluator: docs and judged photos embedded
    by ``features`` (an :class:`~mixer_lite.dataset.ImageTable` -> unit-norm rows, each side
    computed on its own), searched and scored against qrels."""
    from .dataset import ImageTable, image_files

    rows = judged_query_rows(data)
    docs = features(ImageTable(image_files(data, "docs"), size))
    queries = features(ImageTable(image_files(data, "queries", rows), size))
    return evaluate_embeddings(data, docs, queries, rows, index_kind)


def evaluate_raw_pixels(data, size: int = 64, side: int = 16, index_kind: str = "flat",
                        mean_image: bool = False) -> dict:
    """The no-learning baseline: raw pixels for queries and docs alike; with ``mean_image``,
    docs centred on the docs' mean image and queries on the queries'."""
    return evaluate_image_features(
        data, lambda images: raw_pixel_embeddings(images, side, mean_image=mean_image), size,
        index_kind)


def recall_curve(ranked: np.ndarray, relevant: list[set[int]], max_k: int = 50) -> np.ndarray:
    """Recall@K for K = 1..max_k (the curve the figures plot)."""
    ks = tuple(range(1, max_k + 1))
    m = ranking_metrics(ranked[:, :max_k], relevant, ks=ks)
    return np.array([m[f"recall@{k}"] for k in ks])

