"""The icons dataset builder, on small icon packages laid out as the real ones are (the real
sets are hundreds of MB and install from registries; the full build is measured in
docs/EXPERIMENTS.md, "The icons dataset")."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from _cli import cli
from _icon_packages import SETS, SHAPES, make_packages, rasterise_text, svg
from PIL import Image

from mixer_lite.dataset import load_dataset
from mixer_lite.icon_sources import ICON_SETS, read_theme
from mixer_lite.icons import (concept_examples, doc_picture, make_icons, match_sheet,
                              photo_of_drawing, rasterise)


def _read(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def icons_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("icons")
    npm, themes = make_packages(root / "packages")
    stats = make_icons(root / "data", npm_root=npm, theme_root=themes, sets=SETS, progress=False,
                       queries_per_concept=6, test_concept_share=0.3)
    return root, npm, themes, stats


def test_the_folder_is_valid_and_every_concept_is_drawn_by_several_sets(icons_dir):
    root, _, _, stats = icons_dir
    data = load_dataset(root / "data")
    assert data.summary["docs"] == stats["docs"]
    concepts = {c["concept"]: c for c in _read(root / "data", "_truth/concepts.jsonl")}
    assert set(concepts) == set(SHAPES)
    for c in concepts.values():
        sets = c["doc_sets"] + c["query_sets"]
        assert len(set(sets)) == len(sets) >= 3
        assert c["doc_sets"] and c["query_sets"]  # a query never shows a doc's drawing


def test_queries_show_other_sets_drawings_and_qrels_name_their_concepts_docs(icons_dir):
    root = icons_dir[0] / "data"
    concepts = {c["concept"]: c for c in _read(root, "_truth/concepts.jsonl")}
    doc_truth = {d["doc_id"]: d for d in _read(root, "_truth/docs.jsonl")}
    query_truth = {q["query_id"]: q for q in _read(root, "_truth/queries.jsonl")}
    for q in query_truth.values():
        assert q["set"] in concepts[q["concept"]]["query_sets"]
    for r in _read(root, "qrels.jsonl"):
        concept = query_truth[r["query_id"]]["concept"]
        assert concepts[concept]["split"] == "test"
        assert sorted(r["doc_ids"]) == sorted(d for d, t in doc_truth.items()
                                              if t["concept"] == concept)
    test_queries = {q for q, t in query_truth.items() if concepts[t["concept"]]["split"] == "test"}
    assert test_queries and not test_queries & {c["query_id"] for c in _read(root, "clicks.jsonl")}


def test_titles_are_the_sets_own_names_and_tags(icons_dir):
    root = icons_dir[0] / "data"
    texts = {d["doc_id"]: d["text"] for d in _read(root, "docs.jsonl")}
    for d in _read(root, "_truth/docs.jsonl"):
        name = d["concept"].replace("-", " ")
        want = {"tabler": [f"{name} shape tabler {name} tag"], "lucide": [f"{name} lucide tag"],
                "bootstrap": [name], "iconoir": [name],
                "tango": [f"{name} actions", f"{name} emblems"]}  # a theme: name and context
        assert texts[d["doc_id"]] in want[d["set"]]


def test_same_seed_gives_byte_identical_files_whatever_the_workers(icons_dir, tmp_path):
    root, npm, themes, _ = icons_dir
    again = tmp_path / "again"
    make_icons(again, npm_root=npm, theme_root=themes, sets=SETS, progress=False, workers=2,
               queries_per_concept=6, test_concept_share=0.3)
    for name in ("docs.jsonl", "queries.jsonl", "clicks.jsonl", "qrels.jsonl",
                 "_truth/concepts.jsonl"):
        assert (root / "data" / name).read_bytes() == (again / name).read_bytes(), name
    for sub in ("images/docs", "images/queries"):
        for p in sorted((root / "data" / sub).iterdir()):
            assert p.read_bytes() == (again / sub / p.name).read_bytes(), p


def test_a_set_that_copies_another_is_not_counted_twice(tmp_path):
    """Bootstrap's circle drawn exactly as Lucide's: dropped, leaving the circle 4 sets (< 5)."""
    npm, themes = make_packages(tmp_path / "p", identical_in_bootstrap=("circle",))
    stats = make_icons(tmp_path / "d", npm_root=npm, theme_root=themes, sets=SETS, min_sets=5,
                       progress=False)
    concepts = {c["concept"] for c in _read(tmp_path / "d", "_truth/concepts.jsonl")}
    assert stats["near_duplicates_dropped"] == 1
    assert concepts == set(SHAPES) - {"circle"}


def test_a_missing_set_is_named_with_how_to_install_it(tmp_path):
    npm, themes = make_packages(tmp_path / "p")
    with pytest.raises(FileNotFoundError,
                       match=r"(?s)'phosphor'.*@phosphor-icons/core.*npm install"):
        make_icons(tmp_path / "d", npm_root=npm, theme_root=themes,
                   sets=("tabler", "phosphor"), progress=False)
    with pytest.raises(ValueError, match="unknown set"):
        make_icons(tmp_path / "d", npm_root=npm, theme_root=themes, sets=("twemoji",))


def test_no_emoji_set_is_a_source():
    """Emoji sets and fonts are kept for evaluation outside the project."""
    banned = ("emoji", "moji", "twemoji", "noto", "joypixels", "symbola", "fluent", "blob")
    for s in ICON_SETS.values():
        assert not any(b in (s.name + s.package).lower() for b in banned), s


def test_theme_reader_takes_the_size_nearest_64_and_skips_aliases_and_symbolic(tmp_path):
    theme = tmp_path / "T"
    for size, context in (("16x16", "apps"), ("48x48", "apps"), ("128x128", "apps"),
                          ("scalable", "apps"), ("64x64", "mimetypes"), ("symbolic", "apps")):
        (theme / size / context).mkdir(parents=True)
    for size in ("16x16", "48x48", "128x128"):
        Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(theme / size / "apps" / "editor.png")
    (theme / "scalable" / "apps" / "editor.svg").write_text(svg(SHAPES["star"], ""))
    (theme / "16x16" / "apps" / "small-only.png").write_bytes(
        (theme / "16x16" / "apps" / "editor.png").read_bytes())
    os.symlink(theme / "128x128" / "apps" / "editor.png", theme / "128x128" / "apps" / "alias.png")
    (theme / "128x128" / "apps" / "tool-symbolic.png").write_bytes(b"x")
    (theme / "64x64" / "mimetypes" / "text-plain.png").write_bytes(b"x")
    got = {d.name: d for d in read_theme("t", theme)}
    assert set(got) == {"editor", "small-only"}
    assert got["editor"].path.endswith("128x128/apps/editor.png")
    assert got["editor"].tags == ("apps",)
    assert got["small-only"].path.endswith("16x16/apps/small-only.png")


def test_the_two_views_differ_and_repeat_for_a_seed(tmp_path):
    drawing = rasterise_text(svg(SHAPES["star"], 'fill="#000"'), tmp_path / "s.svg")
    assert drawing.size == (128, 128) and drawing.mode == "RGBA"
    doc = np.asarray(doc_picture(drawing, np.random.default_rng(0), 64), np.float32)
    photo = np.asarray(photo_of_drawing(drawing, np.random.default_rng(0), 64), np.float32)
    again = np.asarray(photo_of_drawing(drawing, np.random.default_rng(0), 64), np.float32)
    other = np.asarray(photo_of_drawing(drawing, np.random.default_rng(1), 64), np.float32)
    assert doc.shape == photo.shape == (64, 64, 3)
    assert (doc > 235).mean() > 0.5            # a white ground
    assert (photo > 235).mean() < (doc > 235).mean()  # a surface, not the ground
    assert np.array_equal(photo, again) and not np.array_equal(photo, other)


def test_an_empty_or_broken_drawing_is_not_rasterised(tmp_path):
    (tmp_path / "bad.svg").write_text("<svg")
    assert rasterise(str(tmp_path / "bad.svg")) is None
    assert rasterise_text('<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24"/>',
                          tmp_path / "empty.svg") is None


def test_make_data_icons_from_the_command_line(icons_dir, tmp_path):
    """The CLI writes what the function writes, and says so in one JSON line."""
    root, npm, themes, stats = icons_dir
    out = tmp_path / "cli"
    r = cli("make-data", "--source", "icons", "--out", out, "--npm-root", npm, "--theme-root",
            themes, "--sets", ",".join(SETS), "--quiet")
    assert r.returncode == 0, r.stderr
    said = json.loads(r.stdout.splitlines()[-1])
    assert said["concepts"] == len(SHAPES) and said["docs"] == len(_read(out, "docs.jsonl"))
    defaults = make_icons(tmp_path / "direct", npm_root=npm, theme_root=themes, sets=SETS,
                          progress=False)
    for name in ("docs.jsonl", "queries.jsonl", "clicks.jsonl", "qrels.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name
    assert defaults["docs"] == said["docs"]
    r = cli("make-data", "--source", "icons", "--out", tmp_path / "x", "--npm-root", npm,
            "--theme-root", themes, "--sets", "tabler,phosphor", "--quiet")
    assert r.returncode != 0 and "phosphor" in r.stderr and "npm install" in r.stderr
    assert "Traceback" not in r.stderr


def test_concept_examples_show_one_concepts_docs_then_its_photos_by_their_sets(icons_dir):
    """Checked against the dataset's own truth files, and drawn: each panel is its file."""
    import matplotlib.pyplot as plt

    from mixer_lite.viz import image_rows

    data = icons_dir[0] / "data"
    truth = {**{d["doc_id"]: d for d in _read(data, "_truth/docs.jsonl")},
             **{q["query_id"]: q for q in _read(data, "_truth/queries.jsonl")}}
    titles = {d["doc_id"]: d["text"] for d in _read(data, "docs.jsonl")}
    examples = concept_examples(data, 3, seed=0, columns=4)
    assert len({concept for concept, _ in examples}) == 3
    for concept, cells in examples:
        assert 3 <= len(cells) <= 4
        kinds = [caption.split(" ·")[0] for _, caption in cells]
        assert kinds == sorted(kinds) and kinds[:1] == ["doc"] and kinds.count("photo") >= 2
        for path, caption in cells:
            item = truth[Path(path).stem]
            assert item["concept"] == concept and f"· {item['set']}" in caption
            if "doc_id" in item:
                assert caption.endswith(f'"{titles[item["doc_id"]]}"')
    # Every concept here is drawn by all five sets: four are too few for any of them.
    assert concept_examples(data, 3, seed=0, sets=SETS, columns=4) == examples
    with pytest.raises(ValueError, match="0 concepts .* drawn by tabler, lucide, bootstrap, "
                                         "iconoir alone, 1 asked"):
        concept_examples(data, 1, seed=0, sets=SETS[:4])
    fig = image_rows(examples, title="t")
    first = fig.axes[0].get_images()[0].get_array()
    assert np.array_equal(first, np.asarray(Image.open(examples[0][1][0][0]).convert("RGB")))
    assert fig.axes[0].get_ylabel() == examples[0][0]
    plt.close(fig)


def test_the_match_sheet_shows_every_set_of_each_picked_concept(icons_dir):
    root, npm, themes, _ = icons_dir
    sheet = match_sheet(root / "data", 4, seed=1, npm_root=npm, theme_root=themes, cell=20)
    assert sheet.size == (170 + 20 * len(SETS), 4 * 20)
    cells = np.asarray(sheet)[:, 170:]
    drawn = [(cells[r * 20:(r + 1) * 20, c * 20:(c + 1) * 20] < 200).any()
             for r in range(4) for c in range(len(SETS))]
    assert all(drawn)  # every concept here is drawn by all five sets
