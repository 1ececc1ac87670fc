"""The SynthShop generator: deterministic, and its difficulties measure as asked."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mixer_lite.synthshop import CATEGORIES, SynthConfig, make_synthshop, zipf_exponent_mle

JSONL = ("docs.jsonl", "queries.jsonl", "clicks.jsonl", "qrels.jsonl", "_truth/docs.jsonl",
         "_truth/queries.jsonl", "_truth/products.jsonl")


def _read(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / name).read_text().splitlines()]


def test_same_seed_gives_byte_identical_files_whatever_the_workers(tiny_dir, tmp_path):
    root, _ = tiny_dir
    again = tmp_path / "again"
    make_synthshop(again, preset="tiny", seed=0, workers=2, progress=False)
    for name in JSONL:
        assert (root / name).read_bytes() == (again / name).read_bytes(), name
    some = sorted((root / "images" / "queries").iterdir())[:20]
    for p in some:
        assert p.read_bytes() == (again / "images" / "queries" / p.name).read_bytes()


def test_other_seed_gives_other_data(tiny_dir, tmp_path):
    other = tmp_path / "other"
    make_synthshop(other, preset="tiny", seed=1, progress=False, n_products=50, n_queries=200)
    assert (other / "docs.jsonl").read_bytes() != (tiny_dir[0] / "docs.jsonl").read_bytes()


def test_refuses_to_overwrite(tiny_dir):
    with pytest.raises(FileExistsError):
        make_synthshop(tiny_dir[0], preset="tiny", progress=False)


def test_bad_knob_is_rejected():
    with pytest.raises(ValueError, match="noise_confusable"):
        SynthConfig(noise_confusable=-0.1)
    with pytest.raises(ValueError, match="unknown SynthConfig field"):
        make_synthshop("/nonexistent", preset="tiny", noise=0.3)


def test_measured_click_noise_matches_request(tiny_dir):
    root, stats = tiny_dir
    truth_doc = {r["doc_id"]: r["product_id"] for r in _read(root, "_truth/docs.jsonl")}
    truth_query = {r["query_id"]: r["product_id"] for r in _read(root, "_truth/queries.jsonl")}
    clicks = _read(root, "clicks.jsonl")
    events = sum(c["count"] for c in clicks)
    wrong = sum(c["count"] for c in clicks if truth_doc[c["doc_id"]] != truth_query[c["query_id"]])
    requested = 0.12 + 0.05
    # Binomial standard error at ~4,000 events is ~0.006: 0.03 is five of them.
    assert abs(wrong / events - requested) < 0.03
    assert stats["noise_share_measured"] == pytest.approx(wrong / events)


def test_zipf_mle_recovers_a_known_exponent():
    rng = np.random.default_rng(0)
    support = np.arange(1, 2001)
    for a in (0.6, 1.0, 1.4):
        p = support ** -a / np.sum(support ** -a)
        ranks = rng.choice(support, size=20000, p=p)
        assert zipf_exponent_mle(ranks, support) == pytest.approx(a, abs=0.03)


def test_queries_per_product_follow_the_requested_zipf_law(tiny_dir):
    root, _ = tiny_dir
    products = {r["product_id"]: r for r in _read(root, "_truth/products.jsonl")}
    train = [p for p in products.values() if p["split"] == "train"]
    ranks = [products[r["product_id"]]["popularity_rank"]
             for r in _read(root, "_truth/queries.jsonl")
             if products[r["product_id"]]["split"] == "train"]
    support = np.array(sorted(p["popularity_rank"] for p in train))
    assert zipf_exponent_mle(np.array(ranks), support) == pytest.approx(0.9, abs=0.1)


def test_test_products_are_never_clicked_and_test_queries_not_in_clicks(tiny_dir):
    root, _ = tiny_dir
    products = {r["product_id"]: r["split"] for r in _read(root, "_truth/products.jsonl")}
    doc_product = {r["doc_id"]: r["product_id"] for r in _read(root, "_truth/docs.jsonl")}
    split = {q["query_id"]: q["split"] for q in _read(root, "queries.jsonl")}
    clicks = _read(root, "clicks.jsonl")
    assert all(split[c["query_id"]] == "train" for c in clicks)
    assert all(products[doc_product[c["doc_id"]]] == "train" for c in clicks)
    assert sum(s == "test" for s in split.values()) > 50


def test_index_holds_every_product_and_qrels_are_its_docs(tiny_dir):
    root, _ = tiny_dir
    doc_product = {r["doc_id"]: r["product_id"] for r in _read(root, "_truth/docs.jsonl")}
    query_product = {r["query_id"]: r["product_id"] for r in _read(root, "_truth/queries.jsonl")}
    assert set(doc_product.values()) == {r["product_id"] for r in
                                         _read(root, "_truth/products.jsonl")}
    for rel in _read(root, "qrels.jsonl"):
        want = sorted(d for d, p in doc_product.items() if p == query_product[rel["query_id"]])
        assert sorted(rel["doc_ids"]) == want


def test_taxonomy_and_text_only_attributes(tiny_dir):
    root, _ = tiny_dir
    assert len(CATEGORIES) >= 10
    products = _read(root, "_truth/products.jsonl")
    assert len({p["category"] for p in products}) >= 10
    # Look-alike products (one design) that only brand or material tells apart must exist.
    designs: dict[int, list] = {}
    for p in products:
        designs.setdefault(p["design"], []).append(p)
    assert sum(len(v) > 1 for v in designs.values()) >= 20
    # Brand and material are always in the title; colour words are sometimes left out.
    docs = {d["doc_id"]: d for d in _read(root, "docs.jsonl")}
    by_id = {p["product_id"]: p for p in products}
    truth_docs = _read(root, "_truth/docs.jsonl")
    for t in truth_docs:
        prod, text = by_id[t["product_id"]], docs[t["doc_id"]]["text"]
        assert prod["brand"] in text and prod["material"] in text
    spam = sum("free shipping" in d["text"] or "hot sale" in d["text"] for d in docs.values())
    assert 0.05 < spam / len(docs) < 0.6


def test_domain_gap_is_real(tiny_data):
    """Query photos differ from their product's doc shots more than two doc shots differ."""
    root = tiny_data.root
    doc_product = {r["doc_id"]: r["product_id"] for r in _read(root, "_truth/docs.jsonl")}
    query_product = {r["query_id"]: r["product_id"] for r in _read(root, "_truth/queries.jsonl")}
    docs_of: dict[str, list[int]] = {}
    for i, d in enumerate(tiny_data.doc_ids):
        docs_of.setdefault(doc_product[d], []).append(i)
    q_gap, d_gap = [], []
    for i in range(0, len(tiny_data.queries), 40):
        prod = query_product[tiny_data.query_ids[i]]
        q = np.asarray(tiny_data.queries[i]["image"], dtype=np.float32)
        d0, d1 = docs_of[prod][:2]
        a = np.asarray(tiny_data.docs[d0]["image"], dtype=np.float32)
        b = np.asarray(tiny_data.docs[d1]["image"], dtype=np.float32)
        q_gap.append(np.abs(q - a).mean())
        d_gap.append(np.abs(b - a).mean())
    assert np.mean(q_gap) > 3 * np.mean(d_gap)


def test_doc_object_masks_cover_the_object_and_not_the_studio_background(tiny_dir, tiny_data):
    """Independent check against the pixels: where the rebuilt mask is 0 the doc image is the
    plain light studio background; where it is 1 most pixels are something else."""
    from mixer_lite.dataset import ImageTable, image_files
    from mixer_lite.synthshop import doc_object_masks

    masks = doc_object_masks(tiny_dir[0], tiny_data.doc_ids[:40], 64)
    img = ImageTable(image_files(tiny_data, "docs", range(40)), 64)[np.arange(40)]
    pixels = img.numpy().transpose(0, 2, 3, 1).astype(float)
    background, obj = pixels[masks == 0], pixels[masks > 0.99]
    assert 0.05 < masks.mean() < 0.6
    assert background.min() > 200 and background.std() < 12
    assert (np.abs(obj - 243).max(axis=1) > 30).mean() > 0.6


def test_scene_docs_show_the_product_among_other_categories_and_the_title_names_it(scene_dir):
    docs = {r["doc_id"]: r for r in _read(scene_dir, "docs.jsonl")}
    products = {r["product_id"]: r for r in _read(scene_dir, "_truth/products.jsonl")}
    truth = _read(scene_dir, "_truth/docs.jsonl")
    scenes = [t for t in truth if len(t["objects"]) > 1]
    # 40% asked; the binomial standard error at ~360 docs is ~0.026: 0.1 is four of them.
    assert abs(len(scenes) / len(truth) - 0.4) < 0.1
    assert {len(t["objects"]) for t in scenes} == {2, 3, 4}  # 1-3 others, each seen
    for t in truth:
        objects = t["objects"]
        categories = [o["category"] for o in objects]
        assert objects[0]["product_id"] == t["product_id"]
        assert len(set(categories)) == len(categories)  # one object of each category shown
        assert categories[0] == docs[t["doc_id"]]["category"]
        assert all(products[o["product_id"]]["category"] == o["category"] for o in objects)
        assert any(name in docs[t["doc_id"]]["text"] for name in CATEGORIES[categories[0]][0])


def test_scene_masks_lie_in_their_boxes_and_match_the_pixels(scene_dir):
    """Independent check against the pixels: each object's label lies inside its recorded box
    and is seen; away from every object the doc image is the plain light studio; where one
    object covers a pixel fully, most such pixels are not studio white."""
    from PIL import Image

    scenes = [t for t in _read(scene_dir, "_truth/docs.jsonl") if len(t["objects"]) > 1][:30]
    ink = []
    for t in scenes:
        labels = np.asarray(Image.open(scene_dir / "_truth" / "masks" / f"{t['doc_id']}.png"))
        assert labels.shape == (128, 128) and labels.max() <= len(t["objects"])
        for i, o in enumerate(t["objects"]):
            ys, xs = np.nonzero(labels == i + 1)
            x, y, side = o["box"]
            assert len(xs) > 0
            assert x <= xs.min() and xs.max() < x + side and y <= ys.min() and ys.max() < y + side
        image = np.asarray(Image.open(scene_dir / "images" / "docs" / f"{t['doc_id']}.png")
                           .convert("RGB"), dtype=float)                  # 64 px
        background = (labels == 0).reshape(64, 2, 64, 2).all((1, 3))
        assert image[background].min() > 200 and image[background].std() < 12
        for i in range(len(t["objects"])):
            full = (labels == i + 1).reshape(64, 2, 64, 2).all((1, 3))
            ink.extend(np.abs(image[full] - 243).max(axis=1) > 30)
    assert np.mean(ink) > 0.6


def test_scene_docs_are_byte_identical_whatever_the_workers(scene_dir, tmp_path):
    again = tmp_path / "again"
    make_synthshop(again, preset="tiny", seed=0, workers=2, progress=False, n_products=120,
                   n_queries=600, scene_share=0.4)
    for name in JSONL:
        assert (scene_dir / name).read_bytes() == (again / name).read_bytes(), name
    for sub in ("images/docs", "_truth/masks"):
        files = sorted((scene_dir / sub).iterdir())
        assert [p.name for p in files] == sorted(p.name for p in (again / sub).iterdir())
        assert all(p.read_bytes() == (again / sub / p.name).read_bytes() for p in files)


def test_scene_share_is_checked():
    with pytest.raises(ValueError, match="scene_share"):
        SynthConfig(scene_share=1.5)
    with pytest.raises(ValueError, match="scene_objects"):
        SynthConfig(scene_objects=(1, len(CATEGORIES)))
