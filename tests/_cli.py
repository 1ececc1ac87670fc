"""Running ``mixer-lite`` as a user does (a subprocess), shared by the CLI and fault tests."""
from __future__ import annotations

import subprocess
import sys

# A model small enough that a tiny run trains in seconds, through the same code as tiny-cpu.
# The shipped pretrained weights are for width 128, so this narrow cnn starts from scratch.
TINY_MODEL = ["--model.vit_dim=32", "--model.text_dim=32", "--model.text_depth=1",
              "--model.text_heads=2", "--model.embed_dim=32", "--model.n_concepts=4",
              "--model.image_weights=none", "--batch_size=32", "--threads=1"]


def run_embeddings(run, data_dir, query_rows=None) -> dict:
    """A run's doc and query embeddings (the queries of ``query_rows``, all by default), computed
    in this process: the reference the served and printed results are checked against."""
    from mixer_lite.dataset import ImageTable, image_files, load_dataset
    from mixer_lite.retrieval import embed_docs, embed_queries
    from mixer_lite.runs import load_run_model

    data = load_dataset(data_dir)
    model = load_run_model(run)
    size = model.cfg.image_size
    docs = embed_docs(model, ImageTable(image_files(data, "docs"), size), data.doc_texts)
    queries = embed_queries(model, ImageTable(image_files(data, "queries", query_rows), size))
    return {"data": data, "model": model, "docs": docs, "queries": queries}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mixer_lite.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


class _Payload:
    """Unpickled, it creates the file ``marker``: what an attacker's code would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_payload(path, marker, keep_keys=True) -> None:
    """Rewrite the torch file ``path`` with a pickled call beside its real content (all of its
    keys kept), as a crafted ``model.pt`` or checkpoint from elsewhere would be."""
    import torch

    obj = torch.load(path, weights_only=True)
    obj["extra"] = _Payload(marker)
    torch.save(obj, path)
