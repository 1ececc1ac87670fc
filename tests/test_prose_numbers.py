"""No number in the notebooks' prose or the README is typed by hand.

A notebook's prose (markdown cells, and the literal text of the ``Markdown(f"...")`` it renders)
holds no decimal number: every measured number is rendered from a variable, so it is the one
the run printed.  The README's prose quotes measurements too; each of its decimals is listed
with the committed records that give it (a metric, a mean over seeds, a difference between two
rows, one query's share in points) or the shipped weights' size, and recomputed: a number no
record backs is either stale or invented.  The tables the README quotes from ``make
reproduce`` are checked whole by ``test_reproduce.py``; code spans and blocks are commands, not
claims.
"""
import ast
import json
import re
from pathlib import Path

import jupytext
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\d.])")  # 0.10x counts too
# Points of a measure's scale named where the measure is defined ("0.5 = indistinguishable,
# 1.0 = fully separable"): definitions, not results.
SCALE_POINTS = {"0.5", "1.0"}
# Decimals of the README that are not measurements: the paper's arXiv id, Python versions.
NOT_MEASURED = {"2305.03972", "3.10", "3.11"}


def without_code(markdown: str) -> str:
    """Markdown with code blocks and inline code removed."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", markdown, flags=re.S))


def rendered_literals(code: str) -> list[str]:
    """The literal text of every ``Markdown(...)`` call's string argument in ``code``: the
    constant parts of f-strings and plain strings (what a reader sees that no variable
    supplies)."""
    def literals(node) -> list[str]:
        if isinstance(node, ast.FormattedValue):  # a rendered value (strings typed in its
            return literals(node.value)            # expression count; its format spec not)
        if isinstance(node, ast.Constant):
            return [node.value] if isinstance(node.value, str) else []
        return [t for child in ast.iter_child_nodes(node) for t in literals(child)]

    return [t for node in ast.walk(ast.parse(code))
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Markdown"
            for t in literals(node)]


def notebook_prose(source: Path) -> list[str]:
    nb = jupytext.read(source)
    texts = [c.source for c in nb.cells if c.cell_type == "markdown"]
    for c in nb.cells:
        if c.cell_type == "code":
            texts += rendered_literals(c.source)
    return texts


def typed_decimals(texts: list[str]) -> list[str]:
    return [d for t in texts for d in DECIMAL.findall(without_code(t)) if d not in SCALE_POINTS]


def test_finds_typed_numbers_and_spares_rendered_ones():
    code = ('x = 1.25\nMarkdown(f"""Recall {x:.3f} against 53.7 (`--lr=0.5`), '
            'on 0.5 = chance {"of 1.5" if x else ""}""")\nprint(f"{x} 9.9")')
    assert typed_decimals(rendered_literals(code)) == ["53.7", "1.5"]
    assert typed_decimals(["# Lift 1.54 over ```\n2.5\n``` blocks"]) == ["1.54"]


@pytest.mark.parametrize("source", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")),
                         ids=lambda p: p.stem)
def test_notebook_prose_types_no_number(source):
    typed = typed_decimals(notebook_prose(source))
    assert not typed, (f"{source.name}: numbers typed into the prose {typed}; render them from "
                       f"the variable or record that holds them")


def readme_prose() -> str:
    """The README without code and without the tables (checked against records elsewhere)."""
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines()
             if not ln.lstrip().startswith("|")]
    return without_code("\n".join(lines))


def metric(preset: str, name: str, key: str = "recall@10") -> float:
    """A committed record's metric: ``results/reproduce/<preset>/<preset>-<name>.json``."""
    path = ROOT / "results" / "reproduce" / preset / f"{preset}-{name}.json"
    return json.loads(path.read_text())["metrics"][key]


def seed_mean(preset: str, slug: str, key: str = "recall@10", seeds=(0, 1, 2)) -> float:
    return float(np.mean([metric(preset, f"{slug}-s{s}", key) for s in seeds]))


# Every decimal of the README's prose, and how the committed records give it: the README says
# what a record holds, or the test fails when either changes.
def points(share: float) -> str:
    return f"{100 * share:.1f}"


README_QUOTES = {
    # the demo's run: the scene records' Mixer, seed 0
    "0.505": lambda: f"{scene_record('mixer-s0')['recall@10']:.3f}",
    "1.53": lambda: f"{scene_record('mixer-s0')['attention']['product_lift']:.2f}",
    "2.3": lambda: f"{(ROOT / 'mixer_lite/weights/openclipart-cnn.pt').stat().st_size / 1e6:.1f}",
    "15.4": lambda: points(metric("small", "frozen_backbone")),
    "0.08": lambda: f"{100 / metric('small', 'mixer-s0', 'queries'):.2f}",  # one photo, points
    "53.7": lambda: points(seed_mean("small", "mixer")),
    "4.5": lambda: points(seed_mean("small", "mixer") - seed_mean("small", "infonce")),
    "12.7": lambda: points(seed_mean("icons", "mixer") - seed_mean("icons", "random_weights")),
    "2.9": lambda: points(metric("icons", "mixer-s0") - metric("icons", "scratch-s0")),
    "21.2": lambda: points(transfer_mean("icons")),
    "12.3": lambda: points(transfer_mean("synth-small")),
}


def scene_record(name: str) -> dict:
    """A committed scene record's metrics: ``results/scenes/small-scenes30-<name>.json``."""
    path = ROOT / "results" / "scenes" / f"small-scenes30-{name}.json"
    return json.loads(path.read_text())["metrics"]


def transfer_mean(data: str) -> float:
    """Mean test Recall@10 of the three `designers-cnn` Mixer records on ``data``."""
    return np.mean([json.loads((ROOT / "results" / "transfer" / f"{data}-designers-cnn-s{s}.json")
                               .read_text())["metrics"]["recall@10"] for s in (0, 1, 2)])


@pytest.mark.parametrize("quoted", sorted(README_QUOTES))
def test_readme_quote_is_what_the_records_give(quoted):
    assert README_QUOTES[quoted]() == quoted


def test_readme_prose_quotes_only_numbers_records_give():
    prose = readme_prose()
    unbacked = [d for d in DECIMAL.findall(prose) if d not in README_QUOTES and
                d not in NOT_MEASURED]
    assert not unbacked, (f"README.md quotes {unbacked}, which no committed record gives; "
                          f"quote a record (README_QUOTES) or point to docs/EXPERIMENTS.md")
    assert all(q in DECIMAL.findall(prose) for q in README_QUOTES), "a quote left the README"
