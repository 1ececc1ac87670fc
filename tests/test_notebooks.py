"""Every notebook's jupytext source (.py) and its committed .ipynb hold the same cells, the
committed outputs come from one full run on ``small``, and ``make notebooks`` plans its
training from the notebooks' own parameters.

The notebooks themselves are executed by ``make test`` with nbval (fast mode).
"""
import ast
import inspect
import json
import textwrap
from pathlib import Path

import jupytext
import nbformat
import pytest

from mixer_lite import notebooks
from mixer_lite.ablations import ROWS, run_name
from mixer_lite.losses import margin_logits

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
    first = next(o for c in code for o in c.get("outputs", []))
    shown = "".join(first.get("data", {}).get("text/markdown", ""))
    assert "SynthShop `small`, full mode" in shown, \
        f"{source.stem}.ipynb: its first output must name the data and mode: {shown[:120]!r}"
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), \
        f"{source.stem}.ipynb was not executed in one run from the top: counts {counts}"
    for i, cell in enumerate(code):
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{source.stem}.ipynb cell {i}: an error"
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            assert "site-packages/" not in text and "Traceback" not in text, \
                f"{source.stem}.ipynb cell {i} prints a traceback or a machine path"


@pytest.mark.parametrize("fast", [False, True], ids=["full", "fast"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_parameters_name_the_runs_a_notebook_trains(source, fast):
    """The parameters cell sets the preset of its mode and names rows that exist; every row or
    run the notebook's code trains is among them (read from the code, not assumed): each row
    an ``ensure_row`` call names (the rows a notebook reads from the committed records train
    nothing)."""
    p = notebooks.parameters(source, fast)
    assert p["preset"] == ("tiny" if fast else "small") and p["seed"] == 0
    assert set(p["rows"]) <= set(ROWS)
    if fast:  # fast mode leaves rows out; the code reads them only in full mode
        return
    code = jupytext.read(source)
    text = "\n".join(c.source for c in code.cells
                     if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))
    calls = [node for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Call)
             and getattr(node.func, "id", getattr(node.func, "attr", None)) == "ensure_row"]
    for call in calls:  # ensure_row(data_dir, preset, slug, seed)
        slug = call.args[2]
        if isinstance(slug, ast.Constant):
            assert slug.value in p["rows"], (slug.value, p["rows"])
        else:  # a name bound by a loop over the parameters' rows
            assert f"for {ast.unparse(slug)} in rows" in text, ast.unparse(call)
    if "ensure_run(" in text or "ensure_validation_run(" in text:
        assert p.get("named_runs"), f"{source.name} trains named runs its parameters omit"


# The claims CI's fast mode does not check, each with why it cannot be checked on `tiny`.
FULL_ONLY_CLAIMS = {
    ("02_concept_fusion", "and its concepts look at more different places than softmax "
                          "attention's"):
        "on tiny (42 steps) the concepts correlate at 0.82 against softmax's 0.89 "
        "(docs/EXPERIMENTS.md, item 8)",
}


def claims_fast_mode_skips(source: Path) -> list[str]:
    """The first argument of each ``claim(...)`` call that sits in the branch of an ``if`` on
    ``fast`` that fast mode does not take (``if not fast:``'s body, ``if fast:``'s else)."""
    code = jupytext.read(source)
    tree = ast.parse("\n".join(c.source for c in code.cells if c.cell_type == "code"))
    skipped = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.If) or "fast" not in {
                n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}:
            continue
        negated = isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not)
        for part in node.body if negated else node.orelse:
            skipped += [ast.literal_eval(call.args[0]) for call in ast.walk(part)
                        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "claim"]
    return skipped


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_fast_mode_checks_every_claim_but_those_that_cannot_hold_on_tiny(source):
    """CI runs the notebooks in fast mode only: a claim kept for full mode is never checked
    there, so each one must be listed with its reason.  The rows fast mode leaves out carry no
    claim (a claim on one would fail in fast mode on its missing number)."""
    for text in claims_fast_mode_skips(source):
        assert (source.stem, text) in FULL_ONLY_CLAIMS, \
            f"{source.name}: the claim {text!r} is left out of fast mode (CI) without a reason"


def test_the_fast_mode_claim_reader_finds_a_claim_under_not_fast(tmp_path):
    """The reader above against a hand-written notebook: the claims under ``if not fast`` and
    under ``if fast``'s else branch are found, the others are not."""
    source = tmp_path / "nb.py"
    source.write_text(textwrap.dedent("""\
        # %%
        claim("always", True)
        if not fast:
            claim("full only", True)
        if fast:
            claim("fast only", True)
        else:
            claim("full only too", True)
        """))
    assert claims_fast_mode_skips(source) == ["full only", "full only too"]


def write_source(path: Path, rows: list[str], named: list[str] = ()) -> Path:
    path.write_text(textwrap.dedent(f"""\
        # %% tags=["parameters"]
        import os
        fast = os.environ.get("MIXER_LITE_FAST", "0") == "1"
        preset = "tiny" if fast else "small"
        seed = 0
        rows = {rows!r}
        named_runs = {list(named)!r}
        """))
    return path


def test_plan_counts_missing_runs_once_with_their_recorded_time(tmp_path):
    a = write_source(tmp_path / "01_a.py", ["mixer", "shared"])
    b = write_source(tmp_path / "02_b.py", ["mixer", "concat"], named=["small-extra-s0"])
    runs, records = tmp_path / "runs", tmp_path / "records" / "small"
    (runs / run_name("small", "shared", 0)).mkdir(parents=True)
    (runs / run_name("small", "shared", 0) / "seconds.json").write_text("5")
    (runs / run_name("small", "concat", 0)).mkdir()  # no seconds.json: an unfinished run
    records.mkdir(parents=True)
    for slug, seconds in (("mixer", 600.0), ("concat", 300.0), ("shared", 100.0)):
        (records / f"{run_name('small', slug, 0)}.json").write_text(
            json.dumps({"train_seconds": seconds}))
    steps = notebooks.plan([a, b], runs=runs, records=tmp_path / "records")
    assert steps[0]["missing"] == ["small-mixer-s0"] and steps[0]["seconds"] == 600.0
    # mixer is trained by the first notebook; the named run has no record: the median (300)
    assert steps[1]["missing"] == ["small-concat-s0", "small-extra-s0"]
    assert steps[1]["seconds"] == 300.0 + 300.0
    text = notebooks.describe(steps)
    assert "about 10 min" in text and "about 20 min" in text.splitlines()[-1]
    fast = notebooks.plan([a], fast=True, runs=runs, records=tmp_path / "records")
    assert fast[0]["missing"] == ["tiny-mixer-s0", "tiny-shared-s0"]
    assert fast[0]["seconds"] is None  # no tiny records: no estimate rather than a wrong one


def test_a_notebook_without_parameters_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "01_bad.py"
    bad.write_text("# %%\nx = 1\n")
    with pytest.raises(ValueError, match="01_bad.py.*parameters"):
        notebooks.parameters(bad)
    write_source(bad, ["mixer"])
    bad.write_text(bad.read_text().replace("rows = ['mixer']", ""))
    with pytest.raises(ValueError, match=r"does not set \['rows'\]"):
        notebooks.parameters(bad)


def test_show_code_shows_the_package_source():
    shown = notebooks.show_code(margin_logits).data
    assert inspect.getsource(margin_logits) in shown
    assert shown.startswith("`mixer_lite.losses.margin_logits`")


def test_attention_viewer_draws_the_maps_of_the_chosen_doc_concept_and_title(tiny_data,
                                                                             monkeypatch):
    """Each control redraws with the model's own attention (computed here straight from
    ``embed_docs``) for the doc, concept and title chosen; a new doc brings back its title."""
    import numpy as np
    import torch

    from mixer_lite import viz
    from mixer_lite.dataset import load_images
    from mixer_lite.encoders import WordTokenizer
    from mixer_lite.model import MixerModel, ModelConfig

    torch.manual_seed(0)
    model = MixerModel(ModelConfig(vit_depth=1, vit_dim=32, text_dim=32, embed_dim=16,
                                   n_concepts=3), WordTokenizer.fit(tiny_data.doc_texts)).eval()
    drawn = []
    monkeypatch.setattr(viz, "concept_attention",
                        lambda images, info, tokens, **kw: drawn.append(("all", kw["titles"])))
    monkeypatch.setattr(viz, "concept_map_change",
                        lambda image, before, after, titles, k: drawn.append((k, titles, before,
                                                                              after)))
    rows = [0, 5]
    box = notebooks.attention_viewer(model, tiny_data, rows)
    (doc, concept), title = box.children[0].children, box.children[1]
    own = tiny_data.doc_texts[0]
    assert drawn == [("all", [f"own title: {own}", f"your title: {own}"])]

    def attention(row, text, k):
        images = load_images(tiny_data, "docs", [row], model.cfg.image_size)
        with torch.no_grad():
            _, info = model.embed_docs(images, model.tokenize([text]), return_attention=True)
        return info["text_to_image"][0, k].numpy()

    concept.value = 2
    k, titles, before, after = drawn[-1]
    assert k == 2 and np.allclose(before, attention(0, own, 2), atol=1e-6)
    assert np.allclose(after, before)  # the same title: nothing moved
    title.value = tiny_data.doc_texts[5]
    k, titles, before, after = drawn[-1]
    assert titles[1] == f"your title: {tiny_data.doc_texts[5]}"
    assert np.allclose(after, attention(0, tiny_data.doc_texts[5], 2), atol=1e-6)
    assert not np.allclose(after, before)
    doc.value = 5
    assert title.value == tiny_data.doc_texts[5]
    k, titles, before, after = drawn[-1]
    assert np.allclose(before, attention(5, tiny_data.doc_texts[5], 2), atol=1e-6)
