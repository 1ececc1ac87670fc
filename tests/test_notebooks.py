"""Every notebook's jupytext source (.py) and its committed .ipynb hold the same cells.

The notebooks themselves are executed by ``make test`` with nbval (fast mode); this test only
checks that nobody edited one side of a pair and forgot the other.
"""
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("*.py"))


def test_there_are_notebooks():
    assert len(SOURCES) == 6  # 00 (the pretrained backbone) and 01-05


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_pair_in_sync(source):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run `jupytext --sync {source.name}`"
    text = jupytext.read(source)
    committed = nbformat.read(ipynb, as_version=4)
    a = [(c.cell_type, c.source) for c in text.cells]
    b = [(c.cell_type, c.source) for c in committed.cells]
    assert a == b, f"{source.name} and {ipynb.name} differ: run `jupytext --sync {source.name}`"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_committed_notebook_is_executed(source):
    """One run, top to bottom, without an error: execution counts 1, 2, 3, ... in cell order,
    no error output, and no absolute path of the machine that ran it."""
    committed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    code = [c for c in committed.cells if c.cell_type == "code" and c.source.strip()]
    assert code, f"{source.stem}.ipynb has no code"
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), \
        f"{source.stem}.ipynb was not executed in one run from the top: counts {counts}"
    for i, cell in enumerate(code):
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{source.stem}.ipynb cell {i}: an error"
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            assert "site-packages/" not in text and "Traceback" not in text, \
                f"{source.stem}.ipynb cell {i} prints a traceback or a machine path"
