"""Running ``mixer-lite`` as a user does, shared by the CLI and fault tests: every command in a
process of its own, with its own exit code, standard output and standard error.

The process is forked from a server that imported the package and torch once (Python's
``forkserver`` start method), not started from scratch: about 120 commands in the suite would
otherwise each spend about 3.4 s importing torch, torch._dynamo (which torch's optimiser
constructor imports) and matplotlib (``bench/cli_start.py``, measured in bench/README.md).
The server imports only, with one thread, so every command begins from the state a fresh
``python -m mixer_lite.cli`` reaches after its imports, with the test's current environment.
``tests/test_cli.py`` trains its run with a plain subprocess, so the real entry point is
checked as well.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# What the commands import on their first line of work; a name the server cannot import is
# skipped by the forkserver and imported by the command itself.
PRELOAD = ["mixer_lite.cli", "mixer_lite.train", "mixer_lite.pretrain", "mixer_lite.retrieval",
           "mixer_lite.service", "mixer_lite.server", "mixer_lite.demo", "mixer_lite.viz",
           "mixer_lite.synthshop", "mixer_lite.icons", "mixer_lite.pack", "mixer_lite.classes",
           "torch._dynamo", "torch.distributed"]

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


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """``mixer-lite ARGS`` in a process of its own (module docstring), in ``cwd``; what
    ``subprocess.run(..., capture_output=True, text=True)`` returns."""
    argv = [str(a) for a in args]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        command = context.Process(target=_command, args=(
            argv, None if cwd is None else str(cwd), str(out), str(err), dict(os.environ)))
        command.start()
        command.join()
        return subprocess.CompletedProcess([sys.executable, "-m", "mixer_lite.cli", *argv],
                                           command.exitcode, _text(out), _text(err))


def cli_subprocess(*args, cwd=None) -> subprocess.CompletedProcess:
    """``python -m mixer_lite.cli ARGS`` started from scratch, for the test of the entry point
    itself."""
    return subprocess.run([sys.executable, "-m", "mixer_lite.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def _command(argv: list[str], cwd: str | None, out: str, err: str, env: dict) -> None:
    """The forked process: the caller's environment and folder, its output into ``out`` and
    ``err``, then the command; its exit status is ``main``'s (an uncaught exception prints its
    traceback and exits with 1, as Python does)."""
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")
    from mixer_lite import cli as command_line

    sys.argv = [command_line.__file__, *argv]
    sys.exit(command_line.main(argv))


def _text(path: Path) -> str:
    """A captured stream as ``text=True`` decodes it (universal newlines)."""
    return path.read_text(errors="replace") if path.exists() else ""


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
