"""Fault injection: the CLI over corrupted copies of a small SynthShop folder (conftest's
``mini_dir``), as a user would meet them.

Every case runs a real ``mixer-lite`` command in a process of its own (``_cli``) and asserts what
a user is owed: a non-zero exit, no Python traceback, a message that names the file (and the
line, where the fault has one), and every output that existed before the command
byte-for-byte unchanged.
The cases cover each rule of ``docs/DATASET_FORMAT.md``, damaged images, damaged checkpoints
and model files, and bad arguments.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _cli import TINY_MODEL, cli, plant_payload


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_dataset(src: Path, dst: Path) -> Path:
    """JSONL files copied, images hard-linked (fast, and still inside the new folder)."""
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns("*.jsonl"))
    for name in ("docs.jsonl", "queries.jsonl", "clicks.jsonl", "qrels.jsonl"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def trained(mini_dir, tmp_path_factory):
    """A finished tiny run with an index: the outputs a failing command must leave alone."""
    run = tmp_path_factory.mktemp("faults") / "run"
    r = cli("train", "--data", mini_dir[0], "--out", run, "--steps=4", "--checkpoint_every=2",
            *TINY_MODEL)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("index", "--run", run, "--data", mini_dir[0], "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def edit_line(path: Path, lineno: int, edit) -> None:
    lines = path.read_text().splitlines(keepends=True)
    obj = json.loads(lines[lineno - 1])
    lines[lineno - 1] = (edit(obj) if callable(edit) else edit) + "\n"
    path.write_text("".join(lines))


def set_field(key, value):
    def edit(obj):
        obj[key] = value
        return json.dumps(obj)
    return edit


def first_line_with(path: Path, **match) -> int:
    for i, line in enumerate(path.read_text().splitlines(), 1):
        obj = json.loads(line)
        if all(obj.get(k) == v for k, v in match.items()):
            return i
    raise AssertionError(f"no line of {path} has {match}")


def image_of(root: Path, table: str, lineno: int) -> Path:
    return root / json.loads((root / table).read_text().splitlines()[lineno - 1])["image"]


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()  # a hard link: never write through it into the shared original
    path.write_bytes(data)


def bomb_png() -> bytes:
    """A tiny PNG whose header claims 20000 x 20000 pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


# Each case: (id, corrupt(folder) -> text the message must contain).  Line numbers are those
# of the corrupted line; the data is SynthShop's, whose first lines are known valid.
def _malformed(root):
    edit_line(root / "docs.jsonl", 5, '{"doc_id": "d0000004", "image": ')
    return "docs.jsonl:5"


def _empty_line(root):
    edit_line(root / "queries.jsonl", 3, "")
    return "queries.jsonl:3"


def _not_object(root):
    edit_line(root / "clicks.jsonl", 2, '["q0000001", "d0000002", 1]')
    return "clicks.jsonl:2"


def _non_utf8(root):
    lines = (root / "docs.jsonl").read_bytes().splitlines(keepends=True)
    lines[6] = lines[6].replace(b"lamp", b"l\xff\xfeamp", 1) if b"lamp" in lines[6] else \
        lines[6][:-2] + b"\xff\xfe" + lines[6][-2:]
    (root / "docs.jsonl").write_bytes(b"".join(lines))
    return "docs.jsonl:7"


def _duplicate_doc(root):
    edit_line(root / "docs.jsonl", 4, set_field("doc_id", "d0000000"))
    return "docs.jsonl:4"


def _empty_query_id(root):
    edit_line(root / "queries.jsonl", 2, set_field("query_id", ""))
    return "queries.jsonl:2"


def _unknown_doc_in_clicks(root):
    edit_line(root / "clicks.jsonl", 3, set_field("doc_id", "d9999999"))
    return "clicks.jsonl:3"


def _unknown_query_in_qrels(root):
    edit_line(root / "qrels.jsonl", 2, set_field("query_id", "q9999999"))
    return "qrels.jsonl:2"


def _text_not_string(root):
    edit_line(root / "docs.jsonl", 2, set_field("text", 42))
    return "docs.jsonl:2"


def _empty_category(root):
    edit_line(root / "docs.jsonl", 3, set_field("category", ""))
    return "docs.jsonl:3"


def _bad_split(root):
    edit_line(root / "queries.jsonl", 4, set_field("split", "validation"))
    return "queries.jsonl:4"


def _zero_count(root):
    edit_line(root / "clicks.jsonl", 5, set_field("count", 0))
    return "clicks.jsonl:5"


def _huge_count(root):
    edit_line(root / "clicks.jsonl", 100, set_field("count", 2**70))
    return "clicks.jsonl:100"


def _string_count(root):
    edit_line(root / "clicks.jsonl", 6, set_field("count", "3"))
    return "clicks.jsonl:6"


def _empty_doc_ids(root):
    edit_line(root / "qrels.jsonl", 3, set_field("doc_ids", []))
    return "qrels.jsonl:3"


def _repeated_doc_ids(root):
    edit_line(root / "qrels.jsonl", 4, set_field("doc_ids", ["d0000000", "d0000000"]))
    return "qrels.jsonl:4"


def _qrels_names_train_query(root):
    edit_line(root / "qrels.jsonl", 1, set_field("query_id", "q0000000"))
    return "qrels.jsonl:1"


def _test_query_in_clicks(root):
    test_q = json.loads((root / "qrels.jsonl").read_text().splitlines()[0])["query_id"]
    edit_line(root / "clicks.jsonl", 7, set_field("query_id", test_q))
    return "clicks.jsonl:7"


def _missing_image(root):
    image_of(root, "docs.jsonl", 8).unlink()
    return "docs.jsonl:8"


def _absolute_image(root):
    edit_line(root / "queries.jsonl", 9, set_field("image", "/etc/hostname"))
    return "queries.jsonl:9"


def _dotdot_image(root):
    edit_line(root / "docs.jsonl", 10, set_field("image", "../outside.png"))
    return "docs.jsonl:10"


def _symlink_outside(root):
    target = image_of(root, "docs.jsonl", 11)
    outside = root.parent / f"{root.name}-outside.png"
    shutil.copy(target, outside)
    target.unlink()
    target.symlink_to(outside)
    return "docs.jsonl:11"


def _zero_byte_doc_image(root):
    replace_file(image_of(root, "docs.jsonl", 12), b"")
    return "docs.jsonl:12"


def _truncated_query_image(root):
    path = image_of(root, "queries.jsonl", 13)
    replace_file(path, path.read_bytes()[:60])
    return "queries.jsonl:13"


def _bomb_image(root):
    replace_file(image_of(root, "docs.jsonl", 14), bomb_png())
    return "docs.jsonl:14"


def _missing_qrels(root):
    (root / "qrels.jsonl").unlink()
    return "qrels.jsonl"


def _half_truncated_image(root):
    """A JPEG photo cut in the middle of its scan: its header is whole, so it opens."""
    path = image_of(root, "queries.jsonl", 15)
    replace_file(path, path.read_bytes()[: path.stat().st_size // 2])
    return "queries.jsonl:15"


def _garbage_pixels_valid_crc(root):
    """A PNG whose IDAT chunk holds garbage under a correct CRC: only decoding finds it."""
    import struct
    import zlib

    path = image_of(root, "docs.jsonl", 16)
    data = path.read_bytes()
    at = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[at: at + 4])
    junk = bytes((i * 37 + 11) % 256 for i in range(length))
    chunk = data[at: at + 4] + b"IDAT" + junk + \
        struct.pack(">I", zlib.crc32(b"IDAT" + junk) & 0xFFFFFFFF)
    replace_file(path, data[:at] + chunk + data[at + 12 + length:])
    return "docs.jsonl:16"


def _symlink_loop(root):
    path = image_of(root, "docs.jsonl", 17)
    path.unlink()
    loop = path.with_name("loop.png")
    loop.symlink_to(path.name)
    path.symlink_to(loop.name)
    return "docs.jsonl:17"


DATA_FAULTS = [_malformed, _empty_line, _not_object, _non_utf8, _duplicate_doc,
               _empty_query_id, _unknown_doc_in_clicks, _unknown_query_in_qrels,
               _text_not_string, _empty_category, _bad_split, _zero_count, _huge_count,
               _string_count, _empty_doc_ids, _repeated_doc_ids, _qrels_names_train_query,
               _test_query_in_clicks, _missing_image, _absolute_image, _dotdot_image,
               _symlink_outside, _zero_byte_doc_image, _truncated_query_image, _bomb_image,
               _missing_qrels, _half_truncated_image, _garbage_pixels_valid_crc, _symlink_loop]


def assert_refused(r, *named):
    assert r.returncode != 0, r.stdout[-1000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for text in named:
        assert text in r.stderr, (text, r.stderr[-2000:])


@pytest.mark.parametrize("fault", DATA_FAULTS, ids=lambda f: f.__name__.strip("_"))
def test_every_fault_is_named_by_file_and_line_when_the_folder_is_read(fault, mini_dir,
                                                                       tmp_path):
    """What every command reads a folder with (``load_dataset``, images opened) refuses each
    fault, naming its file and line; the commands themselves are run on a sample below."""
    from mixer_lite.dataset import DatasetError, load_dataset

    data = copy_dataset(mini_dir[0], tmp_path / "data")
    where = fault(data)
    with pytest.raises(DatasetError) as refused:
        load_dataset(data)
    assert where in str(refused.value)


# One fault of each kind, through the whole command: a line that is not JSON, a reference to
# nothing, a missing and a hostile image, a link out of the folder, a missing file.
@pytest.mark.parametrize("fault", [_malformed, _unknown_doc_in_clicks, _missing_image, _bomb_image,
                                   _symlink_outside, _missing_qrels],
                         ids=lambda f: f.__name__.strip("_"))
def test_evaluate_refuses_a_broken_folder_and_leaves_the_run_alone(fault, mini_dir, trained,
                                                                   tmp_path):
    data = copy_dataset(mini_dir[0], tmp_path / "data")
    where = fault(data)
    before = snapshot(trained)
    r = cli("evaluate", "--run", trained, "--data", data, "--quiet")
    assert_refused(r, where)
    assert snapshot(trained) == before


@pytest.mark.parametrize("fault", [_zero_byte_doc_image, _truncated_query_image, _bomb_image,
                                   _huge_count], ids=lambda f: f.__name__.strip("_"))
def test_train_checks_its_input_before_any_work(fault, mini_dir, tmp_path):
    data = copy_dataset(mini_dir[0], tmp_path / "data")
    where = fault(data)
    r = cli("train", "--data", data, "--out", tmp_path / "run", "--steps=2", *TINY_MODEL)
    assert_refused(r, where)
    assert not (tmp_path / "run").exists()  # nothing half-made left behind


def test_build_classes_blames_the_line_of_a_huge_count_and_keeps_its_output(mini_dir,
                                                                           tmp_path):
    data = copy_dataset(mini_dir[0], tmp_path / "data")
    where = _huge_count(data)
    out = tmp_path / "classes.jsonl"
    out.write_text("precious\n")
    assert_refused(cli("build-classes", "--data", data, "--out", out), where)
    assert out.read_text() == "precious\n"


def test_build_classes_on_empty_clicks_writes_nothing_and_fails(mini_dir, tmp_path):
    data = copy_dataset(mini_dir[0], tmp_path / "data")
    (data / "clicks.jsonl").write_text("")
    assert_refused(cli("build-classes", "--data", data, "--out", tmp_path / "c.jsonl"),
                   "clicks.jsonl", "no clicks")
    assert not (tmp_path / "c.jsonl").exists()


def test_a_missing_folder_is_called_missing(tmp_path):
    r = cli("validate", tmp_path / "nowhere")
    assert_refused(r, "nowhere", "no such folder")


def test_validate_reports_a_decompression_bomb_as_a_bad_image(mini_dir, tmp_path):
    data = copy_dataset(mini_dir[0], tmp_path / "data")
    where = _bomb_image(data)
    r = cli("validate", data)
    assert_refused(r, where, "does not open as an image")


@pytest.mark.parametrize("fault", [_half_truncated_image, _garbage_pixels_valid_crc,
                                   _symlink_loop], ids=lambda f: f.__name__.strip("_"))
def test_validate_decodes_every_image(fault, mini_dir, tmp_path):
    """What only a whole decode finds (a cut JPEG, garbage pixels under valid CRCs) and a link
    loop: validate reports them, so train never fails later on a folder called valid."""
    data = copy_dataset(mini_dir[0], tmp_path / "data")
    where = fault(data)
    r = cli("validate", data)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{where}: image" in r.stderr


# ---- damaged checkpoints and model files ----------------------------------------------------
def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def test_a_truncated_model_file_is_named(mini_dir, trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    model = run / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    before = snapshot(run)
    for r in (cli("evaluate", "--run", run, "--data", mini_dir[0], "--quiet"),
              cli("index", "--run", run, "--data", mini_dir[0], "--quiet"),
              cli("search", "--run", run, "--data", mini_dir[0], "--image",
                  image_of(mini_dir[0], "queries.jsonl", 1))):
        assert_refused(r, str(model), "damaged model file")
    assert snapshot(run) == before


def test_a_truncated_checkpoint_is_named_before_any_data_is_read(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    ckpt = run / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    before = snapshot(run)
    # The data folder does not even exist: the checkpoint is checked first.
    r = cli("train", "--data", tmp_path / "no-data", "--out", run, "--resume", "--steps=4",
            "--checkpoint_every=2", *TINY_MODEL)
    assert_refused(r, str(ckpt), "damaged checkpoint")
    assert snapshot(run) == before


def test_a_crafted_model_file_is_refused_and_runs_nothing(mini_dir, trained, tmp_path):
    """A model.pt whose pickle calls a function: every command that loads it refuses it, and
    the call never happens (the marker file it would create stays absent)."""
    run = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "ran"
    plant_payload(run / "model.pt", marker)
    before = snapshot(run)
    for r in (cli("evaluate", "--run", run, "--data", mini_dir[0], "--quiet"),
              cli("index", "--run", run, "--data", mini_dir[0], "--quiet"),
              cli("search", "--run", run, "--data", mini_dir[0], "--image",
                  image_of(mini_dir[0], "queries.jsonl", 1))):
        assert_refused(r, str(run / "model.pt"), "refused", "would run")
        assert not marker.exists()
    assert snapshot(run) == before


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(mini_dir, trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "ran"
    ckpt = run / "checkpoints" / "last.pt"
    plant_payload(ckpt, marker)
    before = snapshot(run)
    r = cli("train", "--data", mini_dir[0], "--out", run, "--resume", "--steps=4",
            "--checkpoint_every=2", *TINY_MODEL)
    assert_refused(r, str(ckpt), "refused")
    assert not marker.exists() and snapshot(run) == before


@pytest.mark.parametrize("changed", [["--steps=5"], ["--lr=0.1"], ["--model.embed_dim=16"]])
def test_resume_with_other_settings_is_refused_naming_them(mini_dir, trained, tmp_path,
                                                           changed):
    run = copy_run(trained, tmp_path / "run")
    before = snapshot(run)
    args = [a for a in ["--steps=4", "--checkpoint_every=2", *TINY_MODEL]
            if a.split("=")[0] not in {c.split("=")[0] for c in changed}]
    r = cli("train", "--data", mini_dir[0], "--out", run, "--resume", *args, *changed)
    key = changed[0][2:].split("=")[0]
    assert_refused(r, str(run), key, "config.json")
    assert snapshot(run) == before


# ---- runs that must not look finished ------------------------------------------------------
def strict_lines(path: Path) -> list[dict]:
    """A JSON Lines file read as strict JSON readers do (a bare NaN or Infinity is an error)."""
    def refuse(word):
        raise AssertionError(f"{path} holds a bare {word}")
    return [json.loads(x, parse_constant=refuse) for x in path.read_text().splitlines()]


def test_a_diverging_run_stops_naming_the_learning_rate_and_saves_no_model(mini_dir, tmp_path):
    r = cli("train", "--data", mini_dir[0], "--out", tmp_path / "run", "--lr=1e9",
            "--steps=6", "--log_every=1", "--checkpoint_every=1", *TINY_MODEL)
    assert_refused(r, "diverged", "--lr=1e+09", str(tmp_path / "run"))
    assert not (tmp_path / "run" / "model.pt").exists()
    initial, *log = strict_lines(tmp_path / "run" / "metrics.jsonl")
    assert initial["step"] == 0 and "loss" not in initial  # the initial weights' validation
    assert all(isinstance(x["loss"], float) for x in log)  # only finite steps were logged
    again = cli("index", "--run", tmp_path / "run", "--data", mini_dir[0], "--quiet")
    assert_refused(again, "model.pt")


# ---- indexes --------------------------------------------------------------------------------
def test_search_refuses_an_index_of_another_build_or_model(mini_dir, trained, tmp_path):
    """docs.faiss replaced under its meta.json (an index killed or running), and an index left
    from before the run's model was trained again: both are refused, never answered."""
    photo = image_of(mini_dir[0], "queries.jsonl", 1)
    run = copy_run(trained, tmp_path / "run")
    faiss_file = run / "index" / "docs.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:-32 * 4 * 17])  # 17 vectors fewer
    assert_refused(cli("search", "--run", run, "--data", mini_dir[0], "--image", photo),
                   str(faiss_file), "mixer-lite index")
    run = copy_run(trained, tmp_path / "run2")
    model = run / "model.pt"
    obj = torch.load(model, weights_only=True)
    obj["state_dict"] = {k: v + 1 if v.is_floating_point() else v
                         for k, v in obj["state_dict"].items()}
    torch.save(obj, model)  # the run trained again: other weights, same data
    r = cli("search", "--run", run, "--data", mini_dir[0], "--image", photo)
    assert_refused(r, str(model), "mixer-lite index")
    assert r.stdout == ""


def test_search_prints_control_characters_as_escapes(mini_dir, trained, tmp_path):
    data = copy_dataset(mini_dir[0], tmp_path / "data")
    forged = "red hat\n1\td0000000\t0.9999\tfake\x1b[31m"
    lines = (data / "docs.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):  # every title forged, so whatever comes back shows it
        lines[i] = json.dumps({**json.loads(line), "text": forged})
    (data / "docs.jsonl").write_text("\n".join(lines) + "\n")
    run = copy_run(trained, tmp_path / "run")
    assert cli("index", "--run", run, "--data", data, "--quiet").returncode == 0
    r = cli("search", "--run", run, "--data", data, "--k", "3", "--image",
            image_of(data, "queries.jsonl", 1))
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.splitlines()
    assert len(out) == 4 and "\x1b" not in r.stdout
    assert all(x.split("\t")[3] == "red hat\\n1\\td0000000\\t0.9999\\tfake\\x1b[31m"
               for x in out[1:])


def test_search_skips_a_fifo_in_a_folder_and_refuses_one_named(mini_dir, trained, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(image_of(mini_dir[0], "queries.jsonl", 1), folder / "a.png")
    os.mkfifo(folder / "b.png")
    r = cli("search", "--run", trained, "--data", mini_dir[0], "--image", folder)
    assert r.returncode == 0 and r.stdout.count("# ") == 1, r.stderr[-2000:]
    assert_refused(cli("search", "--run", trained, "--data", mini_dir[0], "--image",
                       folder / "b.png"), "not a regular file")


# ---- run folders: one writer, one run ------------------------------------------------------
def test_a_run_folder_without_checkpoints_is_not_reused(mini_dir, trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    r = cli("train", "--data", mini_dir[0], "--out", run, "--steps=4", *TINY_MODEL)
    assert_refused(r, str(run), "model.pt", "index", "no checkpoint")
    assert snapshot(run) == before


def test_a_fresh_run_into_a_folder_killed_before_its_first_checkpoint_starts_its_log_anew(
        mini_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"train": {}}\n')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    r = cli("train", "--data", mini_dir[0], "--out", run, "--steps=3", "--log_every=1",
            "--eval_at_end=false", *TINY_MODEL)
    assert r.returncode == 0, r.stderr[-2000:]
    initial, *log = strict_lines(run / "metrics.jsonl")
    assert initial["step"] == 0 and "loss" not in initial  # the initial weights' validation
    assert [x["step"] for x in log] == [1, 2, 3] and all(x["loss"] != 9.0 for x in log)


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_first(mini_dir, trained,
                                                                      tmp_path):
    from mixer_lite.files import folder_lock

    run = copy_run(trained, tmp_path / "run")
    with folder_lock(run, "train"):  # as a train or index running now
        before = snapshot(run)
        for r in (cli("train", "--data", mini_dir[0], "--out", run, "--resume", "--steps=4",
                      "--checkpoint_every=2", *TINY_MODEL),
                  cli("index", "--run", run, "--data", mini_dir[0], "--quiet")):
            assert_refused(r, str(run), "in use by another mixer-lite process",
                           f"pid {os.getpid()}")
        assert snapshot(run) == before
    r = cli("index", "--run", run, "--data", mini_dir[0], "--quiet")  # the lock is gone with it
    assert r.returncode == 0, r.stderr[-2000:]


def test_resume_on_other_data_is_refused(mini_dir, trained, tmp_path):
    data = copy_dataset(mini_dir[0], tmp_path / "data")
    edit_line(data / "docs.jsonl", 3, set_field("text", "another title"))
    run = copy_run(trained, tmp_path / "run")
    before = snapshot(run)
    r = cli("train", "--data", data, "--out", run, "--resume", "--steps=4",
            "--checkpoint_every=2", *TINY_MODEL)
    assert_refused(r, str(run), "other data", "fingerprint")
    assert snapshot(run) == before


def test_an_edit_that_keeps_the_modification_time_is_read(mini_dir, tmp_path):
    """The tables come from the lines just read, never from a cache keyed on the file's path
    and mtime; and no cache folder is needed (here it is a file, so none can be made)."""
    from mixer_lite.dataset import load_dataset

    data = copy_dataset(mini_dir[0], tmp_path / "data")
    docs = data / "docs.jsonl"
    assert load_dataset(data, check_images=False).doc_texts[2] != "x" * 5
    stamp = docs.stat()
    edit_line(docs, 3, set_field("text", "x" * 5))
    os.utime(docs, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    (tmp_path / "cache").write_text("not a folder")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import sys; from mixer_lite.dataset import "
                        "load_dataset; print(load_dataset(sys.argv[1]).doc_texts[2])", data],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "x" * 5, r.stderr[-2000:]


# ---- outputs that cannot be written ---------------------------------------------------------
def test_outputs_of_the_wrong_kind_are_refused_before_any_work(mini_dir, trained, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [(cli("train", "--data", mini_dir[0], "--out", afile, *TINY_MODEL), str(afile)),
             (cli("build-classes", "--data", mini_dir[0], "--out", tmp_path / "adir"),
              "is a folder"),
             (cli("build-classes", "--data", mini_dir[0], "--out", afile / "c.jsonl"),
              "is a file, not a folder"),
             (cli("make-data", "--preset", "tiny", "--out", afile / "d"), str(afile)),
             (cli("evaluate", "--run", trained, "--data", mini_dir[0], "--quiet",
                  "--compare-out", tmp_path / "adir"), "is a folder")]
    for r, named in cases:
        assert_refused(r, named)
    assert afile.read_text() == "x" and not any((tmp_path / "adir").iterdir())


def test_a_full_disk_during_training_is_named_not_a_torch_internal(mini_dir, tmp_path):
    """A file-size limit stands in for a full disk: writes past it fail as they would there."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
    r = subprocess.run([sys.executable, "-m", "mixer_lite.cli", "train", "--data",
                        str(mini_dir[0]), "--out", str(tmp_path / "run"), "--steps=2",
                        *TINY_MODEL], capture_output=True, text=True, preexec_fn=limit)
    assert_refused(r, str(tmp_path / "run"), "writing failed")
    assert "inline_container" not in r.stderr


def keep_first_docs(root: Path, n: int) -> None:
    """Cut a dataset folder down to its first ``n`` docs, with the clicks and qrels that stay
    valid (what a small shop of a user's would be)."""
    def rewrite(name, keep):
        rows = [json.loads(x) for x in (root / name).read_text().splitlines()]
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in map(keep, rows) if r))
    ids = {json.loads(x)["doc_id"] for x in (root / "docs.jsonl").read_text().splitlines()[:n]}
    rewrite("docs.jsonl", lambda r: r if r["doc_id"] in ids else None)
    rewrite("clicks.jsonl", lambda r: r if r["doc_id"] in ids else None)
    rewrite("qrels.jsonl", lambda r: {**r, "doc_ids": [d for d in r["doc_ids"] if d in ids]}
            if set(r["doc_ids"]) & ids else None)


def test_evaluate_refuses_ivfpq_over_too_few_docs_before_embedding(mini_dir, trained, tmp_path):
    data = copy_dataset(mini_dir[0], tmp_path / "data")
    keep_first_docs(data, 100)
    assert cli("validate", data).returncode == 0
    before = snapshot(trained)
    for r in (cli("evaluate", "--run", trained, "--data", data, "--index", "ivfpq"),
              cli("index", "--run", trained, "--data", data, "--index", "ivfpq")):
        assert_refused(r, "ivfpq", "at least 256 docs", "there are 100")
    assert snapshot(trained) == before


def test_a_run_config_of_wrong_types_is_named_before_evaluating(mini_dir, trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    (run / "config.json").write_text("[]")
    r = cli("evaluate", "--run", run, "--data", mini_dir[0], "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]  # scored as a run of unknown data, by name
    assert list(run.glob("eval-mini-*.json"))


def test_a_model_file_whose_export_lacks_keys_is_named(mini_dir, trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    obj = torch.load(run / "model.pt", weights_only=True)
    del obj["export"]["model"]
    torch.save(obj, run / "model.pt")
    r = cli("evaluate", "--run", run, "--data", mini_dir[0], "--quiet")
    assert_refused(r, str(run / "model.pt"), "model config")


def test_make_data_checks_its_seed_before_creating_anything(tmp_path):
    r = cli("make-data", "--preset", "tiny", "--seed", "-1", "--out", tmp_path / "d")
    assert_refused(r, "--seed")
    assert list(tmp_path.iterdir()) == []


def test_make_data_recovers_from_a_killed_run(tmp_path):
    partial = tmp_path / ".d.partial"
    (partial / "images").mkdir(parents=True)
    (partial / "docs.jsonl.part").write_text("half")  # what a kill -9 left
    r = cli("make-data", "--preset", "tiny", "--out", tmp_path / "d", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert cli("validate", tmp_path / "d").returncode == 0


# ---- arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", ["0", "-1", "many"])
def test_search_refuses_a_bad_k(mini_dir, trained, k):
    r = cli("search", "--run", trained, "--data", mini_dir[0], "--k", k, "--image",
            image_of(mini_dir[0], "queries.jsonl", 1))
    assert_refused(r, "--k")


@pytest.mark.parametrize("arg,named", [("--checkpoint_every=0", "checkpoint_every"),
                                        ("--log_every=0", "log_every"),
                                        ("--device=gpu", "--device=gpu"),
                                        ("--val_share=1.5", "val_share"),
                                        ("--model.image_size=1", "image_size"),
                                        ("--model.vit_dim=0", "vit_dim=0"),
                                        ("--model.max_text_len=0", "max_text_len=0"),
                                        ("--model.text_heads=3", "text_heads=3"),
                                        ("--threads=-1", "threads"),
                                        ("--device=meta", "--device=meta"),
                                        ("--clip_grad=-1", "clip_grad"),
                                        ("--warmup_frac=-1", "warmup_frac"),
                                        ("--scale=0", "scale"),
                                        ("--margin=-5", "margin")])
def test_train_refuses_bad_settings_before_any_work(mini_dir, tmp_path, arg, named):
    r = cli("train", "--data", mini_dir[0], "--out", tmp_path / "run", *TINY_MODEL, arg)
    assert_refused(r, named)
    assert not (tmp_path / "run").exists()


def test_train_on_cuda_without_a_gpu_is_refused(mini_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: --device=cuda is valid here")
    r = cli("train", "--data", mini_dir[0], "--out", tmp_path / "run", "--device=cuda",
            *TINY_MODEL)
    assert_refused(r, "--device=cuda", "no CUDA GPU")
    assert not (tmp_path / "run").exists()


def test_a_bare_flag_is_named_alone(mini_dir, tmp_path):
    r = cli("train", "--data", mini_dir[0], "--out", tmp_path / "run", "--lr", "--steps=3")
    assert_refused(r, "--lr")
    assert "--steps=3" not in r.stderr


def test_an_oversized_batch_is_refused_with_an_estimate(mini_dir, tmp_path):
    r = cli("train", "--data", mini_dir[0], "--out", tmp_path / "run",
            "--batch_size=50000000", "--steps=1", *TINY_MODEL[:-2])
    assert_refused(r, "batch_size=50000000", "GiB")


@pytest.mark.parametrize("command", ["evaluate", "index", "search", "serve"])
def test_the_other_commands_on_cuda_without_a_gpu_are_refused(mini_dir, trained, tmp_path,
                                                              command):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: --device=cuda is valid here")
    extra = {"search": ["--image", tmp_path]}.get(command, [])
    if command == "search":
        (tmp_path / "p.png").write_bytes((mini_dir[0] / jsonl_first_image(mini_dir[0]))
                                         .read_bytes())
    before = snapshot(trained)
    r = cli(command, "--run", trained, "--data", mini_dir[0], "--device=cuda", *extra)
    assert_refused(r, "--device=cuda", "no CUDA GPU")
    assert snapshot(trained) == before


def jsonl_first_image(data) -> str:
    return json.loads((data / "queries.jsonl").read_text().splitlines()[0])["image"]
