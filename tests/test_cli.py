"""The CLI's success paths, run as a user runs them: ``train``, ``evaluate``, ``index``, ``search``
and ``demo`` in a process of their own over SynthShop ``tiny`` (``_cli``).

Each test checks the exit code, the printed format and the files written, and the numbers
against an independent reference: a brute-force numpy ranking over the run's own embeddings,
scored against ``qrels.jsonl`` read straight from the file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _cli import TINY_MODEL, cli, cli_subprocess, run_embeddings

from mixer_lite.dataset import VALID_STAMP, ImageTable, image_files, images_validated, load_dataset
from mixer_lite.measures import scene_attention
from mixer_lite.retrieval import embed_queries, evaluate_raw_pixels
from mixer_lite.runs import load_run_model
from mixer_lite.synthshop import make_synthshop

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUMMARY = {"recall@1", "recall@5", "recall@10", "recall@20", "recall@50", "map@10", "mrr",
           "queries", "docs", "index"}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ok(r) -> str:
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    """The run the tests read, trained by ``python -m mixer_lite.cli`` started from scratch: the
    entry point itself, which every other command reaches through a forked process (_cli)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    printed = json.loads(ok(cli_subprocess("train", "--data", tiny_dir[0], "--out", out,
                                           "--steps=6", "--eval_at_end=false", *TINY_MODEL)))
    assert printed["steps"] == 6
    return out


@pytest.fixture(scope="module")
def reference(run, tiny_dir):
    """The run's embeddings computed in this process, and the judged queries' relevant docs."""
    data = load_dataset(tiny_dir[0])
    doc_ids = [d["doc_id"] for d in jsonl(tiny_dir[0] / "docs.jsonl")]
    qrels = {q["query_id"]: set(q["doc_ids"]) for q in jsonl(tiny_dir[0] / "qrels.jsonl")}
    judged = sorted(qrels, key=data.query_row.__getitem__)
    ref = run_embeddings(run, tiny_dir[0], [data.query_row[q] for q in judged])
    model, docs, queries = ref["model"], ref["docs"], ref["queries"]
    return {"model": model, "docs": docs, "doc_ids": doc_ids, "queries": queries,
            "relevant": [qrels[q] for q in judged]}


def brute_force_recall(ref, k: int) -> float:
    scores = ref["queries"] @ ref["docs"].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hit = [bool({ref["doc_ids"][j] for j in row} & rel)
           for row, rel in zip(order, ref["relevant"])]
    return float(np.mean(hit))


def test_evaluate_prints_one_json_summary_that_brute_force_confirms(run, tiny_dir, reference):
    lines = ok(cli("evaluate", "--run", run, "--data", tiny_dir[0], "--quiet")).splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert set(summary) == SUMMARY
    n = len(reference["relevant"])
    assert summary["queries"] == n
    assert summary["docs"] == len(reference["doc_ids"]) and summary["index"] == "flat"
    for k in (1, 5, 10, 50):
        # the subprocess embeds with its own thread count: allow one near-tie to flip
        assert abs(summary[f"recall@{k}"] - brute_force_recall(reference, k)) <= 1 / n + 1e-9
    written = json.loads((run / "eval.json").read_text())
    assert {k: written[k] for k in SUMMARY} == summary
    assert len(written["recall_curve"]) == 50
    assert (run / "recall_curve.png").read_bytes()[:8] == PNG_SIGNATURE


def assert_metrics_close(a: dict, b: dict, queries: int, flips: int = 1) -> None:
    """Metrics of one ranking computed in two processes: the counts equal, each rate within
    ``flips`` queries (a near-tie may order the other way at another thread count)."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], str) or k in ("queries", "docs"):
            assert a[k] == b[k], k
        else:
            assert abs(a[k] - b[k]) <= flips / queries + 1e-9, (k, a[k], b[k])


def test_evaluate_compares_runs_and_the_baseline_in_one_call(run, tiny_dir, tmp_path):
    """Two different runs and the baseline in one call: each entry is what that run scores
    alone (not a copy of the first), and the baseline is the in-process raw-pixel score."""
    other = tmp_path / "other"
    ok(cli("train", "--data", tiny_dir[0], "--out", other, "--steps=6", "--seed=1",
           "--eval_at_end=false", *TINY_MODEL))
    alone = {r: json.loads(ok(cli("evaluate", "--run", r, "--data", tiny_dir[0], "--quiet")))
             for r in (run, other)}
    assert alone[run] != alone[other]  # a different model ranks differently
    figure = tmp_path / "compare.png"
    summary = json.loads(ok(cli("evaluate", "--run", run, "--run", other, "--data",
                                tiny_dir[0], "--baseline", "raw-pixel", "--compare-out", figure,
                                "--quiet")))
    assert list(summary) == [str(run), str(other), "raw-pixel baseline"]
    assert summary[str(run)] == alone[run] and summary[str(other)] == alone[other]
    raw = evaluate_raw_pixels(load_dataset(tiny_dir[0]))
    assert_metrics_close(summary["raw-pixel baseline"], {k: raw[k] for k in SUMMARY},
                         raw["queries"])
    assert figure.read_bytes()[:8] == PNG_SIGNATURE


def test_search_before_index_says_to_build_it(run, tiny_dir, tmp_path):
    fresh = shutil.copytree(run, tmp_path / "fresh", ignore=shutil.ignore_patterns("index"))
    photo = image_files(load_dataset(tiny_dir[0]), "queries", [0])[0]
    r = cli("search", "--run", fresh, "--data", tiny_dir[0], "--image", photo)
    assert r.returncode == 2 and r.stdout == ""
    assert "mixer-lite index" in r.stderr and str(fresh / "index" / "meta.json") in r.stderr


def test_index_then_search_many_photos_in_one_call(run, tiny_dir, tmp_path, reference):
    printed = json.loads(ok(cli("index", "--run", run, "--data", tiny_dir[0], "--quiet")))
    assert printed == {"index": str(run / "index" / "docs.faiss"), "kind": "flat",
                       "docs": len(reference["doc_ids"])}
    meta = json.loads((run / "index" / "meta.json").read_text())
    assert meta["doc_ids"] == reference["doc_ids"]

    data = load_dataset(tiny_dir[0])
    photos = image_files(data, "queries", [0, 1, 2, 3])
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos[2:]:
        shutil.copy(p, folder / Path(p).name)
    k = 5
    out = ok(cli("search", "--run", run, "--data", tiny_dir[0], "--k", k,
                 "--image", photos[0], photos[1], "--image", folder))
    blocks = [b.splitlines() for b in out.split("# ")[1:]]
    expected = photos[:2] + sorted(str(folder / Path(p).name) for p in photos[2:])
    assert [b[0] for b in blocks] == expected

    texts = {d["doc_id"]: d["text"] for d in jsonl(tiny_dir[0] / "docs.jsonl")}
    q = embed_queries(reference["model"],
                      ImageTable(expected, reference["model"].cfg.image_size))
    row_of = {doc_id: i for i, doc_id in enumerate(reference["doc_ids"])}
    for block, emb in zip(blocks, q):
        fields = [line.split("\t") for line in block[1:]]
        assert [int(f[0]) for f in fields] == list(range(1, k + 1))
        assert all(len(f) == 4 and texts[f[1]] == f[3] for f in fields)
        printed_scores = np.array([float(f[2]) for f in fields])
        assert np.all(np.diff(printed_scores) <= 1e-4)
        scores = reference["docs"] @ emb
        mine = np.array([scores[row_of[f[1]]] for f in fields])
        np.testing.assert_allclose(printed_scores, mine, atol=2e-4)
        np.testing.assert_allclose(printed_scores, np.sort(scores)[::-1][:k], atol=2e-4)


def test_demo_runs_the_pipeline_then_skips_what_is_done(tmp_path):
    data, reports, run = tmp_path / "data", tmp_path / "reports", tmp_path / "run"
    args = ("demo", "--preset", "tiny", "--data", data, "--reports", reports, "--run", run,
            "--steps=6", *TINY_MODEL)
    first = ok(cli(*args))
    for step in range(1, 6):
        assert f"[demo] {step}/5" in first
    assert sorted(p.name for p in reports.iterdir() if p.name != ".lock") == [
        "attention_gallery.png", "class_sizes.png", "classes.jsonl", "metrics.json",
        "query_doc_grid.png", "recall_curves.png", "scene_attention.png"]
    for png in reports.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_SIGNATURE
    # the data it generated is SynthShop tiny with seed 0 and 30% scene docs, line for line
    reference = tmp_path / "reference"
    make_synthshop(reference, preset="tiny", seed=0, progress=False, scene_share=0.3)
    for name in ("docs.jsonl", "queries.jsonl", "clicks.jsonl", "qrels.jsonl",
                 "_truth/docs.jsonl"):
        assert (data / name).read_text() == (reference / name).read_text()
    # it decoded every image, so training (and any later command) trusts its stamp
    assert images_validated(data)
    assert json.loads((data / VALID_STAMP).read_text())["by"] == "mixer-lite demo"

    metrics = json.loads((reports / "metrics.json").read_text())
    judged = len(jsonl(data / "qrels.jsonl"))
    classes = jsonl(reports / "classes.jsonl")
    assert metrics["mixer"]["queries"] == metrics["raw_pixels"]["queries"] == judged
    assert metrics["classes"]["classes"] == len(classes)
    assert metrics["classes"]["samples"] == sum(len(c["query_ids"]) + len(c["doc_ids"])
                                                for c in classes)
    model = load_run_model(run)
    raw = evaluate_raw_pixels(load_dataset(data), size=model.cfg.image_size)
    assert_metrics_close(metrics["raw_pixels"], {k: raw[k] for k in metrics["raw_pixels"]},
                         raw["queries"])
    assert f"Recall@10 {metrics['mixer']['recall@10']:.3f}" in first
    # the scene measures are those measures.scene_attention gives for the demo's run
    scenes = scene_attention(model, load_dataset(data), data)
    del scenes["per_doc"]
    assert metrics["scene_attention"] == pytest.approx(scenes, abs=1e-6)
    assert f"in {scenes['swap_moved']:.0%} of {scenes['docs']} docs" in first

    trained_at = (run / "model.pt").stat().st_mtime_ns
    second = ok(cli(*args))
    assert "1/5 generating" not in second and "4/5 training" not in second
    assert (run / "model.pt").stat().st_mtime_ns == trained_at
    assert json.loads((reports / "metrics.json").read_text()) == metrics

    # Killed during training's final evaluation: model.pt written, eval.json not yet.
    (run / "eval.json").unlink()
    third = ok(cli(*args))
    assert "4/5 training" not in third and (run / "model.pt").stat().st_mtime_ns == trained_at
    assert json.loads((reports / "metrics.json").read_text()) == metrics

    # The same run folder with other settings is refused, never reused as if it were them.
    r = cli(*args, "--lr=1e-3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{run} was trained with another config (differs in lr)" in r.stderr
    assert (run / "model.pt").stat().st_mtime_ns == trained_at


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_evaluate_with_an_approximate_index(run, tiny_dir, reference, kind):
    """Each approximate index from the CLI: its own file, its kind in the summary, and a recall
    near the exact brute force (ivfpq quantises the vectors, so it may lose more)."""
    summary = json.loads(ok(cli("evaluate", "--run", run, "--data", tiny_dir[0], "--index",
                                kind, "--quiet")))
    assert summary["index"] == kind and summary["queries"] == len(reference["relevant"])
    written = json.loads((run / f"eval-{kind}.json").read_text())
    assert {k: written[k] for k in SUMMARY} == summary
    slack = {"ivf": 0.05, "hnsw": 0.05, "ivfpq": 0.15}[kind]
    for k in (10, 50):
        assert abs(summary[f"recall@{k}"] - brute_force_recall(reference, k)) <= slack, k


def test_make_data_and_validate_from_the_command_line(tiny_dir, tmp_path):
    out = tmp_path / "d"
    said = json.loads(ok(cli("make-data", "--preset", "tiny", "--seed", "0", "--out", out,
                             "--quiet")).splitlines()[-1])
    assert said["docs"] == len(jsonl(out / "docs.jsonl"))
    for name in ("docs.jsonl", "queries.jsonl", "clicks.jsonl", "qrels.jsonl"):
        assert (out / name).read_bytes() == (tiny_dir[0] / name).read_bytes()
    assert "valid" in ok(cli("validate", out))
    # --no-image-check opens no image: a damaged one passes it, and fails the full check.
    image = out / jsonl(out / "docs.jsonl")[0]["image"]
    image.write_bytes(b"not an image")
    assert "valid" in ok(cli("validate", out, "--no-image-check"))
    full = cli("validate", out)
    assert full.returncode == 1 and "docs.jsonl:1: image" in full.stderr
