"""The notebooks' measurements against independent references (naive loops, numpy, truth)."""
import dataclasses
import json

import matplotlib
import numpy as np
import pytest
import torch

from mixer_lite import ablations, measures, runcache
from mixer_lite.model import window_grid
from mixer_lite.reproduce import markdown
from mixer_lite.viz import (bars, concept_map_change, domain_projections, missed_queries,
                            recall_curves, search_grid, training_curves, weak_label_class)


def test_domain_probe_separable_vs_identical():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (200, 8))
    separable = np.concatenate([a[:100] + 4, a[100:]])
    assert measures.domain_probe_accuracy(separable, 100) > 0.97
    same = rng.normal(0, 1, (400, 8))
    assert abs(measures.domain_probe_accuracy(same, 200) - 0.5) < 0.1


def test_mmd_matches_naive_double_loop():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (7, 3)), rng.normal(0.5, 1, (5, 3))
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    d2 = np.array([[np.sum((x - y) ** 2) for y in z] for x in z])
    bw = np.median(d2[d2 > 0])
    k = np.exp(-d2 / bw)
    naive = k[:7, :7].mean() + k[7:, 7:].mean() - 2 * k[:7, 7:].mean()
    assert measures.mmd_rbf(a, b) == pytest.approx(naive, rel=1e-9)
    assert measures.mmd_rbf(a, a) == pytest.approx(0.0, abs=1e-12)


def test_pca_matches_covariance_eigenvalues():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (300, 5)) * np.array([5, 3, 1, 0.5, 0.1])
    xy = measures.pca_2d(x)
    top = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1][:2]
    np.testing.assert_allclose(xy.var(axis=0, ddof=1), top, rtol=1e-8)


def test_pair_cosines_naive():
    rng = np.random.default_rng(3)
    e = rng.normal(0, 1, (6, 4))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    pairs = np.array([[0, 1], [2, 5], [3, 3]])
    naive = [sum(e[i, k] * e[j, k] for k in range(4)) for i, j in pairs]
    np.testing.assert_allclose(measures.pair_cosines(e, pairs), naive)


def test_variant_pairs_agree_with_truth(tiny_dir, tiny_data):
    tiny_dir = tiny_dir[0]
    pairs = measures.variant_pairs(tiny_data, tiny_dir)
    product = {json.loads(line)["doc_id"]: json.loads(line)["product_id"]
               for line in open(tiny_dir / "_truth" / "docs.jsonl")}
    design = {}
    for line in open(tiny_dir / "_truth" / "products.jsonl"):
        r = json.loads(line)
        design[r["product_id"]] = (r["category"], r["design"])
    ids = tiny_data.doc_ids
    assert len(pairs["same_product"]) and len(pairs["variant"])
    for a, b in pairs["same_product"]:
        assert product[ids[a]] == product[ids[b]]
    for a, b in pairs["variant"]:
        pa, pb = product[ids[a]], product[ids[b]]
        assert pa != pb and design[pa] == design[pb]


def test_ensure_run_refuses_a_run_made_with_another_config(tmp_path, tiny_dir):
    from mixer_lite.train import config_from

    run = tmp_path / "r"
    run.mkdir()
    stamp = dataclasses.asdict(config_from("tiny-cpu", ["--seed=1"]))
    (run / "config.json").write_text(json.dumps({"train": stamp}))
    with pytest.raises(FileExistsError, match="differs in seed\\)"):
        runcache.ensure_run(tiny_dir[0], "r", ["--seed=2"], runs=tmp_path)
    stamp["lr"] = 1.0  # the same overrides over other defaults (an older version) are refused too
    stamp["seed"] = 2
    (run / "config.json").write_text(json.dumps({"train": stamp}))
    with pytest.raises(FileExistsError, match="differs in lr\\)"):
        runcache.ensure_run(tiny_dir[0], "r", ["--seed=2"], runs=tmp_path)
    # a key an older config.json lacks counts as its default: the cached run is reused
    stamp["lr"] = config_from("tiny-cpu", []).lr
    del stamp["steps"], stamp["model"]["fusion"]
    (run / "config.json").write_text(json.dumps({"train": stamp, "steps": 46}))
    (run / "eval.json").write_text(json.dumps({"recall@10": 0.25}))
    (run / "seconds.json").write_text("12.5")
    assert runcache.ensure_run(tiny_dir[0], "r", ["--seed=2"], runs=tmp_path)["recall@10"] == 0.25
    (run / "config.json").write_text("{")  # damaged: an error naming the file, not a crash
    with pytest.raises(ValueError, match="r/config.json: cannot read the run's config"):
        runcache.ensure_run(tiny_dir[0], "r", ["--seed=2"], runs=tmp_path)


def test_fast_mode_trains_every_run_short_into_a_folder_of_its_own(tmp_path, tiny_dir,
                                                                     monkeypatch):
    """In the notebooks' fast mode a run trains ``FAST_STEPS`` steps whatever its overrides say
    (a pairwise row's own ``--steps`` included) into ``<name>-fast``, beside the full-length
    run of the same name; ``make reproduce`` refuses to record such runs."""
    from mixer_lite import reproduce

    trained = []

    def fake_train(data_dir, out, cfg, **kwargs):
        trained.append((out.name, cfg.steps, cfg.seed))
        out.mkdir(exist_ok=True)  # ensure_run's lock made it
        (out / "config.json").write_text(json.dumps({"train": dataclasses.asdict(cfg),
                                                     "steps": cfg.steps}))
        (out / "eval.json").write_text(json.dumps({"recall@10": 0.5}))

    monkeypatch.setattr(runcache, "train", fake_train)
    monkeypatch.setenv(runcache.FAST_ENV, "1")
    got = runcache.ensure_run(tiny_dir[0], "r", ["--seed=2", "--steps=90"], runs=tmp_path)
    assert trained == [("r-fast", runcache.FAST_STEPS, 2)]
    assert got["run"] == str(tmp_path / "r-fast") and got["steps"] == runcache.FAST_STEPS
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit, match="MIXER_LITE_FAST=1 is the notebooks' fast mode"):
        reproduce.reproduce("tiny", seeds=(0,), records=tmp_path / "records")
    monkeypatch.setenv(runcache.FAST_ENV, "0")
    runcache.ensure_run(tiny_dir[0], "r", ["--seed=2", "--steps=90"], runs=tmp_path)
    assert trained[1] == ("r", 90, 2)


def test_ensure_validation_run_reads_the_run_the_scene_bench_names(tmp_path):
    """The run of variant ``mixer`` on ``data/synth-tiny-scenes30`` with seed 3 is
    ``tiny-scenes30-mixer-s3`` (``validation_run_name`` says so without the folder), trained
    with the validation split and the test queries unread; a cached one is read back with its
    validation recall, not trained again."""
    from mixer_lite.train import config_from

    overrides = ["--val_share=0.1", "--eval_at_end=false", "--seed=3", "--model.fusion=concat"]
    run = tmp_path / "tiny-scenes30-mixer-s3"
    run.mkdir()
    stamp = dataclasses.asdict(config_from("tiny-cpu", overrides))
    (run / "config.json").write_text(json.dumps({"train": stamp, "steps": 7}))
    (run / "model.pt").write_bytes(b"")
    (run / "val.json").write_text(json.dumps({"val_recall@10": 0.5}))
    (run / "seconds.json").write_text("3.0")
    got = runcache.ensure_validation_run(tmp_path / "synth-tiny-scenes30", "mixer", 3,
                                         ["--model.fusion=concat"], runs=tmp_path)
    assert got == {"validation": {"val_recall@10": 0.5}, "run": str(run), "seconds": 3.0,
                   "steps": 7, "overrides": overrides}
    # a notebook names the same run from its parameters, before any folder exists
    assert runcache.validation_run_name(runcache.data_folder_name("tiny", 0.3), "mixer", 3) \
        == run.name
    assert runcache.data_folder_name("tiny") == "synth-tiny"
    assert runcache.data_folder_name("icons") == "icons"


def test_rows_encode_as_many_images_as_the_mixer_row(tiny_dir, tiny_data):
    from mixer_lite.classes import build_classes_from_clicks
    from mixer_lite.sampling import held_out
    from mixer_lite.train import config_from

    # Independent count: the Mixer row's samples are every member of a class not held out for
    # validation, at most max_per_class of a class an epoch; an epoch is floor(samples / batch)
    # steps and it trains 3.5 epochs.  A pairwise row trains on the clicks that touch no
    # held-out class.
    c = config_from("tiny-cpu", [])
    cq, cd, cn = tiny_data.clicks_columns()
    classes, _ = build_classes_from_clicks(cq, cd, cn, c.classes)
    held = held_out(classes, c.val_share)
    assert 0 < held.sum() < len(classes)
    held_q = {q for k, h in zip(classes, held) if h for q in k["query_ids"]}
    held_d = {d for k, h in zip(classes, held) if h for d in k["doc_ids"]}
    members = [len(k["query_ids"]) + len(k["doc_ids"]) for k, h in zip(classes, held) if not h]
    mixer_images = round(c.epochs * (sum(min(m, c.max_per_class) for m in members)
                                     // c.batch_size)) * c.batch_size
    pairs = sum(q not in held_q and d not in held_d for q, d in zip(cq, cd))
    pairs_per_epoch = pairs // c.batch_size * 2 * c.batch_size  # two images a click pair
    assert round(c.epochs * pairs_per_epoch) > 2 * mixer_images  # equal epochs: not equal images
    for row in ablations.ROWS:
        overrides = ablations.row_overrides(tiny_dir[0], row, seed=3)
        rc = config_from("tiny-cpu", overrides)
        assert overrides[:1 + len(ablations.ROWS[row].overrides)] == \
            ["--seed=3", *ablations.ROWS[row].overrides]
        if rc.loss in ("infonce", "triplet"):
            assert rc.steps == mixer_images // (2 * rc.batch_size)
        elif rc.labels == "raw_clicks":
            assert rc.steps * rc.batch_size == mixer_images
        else:  # same samples as the Mixer row, or its own epochs: no --steps added
            assert len(overrides) == 1 + len(ablations.ROWS[row].overrides)
            assert rc.steps == 0 and (rc.epochs == c.epochs or row == "scratch")


def test_rows_are_valid_configs_with_distinct_run_names():
    from mixer_lite.train import config_from

    names = {ablations.run_name("small", row, 0) for row in ablations.ROWS}
    assert len(names) == len(ablations.ROWS)
    labels = {row.label for row in ablations.ROWS.values()}
    assert len(labels) == len(ablations.ROWS)
    for slug, row in ablations.ROWS.items():
        assert row.slug == slug
        config_from("tiny-cpu", list(row.overrides))  # raises on a bad key or value


def test_markdown_table_mean_and_std():
    result = {"rows": {"a": {"recall@1": [0.1, 0.3], "recall@10": [0.5, 0.5],
                             "map@10": [0.2, 0.2]},
                       "b": {"recall@1": [0.25], "recall@10": [0.5], "map@10": [0.125]}}}
    lines = markdown(result).splitlines()
    assert lines[0] == "| row | Recall@1 | Recall@10 | mAP@10 |"
    assert lines[2] == "| a | 20.0 ± 10.0 | 50.0 ± 0.0 | 20.0 ± 0.0 |"
    assert lines[3] == "| b | 25.0 | 50.0 | 12.5 |"


def test_new_figures_have_titles_and_labels():
    rng = np.random.default_rng(0)
    figs = [domain_projections({"a": rng.normal(size=(20, 2))}, 10),
            training_curves({"run": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]}),
            bars({"x": 1.0, "y": 2.0}, xlabel="Recall@10 (%)", title="t"),
            search_grid(rng.integers(0, 255, (2, 3, 8, 8), dtype=np.uint8),
                        torch.zeros(5, 3, 8, 8, dtype=torch.uint8), np.array([[0, 1], [2, 3]]),
                        [{1}, set()])]
    for fig in figs:
        assert fig._suptitle is not None or fig.axes[0].get_title()
        if fig.axes[0].get_xticks().size:  # image grids carry no ticks by design
            assert fig.axes[0].get_xlabel()
        matplotlib.pyplot.close(fig)


def test_figures_draw_the_data_they_are_given():
    from mixer_lite.viz import training_health

    rows = [{"step": s, "loss": 3.0 - s, "centre_norm": 1.0, "cos_own": 0.1 * s,
             "cos_other": -0.01, "cos_batch": -0.0073 - 1e-5 * s} for s in (1, 2, 3)]
    rows.append({"step": 3, "val_recall@10": 0.4})
    curves = training_curves({"run": [{"step": 0, "val_recall@10": 0.1}] + rows[:3]})
    line = curves.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [2.0, 1.0, 0.0]
    health = training_health({"run": rows})
    val, norm, cos, batch = health.axes
    assert [tuple(x.get_ydata()) for x in val.get_lines()] == [(0.4,)]
    assert [tuple(x.get_ydata()) for x in cos.get_lines()] == [(0.1, 0.2, 0.30000000000000004),
                                                               (-0.01,) * 3]
    assert cos.get_lines()[1].get_linestyle() == "--"  # to other centres, dashed
    # A cosine of about -0.0073 give or take 3e-5 is drawn on the cosine's scale, not zoomed.
    assert val.get_ylim() == (0, 1) and batch.get_ylim() == (-0.1, 1)
    assert norm.get_ylim()[0] == 0
    matplotlib.pyplot.close("all")


def test_recall_curves_zoom_to_the_data_but_never_past_100():
    from mixer_lite.viz import recall_curves

    low = recall_curves({"a": [0.01, 0.02, 0.04]})
    assert low.axes[0].get_ylim() == (0, 6.4)  # 1.6 x the highest recall, in %
    assert recall_curves({"a": [0.001]}).axes[0].get_ylim() == (0, 5)
    assert recall_curves({"a": [0.5, 0.9]}).axes[0].get_ylim() == (0, 100)
    matplotlib.pyplot.close("all")


def test_untrained_floor_is_deterministic_per_seed(tiny_data):
    small = ["--model.vit_dim=32", "--model.embed_dim=32", "--model.text_dim=32",
             "--model.text_depth=1", "--model.n_concepts=4", "--model.image_weights=none"]
    a = measures.evaluate_untrained(tiny_data, 0, small)
    assert a == measures.evaluate_untrained(tiny_data, 0, small)  # same seed, same initial weights
    assert a != measures.evaluate_untrained(tiny_data, 1, small)
    assert a["queries"] == 144 and 0 <= a["recall@10"] <= a["recall@50"] <= 1


class _StubModel:
    """A model whose attention is given: concepts put all their mass on chosen patches."""

    def __init__(self, attention):
        self.attention = attention
        self.cfg = type("Cfg", (), {"image_size": 64, "fusion": "concept"})()

    def eval(self):
        return self

    def tokenize(self, texts):
        return {}

    def embed_docs(self, images, tokens, return_attention=False):
        assert len(images) == len(self.attention)  # given for exactly the docs measured
        return torch.zeros(len(images), 4), {"text_to_image": self.attention, "grid": 8}


def test_attention_on_objects_against_hand_computed_cases(tiny_dir, tiny_data):
    from mixer_lite.measures import attention_on_objects
    from mixer_lite.synthshop import doc_object_masks

    n = len(tiny_data.docs)
    uniform = torch.full((20, 3, 64), 1 / 64)
    r = attention_on_objects(_StubModel(uniform), tiny_data, tiny_dir[0], n_docs=20)
    assert r["object_lift"] == pytest.approx(1.0, abs=1e-5)  # blind: mass = object share
    # All concepts on the one patch with the most object: lift = coverage / share, and the
    # maps are identical (correlation 1).
    rows = np.sort(np.random.default_rng(0).choice(n, 20, replace=False))
    masks = doc_object_masks(tiny_dir[0], [tiny_data.doc_ids[int(i)] for i in rows], 64)
    cover = masks.reshape(20, 8, 8, 8, 8).mean((2, 4)).reshape(20, 64)
    peaked = torch.zeros(20, 3, 64)  # the docs in the order attention_on_objects draws them
    for i in range(20):
        peaked[i, :, cover[i].argmax()] = 1.0
    r = attention_on_objects(_StubModel(peaked), tiny_data, tiny_dir[0], n_docs=20)
    expected = np.mean(cover.max(axis=1) / cover.mean(axis=1))
    assert r["object_lift"] == pytest.approx(expected, rel=1e-5)
    assert r["concept_correlation"] == pytest.approx(1.0, abs=1e-5)


def test_claim_prints_rounded_values_and_raises_when_false(capsys):
    assert measures.claim("a beats b", True, a=0.12345, b=0.1) == "a beats b (a 0.12, b 0.10)"
    assert capsys.readouterr().out == "holds: a beats b (a 0.12, b 0.10)\n"
    with pytest.raises(AssertionError, match=r"claim does not hold: b beats a \(a 0.12\)"):
        measures.claim("b beats a", False, a=0.12345)


def test_backbone_probe_recall_matches_brute_force_over_qrels(mini_dir, monkeypatch):
    """The probe's photo-to-doc Recall@10 on the test photos, against a numpy ranking of the
    same features scored with qrels.jsonl read straight from the file; the validation split
    scores photos of training products the fit photos never show."""
    from mixer_lite.dataset import image_files, load_dataset
    from mixer_lite.synthshop import load_truth

    data_dir = mini_dir[0]
    data = load_dataset(data_dir)
    encoder = measures.image_encoder_from("none", seed=3, vit_dim=32)
    seen = {}
    real_features = measures.pooled_features

    def remember(enc, images, batch_size=256):
        out = real_features(enc, images, batch_size)
        seen[len(seen)] = (images.files, out)
        return out

    monkeypatch.setattr(measures, "pooled_features", remember)
    got = measures.backbone_probe(encoder, data_dir, n_train=200, seed=0)
    (fit_paths, _), (test_paths, q), (doc_paths, d) = seen[0], seen[1], seen[2]
    assert doc_paths == image_files(data, "docs")
    assert not set(fit_paths) & set(test_paths)  # the probe's fitting photos are never scored
    qrels = {}
    with open(data_dir / "qrels.jsonl") as f:
        for line in f:
            r = json.loads(line)
            qrels[r["query_id"]] = set(r["doc_ids"])
    by_path = {p: qid for qid, p in zip(data.query_ids, image_files(data, "queries"))}
    assert {by_path[p] for p in test_paths} == set(qrels)  # every test photo, and only them
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    hits = [len(qrels[by_path[p]] & {data.doc_ids[j] for j in np.argsort(-(d @ qi),
                                                                       kind="stable")[:10]}) > 0
            for p, qi in zip(test_paths, q)]
    assert got["photo_to_doc_recall@10"] == pytest.approx(np.mean(hits))
    assert got["eval_photos"] == len(qrels) and got["fit_photos"] == 200
    for key in ("category", "colour"):
        assert 0 <= got[key] <= 1
    assert 0.5 <= got["domain_probe"] <= 1

    seen.clear()
    measures.backbone_probe(encoder, data_dir, n_train=200, seed=0, split="validation")
    truth = load_truth(data_dir)
    fit_products = {truth[by_path[p]] for p in seen[0][0]}
    val_products = {truth[by_path[p]] for p in seen[1][0]}
    test_products = {truth[q] for q in qrels}
    assert val_products and not val_products & fit_products and not val_products & test_products
    with pytest.raises(ValueError, match="split"):
        measures.backbone_probe(encoder, data_dir, split="test-ish")


def test_ensure_run_waits_for_a_run_another_process_is_training(tmp_path, mini_dir):
    """Two notebooks asking for one run at once: the second waits for the first's lock, then
    reads the finished run instead of failing or training it again.  Here the test holds the
    lock as the first ``ensure_run`` would, and finishes the run (its time written last, after
    its evaluation) once a subprocess says it waits."""
    import subprocess
    import sys

    from mixer_lite.files import folder_lock
    from mixer_lite.runcache import ENSURE_LOCK
    from mixer_lite.train import config_from

    run = tmp_path / "r"
    code = ("import json, sys; from mixer_lite.runcache import ensure_run; "
            f"print(json.dumps(ensure_run({str(mini_dir[0])!r}, 'r', ['--seed=2'], "
            f"runs={str(tmp_path)!r})))")
    with folder_lock(run, "ensure_run", lock_file=ENSURE_LOCK):
        waiting = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        seen = []
        while not any("waiting for it to end" in line for line in seen):  # blocked on the lock
            seen.append(waiting.stderr.readline())
            assert seen[-1], "".join(seen)[-2000:]  # it ended instead of waiting
        stamp = dataclasses.asdict(config_from("tiny-cpu", ["--seed=2"]))
        (run / "config.json").write_text(json.dumps({"train": stamp, "steps": 7}))
        (run / "eval.json").write_text(json.dumps({"recall@10": 0.25}))
        (run / "seconds.json").write_text("12.5")
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err[-2000:]
    got = json.loads(out.strip().splitlines()[-1])
    assert got["recall@10"] == 0.25 and got["steps"] == 7 and got["seconds"] == 12.5
    assert not (run / "checkpoints").exists()  # it never trained


def test_ensure_data_waits_for_a_folder_another_process_is_writing(tmp_path, monkeypatch):
    """Two notebooks asking for one dataset at once: the second finds the first's partial
    folder locked, waits, and returns the folder the first wrote, without writing it again."""
    import threading

    from mixer_lite.files import folder_lock

    out, partial = tmp_path / "synth-tiny", tmp_path / ".synth-tiny.partial"
    sleeps = []
    # The first writer finishes only once the second has found the lock and gone to sleep.
    monkeypatch.setattr(runcache.time, "sleep",
                        lambda s: sleeps.append(s) or finish.set() or writer.join(5))
    finish, holding = threading.Event(), threading.Event()

    def first_writer():
        with folder_lock(partial, "make-data"):
            holding.set()
            finish.wait(5)
            (partial / "docs.jsonl").write_text("written by the first\n")
            (partial / ".lock").unlink()
            partial.rename(out)

    writer = threading.Thread(target=first_writer)
    writer.start()
    holding.wait(5)
    got = runcache.ensure_data("tiny", root=tmp_path)
    writer.join()
    assert got == out and (out / "docs.jsonl").read_text() == "written by the first\n"
    assert sleeps  # it waited instead of failing


def test_ensure_data_reads_a_folder_renamed_into_place_between_its_look_and_its_build(
        tmp_path, monkeypatch):
    """Another process finishes the dataset after ``ensure_data`` saw none and before its own
    build starts: the build refuses the now-whole folder and ``ensure_data`` returns it."""
    out = tmp_path / "synth-tiny"
    real_make = runcache.make_synthshop

    def other_process_finishes_first(folder, **kw):
        out.mkdir()
        (out / "docs.jsonl").write_text("written by the other\n")
        return real_make(folder, **kw)

    monkeypatch.setattr(runcache, "make_synthshop", other_process_finishes_first)
    assert runcache.ensure_data("tiny", root=tmp_path) == out
    assert (out / "docs.jsonl").read_text() == "written by the other\n"


def test_ensure_data_refuses_a_foreign_folder_in_its_place(tmp_path):
    """A folder of something else under the dataset's name is never overwritten."""
    (tmp_path / "synth-tiny").mkdir()
    (tmp_path / "synth-tiny" / "notes.txt").write_text("mine\n")
    with pytest.raises(FileExistsError, match="synth-tiny"):
        runcache.ensure_data("tiny", root=tmp_path)


def test_frozen_backbone_floor_matches_brute_force_over_qrels(mini_dir, mini_data):
    """The frozen backbone's Recall@10 and mAP@10, against the shipped encoder's pooled features
    computed here, ranked with numpy and scored with qrels.jsonl read straight from the file."""
    from mixer_lite.dataset import load_images
    from mixer_lite.encoders import normalise_pixels

    got = measures.evaluate_frozen_backbone(mini_data)
    encoder = measures.image_encoder_from("openclipart-cnn").eval()
    with open(mini_dir[0] / "qrels.jsonl") as f:
        qrels = {r["query_id"]: set(r["doc_ids"]) for r in map(json.loads, f)}
    rows = [mini_data.query_row[q] for q in sorted(qrels, key=mini_data.query_row.get)]
    with torch.no_grad():
        doc_rows = np.arange(len(mini_data.docs))
        d = encoder(normalise_pixels(load_images(mini_data, "docs", doc_rows, 64)))[1].numpy()
        q = encoder(normalise_pixels(load_images(mini_data, "queries", rows, 64)))[1].numpy()
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    hits, aps = [], []
    for row, qi in zip(rows, q):
        top = [mini_data.doc_ids[j] for j in np.argsort(-(d @ qi), kind="stable")[:10]]
        rel = qrels[mini_data.query_ids[row]]
        hits.append(any(t in rel for t in top))
        found = [k for k, t in enumerate(top, 1) if t in rel]
        aps.append(sum((i + 1) / k for i, k in enumerate(found)) / min(len(rel), 10))
    assert got["queries"] == len(qrels)
    assert got["recall@10"] == pytest.approx(np.mean(hits), abs=1.5 / len(qrels))
    assert got["map@10"] == pytest.approx(np.mean(aps), abs=0.01)


def test_frozen_validation_floor_matches_brute_force_over_the_held_out_classes(mini_data):
    """Validation Recall@1/10 of the frozen encoder: the held-out classes' photos ranked here
    with numpy over the shipped encoder's pooled features, a hit a doc of the photo's class."""
    from mixer_lite.dataset import load_images
    from mixer_lite.encoders import normalise_pixels
    from mixer_lite.sampling import make_samples
    from mixer_lite.train import config_from

    cfg = config_from("tiny-cpu", [])
    got = measures.evaluate_frozen_validation(mini_data, cfg)
    val = make_samples(mini_data, cfg)[0].validation
    encoder = measures.image_encoder_from("openclipart-cnn").eval()
    with torch.no_grad():
        d = encoder(normalise_pixels(load_images(mini_data, "docs",
                                                 np.arange(len(mini_data.docs)), 64)))[1].numpy()
        q = encoder(normalise_pixels(load_images(mini_data, "queries", val.query_rows,
                                                 64)))[1].numpy()
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ranks = [next((k for k, j in enumerate(np.argsort(-(d @ qi), kind="stable"), 1)
                   if j in rel), 10 ** 9) for qi, rel in zip(q, val.relevant)]
    assert len(ranks) > 10
    for k in (1, 10):
        want = np.mean([r <= k for r in ranks])
        assert got[f"val_recall@{k}"] == pytest.approx(want, abs=1.5 / len(ranks))
    with pytest.raises(ValueError, match="val_share=0"):
        measures.evaluate_frozen_validation(mini_data, config_from("tiny-cpu", ["--val_share=0"]))


def test_fusion_halves_are_the_same_weights_as_image_only_docs_and_as_docs_without_the_gate(
        mini_data):
    """``fusion_halves``: the docs as their image vector alone rank the validation photos as the
    same weights do built as image-only docs, and as their fused concepts alone as the same
    weights built without the gate (each loaded from the gated model's state, nothing it needs
    missing); with each gate dimension at its mean over the docs, as the same weights with a
    gate layer that ignores its input and says that mean; as trained, as the model itself.  The
    gates are what the gate layer itself outputs (a hook on it), and their spread is computed
    from them.  The gate is put back after, and a model without one is refused."""
    from mixer_lite.dataset import ImageTable, image_files
    from mixer_lite.retrieval import embed_docs, embed_queries, validation_recall
    from mixer_lite.sampling import make_samples
    from mixer_lite.train import build_model, config_from

    base = ["--model.image_weights=none"]
    cfg = config_from("tiny-cpu", base)
    samples = make_samples(mini_data, cfg)[0]
    val = samples.validation
    torch.manual_seed(0)
    model = build_model(mini_data, samples, cfg).eval()
    with torch.no_grad():  # a gate that differs by doc and dimension, as a trained one may
        model.fusion.gate.weight.normal_(0, 0.5)
    gate = model.fusion.gate
    got = measures.fusion_halves(model, mini_data, val)
    assert model.fusion.gate is gate
    seen = []
    hook = gate.register_forward_hook(lambda m, i, o: seen.append(torch.sigmoid(o)))
    gates = measures.doc_gates(model, mini_data)
    hook.remove()
    hooked = torch.cat(seen).numpy()
    assert gates.shape == (len(mini_data.docs), model.cfg.embed_dim)
    np.testing.assert_allclose(gates, hooked, rtol=0, atol=1e-6)
    weights = measures.doc_image_weights(model, mini_data)
    np.testing.assert_allclose(weights, hooked.mean(axis=1), rtol=0, atol=1e-6)
    assert got["image_weight"]["std"] == pytest.approx(float(hooked.mean(axis=1).std()), abs=1e-6)
    assert 0 < got["image_weight"]["min"] < got["image_weight"]["max"] < 1
    assert got["gate_spread"]["across_docs"] == pytest.approx(
        float(np.mean([hooked[:, j].std() for j in range(hooked.shape[1])])), abs=1e-6)
    assert got["gate_spread"]["doc_share"] == pytest.approx(
        float(np.mean(hooked.var(axis=0)) / hooked.var()), abs=1e-5)
    assert 0 < got["gate_spread"]["doc_share"] < 1
    docs = ImageTable(image_files(mini_data, "docs"), 64)
    photos = ImageTable(image_files(mini_data, "queries", val.query_rows), 64)

    def recall(m):
        return validation_recall(embed_docs(m, docs, mini_data.doc_texts),
                                 embed_queries(m, photos), val.relevant)

    assert got["trained"] == recall(model)
    for half, override in (("image", "--model.fusion=image_only"),
                           ("concepts", "--model.fusion_gate=false")):
        same = build_model(mini_data, samples, config_from("tiny-cpu", [*base, override]))
        missing, _ = same.load_state_dict(model.state_dict(), strict=False)
        assert missing == []
        assert got[half] == recall(same.eval()), half
    fixed = build_model(mini_data, samples, cfg)
    fixed.load_state_dict(model.state_dict())
    with torch.no_grad():  # logit(mean gate) as the bias of a layer blind to its input
        fixed.fusion.gate.weight.zero_()
        mean = torch.from_numpy(hooked.mean(axis=0)).double()
        fixed.fusion.gate.bias.copy_(torch.log(mean / (1 - mean)))
    assert got["constant"] == pytest.approx(recall(fixed.eval()), abs=1e-9)
    assert len({got[h]["val_recall@10"] for h in ("trained", "image", "concepts")}) > 1
    image_only = build_model(mini_data, samples, config_from("tiny-cpu", [
        *base, "--model.fusion=image_only"]))
    with pytest.raises(ValueError, match="no image/text gate"):
        measures.fusion_halves(image_only, mini_data, val)


class _TitleFollowingModel:
    """A model whose attention follows the title perfectly: all concepts' weight spread over
    the regions of the object whose product the title names (read from the truth), in
    proportion to how much of each region it covers; uniform where the title names none."""

    def __init__(self, data, root, cover, title_product, grid=8):
        self.cfg = type("Cfg", (), {"image_size": 64, "fusion": "concept"})()
        self.cover, self.title_product, self.grid = cover, title_product, grid
        images = load_images_of_all(data)
        self.doc_of_image = {images[r].numpy().tobytes(): data.doc_ids[r]
                             for r in range(len(images))}

    def eval(self):
        return self

    def tokenize(self, texts):
        return {"texts": texts}

    def embed_docs(self, images, tokens, return_attention=False):
        maps = []
        for image, text in zip(images, tokens["texts"]):
            regions = self.cover[self.doc_of_image[image.numpy().tobytes()]]
            named = regions.get(self.title_product[text])
            maps.append(named / named.sum() if named is not None
                        else np.full(self.grid ** 2, self.grid ** -2))
        att = torch.tensor(np.array(maps), dtype=torch.float32)[:, None, :].repeat(1, 3, 1)
        return torch.zeros(len(images), 4), {"text_to_image": att, "grid": self.grid}


def load_images_of_all(data):
    from mixer_lite.dataset import load_images

    return load_images(data, "docs", np.arange(len(data.docs)), 64)


def title_following_model(data, scene_dir):
    """(:class:`_TitleFollowingModel` of the folder, its truth lines, and each doc's products'
    cover of the 8x8 regions, read from the label PNGs)."""
    from PIL import Image

    truth = [json.loads(line) for line in open(scene_dir / "_truth" / "docs.jsonl")]
    title_product = {data.doc_texts[data.doc_row[t["doc_id"]]]: t["product_id"] for t in truth}
    cover = {}  # doc -> {product: share of each of the 8x8 regions it covers}
    for t in truth:
        labels = np.asarray(Image.open(scene_dir / "_truth" / "masks" / f"{t['doc_id']}.png"))
        cover[t["doc_id"]] = {o["product_id"]: (labels == i + 1).reshape(8, 16, 8, 16)
                              .mean((1, 3)).reshape(64) for i, o in enumerate(t["objects"])}
    return _TitleFollowingModel(data, scene_dir, cover, title_product), truth, cover


def test_scene_attention_against_a_naive_loop_over_the_label_maps(scene_dir):
    """A model that attends exactly where the title points scores what a loop over the label
    PNGs computes (lift, the other objects' lift, the swap), and a blind one scores lift 1 and
    no swap."""
    from mixer_lite.dataset import load_dataset

    data = load_dataset(scene_dir)
    model, truth, cover = title_following_model(data, scene_dir)
    r = measures.scene_attention(model, data, scene_dir, n_docs=40, seed=3)
    per = r["per_doc"]
    lifts, others, above, moved = [], [], [], []
    for i, (row, swap, new_title) in enumerate(zip(per["rows"], per["swap"],
                                                    per["swapped_titles"])):
        t = truth[int(row)]
        regions = [cover[t["doc_id"]][o["product_id"]] for o in t["objects"]]
        att = regions[0] / regions[0].sum()
        # what the figures show is what was measured: the doc's maps, masks and objects
        assert [o["product_id"] for o in per["objects"][i]] == \
            [o["product_id"] for o in t["objects"]]
        assert np.allclose(per["masks"][i, 0].reshape(8, 8, 8, 8).mean((1, 3)).reshape(64),
                           regions[0])
        assert np.allclose(per["maps"][i], att, atol=1e-5)
        assert np.allclose(per["maps_swapped"][i], regions[swap] / regions[swap].sum(),
                           atol=1e-5)
        lift = [float(att @ c) / c.mean() for c in regions]
        lifts.append(lift[0])
        others.extend(lift[1:])
        above.append(lift[0] > max(lift[1:]))
        assert model.title_product[new_title] == t["objects"][swap]["product_id"] \
            != t["product_id"]
        after = regions[swap] / regions[swap].sum()
        mass_after = [float(after @ c) for c in regions]
        moved.append(int(np.argmax(mass_after)) == swap and mass_after[swap] > att @ regions[swap])
    assert r["docs"] == 40 and len(set(per["rows"])) == 40
    assert per["images"].shape == (40, 3, 64, 64) and per["images"].dtype == torch.uint8
    assert r["product_lift"] == pytest.approx(np.mean(lifts), rel=1e-4)
    assert r["other_lift"] == pytest.approx(np.mean(others), rel=1e-4)
    assert r["product_above_others"] == pytest.approx(np.mean(above))
    assert r["swap_moved"] == pytest.approx(np.mean(moved))
    assert r["product_lift"] > 3 and r["swap_moved"] > 0.9  # the title decides, as built

    blind = measures.scene_attention(_StubModel(torch.full((40, 3, 64), 1 / 64)), data,
                                     scene_dir, n_docs=40, seed=3)
    assert blind["product_lift"] == pytest.approx(1.0, abs=1e-5)
    assert blind["other_lift"] == pytest.approx(1.0, abs=1e-5)
    assert blind["swap_moved"] == 0.0


def test_doc_attention_among_rows_draws_test_docs_of_those_rows(scene_dir):
    """With ``among`` (the demo passes the scene docs) the gallery's docs are rows given that a
    test query judges relevant, each image and title its own row's, and its attention is what
    the model's ``embed_docs`` returns for them."""
    from mixer_lite.dataset import load_dataset, load_images
    from mixer_lite.model import MixerModel, ModelConfig, WordTokenizer

    data = load_dataset(scene_dir)
    scenes = measures.scene_doc_rows(data, scene_dir)
    judged = {data.doc_row[d] for q in data.qrels for d in q["doc_ids"]}
    torch.manual_seed(0)
    model = MixerModel(ModelConfig(fusion="concept", vit_depth=2, vit_dim=64, text_dim=64,
                                   embed_dim=32, n_concepts=4), WordTokenizer.fit(data.doc_texts))
    shown = measures.doc_attention(model, data, n_docs=5, seed=2, among=scenes)
    rows = shown["rows"]
    assert len(set(rows)) == 5 and set(rows) <= set(scenes.tolist()) & judged
    assert shown["titles"] == [data.doc_texts[r] for r in rows]
    assert torch.equal(shown["images"], load_images(data, "docs", rows, 64))
    model.eval()
    with torch.no_grad():
        _, info = model.embed_docs(shown["images"], model.tokenize(shown["titles"]),
                                   return_attention=True)
    assert torch.equal(shown["info"]["text_to_image"], info["text_to_image"])
    untested = np.setdiff1d(np.arange(len(data.docs)), sorted(judged))
    with pytest.raises(ValueError, match="none of the rows"):
        measures.doc_attention(model, data, among=untested)


def test_recall_by_doc_kind_splits_the_test_queries_by_their_docs(scene_dir):
    """The groups partition the judged queries by whether a relevant doc is a scene (checked
    against the truth file), and ``all`` is what the project's evaluator reports."""
    from mixer_lite.dataset import load_dataset
    from mixer_lite.retrieval import evaluate_model
    from mixer_lite.train import build_model, config_from
    from mixer_lite.sampling import make_samples

    data = load_dataset(scene_dir)
    cfg = config_from("tiny-cpu", ["--model.image_weights=none"])
    model = build_model(data, make_samples(data, cfg)[0], cfg)
    r = measures.recall_by_doc_kind(model, data, scene_dir)
    whole = evaluate_model(model, data)
    for m in ("recall@1", "recall@10", "map@10", "queries"):
        assert r["all"][m] == pytest.approx(whole[m], abs=1e-9)
    scene_docs = {json.loads(line)["doc_id"] for line in open(scene_dir / "_truth" / "docs.jsonl")
                  if len(json.loads(line)["objects"]) > 1}
    n_scene = sum(any(d in scene_docs for d in q["doc_ids"]) for q in data.qrels)
    assert r["scene"]["queries"] == n_scene and r["single"]["queries"] == len(data.qrels) - n_scene
    for m in ("recall@10", "map@10"):
        assert r["all"][m] == pytest.approx((r["scene"][m] * n_scene + r["single"][m] *
                                             (len(data.qrels) - n_scene)) / len(data.qrels))
    # Only scene docs count as hits: brute force over the same embeddings' top 10.
    from mixer_lite.dataset import ImageTable, image_files
    from mixer_lite.retrieval import embed_docs, embed_queries, judged_query_rows

    rows = judged_query_rows(data)
    docs = embed_docs(model, ImageTable(image_files(data, "docs"), 64), data.doc_texts)
    queries = embed_queries(model, ImageTable(image_files(data, "queries", rows), 64))
    qrels = {q["query_id"]: q["doc_ids"] for q in data.qrels}
    found = []
    for i, row in enumerate(rows):
        wanted = {d for d in qrels[data.query_ids[row]] if d in scene_docs}
        if wanted:
            top = np.argsort(-(docs @ queries[i]), kind="stable")[:10]
            found.append(bool(wanted & {data.doc_ids[j] for j in top}))
    assert r["scene_docs"]["queries"] == n_scene
    assert r["scene_docs"]["recall@10"] == pytest.approx(np.mean(found))


def test_scene_docs_redrawn_paints_only_the_other_objects(scene_dir):
    """Single-object docs untouched; in a scene doc, the pixels only other objects cover take the
    background's median colour (computed here from the label PNG, by numpy), the pixels no other
    object covers are unchanged; the ceiling measure embeds exactly these images."""
    from PIL import Image

    from mixer_lite.dataset import ImageTable, image_files, load_dataset

    data = load_dataset(scene_dir)
    size = 64
    painted = measures.scene_docs_redrawn(data, scene_dir, size).numpy()
    original = ImageTable(image_files(data, "docs"), size)[np.arange(len(data.docs))].numpy()
    objects = {json.loads(line)["doc_id"]: json.loads(line)["objects"]
               for line in open(scene_dir / "_truth" / "docs.jsonl")}
    scenes = [r for r, d in enumerate(data.doc_ids) if len(objects[d]) > 1]
    singles = [r for r, d in enumerate(data.doc_ids) if len(objects[d]) == 1]
    assert scenes and singles
    assert (painted[singles] == original[singles]).all()
    for r in scenes[:10]:
        labels = np.asarray(Image.open(scene_dir / "_truth" / "masks" / f"{data.doc_ids[r]}.png"))
        step = labels.shape[0] // size  # the label map is a whole multiple of the image side
        blocks = labels.reshape(size, step, size, step).transpose(0, 2, 1, 3)
        blocks = blocks.reshape(size, size, -1)
        free = (blocks == 0).all(-1)
        only_others = (blocks >= 2).all(-1)
        no_others = (blocks < 2).all(-1)
        ground = np.median(original[r][:, free], axis=1)
        assert np.abs(painted[r][:, only_others] - np.round(ground)[:, None]).max() <= 1
        assert (painted[r][:, no_others] == original[r][:, no_others]).all()
        assert only_others.sum() > 20  # the scene has other objects to paint


def test_the_painted_ceiling_ranks_the_painted_scene_docs(scene_dir):
    """``recall_by_doc_kind(scene_docs_as="painted")`` is the brute-force recall over
    embeddings of :func:`scene_docs_redrawn`'s images (``"pointed"`` swaps in
    :func:`pointed_crops` on the same path; those crops are tested against PIL)."""
    from mixer_lite.dataset import ImageTable, image_files, load_dataset
    from mixer_lite.retrieval import embed_docs, embed_queries, judged_query_rows
    from mixer_lite.sampling import make_samples
    from mixer_lite.train import build_model, config_from

    data = load_dataset(scene_dir)
    cfg = config_from("tiny-cpu", ["--model.image_weights=none"])
    model = build_model(data, make_samples(data, cfg)[0], cfg)
    r = measures.recall_by_doc_kind(model, data, scene_dir, scene_docs_as="painted")
    docs = embed_docs(model, measures.scene_docs_redrawn(data, scene_dir, 64), data.doc_texts)
    rows = judged_query_rows(data)
    queries = embed_queries(model, ImageTable(image_files(data, "queries", rows), 64))
    qrels = {q["query_id"]: set(q["doc_ids"]) for q in data.qrels}
    top = np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :10]
    hits = [bool(qrels[data.query_ids[row]] & {data.doc_ids[j] for j in top[i]})
            for i, row in enumerate(rows)]
    assert r["all"]["recall@10"] == pytest.approx(np.mean(hits))


def test_pointed_beside_scores_each_doc_by_the_better_of_its_two_entries(scene_dir):
    """``recall_by_doc_kind(pointed_beside=True)`` against a loop: each query's docs ranked by
    the larger of its cosines with the doc as shot and with the doc cut where its attention
    points (:func:`pointed_crops`, tested against PIL below), each doc counted once.  Each
    query's relevant docs are the loop's top 10, so mAP@10 is 1 exactly when every query's top
    10 is the loop's, whatever the untrained model's quality."""
    from types import SimpleNamespace

    from mixer_lite.dataset import ImageTable, image_files, load_dataset
    from mixer_lite.retrieval import embed_docs, embed_queries
    from mixer_lite.sampling import make_samples
    from mixer_lite.train import build_model, config_from

    data = load_dataset(scene_dir)
    cfg = config_from("tiny-cpu", ["--model.image_weights=none"])
    model = build_model(data, make_samples(data, cfg)[0], cfg)
    shot = embed_docs(model, ImageTable(image_files(data, "docs"), 64), data.doc_texts)
    cut = embed_docs(model, measures.pointed_crops(model, data, np.arange(len(data.docs)), 64),
                     data.doc_texts)
    rows = np.arange(40)
    queries = embed_queries(model, ImageTable(image_files(data, "queries", rows), 64))
    relevant = []
    for i in range(len(rows)):
        best = [max(float(queries[i] @ shot[j]), float(queries[i] @ cut[j]))
                for j in range(len(data.docs))]
        order = sorted(range(len(data.docs)), key=lambda j: -best[j])
        relevant.append(set(order[:10]))
    chosen = SimpleNamespace(query_rows=rows, relevant=relevant)
    r = measures.recall_by_doc_kind(model, data, scene_dir, chosen, pointed_beside=True)
    assert r["all"]["map@10"] == pytest.approx(1.0)
    # The second entries matter: ranked by the shots alone, some top 10 differs.
    assert measures.recall_by_doc_kind(model, data, scene_dir, chosen)["all"]["map@10"] < 1
    with pytest.raises(ValueError, match="scene_docs_as"):
        measures.recall_by_doc_kind(model, data, scene_dir, scene_docs_as="painted",
                                    pointed_beside=True)


@pytest.mark.parametrize("paint_others", [True, False])
def test_a_cropped_scene_doc_is_its_product_cut_out_and_framed(scene_dir, paint_others):
    """``crop=True``: against PIL doing the same by hand on the 128 px file and label map (the
    other objects filled with the background median unless they are kept, the box plus 5% cut,
    shrunk by box averaging); single-object docs unchanged."""
    from PIL import Image

    from mixer_lite.dataset import ImageTable, image_files, load_dataset

    data = load_dataset(scene_dir)
    size = 32
    cropped = measures.scene_docs_redrawn(data, scene_dir, size, paint_others=paint_others,
                                          crop=True).numpy()
    plain = ImageTable(image_files(data, "docs"), size)[np.arange(len(data.docs))].numpy()
    objects = {json.loads(line)["doc_id"]: json.loads(line)["objects"]
               for line in open(scene_dir / "_truth" / "docs.jsonl")}
    singles = [r for r, d in enumerate(data.doc_ids) if len(objects[d]) == 1]
    assert (cropped[singles] == plain[singles]).all()
    scenes = [r for r, d in enumerate(data.doc_ids) if len(objects[d]) > 1]
    overlapped = 0
    for r in scenes[:8]:
        doc = data.doc_ids[r]
        shot = np.asarray(Image.open(image_files(data, "docs")[r]).convert("RGB")
                          .resize((128, 128), Image.BILINEAR), dtype=np.float64)
        labels = np.asarray(Image.open(scene_dir / "_truth" / "masks" / f"{doc}.png"))
        painted = shot.copy()
        painted[labels >= 2] = np.median(shot[labels == 0], axis=0)
        x, y, s = objects[doc][0]["box"]
        m = round(0.05 * s)
        box = (slice(max(0, y - m), y + s + m), slice(max(0, x - m), x + s + m))
        diff = {}
        for name, img in (("painted", painted), ("kept", shot)):
            piece = Image.fromarray(img[box].round().astype(np.uint8))
            want = np.asarray(piece.resize((size, size), Image.BOX), dtype=np.float64)
            diff[name] = np.abs(cropped[r].transpose(1, 2, 0) - want).mean()
        mine = "painted" if paint_others else "kept"
        assert diff[mine] < 6, doc  # torch's and PIL's resampling differ a little
        if (labels[box] >= 2).mean() > 0.05:  # another object overlaps the box: they differ
            overlapped += 1
            assert diff[mine] < diff[{"painted": "kept", "kept": "painted"}[mine]], doc
    assert overlapped  # some box holds another object: the two settings differ there


def test_window_grid_places_windows_edge_to_edge():
    """Hand-computed: two sides at 2 places are the four corners of each, half side first; three
    places put the middle one at the centre."""
    three = window_grid((0.625,), 3)
    assert three[:, 0].tolist() == pytest.approx([-0.375, 0, 0.375] * 3)
    assert three[:, 1].tolist() == pytest.approx([-0.375] * 3 + [0] * 3 + [0.375] * 3)
    two = window_grid((0.5, 0.75), 2)
    want = [[-0.5, -0.5, 0.5], [0.5, -0.5, 0.5], [-0.5, 0.5, 0.5], [0.5, 0.5, 0.5],
            [-0.25, -0.25, 0.75], [0.25, -0.25, 0.75], [-0.25, 0.25, 0.75], [0.25, 0.25, 0.75]]
    assert two.flatten().tolist() == pytest.approx(np.ravel(want))
    assert len(measures.FINE_WINDOWS) == 75


def test_pointed_window_hand_computed():
    """The 5 x 5 square of an 8 x 8 map with the most mass: (centre x, centre y, half side)."""
    one = torch.zeros(1, 2, 64)
    one[0, :, 2 * 8 + 6] = 1.0  # all mass in row 2, column 6: squares with top 0-2, left 2-3
    box = measures.pointed_window(one, 8, 5)[0].tolist()
    assert box == pytest.approx([(2 + 2.5) / 4 - 1, (0 + 2.5) / 4 - 1, 0.625])  # first in order
    split = torch.zeros(1, 1, 64)
    split[0, 0, [0, 7 * 8 + 7, 7 * 8 + 6]] = torch.tensor([0.4, 0.3, 0.3])  # bottom right wins
    assert measures.pointed_window(split, 8, 5)[0].tolist() == pytest.approx([0.375, 0.375, 0.625])
    assert measures.pointed_window(torch.full((1, 3, 64), 1 / 64), 8, 5)[0].tolist() == \
        pytest.approx([-0.375, -0.375, 0.625])  # uniform: every square ties


def test_pointed_crops_cut_where_the_attention_points(scene_dir):
    """A model whose attention covers the named product: each scene doc is cut to the 5 x 5
    regions of most mass (a loop over the squares) on the 128 px canvas and shrunk, against PIL
    doing so by hand."""
    from PIL import Image

    from mixer_lite.dataset import image_files, load_dataset

    data = load_dataset(scene_dir)
    model, truth, cover = title_following_model(data, scene_dir)
    rows = measures.scene_doc_rows(data, scene_dir)[:6]
    got = measures.pointed_crops(model, data, rows, 32, batch_size=4).numpy()
    for i, r in enumerate(rows):
        doc = data.doc_ids[r]
        named = cover[doc][truth[r]["product_id"]].reshape(8, 8)
        mass = {(top, left): named[top:top + 5, left:left + 5].sum()
                for top in range(4) for left in range(4)}
        top, left = max(mass, key=lambda k: (mass[k], -k[0], -k[1]))
        img = Image.open(image_files(data, "docs")[r]).convert("RGB").resize((128, 128),
                                                                            Image.BILINEAR)
        want = np.asarray(img.crop((16 * left, 16 * top, 16 * left + 80, 16 * top + 80))
                          .resize((32, 32), Image.BOX), dtype=np.float64)
        assert np.abs(got[i].transpose(1, 2, 0) - want).mean() < 6, doc  # resampling differs


@pytest.mark.parametrize("sides,places,windows", [
    ((0.625,), 3, [(80, top, left) for top in (0, 24, 48) for left in (0, 24, 48)]),
    ((0.5, 0.75), 2, [(64, top, left) for top in (0, 64) for left in (0, 64)]
     + [(96, top, left) for top in (0, 32) for left in (0, 32)])])
def test_truth_windows_cut_each_scene_doc_to_the_window_that_best_shows_its_product(
        scene_dir, sides, places, windows):
    """Each scene doc cut to one of the windows (side, top, left in px of the 128 px canvas),
    the one whose pixels of the 128 px label map hold the most of the product less the other
    objects over the union of the window and the product (up to the 32 px masks' rounding),
    shrunk by box averaging: against PIL cutting every window by hand.  The docs checked are
    the first six and those where the union changes the choice (with two sizes: where the
    window that fits the product beats the larger one that also holds it)."""
    from PIL import Image

    from mixer_lite.dataset import image_files, load_dataset

    data = load_dataset(scene_dir)
    scenes = measures.scene_doc_rows(data, scene_dir)
    score, raw = {}, {}
    for r in scenes:
        labels = np.asarray(Image.open(scene_dir / "_truth" / "masks" /
                                       f"{data.doc_ids[r]}.png"))
        assert labels.shape == (128, 128)
        product = (labels == 1).sum()
        for side, top, left in windows:
            inside = labels[top:top + side, left:left + side]
            mine = (inside == 1).sum()
            raw[r, side, top, left] = mine - (inside >= 2).sum()
            score[r, side, top, left] = raw[r, side, top, left] / (side ** 2 + product - mine)
    best = {r: max(windows, key=lambda w: score[(r, *w)]) for r in scenes}
    changed = [r for r in scenes if best[r] != max(windows, key=lambda w: raw[(r, *w)])]
    assert changed  # the union decides somewhere
    rows = np.array(sorted({*scenes[:6], *changed[:6]}))
    got = measures.truth_windows(data, scene_dir, rows, 32, window_grid(sides, places),
                                 batch_size=3).numpy()
    for i, r in enumerate(rows):
        img = Image.open(image_files(data, "docs")[r]).convert("RGB").resize((128, 128),
                                                                            Image.BILINEAR)
        diff = {}
        for side, top, left in windows:
            want = np.asarray(img.crop((left, top, left + side, top + side))
                              .resize((32, 32), Image.BOX), dtype=np.float64)
            diff[side, top, left] = np.abs(got[i].transpose(1, 2, 0) - want).mean()
        chosen = min(diff, key=diff.get)
        assert diff[chosen] < 6, r  # torch's and PIL's resampling differ a little
        assert score[(r, *chosen)] >= score[(r, *best[r])] - 0.03, (r, chosen, best[r])


def frame(ax) -> tuple:
    edge = ax.spines["left"]
    return matplotlib.colors.to_hex(edge.get_edgecolor()), edge.get_linewidth()


GREEN, RED, GREY = (matplotlib.colors.to_hex(c) for c in ("tab:green", "tab:red", "0.6"))


def test_result_grids_title_every_doc_and_frame_the_right_ones():
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 255, (2, 3, 8, 8), dtype=np.uint8)
    docs = torch.zeros(5, 3, 8, 8, dtype=torch.uint8)
    texts = [f"doc title {i}" for i in range(5)]
    fig = search_grid(queries, docs, np.array([[0, 1], [2, 3]]), [{1}, set()], doc_texts=texts)
    axes = np.array(fig.axes).reshape(2, 3)
    assert [axes[0, c].get_title() for c in (1, 2)] == ["#1\ndoc title 0",
                                                        "#2 relevant\ndoc title 1"]
    assert [frame(axes[0, c])[0] for c in (1, 2)] == [GREY, GREEN]
    assert "1 of 2 rows found theirs" in fig._suptitle.get_text()
    missed = missed_queries(queries, docs, np.array([[0, 1], [2, 3]]), [{4}, {3, 2}], texts)
    axes = np.array(missed.axes).reshape(2, 4)
    assert axes[0, 3].get_title() == "its product\ndoc title 4" and frame(axes[0, 3])[0] == GREEN
    assert axes[1, 3].get_title() == "its product\ndoc title 2"  # the first of its docs
    assert frame(axes[1, 2])[0] == GREEN  # a relevant doc among the hits is framed too
    matplotlib.pyplot.close("all")


def test_weak_label_class_marks_the_members_of_another_product():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    data = dataclasses.make_dataclass("Data", ["queries", "docs", "query_row", "doc_row"])(
        [{"image": image, "text": ""}] * 3, [{"image": image, "text": "a doc"}] * 2,
        {"q1": 0, "q2": 1, "q3": 2}, {"d1": 0, "d2": 1})
    truth = {"q1": "p", "q2": "p", "q3": "x", "d1": "p", "d2": "p"}
    fig = weak_label_class(data, {"query_ids": ["q1", "q2", "q3"], "doc_ids": ["d1", "d2"]},
                           truth, max_per_row=3)
    axes = np.array(fig.axes).reshape(2, 3)
    assert [frame(axes[0, c])[0] for c in range(3)] == [GREY, GREY, RED]
    assert axes[0, 2].get_title().startswith("OTHER PRODUCT")
    assert not axes[1, 2].axison  # two docs in three panels: the last is blank
    assert "5 samples (5 shown)" in fig._suptitle.get_text()
    matplotlib.pyplot.close(fig)


def test_recall_curves_draw_the_seeds_mean_and_their_range():
    seeds = [[0.1, 0.2] * 5, [0.3, 0.4] * 5, [0.2, 0.3] * 5]
    fig = recall_curves({"three seeds": seeds, "one run": [0.5] * 10})
    ax = fig.axes[0]
    mean, single = ax.get_lines()
    assert np.allclose(mean.get_ydata(), [20, 30] * 5)
    band = ax.collections[0].get_paths()[0].vertices
    assert np.isclose(band[:, 1].min(), 10) and np.isclose(band[:, 1].max(), 40)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["three seeds: R@10 30.0% ± 8.2 (3 seeds)", "one run: R@10 50.0%"]
    matplotlib.pyplot.close(fig)


def test_seed_bars_draw_each_seed_and_the_mean_on_one_axis_from_zero():
    from mixer_lite.viz import seed_bars

    fig = seed_bars({"A": {"pretrained": [50.0, 54.0, 52.0], "scratch": [30.0]},
                     "B": {"pretrained": [14.0, 16.0]}}, xlabel="Recall@10 (%)", title="t")
    a, b = fig.axes
    assert [bar.get_width() for bar in a.patches] == [52.0, 30.0]
    assert [list(line.get_xdata()) for line in a.get_lines()] == [[50.0, 54.0, 52.0], [30.0]]
    assert [t.get_text() for t in a.get_yticklabels()] == ["pretrained (3 seeds)", "scratch"]
    assert a.get_xlim() == b.get_xlim() == (0, 54.0 * 1.1)
    assert (a.get_title(), b.get_title(), fig._suptitle.get_text()) == ("A", "B", "t")
    matplotlib.pyplot.close(fig)


def test_scene_maps_outline_the_named_object_on_each_title_s_map():
    from matplotlib.colors import to_rgba

    from mixer_lite.viz import scene_maps

    masks = np.zeros((1, 3, 8, 8), np.float32)
    masks[0, 0, :4, :4] = 1  # the product, top left
    masks[0, 1, 4:, 4:] = 1  # another object, bottom right; object 2 absent
    own = np.array([[0.7, 0.1, 0.1, 0.1]])
    swapped = np.array([[0.1, 0.1, 0.1, 0.7]])
    fig = scene_maps(np.zeros((1, 3, 8, 8), np.uint8), masks,
                     [("own title", own, [0]), ("swapped", swapped, [1])], ["a mug"], "t")
    image, first, second = fig.axes[:3]
    assert (image.get_title(), first.get_title(), second.get_title()) == \
        ("a mug", "own title", "swapped")
    assert np.allclose(first.get_images()[1].get_array(), [[2.8, 0.4], [0.4, 0.4]])  # x 4
    assert first.get_images()[1].get_clim() == (0.0, 2.8)  # from 0, one scale for both maps

    def outline_colours(ax):  # one contour set per present object, in object order
        return [to_rgba(c.get_edgecolor()[0]) for c in ax.collections]

    lime, white = to_rgba("lime"), to_rgba("white")
    assert outline_colours(image) == outline_colours(first) == [lime, white]
    assert outline_colours(second) == [white, lime]  # the swapped title names object 1
    assert fig._suptitle.get_text() == "t"
    matplotlib.pyplot.close(fig)


def test_concept_map_change_draws_both_maps_and_what_moved():
    before, after = np.array([0.5, 0.5, 0.0, 0.0]), np.array([0.0, 0.5, 0.5, 0.0])
    fig = concept_map_change(np.zeros((3, 8, 8), np.uint8), before, after, ("own", "yours"), 3)
    own, yours, change = (ax for ax in fig.axes if ax.get_title() != "")
    assert np.allclose(own.get_images()[1].get_array(), [[0.5, 0.5], [0, 0]])
    assert np.allclose(change.get_images()[1].get_array(), [[-0.5, 0], [0.5, 0]])
    assert change.get_title().endswith("50% of the weight moved")  # half of |0.5| + |0.5|
    assert change.get_images()[1].get_clim() == (-0.5, 0.5)  # symmetric: no change is white
    assert fig._suptitle.get_text().startswith("Concept 3")
    matplotlib.pyplot.close(fig)
