"""Serving without HTTP: a run's model and doc index loaded once, answering photos in batches.

The paper's fourth difficulty is answering many image queries quickly against a large, fixed
set of docs.  Docs are embedded offline into an index (:func:`build_run_index`, ``mixer-lite
index``); a :class:`SearchService` holds the model and that index and does the per-query work:
decode a photo (:meth:`~SearchService.decode`), embed a batch of photos with the query tower and
search the index (:meth:`~SearchService.search_batch`), and show one doc's concept maps
(:meth:`~SearchService.doc_attention`).  ``server.py`` puts HTTP in front of it; ``bench/serve.py``
calls it in-process as the throughput the server is measured against.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .dataset import IMAGE_ERRORS, ImageTable, data_fingerprint, fit_image, image_files, \
    load_dataset, load_images
from .files import check_writable, file_sha256, folder_lock
from .measures import attention_of_docs
from .retrieval import build_index, check_index_kind, embed_docs, embed_queries, gather_rows, \
    index_on_device, load_index, save_index, search, shard_rows
from .runs import load_run_model, resolve_device, setup_distributed

REBUILD = "rebuild it with `mixer-lite index --run RUN --data DATA`"


# --------------------------------------------------------------------------------------------
# A run's index: built once, offline; opened only when it belongs to the run and the data
# --------------------------------------------------------------------------------------------
def build_run_index(run: str | Path, data_dir: str | Path, kind: str = "flat",
                    progress: bool = True, device="cpu") -> dict:
    """Embed every doc of ``data_dir`` with the run's model (on ``device``) and save the index
    in ``RUN/index`` (its metadata names the data, the doc ids and the sha256 of the model that
    embedded them).  Under torchrun each rank embeds its share of the docs (on its own GPU);
    rank 0 gathers them and writes the index."""
    rank, world, device = setup_distributed(str(device))
    run, model = Path(run), load_run_model(run, device)
    model_sha = file_sha256(run / "model.pt")
    check_writable(run / "index", "folder")
    data = load_dataset(data_dir)
    check_index_kind(kind, len(data.docs))
    mine = shard_rows(len(data.docs), rank, world)
    images = ImageTable(image_files(data, "docs", mine), model.cfg.image_size, preload=False,
                        threads=4)
    # Not while a train or another index writes the run folder: rank 0 holds its lock.
    with folder_lock(run, "index") if rank == 0 else contextlib.nullcontext():
        emb = embed_docs(model, images, [data.doc_texts[i] for i in mine], device=device,
                         progress=progress and rank == 0)
        emb = gather_rows(emb, len(data.docs), world, device)
        if rank == 0:
            save_index(build_index(emb, kind), run / "index",
                       {"data": str(Path(data_dir).resolve()),
                        "data_fingerprint": data_fingerprint(data_dir),
                        "model_sha256": model_sha, "kind": kind, "doc_ids": data.doc_ids})
    if world > 1:  # every rank returns once the index is there
        torch.distributed.barrier()
    return {"index": str(run / "index" / "docs.faiss"), "kind": kind, "docs": len(emb)}


def open_run_index(run: str | Path, data, device="cpu"):
    """(model on ``device``, index, metadata) of a run, refused when the index was built from
    other docs than ``data``'s or by another ``model.pt`` than the run's (trained again since);
    the index on ``device``'s GPU where faiss can (:func:`retrieval.index_on_device`)."""
    run = Path(run)
    index, meta = load_index(run / "index")
    if meta["doc_ids"] != data.doc_ids:
        raise ValueError(f"the index in {run} was built from {meta.get('data')}, whose docs "
                         f"differ from {data.root}/docs.jsonl; {REBUILD}")
    model = load_run_model(run, device)  # a damaged or crafted file is named as such first
    if meta.get("model_sha256") != file_sha256(run / "model.pt"):
        raise ValueError(f"the index in {run} was built from another {run / 'model.pt'} (the "
                         f"run was trained again since); {REBUILD}")
    return model, index_on_device(index, device), meta


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """What one request may ask.  The pixel limit is checked from the image header, before any
    pixel is decoded (a 20-line PNG can claim 50,000 x 50,000 pixels)."""
    max_k: int = 100
    max_pixels: int = 40_000_000       # a 40-megapixel phone photo passes
    max_upload_bytes: int = 20 << 20   # 20 MiB for one request, every photo in it
    max_photos: int = 16               # photos in one request


class Rejected(Exception):
    """Input the service refuses, with the HTTP status that says why (400, 404 or 413)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SearchService:
    """A run's model and index over a dataset's docs, loaded once.

    Not thread-safe by itself: :meth:`search_batch` and :meth:`doc_attention` run the model and
    must be called from one thread at a time (the server gives them one worker thread);
    :meth:`decode` may run on any thread.
    """

    def __init__(self, run: str | Path, data_dir: str | Path, limits: Limits = Limits(),
                 threads: int = 0, index_kind: str = "flat", progress: bool = True,
                 device: str = "cpu"):
        self.run, self.limits = Path(run), limits
        self.device = resolve_device(device)
        if threads:
            torch.set_num_threads(threads)
        if not (self.run / "index" / "meta.json").exists():
            print(f"[serve] {self.run}/index: none yet; embedding the docs of {data_dir} once")
            build_run_index(self.run, data_dir, index_kind, progress, self.device)
        self.data = load_dataset(data_dir, check_images=False)  # a bad image is named on use
        self.model, self.index, self.meta = open_run_index(self.run, self.data, self.device)
        self.size = self.model.cfg.image_size
        self.doc_files = image_files(self.data, "docs")
        self.query_files = image_files(self.data, "queries")
        self.relevant = {r["query_id"]: set(r["doc_ids"]) for r in self.data.qrels}
        self.test_queries = [q for q in self.data.query_ids if q in self.relevant]

    # ---- what it serves ---------------------------------------------------------------------
    def info(self) -> dict:
        cfg = self.model.cfg
        return {"run": self.run.name, "data": Path(self.data.root).name,
                "docs": int(self.index.ntotal), "index": self.meta["kind"],
                "test_queries": len(self.test_queries), "fusion": cfg.fusion,
                "image_size": cfg.image_size, "max_k": self.max_k}

    @property
    def max_k(self) -> int:
        return min(self.limits.max_k, int(self.index.ntotal))

    def doc_row(self, doc_id: str) -> int:
        row = self.data.doc_row.get(doc_id)
        if row is None:
            raise Rejected(404, f"no doc {doc_id!r} in {self.data.root}/docs.jsonl")
        return row

    def query_row(self, query_id: str) -> int:
        row = self.data.query_row.get(query_id)
        if row is None:
            raise Rejected(404, f"no query {query_id!r} in {self.data.root}/queries.jsonl")
        return row

    def check_k(self, k) -> int:
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise Rejected(400, f"k must be a whole number, got {k!r}") from None
        if not 1 <= k <= self.max_k:
            raise Rejected(400, f"k must be between 1 and {self.max_k}, got {k}")
        return k

    # ---- the per-query work -------------------------------------------------------------------
    def decode(self, data: bytes, name: str) -> np.ndarray:
        """One uploaded photo as the model reads it, uint8 [size, size, 3]; a file that is not an
        image, or one over the pixel limit, is :class:`Rejected` naming ``name``."""
        try:
            with Image.open(io.BytesIO(data)) as im:
                pixels = im.width * im.height
                if pixels > self.limits.max_pixels:
                    raise Rejected(413, f"{name}: {im.width} x {im.height} pixels, over the "
                                        f"limit of {self.limits.max_pixels:,}")
                return fit_image(im, self.size)
        except Image.DecompressionBombError as e:
            raise Rejected(413, f"{name}: {e}") from None
        except UnidentifiedImageError:
            raise Rejected(400, f"{name}: not an image this server reads (JPEG, PNG, WebP, "
                                f"GIF, BMP, TIFF)") from None
        except IMAGE_ERRORS as e:
            raise Rejected(400, f"{name}: not an image this server reads ({e})") from None

    def query_photo(self, query_id: str) -> np.ndarray:
        """A dataset query's photo, decoded as :meth:`decode` would an upload of it."""
        return ImageTable([self.query_files[self.query_row(query_id)]], self.size,
                          preload=False, threads=1)[[0]][0].permute(1, 2, 0).numpy()

    def search_batch(self, photos: np.ndarray, k: int) -> dict:
        """Top-``k`` docs of each photo of ``photos`` (uint8 [B, size, size, 3]): one forward
        pass of the query tower, one index search; scores, doc rows and the phases' times."""
        t0 = time.perf_counter()
        pixels = torch.from_numpy(np.ascontiguousarray(photos)).permute(0, 3, 1, 2)
        q = embed_queries(self.model, pixels, max(1, len(photos)), self.device)
        t1 = time.perf_counter()
        scores, rows = search(self.index, q, k)
        t2 = time.perf_counter()
        return {"scores": scores, "rows": rows, "embed_s": t1 - t0, "search_s": t2 - t1}

    def hits(self, scores, rows, query_id: str | None = None) -> list[dict]:
        """One photo's results as JSON-ready dicts; ``relevant`` is known only for a judged
        dataset query (None for an upload)."""
        rel = self.relevant.get(query_id) if query_id else None
        out = []
        for rank, (s, r) in enumerate(zip(scores, rows), 1):
            if r < 0:
                continue
            doc_id = self.data.doc_ids[int(r)]
            out.append({"rank": rank, "doc_id": doc_id, "title": self.data.doc_texts[int(r)],
                        "score": round(float(s), 5), "relevant": None if rel is None
                        else doc_id in rel})
        return out

    def doc_attention(self, doc_id: str, top_words: int = 3) -> dict:
        """One doc's concept maps: per concept, its weights over the image regions (a grid x grid
        map, summing to 1) and the title words it read most; the gate's image weight."""
        row = self.doc_row(doc_id)
        images = load_images(self.data, "docs", [row], self.size).to(self.device)
        title = self.data.doc_texts[row]
        shown = attention_of_docs(self.model, images, [title])
        info, tokens = shown["info"], shown["token_strings"][0]
        out = {"doc_id": doc_id, "title": title, "fusion": self.model.cfg.fusion,
               "grid": info.get("grid"), "image_weight": None, "concepts": []}
        if "image_weight" in info:
            out["image_weight"] = round(float(info["image_weight"][0]), 4)
        if "text_to_image" not in info:
            return out
        maps = info["text_to_image"][0].float().cpu().numpy()
        reads = info.get("token_to_concept")
        for k, m in enumerate(maps):
            if reads is not None:  # concepts read the title; rank its tokens by weight
                w = reads[0, k, : len(tokens)].float().cpu().numpy()
                words = [[tokens[i], round(float(w[i]), 4)] for i in np.argsort(-w)[:top_words]]
            else:  # each query of the attention is one title token
                words = [[tokens[k], 1.0]] if k < len(tokens) else []
            out["concepts"].append({"concept": k, "words": words,
                                    "map": [round(float(v), 5) for v in m]})
        return out

