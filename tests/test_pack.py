"""The packed form of a dataset (``mixer-lite pack``): the folder's tables and image bytes in
Arrow shards, read back as the folder reads, and damage named by file and field."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _cli import cli
from mixer_lite.dataset import (DatasetError, ImageError, ImageTable, data_fingerprint,
                                image_files, load_dataset, write_valid_stamp)
from mixer_lite.pack import PACK_FILE, pack_dataset, read_meta


def test_a_pack_reads_back_as_its_folder(tiny_data, tiny_pack):
    pack = load_dataset(tiny_pack)
    assert pack.packed and not tiny_data.packed
    meta = read_meta(tiny_pack)
    assert all(len(meta["tables"][t]["shards"]) > 1 for t in ("docs", "queries"))
    assert data_fingerprint(tiny_pack) == data_fingerprint(tiny_data.root)
    assert pack.summary == tiny_data.summary
    for table, columns in (("docs", ["doc_id", "text", "category"]),
                           ("queries", ["query_id", "split"]),
                           ("clicks", ["query_id", "doc_id", "count"]),
                           ("qrels", ["query_id", "doc_ids"])):
        for c in columns:
            assert pack.column(table, c) == tiny_data.column(table, c), (table, c)
    for table in ("docs", "queries"):
        paths, packed = image_files(tiny_data, table), image_files(pack, table)
        assert len(packed) == len(paths)
        for i in range(0, len(paths), 97):  # every file's bytes, a sample of them by name
            assert packed[i].data == open(paths[i], "rb").read()
            assert tiny_data.root / packed[i].path == Path(paths[i])
        rows = [0, 5, len(paths) - 1]
        assert np.array_equal(ImageTable(image_files(pack, table, rows), 64)[[0, 1, 2]].numpy(),
                              ImageTable(image_files(tiny_data, table, rows), 64)[[0, 1, 2]]
                              .numpy())
    # The datasets image column opens as from the folder.
    assert np.array_equal(np.asarray(pack.docs[3]["image"]),
                          np.asarray(tiny_data.docs[3]["image"]))


def test_pack_refuses_a_pack_and_a_used_folder(tiny_dir, tiny_pack, tmp_path):
    with pytest.raises(ValueError, match="is a pack already"):
        pack_dataset(tiny_pack, tmp_path / "again", progress=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        pack_dataset(tiny_dir[0], tmp_path / "used", progress=False)
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"


def _damage(pack, how):
    meta = json.loads((pack / PACK_FILE).read_text())
    shard = pack / meta["tables"]["docs"]["shards"][0]["file"]
    if how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif how == "missing shard":
        shard.unlink()
    elif how == "shard of another table":
        other = pack / meta["tables"]["queries"]["shards"][0]["file"]
        meta["tables"]["docs"]["shards"][0]["bytes"] = other.stat().st_size
        shutil.copy(other, shard)
    elif how == "shard outside the pack":
        meta["tables"]["docs"]["shards"][0]["file"] = "../elsewhere.arrow"
    elif how == "garbage shard":
        shard.write_bytes(b"\0" * shard.stat().st_size)
    elif how == "newer version":
        meta["version"] = 99
    elif how == "no tables":
        del meta["tables"]
    elif how == "not JSON":
        (pack / PACK_FILE).write_text("{not json")
        return
    (pack / PACK_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("how,message", [
    ("truncated shard", "docs-00000.arrow has 1000 bytes"),
    ("missing shard", "docs-00000.arrow is missing"),
    ("shard of another table", "docs-00000.arrow holds"),
    ("shard outside the pack", "'../elsewhere.arrow' is not a file of the pack"),
    ("garbage shard", "docs-00000.arrow does not read as Arrow"),
    ("newer version", "pack version 99"),
    ("no tables", "tables: missing"),
    ("not JSON", "cannot be read"),
])
def test_a_damaged_pack_is_named_by_file_and_field(tiny_pack, tmp_path, how, message):
    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack, pack)
    _damage(pack, how)
    with pytest.raises(DatasetError, match="pack.json") as e:
        load_dataset(pack)
    assert message in str(e.value)
    if how == "truncated shard":  # the command says it too (one case: a process costs seconds)
        result = cli("validate", pack)
        assert result.returncode == 1 and message in result.stderr


def test_validate_decodes_every_packed_image_and_training_names_a_bad_one(tiny_dir, tmp_path):
    """A file damaged after its folder was stamped is packed as it is (the stamp is trusted);
    `validate` on the pack decodes every image and names it, and reading it names the pack's
    row and the file."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_dir[0], folder)
    write_valid_stamp(folder)
    data = load_dataset(folder)
    bad = image_files(data, "docs", [7])[0]
    with open(bad, "r+b") as f:
        f.truncate(200)
    pack_dataset(folder, tmp_path / "pack", progress=False)
    result = cli("validate", tmp_path / "pack")
    name = str(Path(bad).relative_to(folder))
    assert result.returncode == 1
    assert f"docs table of the pack:8: image: {name!r} does not open" in result.stderr
    packed = image_files(load_dataset(tmp_path / "pack"), "docs")
    with pytest.raises(ImageError, match=f"docs row 8 \\({name}\\): cannot read the image"):
        ImageTable(packed, 64, preload=False)[[6, 7]]


def test_the_pack_command(tiny_dir, tmp_path):
    result = cli("pack", "--data", tiny_dir[0], "--out", tmp_path / "p", "--shard-mb", "1",
                 "--quiet")
    assert result.returncode == 0, result.stderr
    meta = read_meta(tmp_path / "p")
    sizes = [s["bytes"] for t in meta["tables"].values() for s in t["shards"]]
    assert f"in {len(sizes)} shards, {sum(sizes) / 2**20:.1f} MiB" in result.stdout
    # An image table's shard closes at the first row past the size asked for (these images
    # are a few kB each).
    full = [s["bytes"] for t in ("docs", "queries") for s in meta["tables"][t]["shards"][:-1]]
    assert full and all(2**20 <= b < 2**20 + 2**15 for b in full), full
    assert cli("validate", tmp_path / "p").returncode == 0
