"""Read and validate a dataset folder (``docs/DATASET_FORMAT.md``) into Hugging Face datasets.

Every dataset mixer-lite touches, SynthShop or a user's own export, is one folder of four JSON
Lines files and the images they name.  This module is the one gate between those files and the
rest of the package: :func:`validate_dataset` checks every rule of the format and reports *every*
problem with its file, line and field; :func:`load_dataset` refuses a folder with problems, then
loads the four tables with ``datasets`` (images decoded lazily, on access).

Validation is plain Python over the lines, before any Arrow or torch code sees them, so bad
input never surfaces as a pyarrow, PIL or torch traceback.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FILES = ("docs.jsonl", "queries.jsonl", "clicks.jsonl", "qrels.jsonl")
MAX_COUNT = 2**63 - 1  # counts are summed as int64
# What opening an image can raise besides OSError: PIL's DecompressionBombError (a header that
# claims more pixels than Image.MAX_IMAGE_PIXELS allows), and SyntaxError / ValueError from
# some damaged files.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, zlib.error,
                Image.DecompressionBombError)


@dataclass(frozen=True)
class Problem:
    """One violation of the format: where it is and what is wrong."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class DatasetError(ValueError):
    """A dataset folder that breaks the format; ``problems`` lists every violation found."""

    def __init__(self, root: Path, problems: list[Problem]):
        self.root = root
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{root}: {len(problems)} problem(s) in the dataset folder:\n{shown}{more}")


# --------------------------------------------------------------------------------------------
# Line-level checks
# --------------------------------------------------------------------------------------------
def _read_records(root: Path, name: str, problems: list[Problem]) -> list[tuple[int, dict]]:
    """(line number, object) for every well-formed line; a problem for every other line."""
    path = root / name
    if not path.is_file():
        problems.append(Problem(name, None, None, "file is missing"))
        return []
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(Problem(name, lineno, None, f"not valid UTF-8 ({e.reason})"))
                continue
            if not text.strip():
                problems.append(Problem(name, lineno, None, "empty line"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(Problem(name, lineno, None, f"malformed JSON ({e.msg})"))
                continue
            if not isinstance(obj, dict):
                problems.append(Problem(name, lineno, None,
                                        f"expected a JSON object, got {type(obj).__name__}"))
                continue
            records.append((lineno, obj))
    return records


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _check_id(name: str, lineno: int, obj: dict, key: str, problems: list[Problem]) -> bool:
    value = obj.get(key)
    if key not in obj:
        problems.append(Problem(name, lineno, key, "missing"))
    elif not isinstance(value, str) or not value:
        problems.append(Problem(name, lineno, key,
                                f"must be a non-empty string, got {json.dumps(value)}"))
    else:
        return True
    return False


def _check_unique(name: str, key: str, records: list[tuple[int, dict]],
                  problems: list[Problem]) -> dict[str, int]:
    """Map id -> first line, with a problem for every repeat."""
    seen: dict[str, int] = {}
    for lineno, obj in records:
        value = obj[key]
        if value in seen:
            problems.append(Problem(name, lineno, key,
                                    f"duplicate id {value!r} (first on line {seen[value]})"))
        else:
            seen[value] = lineno
    return seen


def _check_image(root: Path, real_root: Path, name: str, lineno: int, obj: dict,
                 check_images: bool, problems: list[Problem]) -> bool:
    value = obj.get("image")
    if "image" not in obj:
        problems.append(Problem(name, lineno, "image", "missing"))
        return False
    if not isinstance(value, str) or not value:
        problems.append(Problem(name, lineno, "image",
                                f"must be a non-empty relative path, got {json.dumps(value)}"))
        return False
    if os.path.isabs(value) or value.startswith(("/", "\\")):
        problems.append(Problem(name, lineno, "image", f"absolute path {value!r} not allowed"))
        return False
    if ".." in Path(value.replace("\\", "/")).parts:
        problems.append(Problem(name, lineno, "image", f"path {value!r} leaves the folder ('..')"))
        return False
    path = root / value
    try:
        real = path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a link loop so; later ones raise OSError
        problems.append(Problem(name, lineno, "image", f"{value!r} is a symbolic link loop"))
        return False
    except OSError as e:
        problems.append(Problem(name, lineno, "image", f"file {value!r} does not exist"
                                if isinstance(e, FileNotFoundError) else
                                f"{value!r} cannot be resolved ({e.strerror})"))
        return False
    if real != real_root and real_root not in real.parents:
        problems.append(Problem(name, lineno, "image",
                                f"{value!r} is a link that leads outside the dataset folder"))
        return False
    if not real.is_file():
        problems.append(Problem(name, lineno, "image", f"{value!r} is not a file"))
        return False
    if check_images:
        try:  # a whole decode: verify() passes a cut JPEG or a PNG of garbage with valid CRCs
            with Image.open(real) as im:
                im.load()
        except IMAGE_ERRORS as e:
            problems.append(Problem(name, lineno, "image",
                                    f"{value!r} does not open as an image ({e})"))
            return False
    return True


# --------------------------------------------------------------------------------------------
# Folder-level validation
# --------------------------------------------------------------------------------------------
def validate_dataset(root: str | os.PathLike, check_images: bool = True) -> list[Problem]:
    """Every violation of the format in the folder ``root``; an empty list means valid.

    ``check_images=False`` still checks that every image path exists and stays inside the
    folder, but does not open the files (much faster on millions of images).
    """
    return _validate(Path(root), check_images)[0]


def _validate(root: Path, check_images: bool) -> tuple[list[Problem], dict[str, list[dict]]]:
    """(every problem, the objects of each file's lines): :func:`load_dataset` builds its tables
    from the very objects checked here, so no file is read twice or cached."""
    if not root.exists():
        return [Problem(str(root), None, None, "no such folder")], {}
    if not root.is_dir():
        return [Problem(str(root), None, None, "not a folder (a dataset is a folder)")], {}
    real_root = root.resolve()
    problems: list[Problem] = []
    parsed: dict[str, list[dict]] = {}

    def records(name: str, key: str | None) -> list[tuple[int, dict]]:
        """The file's (line number, object) pairs, kept whole in ``parsed``; with ``key``, only
        those whose id field is valid."""
        lines = _read_records(root, name, problems)
        parsed[name] = [o for _, o in lines]
        return lines if key is None else [(n, o) for n, o in lines
                                          if _check_id(name, n, o, key, problems)]

    docs = records("docs.jsonl", "doc_id")
    _check_docs(root, real_root, docs, check_images, problems)
    doc_ids = _check_unique("docs.jsonl", "doc_id", docs, problems)
    queries = records("queries.jsonl", "query_id")
    split_of = _check_queries(root, real_root, queries, check_images, problems)
    _check_unique("queries.jsonl", "query_id", queries, problems)
    _check_clicks(records("clicks.jsonl", None), split_of, doc_ids, problems)
    qrels = records("qrels.jsonl", "query_id")
    _check_unique("qrels.jsonl", "query_id", qrels, problems)
    _check_qrels(qrels, split_of, doc_ids, problems)
    return problems, parsed


def _check_docs(root: Path, real_root: Path, docs: list[tuple[int, dict]], check_images: bool,
                problems: list[Problem]) -> None:
    """Each doc's image, its text, and its category when it has one."""
    for lineno, obj in docs:
        _check_image(root, real_root, "docs.jsonl", lineno, obj, check_images, problems)
        if "text" not in obj:
            problems.append(Problem("docs.jsonl", lineno, "text", "missing"))
        elif not isinstance(obj["text"], str):
            problems.append(Problem("docs.jsonl", lineno, "text",
                                    f"must be a string, got {_type_name(obj['text'])}"))
        if "category" in obj and (not isinstance(obj["category"], str) or not obj["category"]):
            problems.append(Problem("docs.jsonl", lineno, "category",
                                    f"when given, must be a non-empty string, "
                                    f"got {json.dumps(obj['category'])}"))


def _check_queries(root: Path, real_root: Path, queries: list[tuple[int, dict]],
                   check_images: bool, problems: list[Problem]) -> dict[str, str]:
    """Each query's image and split; returns the split of each query id."""
    split_of: dict[str, str] = {}
    for lineno, obj in queries:
        _check_image(root, real_root, "queries.jsonl", lineno, obj, check_images, problems)
        split = obj.get("split")
        if split not in ("train", "test"):
            problems.append(Problem("queries.jsonl", lineno, "split",
                                    f"must be \"train\" or \"test\", got {json.dumps(split)}"))
        split_of.setdefault(obj["query_id"], split)
    return split_of


def _check_clicks(clicks: list[tuple[int, dict]], split_of: dict[str, str], doc_ids,
                  problems: list[Problem]) -> None:
    """Each click names a known training query and a known doc, with a positive count."""
    for lineno, obj in clicks:
        if _check_id("clicks.jsonl", lineno, obj, "query_id", problems):
            q = obj["query_id"]
            if q not in split_of:
                problems.append(Problem("clicks.jsonl", lineno, "query_id",
                                        f"unknown query {q!r} (not in queries.jsonl)"))
            elif split_of[q] == "test":
                problems.append(Problem("clicks.jsonl", lineno, "query_id",
                                        f"{q!r} is a test query; test queries must not "
                                        f"appear in clicks"))
        if _check_id("clicks.jsonl", lineno, obj, "doc_id", problems) \
                and obj["doc_id"] not in doc_ids:
            problems.append(Problem("clicks.jsonl", lineno, "doc_id",
                                    f"unknown doc {obj['doc_id']!r} (not in docs.jsonl)"))
        count = obj.get("count")
        if "count" not in obj:
            problems.append(Problem("clicks.jsonl", lineno, "count", "missing"))
        elif isinstance(count, bool) or not isinstance(count, int) or count < 1:
            problems.append(Problem("clicks.jsonl", lineno, "count",
                                    f"must be a positive integer, got {json.dumps(count)}"))
        elif count > MAX_COUNT:
            problems.append(Problem("clicks.jsonl", lineno, "count",
                                    f"{count} is too large (at most 2**63 - 1)"))


def _check_qrels(qrels: list[tuple[int, dict]], split_of: dict[str, str], doc_ids,
                 problems: list[Problem]) -> None:
    """Each judgement names a test query and a non-empty list of known, distinct docs."""
    for lineno, obj in qrels:
        q = obj["query_id"]
        if q not in split_of:
            problems.append(Problem("qrels.jsonl", lineno, "query_id",
                                    f"unknown query {q!r} (not in queries.jsonl)"))
        elif split_of[q] != "test":
            problems.append(Problem("qrels.jsonl", lineno, "query_id",
                                    f"{q!r} is not a test query; qrels name test queries only"))
        ids = obj.get("doc_ids")
        if "doc_ids" not in obj:
            problems.append(Problem("qrels.jsonl", lineno, "doc_ids", "missing"))
        elif not isinstance(ids, list) or not ids:
            problems.append(Problem("qrels.jsonl", lineno, "doc_ids",
                                    f"must be a non-empty list, got {json.dumps(ids)}"))
        elif not all(isinstance(d, str) and d for d in ids):
            problems.append(Problem("qrels.jsonl", lineno, "doc_ids",
                                    "every entry must be a non-empty string"))
        else:
            if len(set(ids)) != len(ids):
                problems.append(Problem("qrels.jsonl", lineno, "doc_ids", "repeats a doc id"))
            unknown = [d for d in ids if d not in doc_ids]
            if unknown:
                problems.append(Problem("qrels.jsonl", lineno, "doc_ids",
                                        f"unknown doc(s) {unknown[:5]} (not in docs.jsonl)"))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
COLUMNS = {
    "docs.jsonl": ["doc_id", "image", "text", "category"],
    "queries.jsonl": ["query_id", "image", "split"],
    "clicks.jsonl": ["query_id", "doc_id", "count"],
    "qrels.jsonl": ["query_id", "doc_ids"],
}


@dataclass
class ShopData:
    """A validated dataset folder as four Hugging Face ``Dataset`` tables.

    ``docs`` and ``queries`` carry an ``image`` column of the ``datasets.Image`` feature that
    decodes to a PIL image on access; ``image_path`` keeps the absolute path (a folder's), or
    the image column holds the file's bytes (``packed``: a pack of ``mixer_lite/pack.py``).
    """

    root: Path
    docs: "datasets.Dataset"  # noqa: F821
    queries: "datasets.Dataset"  # noqa: F821
    clicks: "datasets.Dataset"  # noqa: F821
    qrels: "datasets.Dataset"  # noqa: F821
    summary: dict = field(default_factory=dict)
    packed: bool = False
    _columns: dict = field(default_factory=dict, repr=False)

    # Plain Python lists of the columns the pipeline reads (``datasets`` hands out lazy Column
    # objects, and row access would decode the image too).
    def column(self, table: str, name: str) -> list:
        key = (table, name)
        if key not in self._columns:
            # From the Arrow column in one call: iterating the table's column reads row by row
            # through the formatter, seconds on a few hundred thousand rows.
            self._columns[key] = getattr(self, table).data.column(name).to_pylist()
        return self._columns[key]

    @property
    def doc_ids(self) -> list[str]:
        return self.column("docs", "doc_id")

    @property
    def query_ids(self) -> list[str]:
        return self.column("queries", "query_id")

    @property
    def doc_texts(self) -> list[str]:
        return self.column("docs", "text")

    def clicks_columns(self) -> tuple[list, list, list]:
        """(query ids, doc ids, counts) of ``clicks.jsonl``, row by row."""
        return (self.column("clicks", "query_id"), self.column("clicks", "doc_id"),
                self.column("clicks", "count"))

    @cached_property
    def doc_row(self) -> dict[str, int]:
        return {d: i for i, d in enumerate(self.doc_ids)}

    @cached_property
    def query_row(self) -> dict[str, int]:
        return {q: i for i, q in enumerate(self.query_ids)}

    def query_rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.column("queries", "split")) == split)


def _table(records: list[dict], name: str):
    """One file's validated objects as an in-memory ``datasets`` table of its columns.

    Built from the objects already parsed, not with ``Dataset.from_json``: that caches the
    file's Arrow form keyed on path and modification time, so an edit that keeps the mtime was
    served stale, a read-only cache folder failed, and the cache grew with every edit.
    """
    import datasets

    columns = COLUMNS[name]
    return datasets.Dataset.from_dict({c: [obj.get(c) for obj in records] for c in columns})


def _with_images(ds, root: Path):
    """Replace the relative ``image`` column by a lazily decoded ``datasets.Image`` column."""
    import datasets

    paths = [str(root / p) for p in ds.data.column("image").to_pylist()]
    ds = ds.remove_columns("image").add_column("image_path", paths).add_column("image", paths)
    return ds.cast_column("image", datasets.Image())


VALID_STAMP = ".mixer-lite-valid.json"
PACK_FILE = "pack.json"  # a pack's description (mixer_lite/pack.py)


def write_valid_stamp(root: str | os.PathLike, by: str = "mixer-lite validate") -> Path:
    """Record that every image of ``root`` decoded, for the JSONL files as they are now
    (``mixer-lite validate`` writes it): :func:`load_dataset` then checks the lines and paths
    but opens no image, so each process of a large job does not decode millions of files."""
    from .files import write_json

    path = Path(root) / VALID_STAMP
    write_json(path, {"fingerprint": data_fingerprint(root), "images": "every one decoded",
                      "by": by})
    return path


def images_validated(root: Path) -> bool:
    """Whether ``root`` holds a stamp of :func:`write_valid_stamp` for its JSONL files as they
    are now (a damaged stamp, or one of other files, counts as none)."""
    try:
        stamp = json.loads((root / VALID_STAMP).read_text())
        return isinstance(stamp, dict) and stamp.get("fingerprint") == data_fingerprint(root)
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def load_dataset(root: str | os.PathLike, check_images: bool = True,
                 trust_stamp: bool = True) -> ShopData:
    """Validate ``root`` and load it; raises :class:`DatasetError` listing every problem.

    ``check_images``: every image is decoded once, unless (``trust_stamp``) a stamp of
    ``mixer-lite validate`` says so for these JSONL files (:func:`write_valid_stamp`); paths
    are always checked.  A pack (``pack.json``, ``mixer_lite/pack.py``) is read from its shards,
    its images trusted unless ``check_images`` and not ``trust_stamp``."""
    import datasets

    root = Path(root)
    if (root / PACK_FILE).is_file():
        from .pack import load_pack

        return load_pack(root, check_images=check_images and not trust_stamp)
    if check_images and trust_stamp and root.is_dir() and images_validated(root):
        check_images = False
    problems, records = _validate(root, check_images)
    if problems:
        raise DatasetError(root, problems)
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    try:
        docs = _with_images(_table(records["docs.jsonl"], "docs.jsonl"), root)
        queries = _with_images(_table(records["queries.jsonl"], "queries.jsonl"), root)
        clicks = _table(records["clicks.jsonl"], "clicks.jsonl")
        qrels = _table(records["qrels.jsonl"], "qrels.jsonl")
    finally:
        if was:
            datasets.enable_progress_bar()
    return shop_data(root, docs, queries, clicks, qrels)


def shop_data(root: Path, docs, queries, clicks, qrels, packed: bool = False) -> ShopData:
    """The four tables as a :class:`ShopData`, with the counts of its ``summary``."""
    split = np.asarray(queries.data.column("split").to_pylist())
    counts = clicks.data.column("count").to_numpy() if len(clicks) else np.zeros(0, np.int64)
    summary = {"docs": len(docs), "train_queries": int((split == "train").sum()),
               "test_queries": int((split == "test").sum()), "clicks": len(clicks),
               "click_events": int(np.sum(counts)), "qrels": len(qrels)}
    return ShopData(root=root, docs=docs, queries=queries, clicks=clicks, qrels=qrels,
                    summary=summary, packed=packed)


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB, upright: rotated by its EXIF orientation (phone photos),
    and 16-bit or float pixels scaled to 0..255 rather than clipped (``convert`` would leave a
    16-bit PNG almost white and a float TIFF black)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        x = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or x.max() > 255 else 255.0
        im = Image.fromarray(np.clip(x / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        x = np.nan_to_num(np.asarray(im, dtype=np.float64))
        top = 1.0 if x.max() <= 1.0 else 255.0  # floats in [0, 1], or in [0, 255]
        im = Image.fromarray(np.clip(x / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def fit_image(im: Image.Image, size: int) -> np.ndarray:
    """An opened image as the model reads it: uint8 [size, size, 3], RGB and upright (JPEG
    decoded at reduced size where it can be: a phone photo costs a fraction of its pixels)."""
    im.draft("RGB", (size, size))
    im = to_rgb(im)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


class ImageError(ValueError):
    """An image that cannot be decoded; the message names its file."""


def data_fingerprint(data_dir: str | Path) -> str:
    """A hash of the dataset's four JSONL files: which data a record or an evaluation scored
    (a pack's is the folder's it was made from)."""
    if (Path(data_dir) / PACK_FILE).is_file():
        from .pack import read_meta

        return read_meta(data_dir)["fingerprint"]
    h = hashlib.sha256()
    for name in FILES:
        h.update(name.encode() + b"\0" + (Path(data_dir) / name).read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class PackedImage:
    """An image file as a pack holds it (``mixer_lite/pack.py``): its bytes, its path in the
    folder it was packed from, and where it is in the pack (for messages)."""

    where: str
    path: str
    data: bytes

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)

    def __str__(self) -> str:
        return f"{self.where} ({self.path})"


class ImageTable:
    """Images of a dataset as uint8 tensors [N, 3, size, size], by row index.

    ``files``: image paths, or a pack's :class:`PackedImage` items (:func:`image_files`).
    ``preload=True`` decodes everything once (threads; PIL releases the GIL while decoding):
    right for SynthShop-sized data on a laptop.  ``preload=False`` decodes each batch on demand
    with the same threads, so memory stays bounded on real datasets of millions of images.
    """

    def __init__(self, files, size: int, preload: bool = True, threads: int = 4,
                 progress: bool = False, desc: str = "images"):
        self.files, self.size, self.threads = files, size, max(1, threads)
        self.cache = None
        if preload:
            import torch
            from tqdm import tqdm

            self.cache = torch.empty(len(self.files), 3, size, size, dtype=torch.uint8)
            step = 512
            for lo in tqdm(range(0, len(self.files), step), desc=f"loading {desc}",
                           disable=not progress, unit_scale=step):
                idx = np.arange(lo, min(lo + step, len(self.files)))
                self.cache[idx] = self._decode(idx)

    def __len__(self) -> int:
        return len(self.files)

    def _decode_one(self, i: int) -> np.ndarray:
        file = self.files[i]
        try:
            with Image.open(file.open() if isinstance(file, PackedImage) else file) as im:
                return fit_image(im, self.size)
        except IMAGE_ERRORS as e:
            raise ImageError(f"{file}: cannot read the image ({e}); "
                             f"`mixer-lite validate` checks every image of a folder") from None

    def _decode(self, idx):
        import torch
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.threads) as pool:
            arrays = list(pool.map(self._decode_one, [int(i) for i in idx]))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def __getitem__(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        if self.cache is not None:
            import torch

            return self.cache[torch.from_numpy(idx)]
        return self._decode(idx)


def image_files(data: ShopData, table: str, rows=None):
    """The image files of ``rows`` (all by default) of ``data.docs`` or ``data.queries``, as
    :class:`ImageTable` reads them: absolute paths, or a pack's images (``PackedImages``)."""
    if data.packed:
        from .pack import PackedImages

        return PackedImages(data, table, rows)
    paths = data.column(table, "image_path")
    return paths if rows is None else [paths[int(r)] for r in rows]


def load_images(data: ShopData, table: str, rows, size: int):
    """The images of ``rows`` of ``data.docs`` or ``data.queries``, decoded now: uint8
    [len(rows), 3, size, size]."""
    return ImageTable(image_files(data, table, rows), size)[np.arange(len(rows))]
