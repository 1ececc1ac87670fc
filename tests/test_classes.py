"""Weak-label classes: hand-built graphs, partition/order/monotonicity properties, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixer_lite.classes import (ClassConfig, analyse, build_classes_from_clicks, click_graph,
                                filter_edges, gini, raw_click_classes)

LOOSE = ClassConfig(min_support=1, min_association=0.0, min_share=0.0, min_class_size=1)


def as_sets(classes):
    return sorted((tuple(c["query_ids"]), tuple(c["doc_ids"])) for c in classes)


def test_two_products_and_one_stray_click():
    # Product A: docs a1, a2 co-clicked by q1, q2, q3.  Product B: b1, b2 by q4, q5.
    # q3 also strays onto b1 once: one query is not enough support (min_support=2) to merge.
    # The stray holds 1/3 of q3's events, so the share filter (0.25) keeps it: the co-click
    # support test is what stops the merge.
    rows = [("q1", "a1", 2), ("q1", "a2", 1), ("q2", "a1", 1), ("q2", "a2", 1), ("q3", "a1", 1),
            ("q3", "a2", 1), ("q3", "b1", 1), ("q4", "b1", 1), ("q4", "b2", 2), ("q5", "b1", 1),
            ("q5", "b2", 1)]
    q, d, n = zip(*rows)
    classes, stats = build_classes_from_clicks(q, d, n)
    assert as_sets(classes) == [(("q1", "q2", "q3"), ("a1", "a2")), (("q4", "q5"), ("b1", "b2"))]
    assert [c["class_id"] for c in classes] == [0, 1]
    assert stats["dropped_click_events"]["outside_query_class"] == 1
    assert stats["kept_click_events"] + sum(stats["dropped_click_events"].values()) == \
        stats["input_click_events"] == 13


def test_loose_thresholds_merge_through_the_stray_click():
    rows = [("q1", "a1", 1), ("q1", "a2", 1), ("q2", "a2", 1), ("q2", "b1", 1),
            ("q3", "b1", 1), ("q3", "b2", 1)]
    classes, _ = build_classes_from_clicks(*zip(*rows), LOOSE)
    assert as_sets(classes) == [(("q1", "q2", "q3"), ("a1", "a2", "b1", "b2"))]


def test_association_normalised_by_the_larger_doc():
    # A head doc h (10 queries) shares 2 co-clicks with tail doc t: 2/10 < 0.3 -> not linked.
    rows = [(f"q{i}", "h", 1) for i in range(10)] + [("q0", "t", 1), ("q1", "t", 1)]
    cfg = ClassConfig(min_association=0.3, min_share=0.0)
    classes, _ = build_classes_from_clicks(*zip(*rows), cfg)
    assert sorted(tuple(c["doc_ids"]) for c in classes) == [("h",)]  # t alone has no query
    cfg = ClassConfig(min_association=0.2, min_share=0.0)
    classes, _ = build_classes_from_clicks(*zip(*rows), cfg)
    assert [tuple(c["doc_ids"]) for c in classes] == [("h", "t")]


def test_edge_filters_by_count_and_share():
    g = click_graph(["q1", "q1", "q1", "q2"], ["a", "b", "c", "a"], [6, 3, 1, 1])
    # shares of q1: 0.6, 0.3, 0.1; q2: 1.0
    assert filter_edges(g, 1, 0.0).tolist() == [True, True, True, True]
    assert filter_edges(g, 2, 0.0).tolist() == [True, True, False, False]
    assert filter_edges(g, 1, 0.25).tolist() == [True, True, False, True]


def test_duplicate_rows_are_summed():
    g = click_graph(["q1", "q1"], ["a", "a"], [2, 3])
    assert g.count.tolist() == [5]


def test_oversized_component_is_split_to_the_cap():
    # A chain of 10 docs, each linked to the next by two queries: one component of 10.
    rows = []
    for i in range(9):
        for j in range(2):
            rows += [(f"q{i}_{j}", f"d{i}", 1), (f"q{i}_{j}", f"d{i + 1}", 1)]
    cfg = ClassConfig(min_share=0.0, min_association=0.0, max_docs_per_class=4, min_class_size=1)
    classes, _ = build_classes_from_clicks(*zip(*rows), cfg)
    assert max(len(c["doc_ids"]) for c in classes) <= 4
    assert sorted(d for c in classes for d in c["doc_ids"]) == sorted(f"d{i}" for i in range(10))
    # Cut along the chain, as few pieces as the cap allows: d0-d3, d4-d7, d8-d9 (not ten
    # singletons, nor pieces of docs that no query links).
    assert sorted(tuple(sorted(c["doc_ids"], key=lambda d: int(d[1:]))) for c in classes) == \
        [("d0", "d1", "d2", "d3"), ("d4", "d5", "d6", "d7"), ("d8", "d9")]
    # Each query sits in the class of the docs it clicked (both, or the one of its pair kept).
    for c in classes:
        for q in c["query_ids"]:
            i = int(q[1:].split("_")[0])
            assert {f"d{i}", f"d{i + 1}"} & set(c["doc_ids"])


def test_oversized_component_of_unequal_links_is_cut_at_its_weakest():
    """Two groups of 3 docs, each densely co-clicked, joined by one weak link: the cap of 3
    cuts the weak link, not a group."""
    rows = []
    for g in ("a", "b"):
        for k in range(6):  # six queries click every pair within the group
            rows += [(f"{g}q{k}", f"{g}{i}", 1) for i in range(3)]
    rows += [("x1", "a2", 1), ("x1", "b0", 1), ("x2", "a2", 1), ("x2", "b0", 1)]
    cfg = ClassConfig(min_share=0.0, min_association=0.0, max_docs_per_class=3,
                      min_class_size=1)
    classes, _ = build_classes_from_clicks(*zip(*rows), cfg)
    assert sorted(tuple(c["doc_ids"]) for c in classes) == [("a0", "a1", "a2"),
                                                            ("b0", "b1", "b2")]


def test_query_cap_and_tiny_classes():
    rows = [(f"q{i}", "a", 1) for i in range(7)] + [("z", "b", 1)]
    cfg = ClassConfig(max_queries_per_class=3, min_class_size=3)
    classes, stats = build_classes_from_clicks(*zip(*rows), cfg)
    assert len(classes) == 1 and len(classes[0]["query_ids"]) == 3
    assert stats["dropped_click_events"]["query_over_class_cap"] == 4
    assert stats["dropped_click_events"]["class_too_small"] == 1


@pytest.mark.parametrize("bad,msg", [
    ((["q1"], ["a"], [0]), "count must be a positive integer"),
    ((["q1"], ["a"], [-2]), "count must be a positive integer"),
    ((["q1"], ["a"], [1.5]), "count must be a positive integer"),
])
def test_bad_counts_are_rejected(bad, msg):
    with pytest.raises(ValueError, match=msg):
        build_classes_from_clicks(*bad)


def test_unknown_ids_are_rejected():
    with pytest.raises(ValueError, match=r"row 2: unknown doc_id 'zz'"):
        build_classes_from_clicks(["q1", "q1"], ["a", "zz"], [1, 1], known_docs={"a"})
    with pytest.raises(ValueError, match="out of range"):
        ClassConfig(min_share=2.0)


# ---- properties --------------------------------------------------------------------------
click_rows = st.lists(st.tuples(st.integers(0, 15), st.integers(0, 12), st.integers(1, 4)),
                      min_size=1, max_size=60)
configs = st.builds(ClassConfig, min_count=st.integers(1, 3), min_share=st.floats(0, 0.6),
                    min_support=st.integers(1, 3), min_association=st.floats(0, 0.8),
                    max_docs_per_class=st.integers(1, 6), min_class_size=st.integers(1, 3),
                    max_queries_per_class=st.integers(1, 5))


def _rows(rows):
    return [f"q{a}" for a, _, _ in rows], [f"d{b}" for _, b, _ in rows], [c for _, _, c in rows]


@settings(max_examples=150, deadline=None)
@given(rows=click_rows, cfg=configs, seed=st.integers(0, 2 ** 16))
def test_result_is_a_partition_and_independent_of_row_order(rows, cfg, seed):
    classes, stats = build_classes_from_clicks(*_rows(rows), cfg)
    members = [x for c in classes for x in c["query_ids"] + c["doc_ids"]]
    assert len(members) == len(set(members))                # each sample in one class at most
    assert set(members) <= {f"q{a}" for a, _, _ in rows} | {f"d{b}" for _, b, _ in rows}
    assert all(len(c["doc_ids"]) <= cfg.max_docs_per_class for c in classes)
    assert all(len(c["query_ids"]) <= cfg.max_queries_per_class for c in classes)
    assert stats["kept_click_events"] + sum(stats["dropped_click_events"].values()) == \
        sum(c for _, _, c in rows)
    shuffled = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    assert build_classes_from_clicks(*_rows(shuffled), cfg)[0] == classes


@settings(max_examples=150, deadline=None)
@given(rows=click_rows, c1=st.integers(1, 4), c2=st.integers(1, 4), s1=st.floats(0, 1),
       s2=st.floats(0, 1))
def test_raising_a_threshold_never_adds_edges(rows, c1, c2, s1, s2):
    g = click_graph(*_rows(rows))
    lo = filter_edges(g, min(c1, c2), min(s1, s2))
    hi = filter_edges(g, max(c1, c2), max(s1, s2))
    assert not np.any(hi & ~lo)


# ---- analysis and cleaning ---------------------------------------------------------------
def test_analyse_hand_computed():
    truth = {"q1": "A", "q2": "A", "q3": "B", "a1": "A", "a2": "A", "b1": "B"}
    classes = [{"query_ids": ["q1", "q2", "q3"], "doc_ids": ["a1", "b1"]},
               {"query_ids": [], "doc_ids": ["a2"]}]
    r = analyse(classes, truth)
    # class 0: majority A (3 of 5); class 1: 1 of 1 -> purity 4/6.
    assert r["purity"] == pytest.approx(4 / 6)
    # pairs in class 0: 3 queries x 2 docs = 6; right: q1-a1, q2-a1, q3-b1 -> noise 3/6.
    assert r["pair_noise"] == pytest.approx(0.5)
    # true pairs: q1,q2 with a1,a2 (4) + q3 with b1 (1) = 5; together: 3.
    assert r["pair_recall"] == pytest.approx(3 / 5)


def test_raw_click_classes():
    classes = raw_click_classes(["q1", "q2", "q1"], ["a", "a", "b"], [1, 1, 1])
    assert as_sets(classes) == [(("q1",), ("b",)), (("q1", "q2"), ("a",))]


def test_gini_hand_computed():
    assert gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)  # (n-1)/n for one holder
    assert gini([1, 3]) == pytest.approx(0.25)


def test_defaults_beat_raw_clicks_on_synthshop(tiny_dir):
    from mixer_lite.synthshop import load_truth

    root = tiny_dir[0]
    rows = [json.loads(x) for x in (root / "clicks.jsonl").read_text().splitlines()]
    q, d, n = [r["query_id"] for r in rows], [r["doc_id"] for r in rows], [r["count"] for r in rows]
    truth = load_truth(root)
    ours = analyse(build_classes_from_clicks(q, d, n)[0], truth)
    raw = analyse(raw_click_classes(q, d, n), truth)
    assert ours["purity"] > raw["purity"] and ours["pair_noise"] < raw["pair_noise"]


def test_cli_build_classes(tiny_dir, tmp_path):
    out = tmp_path / "classes.jsonl"
    r = subprocess.run([sys.executable, "-m", "mixer_lite.cli", "build-classes", "--data",
                        str(tiny_dir[0]), "--out", str(out), "--analyze", "--min_share=0.3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    stats = json.loads(lines[0])
    assert stats["config"]["min_share"] == 0.3
    assert len(out.read_text().splitlines()) == stats["classes"]
    assert [json.loads(x)["step"] for x in lines[1:]][0].startswith("raw clicks")
    bad = subprocess.run([sys.executable, "-m", "mixer_lite.cli", "build-classes", "--data",
                          str(tiny_dir[0]), "--out", str(out), "--min_shar=0.3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown config key 'min_shar'" in bad.stderr
