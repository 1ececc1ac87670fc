"""A dataset folder packed into a few Arrow shards: what a job on millions of images reads.

    mixer-lite pack --data data/synth-small --out data/synth-small.packed

Why: from the folder format, every process of a job (each rank, each loader worker) parses every
JSON line and checks every image path before its first step, and each batch opens its images as
millions of small files.  A pack holds the four tables and every image file's bytes in Arrow
files of about ``shard_mb`` each.  Every command that takes ``--data`` reads it as it reads the
folder (:func:`mixer_lite.dataset.load_dataset` tells them apart by ``pack.json``): the tables
are memory-mapped (the ranks and loader workers of a machine share one copy in the page cache),
nothing is parsed or checked again (the images were decoded once, when the pack was made), and
a batch reads its images' bytes from the mapped shards.  ``bench/dataset_load.py`` measures the
time to step 1 against the folder (``bench/README.md``).

Where nothing says how: Arrow files read through ``datasets`` rather than webdataset's tar
shards, because training samples by class (every doc of a class, P classes x K samples, a
class's photos anywhere in the data): that needs any row at any time, which a memory-mapped
Arrow file gives and a tar stream read front to back does not.  The images keep their encoded
bytes (a pack serves any ``image_size``), in ``datasets``' own image column (``{bytes,
path}``), so ``data.docs[i]["image"]`` opens a PIL image as from the folder.  A pack records the
folder's fingerprint, so a run, an index or a record of either form matches the other.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .dataset import (COLUMNS, PACK_FILE, DatasetError, PackedImage, Problem, ShopData,
                      data_fingerprint, load_dataset, shop_data)

FORMAT = "mixer-lite pack"
VERSION = 1
TABLES = ("docs", "queries", "clicks", "qrels")
BATCH_ROWS = 256  # rows per Arrow record batch at most


def is_pack(root: str | os.PathLike) -> bool:
    return (Path(root) / PACK_FILE).is_file()


def _features(table: str):
    import datasets

    string, count = datasets.Value("string"), datasets.Value("int64")
    kinds = {"doc_id": string, "query_id": string, "image": datasets.Image(), "text": string,
             "category": string, "split": string, "count": count,
             "doc_ids": datasets.Sequence(string)}
    return datasets.Features({c: kinds[c] for c in COLUMNS[f"{table}.jsonl"]})


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def pack_dataset(data_dir: str | os.PathLike, out: str | os.PathLike, shard_mb: float = 256.0,
                 progress: bool = True) -> dict:
    """Pack the dataset folder ``data_dir`` into the new folder ``out``; returns its
    ``pack.json``.  The folder is validated first, every image decoded (unless a ``mixer-lite
    validate`` stamp says so already), so a pack never holds a file that does not open."""
    from .files import build_new_folder, write_json

    if shard_mb <= 0:
        raise ValueError(f"--shard-mb must be positive, got {shard_mb}")
    data_dir = Path(data_dir)
    if is_pack(data_dir):
        raise ValueError(f"{data_dir} is a pack already; pack the dataset folder it was made from")
    data = load_dataset(data_dir)

    def write(folder: Path) -> dict:
        from tqdm import tqdm

        images = len(data.docs) + len(data.queries)
        with tqdm(total=images, desc="packing images", disable=not progress,
                  mininterval=2.0) as bar:
            tables = {name: _write_table(data, name, folder, int(shard_mb * 2**20), bar)
                      for name in TABLES}
        meta = {"format": FORMAT, "version": VERSION, "source": data_dir.name,
                "fingerprint": data_fingerprint(data_dir), "summary": data.summary,
                "images": "every one decoded when packed", "tables": tables}
        write_json(folder / PACK_FILE, meta)
        return meta

    return build_new_folder(out, "pack", write)


def _rows(data: ShopData, table: str, bar):
    """The table's rows as the pack stores them: images as their file's bytes and their path
    relative to the folder."""
    ds = getattr(data, table)
    columns = {c: ds.data.column(c).to_pylist() for c in COLUMNS[f"{table}.jsonl"]
               if c != "image"}
    paths = data.column(table, "image_path") if table in ("docs", "queries") else None
    for i in range(len(ds)):
        row = {c: v[i] for c, v in columns.items()}
        if paths is not None:
            row["image"] = {"bytes": Path(paths[i]).read_bytes(),
                            "path": Path(paths[i]).relative_to(data.root).as_posix()}
            bar.update(1)
        yield row


def _write_table(data: ShopData, table: str, folder: Path, shard_bytes: int, bar) -> dict:
    """Write the table as shards ``<table>-00000.arrow``, ... of about ``shard_bytes`` each
    (Arrow's streaming format with ``datasets``' schema, as ``Dataset.from_file`` reads it)."""
    import pyarrow as pa

    features = _features(table)
    schema = features.arrow_schema
    shards: list[dict] = []
    state = {"writer": None, "sink": None, "rows": 0, "size": 0}

    def close() -> None:
        if state["writer"] is not None:
            state["writer"].close()
            state["sink"].close()
            path = folder / shards[-1]["file"]
            shards[-1].update(rows=state["rows"], bytes=path.stat().st_size)
            state.update(writer=None, sink=None, rows=0, size=0)

    def flush(rows: list[dict]) -> None:
        if state["writer"] is None:
            shards.append({"file": f"{table}-{len(shards):05d}.arrow"})
            state["sink"] = pa.OSFile(str(folder / shards[-1]["file"]), "wb")
            state["writer"] = pa.ipc.new_stream(state["sink"], schema)
        batch = pa.RecordBatch.from_pylist([features.encode_example(r) for r in rows],
                                           schema=schema)
        state["writer"].write_batch(batch)
        state["rows"] += len(rows)
        state["size"] += batch.nbytes
        if state["size"] >= shard_bytes:
            close()

    pending: list[dict] = []
    pending_size = 0
    for row in _rows(data, table, bar):
        pending.append(row)
        pending_size += len(row["image"]["bytes"]) if "image" in row else 0
        # A batch also ends where the shard would pass its size: shards overshoot by a row.
        if len(pending) == BATCH_ROWS or state["size"] + pending_size >= shard_bytes:
            flush(pending)
            pending, pending_size = [], 0
    if pending or not shards:  # an empty table is one empty shard
        flush(pending)
    close()
    return {"rows": sum(s["rows"] for s in shards), "shards": shards}


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def read_meta(root: str | os.PathLike) -> dict:
    """``pack.json`` of the pack ``root``, checked; a damaged or foreign one is a
    :class:`DatasetError` naming the file and field."""
    root = Path(root)
    path = root / PACK_FILE

    def bad(field: str | None, message: str):
        return DatasetError(root, [Problem(PACK_FILE, None, field, message)])

    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise bad(None, f"cannot be read ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad("format", f"expected {FORMAT!r}: not a mixer-lite pack")
    if meta.get("version") != VERSION:
        raise bad("version", f"pack version {meta.get('version')!r}; this mixer-lite reads "
                             f"version {VERSION}: make the pack again with `mixer-lite pack`")
    for key, kind in (("fingerprint", str), ("summary", dict), ("tables", dict)):
        if not isinstance(meta.get(key), kind):
            raise bad(key, f"missing or not a {kind.__name__}")
    for table in TABLES:
        entry = meta["tables"].get(table)
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list) or not all(
                isinstance(s, dict) and isinstance(s.get("file"), str)
                and isinstance(s.get("bytes"), int) and isinstance(s.get("rows"), int)
                for s in entry["shards"]):
            raise bad(f"tables.{table}", "missing, or its shards lack file, rows or bytes")
    return meta


def _read_table(root: Path, table: str, meta: dict):
    """The table's shards, memory-mapped, as one ``datasets.Dataset``."""
    import datasets

    parts = []
    for shard in meta["tables"][table]["shards"]:
        path = root / shard["file"]
        problem = None
        if "/" in shard["file"] or shard["file"].startswith("."):
            problem = f"shard name {shard['file']!r} is not a file of the pack"
        elif not path.is_file():
            problem = f"shard {shard['file']} is missing"
        elif path.stat().st_size != shard["bytes"]:
            problem = (f"shard {shard['file']} has {path.stat().st_size} bytes, the pack "
                       f"recorded {shard['bytes']}: damaged or from another pack")
        if problem is None:
            try:
                part = datasets.Dataset.from_file(str(path))
            except Exception as e:  # pyarrow's errors have no common base worth naming
                problem = f"shard {shard['file']} does not read as Arrow ({e})"
            else:
                if len(part) != shard["rows"] or part.features != _features(table):
                    problem = (f"shard {shard['file']} holds {len(part)} rows of "
                               f"{sorted(part.features)}, the pack recorded {shard['rows']} "
                               f"rows of {sorted(_features(table))}")
        if problem:
            raise DatasetError(root, [Problem(PACK_FILE, None, f"tables.{table}", problem)])
        parts.append(part)
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def load_pack(root: str | os.PathLike, check_images: bool = False) -> ShopData:
    """The pack ``root`` as :func:`load_dataset` returns a folder.  Its images were decoded when
    it was packed; ``check_images`` decodes every one again (``mixer-lite validate``)."""
    import datasets

    root = Path(root)
    meta = read_meta(root)
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    try:
        tables = {t: _read_table(root, t, meta) for t in TABLES}
    finally:
        if was:
            datasets.enable_progress_bar()
    data = shop_data(root, packed=True, **tables)
    if check_images:
        problems = [p for t in ("docs", "queries") for p in _image_problems(data, t)]
        if problems:
            raise DatasetError(root, problems)
    return data


def _image_problems(data: ShopData, table: str) -> list[Problem]:
    from PIL import Image

    from .dataset import IMAGE_ERRORS

    problems = []
    for i, f in enumerate(PackedImages(data, table)):
        try:
            with Image.open(f.open()) as im:
                im.load()
        except IMAGE_ERRORS as e:
            problems.append(Problem(f"{table} table of the pack", i + 1, "image",
                                    f"{f.path!r} does not open as an image ({e})"))
    return problems


class PackedImages(Sequence):
    """The image files of ``rows`` (all by default) of a pack's ``docs`` or ``queries``, read
    from the mapped shards when asked for (:class:`mixer_lite.dataset.ImageTable` takes them
    as it takes paths)."""

    def __init__(self, data: ShopData, table: str, rows=None):
        self.where = f"{data.root}, {table}"
        self.column = getattr(data, table).data.column("image")
        n = len(self.column)
        self.rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            raise TypeError("PackedImages takes one index at a time")
        row = int(self.rows[i])
        cell = self.column[row]
        return PackedImage(f"{self.where} row {row + 1}", cell["path"].as_py(),
                           cell["bytes"].as_py())
