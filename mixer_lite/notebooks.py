"""``make notebooks``: execute every notebook in full mode and write the ``.ipynb`` files that are
committed, so a student reading them on the web sees what the full runs on ``small`` show.

``python -m mixer_lite.notebooks [--fast] [--only 02,05] [--plan]``

Each notebook's jupytext source (``notebooks/NN_*.py``) is the source of truth: it is read,
executed top to bottom in a fresh kernel from the ``notebooks/`` folder, and written to its
``.ipynb`` beside it (cells, outputs, nothing else of the machine).  Before anything runs, the
runs every notebook needs are listed (its parameters cell names them: ``rows``, slugs of
:data:`ablations.ROWS`, and ``named_runs``, other run names) with those not cached under
``runs/experiments/`` and an estimate of their training time from the committed records of
``make reproduce`` (a run with no record counts as the median record).  ``--plan`` prints that
and stops.  ``--fast`` executes CI's fast mode (``MIXER_LITE_FAST=1``, ``tiny``) instead, for a
quick look; its outputs are not the ones to commit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

from .ablations import run_name
from .reproduce import records_dir
from .runcache import FAST_ENV, repo_root
from .runs import environment


def made_with(preset: str, fast: bool, seed: int) -> str:
    """The line a notebook's first output shows: which data and mode made its outputs."""
    env = environment()
    mode = ("fast mode (CI's quick check: short runs; numbers are not the ones the prose "
            "discusses)" if fast else "full mode")
    return (f"**Outputs made by:** SynthShop `{preset}`, {mode}, seed {seed}; torch "
            f"{env['torch']} with {env['cpu_capability']} kernels on {env['torch_threads']} "
            f"threads. `make notebooks` makes them again.")


def show_code(*functions):
    """The source of package functions as a code block in a notebook's output: a student reads
    the lines a section explains, exactly as the package runs them."""
    import inspect
    import textwrap

    from IPython.display import Markdown

    blocks = [textwrap.dedent(inspect.getsource(f)) for f in functions]
    names = ", ".join(f"`{f.__module__}.{f.__qualname__}`" for f in functions)
    return Markdown(f"{names}:\n\n```python\n" + "\n".join(blocks) + "```")


def attention_viewer(model, data, doc_rows: list[int], start_title: str | None = None):
    """An interactive look at concept fusion (ipywidgets): choose a doc and a concept, edit the
    title, and see where the concept looks under the doc's own title and under yours (one
    concept: both maps and their difference; all: every concept's maps under both titles).

    Returns the widget.  A page without a kernel (the web, nbval) shows no widget, so a
    notebook draws a static figure beside it."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from .dataset import load_images
    from .measures import attention_of_docs
    from .viz import concept_attention, concept_map_change

    doc = w.Dropdown(options=[(f"{data.doc_ids[r]}: {data.doc_texts[r][:48]}", r)
                              for r in doc_rows], description="doc")
    concept = w.Dropdown(options=[("all", -1)] + [(f"concept {k}", k)
                                                  for k in range(model.cfg.n_concepts)],
                         description="concept")
    title = w.Text(value=start_title or data.doc_texts[doc_rows[0]], description="your title",
                   continuous_update=False, layout=w.Layout(width="95%"))
    out = w.Output()

    def draw(*_):
        own = data.doc_texts[doc.value]
        images = load_images(data, "docs", [doc.value, doc.value], model.cfg.image_size)
        seen = attention_of_docs(model, images, [own, title.value])
        with out:
            out.clear_output(wait=True)
            if concept.value < 0:
                concept_attention(images, seen["info"], seen["token_strings"], n_docs=2,
                                  titles=[f"own title: {own}", f"your title: {title.value}"])
            else:
                maps = seen["info"]["text_to_image"][:, concept.value].float().numpy()
                concept_map_change(images[0], maps[0], maps[1],
                                   (f"own title: {own}", f"your title: {title.value}"),
                                   concept.value)
            plt.show()

    def new_doc(change):
        own = data.doc_texts[change["new"]]
        if title.value == own:
            draw()
        else:
            title.value = own  # draws through the title's observer

    doc.observe(new_doc, names="value")
    concept.observe(draw, names="value")
    title.observe(draw, names="value")
    draw()
    return w.VBox([w.HBox([doc, concept]), title, out])


def notebook_sources(root: str | Path | None = None) -> list[Path]:
    """The jupytext sources of the notebooks, in reading order."""
    return sorted((Path(root or repo_root()) / "notebooks").glob("[0-9][0-9]_*.py"))


@contextmanager
def _fast_mode(fast: bool):
    old = os.environ.get(FAST_ENV)
    os.environ[FAST_ENV] = "1" if fast else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FAST_ENV)
        else:
            os.environ[FAST_ENV] = old


def parameters(source: str | Path, fast: bool = False) -> dict:
    """The values the parameters cell (tag ``parameters``) of a notebook source sets, in full or
    fast mode: ``preset``, ``seed``, ``rows`` and ``named_runs`` among them."""
    import jupytext

    nb = jupytext.read(source)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{source}: expected one cell tagged 'parameters', found {len(cells)}")
    values: dict = {}
    with _fast_mode(fast):
        exec(compile(cells[0].source, f"{source} (parameters)", "exec"), values)
    missing = {"preset", "seed", "rows"} - set(values)
    if missing:
        raise ValueError(f"{source}: the parameters cell does not set {sorted(missing)}")
    return values


def runs_needed(p: dict) -> list[str]:
    """The run names (``runs/experiments/<name>``) a notebook with :func:`parameters` ``p``
    trains or reads."""
    return ([run_name(p["preset"], slug, p["seed"]) for slug in p["rows"]] +
            list(p.get("named_runs", [])))


def recorded_seconds(records: str | Path) -> dict[str, float]:
    """Training seconds of each run with a committed record (``make reproduce``'s)."""
    out = {}
    for path in sorted(Path(records).glob("*.json")):
        seconds = json.loads(path.read_text()).get("train_seconds")
        if seconds is not None:
            out[path.stem] = float(seconds)
    return out


def plan(sources: list[Path], fast: bool = False, runs: str | Path | None = None,
         records: str | Path | None = None) -> list[dict]:
    """Per notebook: the runs it needs, those missing from ``runs`` (a run is cached once its
    ``seconds.json`` is written), and their estimated training seconds (``None``: no record to
    estimate from).  A run two notebooks share is trained by the first and counted there."""
    runs = Path(runs or repo_root() / "runs" / "experiments")
    seen: set[str] = set()
    out = []
    for source in sources:
        p = parameters(source, fast)
        known = recorded_seconds(records_dir(p["preset"], records))
        typical = statistics.median(known.values()) if known else None
        needed = runs_needed(p)
        missing = [n for n in needed if n not in seen and not (runs / n / "seconds.json").exists()]
        seen.update(needed)
        guesses = [known.get(n, typical) for n in missing]
        out.append({"notebook": source.stem, "runs": needed, "missing": missing,
                    "seconds": None if None in guesses else sum(guesses)})
    return out


def describe(steps: list[dict]) -> str:
    """The plan as lines a person reads before a long execution starts."""
    lines = []
    for s in steps:
        cached = len(s["runs"]) - len(s["missing"])
        todo = (f"trains {len(s['missing'])} run(s), about "
                f"{s['seconds'] / 60:.0f} min at the records' speed (2 cores)"
                if s["missing"] and s["seconds"] is not None else
                f"trains {len(s['missing'])} run(s) (no record to estimate from)"
                if s["missing"] else "trains nothing")
        lines.append(f"{s['notebook']}: {cached} run(s) ready or made by an earlier notebook; "
                     f"{todo}"
                     + (f": {', '.join(s['missing'])}" if s["missing"] else ""))
    known = [s["seconds"] for s in steps if s["missing"] and s["seconds"] is not None]
    lines.append(f"training in all: about {sum(known) / 60:.0f} min, plus a few minutes of "
                 "measurements per notebook")
    return "\n".join(lines)


def execute(source: Path, fast: bool = False) -> Path:
    """Execute one notebook source in a fresh kernel (from ``notebooks/``) and write its
    ``.ipynb``; returns that path."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(source)
    with _fast_mode(fast):
        NotebookClient(nb, timeout=None, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(source.parent)}}).execute()
    out = source.with_suffix(".ipynb")
    tmp = out.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, out)  # a crash mid-write leaves the committed notebook whole
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="CI's fast mode on tiny (not to commit)")
    ap.add_argument("--only", help="comma-separated notebook numbers, e.g. 02,05")
    ap.add_argument("--plan", action="store_true", help="print what would be trained and stop")
    args = ap.parse_args(argv)
    sources = notebook_sources()
    if args.only:
        wanted = set(args.only.split(","))
        sources = [s for s in sources if s.name[:2] in wanted]
        if not sources:
            raise SystemExit(f"no notebook numbered {args.only}")
    print(describe(plan(sources, args.fast)), flush=True)
    if args.plan:
        return
    for source in sources:
        t0 = time.time()
        print(f"{source.stem}: executing ...", flush=True)
        path = execute(source, args.fast)
        print(f"{source.stem}: {time.time() - t0:.0f} s -> {path.relative_to(repo_root())}",
              flush=True)


if __name__ == "__main__":
    main()
