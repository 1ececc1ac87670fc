"""Retrieval metrics against hand-computed cases and a naive loop; FAISS against torch top-k."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mixer_lite.retrieval import (build_index, exact_search, load_index, ranking_metrics,
                                  raw_pixel_embeddings,
                                  recall_curve, save_index, search)


def naive_metrics(ranked, relevant, ks=(1, 5, 10, 20, 50)):
    out = {}
    for k in ks:
        out[f"recall@{k}"] = np.mean([any(d in rel for d in row[:k])
                                      for row, rel in zip(ranked, relevant)])
    aps, rrs = [], []
    for row, rel in zip(ranked, relevant):
        hits, s = 0, 0.0
        for i, d in enumerate(row[:10]):
            if d in rel:
                hits += 1
                s += hits / (i + 1)
        aps.append(s / min(len(rel), 10))
        rr = 0.0
        for i, d in enumerate(row):
            if d in rel:
                rr = 1 / (i + 1)
                break
        rrs.append(rr)
    out["map@10"], out["mrr"] = np.mean(aps), np.mean(rrs)
    return out


def test_hand_computed_case():
    ranked = np.array([[3, 1, 2, 0, 4],    # first hit at rank 2
                       [0, 1, 2, 3, 4],    # hits at ranks 1 and 3 (two relevant docs)
                       [4, 3, 2, 1, 0]])   # no hit at all
    relevant = [{1}, {0, 2}, {9}]
    m = ranking_metrics(ranked, relevant, ks=(1, 2, 5))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["recall@5"] == pytest.approx(2 / 3)
    # AP@10: q0 = (1/2)/1; q1 = (1/1 + 2/3)/2; q2 = 0
    assert m["map@10"] == pytest.approx((0.5 + (1 + 2 / 3) / 2 + 0) / 3)
    assert m["mrr"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["queries"] == 3


def test_ties_are_broken_by_lower_doc_row_in_exact_search():
    docs = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)  # rows 0 and 1 tie
    q = np.array([[1, 0]], dtype=np.float32)
    scores, ranked = exact_search(docs, q, 3)
    assert ranked.tolist() == [[0, 1, 2]]
    assert ranking_metrics(ranked, [{1}], ks=(1, 2))["recall@1"] == 0.0
    _, flat = search(build_index(docs, "flat"), q, 3)
    assert flat.tolist() == [[0, 1, 2]]


def test_metrics_equal_naive_reference_on_random_data():
    rng = np.random.default_rng(0)
    ranked = np.stack([rng.permutation(200)[:50] for _ in range(300)])
    relevant = [set(rng.choice(200, size=rng.integers(1, 12), replace=False).tolist())
                for _ in range(300)]
    ours, ref = ranking_metrics(ranked, relevant), naive_metrics(ranked, relevant)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v), k


def test_recall_curve_equals_a_hand_computed_case():
    """Three queries whose first hits are at ranks 1, 3 and never (depth 4)."""
    ranked = np.array([[5, 1, 2, 3], [7, 8, 9, 4], [0, 1, 2, 3]])
    relevant = [{5}, {9, 11}, {6}]
    np.testing.assert_allclose(recall_curve(ranked, relevant, max_k=4),
                               [1 / 3, 1 / 3, 2 / 3, 2 / 3])


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_same_ranking(rows_a, rows_b, exact: np.ndarray, tol: float = 1e-5) -> None:
    """Two top-k lists of the same search by two libraries: equal, except that docs whose exact
    scores (float64) lie within ``tol`` may swap (BLAS kernels sum in their own order)."""
    for qa, qb, sc in zip(rows_a, rows_b, exact):
        for a, b in zip(qa, qb):
            assert a == b or abs(sc[a] - sc[b]) <= tol, (a, b, sc[a], sc[b])
        # A swap at the list's end may let one doc in and another out: they tie as well.
        left = set(qa) ^ set(qb)
        assert not left or np.ptp(sc[list(left)]) <= tol


def test_faiss_flat_equals_torch_topk():
    docs, q = _unit(2000, 32, 0), _unit(100, 32, 1)
    s1, r1 = search(build_index(docs, "flat"), q, 20)
    s2, r2 = exact_search(docs, q, 20)
    exact = q.astype(np.float64) @ docs.astype(np.float64).T
    assert_same_ranking(r1, r2, exact)
    np.testing.assert_allclose(s1, np.take_along_axis(exact, r1, 1), atol=1e-5)
    np.testing.assert_allclose(s2, np.take_along_axis(exact, r2, 1), atol=1e-5)
    # Planted: a ranking with one real (non-tied) swap is caught.
    bad = r1.copy()
    bad[0, [0, 5]] = bad[0, [5, 0]]
    with pytest.raises(AssertionError):
        assert_same_ranking(bad, r2, exact)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_saved_index_answers_identically(kind, tmp_path):
    docs, q = _unit(3000, 32, 2), _unit(50, 32, 3)
    index = build_index(docs, kind)
    before = search(index, q, 10)
    save_index(index, tmp_path / "index", {"kind": kind, "doc_ids": [str(i) for i in
                                                                  range(len(docs))]})
    loaded, meta = load_index(tmp_path / "index")
    assert meta["vectors"] == len(docs) and meta["kind"] == kind
    after = search(loaded, q, 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0])


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_exact_neighbours(kind):
    docs, q = _unit(5000, 32, 4), _unit(200, 32, 5)
    _, exact = exact_search(docs, q, 10)
    _, approx = search(build_index(docs, kind, nprobe=32), q, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
    assert overlap > 0.8


def test_bad_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="index kind"):
        build_index(_unit(10, 4, 0), "annoy")
    with pytest.raises(ValueError, match="ranked lists"):
        ranking_metrics(np.zeros((2, 3), int), [{1}])
    with pytest.raises(FileNotFoundError, match="mixer-lite index"):
        load_index(tmp_path / "none")


def test_dataset_and_embeddings_that_disagree_fail_clearly(tiny_data):
    from mixer_lite.retrieval import evaluate_embeddings, judged_query_rows, relevance

    rows = judged_query_rows(tiny_data)
    docs, q = _unit(len(tiny_data.docs) - 5, 16, 0), _unit(len(rows), 16, 1)
    with pytest.raises(ValueError, match="built from another dataset"):
        evaluate_embeddings(tiny_data, docs, q, rows)
    train_row = tiny_data.query_rows("train")[:1]
    with pytest.raises(ValueError, match="has no line in .*qrels.jsonl"):
        relevance(tiny_data, train_row)


def test_class_size_rank_plot_has_labels(tmp_path):
    from mixer_lite.viz import class_size_rank

    fig = class_size_rank({"raw": [5, 3, 1, 1], "classes": [9, 2]}, path=tmp_path / "r.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert (tmp_path / "r.png").stat().st_size > 0


def test_embed_docs_with_batch_statistics_matches_a_training_forward_and_keeps_state():
    from mixer_lite.encoders import WordTokenizer
    from mixer_lite.model import MixerModel, ModelConfig
    from mixer_lite.retrieval import embed_docs

    torch.manual_seed(0)
    texts = ["red mug", "blue tote bag", "green hat", "red shoe", "grey lamp"]
    model = MixerModel(ModelConfig(image_encoder="cnn", vit_dim=32, text_dim=32, text_depth=1,
                                   text_heads=2, embed_dim=16, n_concepts=2, dropout=0.0),
                       WordTokenizer.fit(texts))
    x = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = embed_docs(model, x, texts, batch_size=5, batch_stats=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics untouched
    model.train()
    with torch.no_grad():
        want = model.embed_docs(x, model.tokenize(texts)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(embed_docs(model, x, texts, batch_size=5), want, atol=1e-3)


def test_an_index_and_metadata_that_do_not_belong_together_are_refused(tmp_path):
    """The faiss file of one build beside the metadata of another (a rebuild killed between
    its two files, or running now) is refused, as are damaged and foreign files."""
    import json

    ids = [str(i) for i in range(300)]
    save_index(build_index(_unit(300, 8, 0)), tmp_path / "a", {"kind": "flat", "doc_ids": ids})
    save_index(build_index(_unit(290, 8, 1)), tmp_path / "b",
               {"kind": "flat", "doc_ids": ids[:290]})
    (tmp_path / "a" / "docs.faiss").write_bytes((tmp_path / "b" / "docs.faiss").read_bytes())
    with pytest.raises(ValueError, match="not the index .* describes"):
        load_index(tmp_path / "a")
    meta = tmp_path / "b" / "meta.json"
    good = json.loads(meta.read_text())
    meta.write_text(json.dumps({**good, "vectors": 300}))  # a count that the hash cannot see
    with pytest.raises(ValueError, match="290 vectors, where .* records 300"):
        load_index(tmp_path / "b")
    for bad in ("[]", "{", json.dumps({**good, "doc_ids": "d1"})):
        meta.write_text(bad)
        with pytest.raises(ValueError, match="meta.json"):
            load_index(tmp_path / "b")
    meta.write_text(json.dumps(good))
    faiss_file = tmp_path / "b" / "docs.faiss"
    cut = faiss_file.read_bytes()[:100]
    faiss_file.write_bytes(cut)
    meta.write_text(json.dumps({**good, "faiss_sha256": __import__("hashlib").sha256(cut)
                                .hexdigest()}))
    with pytest.raises(ValueError, match="damaged index"):
        load_index(tmp_path / "b")


def test_per_category_recall_equals_a_brute_force_count():
    """Each query counts under its relevant docs' category; a hit is any relevant doc in its
    top 10 (compared with a plain loop, on random rankings)."""
    from mixer_lite.retrieval import per_category

    rng = np.random.default_rng(0)
    n_docs, cats = 60, ["hat", "mug", None]
    doc_category = [cats[i % 3] for i in range(n_docs)]
    ranked = np.stack([rng.permutation(n_docs)[:20] for _ in range(40)])
    relevant = []
    for _ in range(40):
        c = int(rng.integers(0, 3))
        same = [d for d in range(n_docs) if d % 3 == c]
        relevant.append(set(rng.choice(same, size=int(rng.integers(1, 4)), replace=False)))
    got = per_category(ranked, relevant, doc_category)
    expected = {}
    for row, rel in zip(ranked, relevant):
        cat = doc_category[min(rel)]
        if cat is None:
            continue
        hits, n = expected.get(cat, (0, 0))
        expected[cat] = (hits + any(d in rel for d in row[:10]), n + 1)
    assert set(got) == set(expected) == {"hat", "mug"}
    for cat, (hits, n) in expected.items():
        assert got[cat] == {"recall@10": hits / n, "queries": n}


@pytest.mark.parametrize("mean_image", [False, True])
def test_raw_pixel_embeddings_against_numpy_block_means(mean_image):
    """16 x 16 block means of 64 px images, centred on each image's mean value or on the
    collection's mean image, unit norm; batches smaller than the collection change nothing."""
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (7, 3, 64, 64),
                                                                dtype=np.uint8))
    got = raw_pixel_embeddings(images, side=16, batch_size=3, mean_image=mean_image)
    x = images.numpy().astype(np.float64).reshape(7, 3, 16, 4, 16, 4).mean(axis=(3, 5)) / 255
    x = x.reshape(7, -1)
    x -= x.mean(axis=0, keepdims=True) if mean_image else x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(got, x, atol=1e-5)


def test_an_index_goes_to_the_gpu_only_where_faiss_has_gpu_support(monkeypatch):
    """faiss-cpu (no ``StandardGpuResources``) or a CPU device: the index itself.  A faiss with
    GPU support (patched here: the code path, not the hardware) gets the index copied to the
    device's GPU, one resources object per GPU; an index kind it cannot copy stays on the CPU."""
    import faiss

    from mixer_lite.retrieval import build_index, index_on_device

    index = build_index(np.eye(4, dtype=np.float32), "flat")
    assert not hasattr(faiss, "StandardGpuResources")  # the faiss-cpu this suite runs with
    assert index_on_device(index, "cuda:1") is index and index_on_device(index, "cpu") is index
    copied = []

    def to_gpu(resources, gpu, cpu_index):
        if isinstance(cpu_index, faiss.IndexHNSWFlat):
            raise RuntimeError("not implemented for this type of index")
        copied.append((resources, gpu, cpu_index))
        return "gpu index"

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr("mixer_lite.retrieval._GPU_RESOURCES", {})
    assert index_on_device(index, "cpu") is index and not copied
    assert index_on_device(index, "cuda:3") == "gpu index"
    assert index_on_device(index, "cuda:3") == "gpu index"
    assert [(g, i) for _, g, i in copied] == [(3, index), (3, index)]
    assert copied[0][0] is copied[1][0]  # one resources object for GPU 3
    hnsw = build_index(np.eye(4, dtype=np.float32), "hnsw")
    assert index_on_device(hnsw, "cuda") is hnsw
