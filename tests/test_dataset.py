"""The dataset reader: accepts good folders, rejects each rule's violation with file and line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixer_lite.dataset import DatasetError, load_dataset, validate_dataset


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def make_folder(root: Path, docs=None, queries=None, clicks=None, qrels=None) -> Path:
    """A minimal valid dataset: two docs, two train queries, one test query."""
    (root / "images").mkdir(parents=True)
    for name in ("d1", "d2", "q1", "q2", "q3"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "images" / f"{name}.png")
    _write_jsonl(root / "docs.jsonl", docs if docs is not None else [
        {"doc_id": "d1", "image": "images/d1.png", "text": "red bag", "category": "bags"},
        {"doc_id": "d2", "image": "images/d2.png", "text": "blue mug"}])
    _write_jsonl(root / "queries.jsonl", queries if queries is not None else [
        {"query_id": "q1", "image": "images/q1.png", "split": "train"},
        {"query_id": "q2", "image": "images/q2.png", "split": "train"},
        {"query_id": "q3", "image": "images/q3.png", "split": "test"}])
    _write_jsonl(root / "clicks.jsonl", clicks if clicks is not None else [
        {"query_id": "q1", "doc_id": "d1", "count": 3},
        {"query_id": "q2", "doc_id": "d2", "count": 1}])
    _write_jsonl(root / "qrels.jsonl", qrels if qrels is not None else [
        {"query_id": "q3", "doc_ids": ["d1", "d2"]}])
    return root


def only_problem(root: Path) -> str:
    problems = validate_dataset(root)
    assert len(problems) == 1, [str(p) for p in problems]
    return str(problems[0])


def test_minimal_folder_is_valid_and_loads(tmp_path):
    root = make_folder(tmp_path / "ds")
    assert validate_dataset(root) == []
    data = load_dataset(root)
    assert data.summary == {"docs": 2, "train_queries": 2, "test_queries": 1, "clicks": 2,
                            "click_events": 4, "qrels": 1}
    assert data.docs[1]["category"] is None
    assert data.docs[0]["image"].size == (8, 8)  # decoded lazily through datasets.Image
    assert list(data.query_rows("test")) == [2]


def test_generated_synthshop_is_valid(tiny_dir):
    assert validate_dataset(tiny_dir[0]) == []


# ---- one test per rule of the format -----------------------------------------------------
def test_malformed_json_line(tmp_path):
    root = make_folder(tmp_path / "ds", clicks=[{"query_id": "q1", "doc_id": "d1", "count": 1},
                                                '{"query_id": "q2", "doc_id": '])
    assert only_problem(root).startswith("clicks.jsonl:2: malformed JSON")


def test_empty_line_is_an_error(tmp_path):
    root = make_folder(tmp_path / "ds")
    with open(root / "docs.jsonl", "a") as f:
        f.write("\n")
    assert only_problem(root) == "docs.jsonl:3: empty line"


def test_line_must_be_an_object(tmp_path):
    root = make_folder(tmp_path / "ds", qrels=['["q3", ["d1"]]'])
    assert only_problem(root) == "qrels.jsonl:1: expected a JSON object, got list"


@pytest.mark.parametrize("bad", ["", 7, None])
def test_id_must_be_non_empty_string(tmp_path, bad):
    root = make_folder(tmp_path / "ds", docs=[
        {"doc_id": "d1", "image": "images/d1.png", "text": "a"},
        {"doc_id": bad, "image": "images/d2.png", "text": "b"}],
        clicks=[{"query_id": "q1", "doc_id": "d1", "count": 1}], qrels=[])
    assert only_problem(root).startswith("docs.jsonl:2: doc_id: must be a non-empty string")


def test_missing_id_field(tmp_path):
    root = make_folder(tmp_path / "ds", clicks=[{"doc_id": "d1", "count": 1}])
    assert only_problem(root) == "clicks.jsonl:1: query_id: missing"


def test_duplicate_ids(tmp_path):
    row = {"query_id": "q1", "image": "images/q1.png", "split": "train"}
    root = make_folder(tmp_path / "ds", queries=[
        row, row, {"query_id": "q3", "image": "images/q3.png", "split": "test"}],
        clicks=[{"query_id": "q1", "doc_id": "d1", "count": 1}])
    assert only_problem(root) == "queries.jsonl:2: query_id: duplicate id 'q1' (first on line 1)"


def test_unknown_doc_in_clicks(tmp_path):
    root = make_folder(tmp_path / "ds", clicks=[{"query_id": "q1", "doc_id": "d9", "count": 1}])
    assert only_problem(root).startswith("clicks.jsonl:1: doc_id: unknown doc 'd9'")


def test_unknown_query_in_qrels(tmp_path):
    root = make_folder(tmp_path / "ds", qrels=[{"query_id": "q8", "doc_ids": ["d1"]}])
    assert only_problem(root).startswith("qrels.jsonl:1: query_id: unknown query 'q8'")


def test_unknown_doc_in_qrels(tmp_path):
    root = make_folder(tmp_path / "ds", qrels=[{"query_id": "q3", "doc_ids": ["d1", "zz"]}])
    assert only_problem(root).startswith("qrels.jsonl:1: doc_ids: unknown doc(s) ['zz']")


def test_text_must_be_string(tmp_path):
    root = make_folder(tmp_path / "ds", docs=[
        {"doc_id": "d1", "image": "images/d1.png", "text": 12},
        {"doc_id": "d2", "image": "images/d2.png", "text": "x"}])
    assert only_problem(root) == "docs.jsonl:1: text: must be a string, got int"


def test_category_when_given_is_non_empty_string(tmp_path):
    root = make_folder(tmp_path / "ds", docs=[
        {"doc_id": "d1", "image": "images/d1.png", "text": "a", "category": ""},
        {"doc_id": "d2", "image": "images/d2.png", "text": "x"}])
    assert only_problem(root).startswith("docs.jsonl:1: category: when given, must be")


def test_split_must_be_train_or_test(tmp_path):
    root = make_folder(tmp_path / "ds", queries=[
        {"query_id": "q1", "image": "images/q1.png", "split": "train"},
        {"query_id": "q2", "image": "images/q2.png", "split": "valid"},
        {"query_id": "q3", "image": "images/q3.png", "split": "test"}],
        clicks=[{"query_id": "q1", "doc_id": "d1", "count": 1}])
    assert only_problem(root) == 'queries.jsonl:2: split: must be "train" or "test", got "valid"'


@pytest.mark.parametrize("bad", [0, -2, 1.5, "3", True])
def test_count_must_be_positive_integer(tmp_path, bad):
    root = make_folder(tmp_path / "ds", clicks=[{"query_id": "q1", "doc_id": "d1", "count": bad}])
    assert only_problem(root).startswith("clicks.jsonl:1: count: must be a positive integer")


def test_doc_ids_non_empty(tmp_path):
    root = make_folder(tmp_path / "ds", qrels=[{"query_id": "q3", "doc_ids": []}])
    assert only_problem(root) == "qrels.jsonl:1: doc_ids: must be a non-empty list, got []"


def test_doc_ids_without_repeats(tmp_path):
    root = make_folder(tmp_path / "ds", qrels=[{"query_id": "q3", "doc_ids": ["d1", "d1"]}])
    assert only_problem(root) == "qrels.jsonl:1: doc_ids: repeats a doc id"


def test_qrels_name_test_queries_only(tmp_path):
    root = make_folder(tmp_path / "ds", qrels=[{"query_id": "q3", "doc_ids": ["d1"]},
                                               {"query_id": "q1", "doc_ids": ["d1"]}])
    assert only_problem(root).startswith("qrels.jsonl:2: query_id: 'q1' is not a test query")


def test_test_query_never_in_clicks(tmp_path):
    root = make_folder(tmp_path / "ds", clicks=[{"query_id": "q3", "doc_id": "d1", "count": 1}])
    assert only_problem(root).startswith("clicks.jsonl:1: query_id: 'q3' is a test query")


def test_image_must_exist(tmp_path):
    root = make_folder(tmp_path / "ds")
    os.remove(root / "images" / "q2.png")
    assert only_problem(root) == "queries.jsonl:2: image: file 'images/q2.png' does not exist"


def test_image_must_open(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "images" / "d2.png").write_bytes(b"not a png at all")
    assert only_problem(root).startswith("docs.jsonl:2: image: 'images/d2.png' does not open")


def test_image_absolute_path(tmp_path):
    root = make_folder(tmp_path / "ds")
    docs = [{"doc_id": "d1", "image": str(root / "images/d1.png"), "text": "a"},
            {"doc_id": "d2", "image": "images/d2.png", "text": "b"}]
    _write_jsonl(root / "docs.jsonl", docs)
    assert only_problem(root).startswith("docs.jsonl:1: image: absolute path")


def test_image_dotdot(tmp_path):
    root = make_folder(tmp_path / "ds")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    _write_jsonl(root / "docs.jsonl", [
        {"doc_id": "d1", "image": "images/../../outside.png", "text": "a"},
        {"doc_id": "d2", "image": "images/d2.png", "text": "b"}])
    assert only_problem(root).startswith("docs.jsonl:1: image: path 'images/../../outside.png' "
                                         "leaves the folder")


def test_image_symlink_leading_outside(tmp_path):
    root = make_folder(tmp_path / "ds")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    os.remove(root / "images" / "q1.png")
    os.symlink(tmp_path / "outside.png", root / "images" / "q1.png")
    assert only_problem(root).startswith("queries.jsonl:1: image: 'images/q1.png' is a link "
                                         "that leads outside")


def test_symlink_inside_the_folder_is_fine(tmp_path):
    root = make_folder(tmp_path / "ds")
    os.remove(root / "images" / "q1.png")
    os.symlink(root / "images" / "q2.png", root / "images" / "q1.png")
    assert validate_dataset(root) == []


def test_missing_file(tmp_path):
    root = make_folder(tmp_path / "ds")
    os.remove(root / "qrels.jsonl")
    assert only_problem(root) == "qrels.jsonl: file is missing"


def test_every_problem_is_reported_and_load_refuses(tmp_path):
    root = make_folder(tmp_path / "ds", clicks=[{"query_id": "q1", "doc_id": "d1", "count": 0},
                                                {"query_id": "nope", "doc_id": "d1", "count": 1}],
                       qrels=[{"query_id": "q3", "doc_ids": "d1"}])
    with pytest.raises(DatasetError) as e:
        load_dataset(root)
    where = sorted(f"{p.file}:{p.line}:{p.field}" for p in e.value.problems)
    assert where == ["clicks.jsonl:1:count", "clicks.jsonl:2:query_id", "qrels.jsonl:1:doc_ids"]


def test_extra_files_and_fields_are_ignored(tmp_path):
    root = make_folder(tmp_path / "ds", docs=[
        {"doc_id": "d1", "image": "images/d1.png", "text": "a", "price": 3},
        {"doc_id": "d2", "image": "images/d2.png", "text": "b"}])
    (root / "_truth").mkdir()
    (root / "_truth" / "junk.jsonl").write_text("not json\n")
    assert validate_dataset(root) == []


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mixer_lite.cli", *args], capture_output=True,
                          text=True)


def test_cli_validate_good_and_bad(tmp_path):
    root = make_folder(tmp_path / "ds")
    good = _cli("validate", str(root))
    assert good.returncode == 0
    assert good.stdout.count("\n") == 1 and "valid: 2 docs, 2 train queries" in good.stdout
    os.remove(root / "images" / "d1.png")
    with open(root / "clicks.jsonl", "a") as f:
        f.write("{oops\n")
    bad = _cli("validate", str(root))
    assert bad.returncode == 1
    assert "docs.jsonl:1: image: file 'images/d1.png' does not exist" in bad.stderr
    assert "clicks.jsonl:3: malformed JSON" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_images_are_upright_8_bit_rgb_whatever_their_depth_or_orientation(tmp_path):
    """Hand-computed cases: 16-bit grey scales by 255/65535, float grey in [0, 1] by 255, and
    an EXIF orientation of 6 (rotate 90 degrees clockwise to view) turns the pixels."""
    from PIL import Image

    from mixer_lite.dataset import ImageTable

    grey16 = np.full((8, 8), 32896, np.uint16)              # 32896 / 257 = 128
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    grey_f = np.full((8, 8), 0.25, np.float32)                # 0.25 * 255 = 63.75 -> 64
    Image.fromarray(grey_f, "F").save(tmp_path / "gf.tif")
    rgb = np.zeros((8, 4, 3), np.uint8)
    rgb[:, :2] = 255                                          # white left half, 8 high, 4 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = ImageTable([str(tmp_path / n) for n in ("g16.png", "gf.tif")], 8)[[0, 1]]
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 8, 8)
    assert out[0].unique().tolist() == [128] and out[1].unique().tolist() == [64]
    with Image.open(tmp_path / "rot.jpg") as im:
        from mixer_lite.dataset import to_rgb

        upright = np.asarray(to_rgb(im))
    assert upright.shape == (4, 8, 3)                          # rotated: 4 high, 8 wide
    assert upright[:2].mean() > 200 and upright[2:].mean() < 50  # the white half is on top


def test_a_validate_stamp_spares_later_loads_every_decode_until_the_files_change(tmp_path,
                                                                                 monkeypatch):
    """``mixer-lite validate`` decodes every image and stamps the folder; ``load_dataset`` then
    opens no image (PIL's open made to fail proves it), but still checks every path. A JSONL
    change, a damaged stamp or ``trust_stamp=False`` brings the full check back."""
    import mixer_lite.dataset as ds
    from mixer_lite.cli import main

    root = make_folder(tmp_path / "ds")
    assert main(["validate", str(root)]) == 0
    assert (root / ds.VALID_STAMP).exists()

    def no_decoding(*args, **kwargs):
        raise OSError("an image was opened")

    monkeypatch.setattr(ds.Image, "open", no_decoding)
    assert ds.load_dataset(root).summary["docs"] == 2  # trusted: nothing opened
    with pytest.raises(ds.DatasetError, match="an image was opened"):
        ds.load_dataset(root, trust_stamp=False)
    os.remove(root / "images" / "d1.png")  # paths are still checked under a stamp
    with pytest.raises(ds.DatasetError, match="'images/d1.png' does not exist"):
        ds.load_dataset(root)
    monkeypatch.undo()
    make_folder(tmp_path / "ds2")
    root = tmp_path / "ds2"
    ds.write_valid_stamp(root)
    with open(root / "clicks.jsonl", "a") as f:  # the files changed since the stamp
        f.write("\n")
    monkeypatch.setattr(ds.Image, "open", no_decoding)
    with pytest.raises(ds.DatasetError, match="an image was opened"):
        ds.load_dataset(root)
    (root / ds.VALID_STAMP).write_text("{damaged")
    with pytest.raises(ds.DatasetError, match="an image was opened"):
        ds.load_dataset(root)
