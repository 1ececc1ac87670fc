"""Pretraining the image encoder: the corpus reader, the loss, exact resume, the weights file
and how a model loads it (shipped weights with their checksum, a user's file, torchvision)."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _icon_packages import SETS, SHAPES, STYLES, make_packages, svg
from PIL import Image, ImageDraw

from mixer_lite import weights as weights_module
from mixer_lite.encoders import ConvEncoder, build_image_encoder
from mixer_lite.measures import image_encoder_from, linear_probe_accuracy
from mixer_lite.model import ModelConfig
from mixer_lite.weights import SHIPPED_WEIGHTS, load_image_weights, weights_card
from mixer_lite.losses import info_nce
from mixer_lite.icons import rasterise
from mixer_lite.pretrain import (COLOURED, PretrainConfig, drawing_view, excluded_concepts,
                                 load_object, prepare_corpus, pretrain, scan_corpus,
                                 scan_icon_sets, training_batch)
from mixer_lite.shop_images import CANVAS
from mixer_lite.train import config_from

TINY = PretrainConfig(views=2, batch_size=8, steps=6, width=32, held_out_share=0.2,
                      probe_every=3, checkpoint_every=2, log_every=1, workers=1, threads=1)


def draw(path, size, shape, colour, background=None):
    """A drawing: ``shape`` in ``colour`` on a transparent (or coloured) canvas."""
    im = Image.new("RGBA", size, background or (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    w, h = size
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "clipart"
    rng = np.random.default_rng(0)
    for i in range(48):
        folder = ("animals/fish", "animals/birds", "food")[i % 3]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (255,)
        size = tuple(int(s) for s in rng.integers(40, 200, 2))
        draw(root / folder / f"drawing_{i:02d}.png", size, ("circle", "square")[i % 2], colour)
    draw(root / "food" / "empty.png", (50, 50), "circle", (0, 0, 0, 0))   # nothing drawn
    draw(root / "food" / "huge.png", (1500, 1000), "square", (9, 9, 9, 255))  # 1.5 MP
    (root / "food" / "notes.txt").write_text("not an image")
    return root


def test_scan_corpus_labels_by_two_folders_and_names_the_package(corpus_dir, tmp_path):
    found = scan_corpus([corpus_dir])
    assert len(found) == 50 and all(p.endswith(".png") for p, _ in found)
    labels = dict(found)
    assert labels[str(corpus_dir / "animals/fish/drawing_00.png")] == "clipart:animals/fish"
    assert labels[str(corpus_dir / "food/drawing_02.png")] == "clipart:food"
    with pytest.raises(FileNotFoundError, match="apt-get install openclipart-png"):
        scan_corpus([tmp_path / "missing"])
    with pytest.raises(ValueError, match="no images"):
        scan_corpus([tmp_path])


def test_load_object_cuts_out_pads_and_skips_what_it_should(tmp_path):
    draw(tmp_path / "wide.png", (200, 100), "square", (255, 0, 0, 255))
    obj, reason = load_object(str(tmp_path / "wide.png"), max_megapixels=1)
    assert reason is None and obj.size == (128, 128) and obj.mode == "RGBA"
    alpha = np.asarray(obj.getchannel("A")) > 0
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    # The 120 x 60 red square fills the width and is centred vertically.
    assert (cols.min(), cols.max()) == (0, 127) and abs(rows.min() + rows.max() - 127) <= 1
    assert 62 <= len(rows) <= 66
    draw(tmp_path / "big.png", (1200, 1000), "square", (0, 0, 0, 255))
    assert load_object(str(tmp_path / "big.png"), max_megapixels=1) == (None,
                                                                        "over 1 megapixels")
    draw(tmp_path / "blank.png", (64, 64), "circle", (0, 0, 0, 0))
    assert load_object(str(tmp_path / "blank.png"), 1) == (None, "fully transparent")
    (tmp_path / "cut.png").write_bytes((tmp_path / "wide.png").read_bytes()[:60])
    assert load_object(str(tmp_path / "cut.png"), 1)[1].startswith("unreadable")


def test_views_are_the_same_whatever_the_number_of_workers(corpus_dir, tmp_path):
    cfg = dataclasses.replace(TINY, max_megapixels=1.0)
    one = prepare_corpus([corpus_dir], tmp_path / "one", cfg, progress=False)
    two = prepare_corpus([corpus_dir], tmp_path / "two", dataclasses.replace(cfg, workers=2),
                         progress=False)
    assert len(one.keys) == 48 and one.card["skipped"] == {"fully transparent": 1,
                                                            "over 1 megapixels": 1}
    assert one.doc_views.shape == (48, 2, 3, 64, 64)
    assert np.array_equal(one.doc_views, two.doc_views)
    assert np.array_equal(one.query_views, two.query_views)
    # A studio view has a light plain background; a photo view does not.
    corners = lambda v: v[:, :, :, [0, -1]][:, :, :, :, [0, -1]].astype(float)  # noqa: E731
    assert corners(one.doc_views).min() > 200 and corners(one.query_views).std() > 20


@pytest.fixture(scope="module")
def icon_sets(tmp_path_factory):
    """The shared small icon packages (every shape drawn by 5 sets, Bootstrap's circle a copy
    of Lucide's), a name only Tabler drew, one only Tabler and Lucide drew, and an icons
    dataset whose concepts are "star" (test) and "bolt" (training)."""
    root = tmp_path_factory.mktemp("sets")
    npm, themes = make_packages(root / "packages", identical_in_bootstrap=("circle",))
    tabler, lucide = npm / "@tabler/icons/icons/outline", npm / "lucide-static/icons"
    (tabler / "anchor.svg").write_text(svg('<path d="M12 3 V21 M5 15 Q12 24 19 15"/>',
                                           STYLES["tabler"]))
    (tabler / "flag.svg").write_text(svg('<path d="M5 21 V3 H19 L15 8 L19 13 H5"/>',
                                         STYLES["tabler"]))
    (lucide / "flag.svg").write_text(svg('<path d="M5 21 V4 Q12 0 19 4 V14 Q12 10 5 14"/>',
                                         STYLES["lucide"]))
    truth = root / "data" / "_truth"
    truth.mkdir(parents=True)
    (truth / "concepts.jsonl").write_text('{"concept": "star", "split": "test"}\n'
                                          '{"concept": "bolt", "split": "train"}\n')
    return dataclasses.replace(TINY, positives="designers", icon_sets=",".join(SETS),
                               icon_packages=str(npm), icon_themes=str(themes),
                               exclude_concepts=str(root / "data"), single_drawings=1,
                               batch_size=4)


def test_designers_pair_the_sets_drawings_of_a_name_and_leave_the_datasets_concepts_out(
        icon_sets, tmp_path):
    objects = {key: (label, files) for key, label, files in scan_icon_sets(icon_sets)}
    shared = {k for k, (label, _) in objects.items() if label == "designers"}
    assert shared == set(SHAPES) - {"star", "bolt"} | {"flag"}
    assert [k for k, (label, _) in objects.items() if label == "one set"] == ["tabler:anchor"]
    assert [f.split("/")[-2:] for f in objects["flag"][1]] == [["outline", "flag.svg"],
                                                              ["icons", "flag.svg"]]
    assert all(len(objects[k][1]) == len(SETS) for k in shared - {"flag"})
    none_single = dataclasses.replace(icon_sets, single_drawings=0)
    assert all(label == "designers" for _, label, _ in scan_icon_sets(none_single))
    with pytest.raises(FileNotFoundError, match="make-data --source icons"):
        excluded_concepts(str(tmp_path))
    (tmp_path / "_truth").mkdir()
    (tmp_path / "_truth" / "concepts.jsonl").write_text('{"concept": "a"}\n["b"]\n')
    with pytest.raises(ValueError, match="concepts.jsonl, line 2: .*'concept'"):
        excluded_concepts(str(tmp_path))
    with pytest.raises(ValueError, match="not --corpus folders"):
        prepare_corpus([tmp_path], tmp_path / "cache", icon_sets, progress=False)


def test_each_designer_pair_shows_two_sets_drawings_never_a_copy(icon_sets, tmp_path,
                                                                  monkeypatch):
    """The augmentation replaced by a view that writes the drawing's ink pixel count in its
    colour, so each view says which drawing it shows."""
    def identity_view(rgba, rng, size, keep_colour):
        n = int((np.asarray(rgba)[..., 3] > 128).sum())
        return Image.new("RGB", (size, size), (n % 256, n // 256, 0))

    monkeypatch.setattr("mixer_lite.pretrain.drawing_view", identity_view)
    corpus = prepare_corpus([], tmp_path / "cache", dataclasses.replace(icon_sets, views=12),
                            progress=False)
    shown = lambda views, r: [int(v[0, 0, 0]) + 256 * int(v[1, 0, 0])  # noqa: E731
                              for v in views[r]]
    files_of = {k: f for k, _, f in scan_icon_sets(icon_sets)}
    for r, key in enumerate(corpus.keys):
        files = files_of[key]
        ink = [int((np.asarray(rasterise(f))[..., 3] > 128).sum()) for f in files]
        query, doc = shown(corpus.query_views, r), shown(corpus.doc_views, r)
        if key == "tabler:anchor":
            assert query == doc == ink * 12
            continue
        # Two sets' drawings; for the circle, never Lucide's with Bootstrap's copy of it.
        assert all(q != d and {q, d} <= set(ink) for q, d in zip(query, doc))
    assert corpus.card["objects_per_label"] == {"designers": 9, "one set": 1}
    # A training batch takes an object's query and doc view from the same pair.
    rows = np.arange(len(corpus.keys))
    _, query, doc = training_batch(corpus, rows, 0, dataclasses.replace(icon_sets, views=12,
                                                                        batch_size=len(rows)))
    same = (query[:, :2, 0, 0] == doc[:, :2, 0, 0]).all(1).numpy()
    assert same.tolist() == [k == "tabler:anchor" for k in corpus.keys]


def test_views_that_keep_colour_keep_a_red_drawing_red():
    """Counted in HSV: the share of a view's pixels that are saturated red.  Kept hues leave
    the drawing red in every view (its crop always overlaps the drawing); the default views
    shift the hue or turn grey in most."""
    red_drawing = Image.new("RGBA", (CANVAS, CANVAS), (220, 40, 40, 255))

    def red_share(seed, keep_colour):
        view = drawing_view(red_drawing, np.random.default_rng(seed), 64, keep_colour)
        hue, sat, val = np.moveaxis(np.asarray(view.convert("HSV")).astype(int), -1, 0)
        return (((hue <= 6) | (hue >= 250)) & (sat > 60) & (val > 40)).mean()

    kept = np.array([red_share(seed, True) for seed in range(60)])
    default = np.array([red_share(seed, False) for seed in range(60)])
    assert kept.min() > 0.3
    assert (default < 0.1).mean() > 0.4
    with pytest.raises(ValueError, match="keep_colour needs positives='designers'"):
        PretrainConfig(keep_colour=True)


def test_coloured_drawings_join_the_designers_as_hue_keeping_pairs_of_one_drawing(
        icon_sets, corpus_dir, tmp_path, monkeypatch):
    """The view replaced by one that writes the drawing's ink pixel count and whether it was
    asked to keep the hues, so each view says what it shows and how."""
    with_colour = dataclasses.replace(icon_sets, colour_corpus=str(corpus_dir), colour_drawings=5)
    objects = scan_icon_sets(with_colour)
    assert objects[:-5] == scan_icon_sets(icon_sets)
    coloured = objects[-5:]
    coloured_keys = {k for k, _, _ in coloured}
    assert {label for _, label, _ in coloured} == {COLOURED}
    assert coloured_keys < {p for p, _ in scan_corpus([corpus_dir])}
    assert coloured == scan_icon_sets(with_colour)[-5:]  # the same sample for the seed
    with pytest.raises(ValueError, match="colour_corpus needs positives='designers'"):
        PretrainConfig(colour_corpus=str(corpus_dir))

    def identity_view(rgba, rng, size, keep_colour):
        n = int((np.asarray(rgba)[..., 3] > 128).sum())
        return Image.new("RGB", (size, size), (n % 256, n // 256, 255 * keep_colour))

    monkeypatch.setattr("mixer_lite.pretrain.drawing_view", identity_view)
    corpus = prepare_corpus([], tmp_path / "cache", with_colour, progress=False)
    assert corpus.card["objects_per_label"] == {"designers": 9, "one set": 1, COLOURED: 5}
    for r, key in enumerate(corpus.keys):
        for views in (corpus.query_views[r], corpus.doc_views[r]):
            shown = {(int(v[0, 0, 0]) + 256 * int(v[1, 0, 0]), int(v[2, 0, 0])) for v in views}
            if key in coloured_keys:
                obj, _ = load_object(key, with_colour.max_megapixels)
                assert shown == {(int((np.asarray(obj)[..., 3] > 128).sum()), 255)}
            else:  # the designers' views follow keep_colour, off here
                assert {keep for _, keep in shown} == {0}


def test_pretraining_across_designers_runs_end_to_end(icon_sets, tmp_path):
    card = pretrain([], tmp_path / "run", tmp_path / "designers.pt",
                    dataclasses.replace(icon_sets, steps=2, probe_every=2), progress=False)
    assert card["corpus"]["objects"] == 10 and "icon sets' drawings" in card["method"]
    assert card["pretrain"]["exclude_concepts"] == icon_sets.exclude_concepts
    model_cfg = ModelConfig(image_encoder="cnn", vit_dim=32,
                            image_weights=str(tmp_path / "designers.pt"))
    assert load_image_weights(build_image_encoder(model_cfg), model_cfg)["steps"] == 2


def test_info_nce_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    terms = []
    for x, y in ((a, b), (b, a)):
        for i in range(5):
            sims = [float(x[i] @ y[j]) / 0.1 for j in range(5)]
            terms.append(-sims[i] + np.log(np.sum(np.exp(sims))))
    expected = np.mean(terms)
    assert abs(float(info_nce(a * 3, b, 0.1)) - expected) < 1e-5  # scale-free: it normalises


def test_pretrain_resumes_exactly_and_the_weights_load_into_a_model(corpus_dir, tmp_path):
    cfg = dataclasses.replace(TINY, max_megapixels=1.0)
    whole = pretrain([corpus_dir], tmp_path / "whole", tmp_path / "whole.pt", cfg, progress=False)
    stopped = pretrain([corpus_dir], tmp_path / "cut", tmp_path / "cut.pt",
                       dataclasses.replace(cfg, stop_after=3), progress=False)
    assert stopped == {"stopped_at": 3} and not (tmp_path / "cut.pt").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain([corpus_dir], tmp_path / "cut", tmp_path / "cut.pt", cfg, progress=False)
    with pytest.raises(ValueError, match="lr"):
        pretrain([corpus_dir], tmp_path / "cut", tmp_path / "cut.pt",
                 dataclasses.replace(cfg, lr=1e-2), resume=True, progress=False)
    resumed = pretrain([corpus_dir], tmp_path / "cut", tmp_path / "cut.pt", cfg, resume=True,
                       progress=False)
    a = torch.load(tmp_path / "whole.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(7))  # each step once, step 0 the probe
    assert sum("probe_recall@1" in r for r in log) == 3  # steps 0, 3, 6
    assert whole["sha256"] == hashlib.sha256((tmp_path / "whole.pt").read_bytes()).hexdigest()
    assert resumed["probe_recall@1"] == whole["probe_recall@1"]
    assert whole["corpus"]["objects"] == 48 and whole["held_out_objects"] > 1

    # The file loads into the cnn of a model of the same width, and into nothing else.
    model_cfg = ModelConfig(image_encoder="cnn", vit_dim=32,
                            image_weights=str(tmp_path / "whole.pt"))
    enc = build_image_encoder(model_cfg)
    card = load_image_weights(enc, model_cfg)
    assert card["steps"] == 6 and all(torch.equal(enc.state_dict()[k], a[k]) for k in a)
    with pytest.raises(ValueError, match="width 32.*width 128"):
        wide = dataclasses.replace(model_cfg, vit_dim=128)
        load_image_weights(build_image_encoder(wide), wide)
    with pytest.raises(ValueError, match="for the cnn encoder"):
        ModelConfig(image_encoder="vit", image_weights=str(tmp_path / "whole.pt"))
    with pytest.raises(FileNotFoundError, match="neither a shipped name"):
        load_image_weights(enc, dataclasses.replace(model_cfg, image_weights="nope.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="bad.pt: not a weights file"):
        load_image_weights(enc, dataclasses.replace(model_cfg,
                                                    image_weights=str(tmp_path / "bad.pt")))


def test_a_shipped_file_with_another_checksum_is_refused(monkeypatch, tmp_path):
    name, sha = SHIPPED_WEIGHTS["openclipart-cnn"]
    monkeypatch.setitem(SHIPPED_WEIGHTS, "openclipart-cnn", (name, "0" * 64))
    cfg = ModelConfig(image_encoder="cnn", image_weights="openclipart-cnn")
    with pytest.raises(ValueError, match="damaged or was replaced.*image_weights=none"):
        load_image_weights(build_image_encoder(cfg), cfg)


def test_tiny_cpu_starts_from_the_openclipart_weights():
    assert config_from("tiny-cpu", []).model.image_weights == "openclipart-cnn"


@pytest.mark.parametrize("shipped_name", sorted(SHIPPED_WEIGHTS))
def test_each_shipped_file_loads_with_its_checksum_and_its_card_shows_learning(shipped_name):
    name, sha = SHIPPED_WEIGHTS[shipped_name]
    path = weights_module.Path(weights_module.__file__).parent / "weights" / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert path.stat().st_size <= 25 * 2 ** 20
    shipped = torch.load(path, weights_only=True)
    enc = image_encoder_from(shipped_name)
    assert isinstance(enc, ConvEncoder)
    assert all(torch.equal(enc.state_dict()[k], v) for k, v in shipped["state_dict"].items())
    card = weights_card(shipped_name)
    assert card == shipped["card"]
    assert card["corpus"]["objects"] > 5000 and card["steps"] >= 1000
    # Pretraining did something the probe can see: held-out photo-to-studio Recall@1.
    assert card["probe_recall@1"]["final"] > 2 * card["probe_recall@1"]["initial"]


def test_a_torchvision_backbone_loads_its_pretrained_weights_offline(monkeypatch):
    """``image_pretrained=true`` fetches torchvision's weights; here the fetch is served by a
    resnet18 built offline, and the model must end up with exactly those weights."""
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18().state_dict()
    asked = []

    def fetch(url, *args, **kwargs):
        asked.append(url)
        return reference

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", fetch)
    torch.manual_seed(2)
    enc = build_image_encoder(ModelConfig(image_encoder="torchvision:resnet18",
                                          image_pretrained=True))
    assert len(asked) == 1 and "resnet18" in asked[0]
    got = enc.body.state_dict()
    body_keys = [k for k in reference if not k.startswith("fc.")]
    assert len(got) == len(body_keys)
    assert all(torch.equal(v, reference[k]) for k, v in zip(body_keys, got.values()))


def test_linear_probe_on_separable_and_on_random_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    y = rng.integers(0, 4, 800)
    x = centres[y] + rng.normal(size=(800, 16))
    assert linear_probe_accuracy(x[:400], y[:400], x[400:], y[400:]) > 0.97
    shuffled = rng.permutation(y)
    assert abs(linear_probe_accuracy(x[:400], shuffled[:400], x[400:], shuffled[400:]) - 0.25) \
        < 0.08
    names = np.array(["red", "blue", "green", "pink"])[y]  # labels of any kind
    assert linear_probe_accuracy(x[:400], names[:400], x[400:], names[400:]) > 0.97


def test_the_pretrain_command(corpus_dir, tmp_path):
    from _cli import cli

    run = cli("pretrain", "--corpus", corpus_dir, "--out", tmp_path / "w.pt", "--run",
              tmp_path / "run", "--quiet", "--views=1", "--batch_size=8", "--steps=2",
              "--width=32", "--held_out_share=0.2", "--workers=1", "--threads=1")
    assert run.returncode == 0, run.stderr[-2000:]
    said = json.loads(run.stdout.strip().splitlines()[-1])
    assert said["sha256"] == hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()
    assert set(said["probe_recall@1"]) == {"initial", "final"}
    # Every override reached the run: the card records them, the weights have the width.
    shipped = torch.load(tmp_path / "w.pt", weights_only=True)
    card = shipped["card"]
    assert {k: card["pretrain"][k] for k in ("views", "batch_size", "steps", "width",
                                             "held_out_share", "workers", "threads")} == \
        {"views": 1, "batch_size": 8, "steps": 2, "width": 32, "held_out_share": 0.2,
         "workers": 1, "threads": 1}
    assert shipped["vit_dim"] == 32 and card["steps"] == 2
    assert max(v.shape[0] for v in shipped["state_dict"].values() if v.dim() == 4) == 32
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1]["step"] == 2  # the initial probe, then 2 steps
    again = cli("pretrain", "--corpus", corpus_dir, "--out", tmp_path / "w.pt", "--run",
                tmp_path / "run", "--quiet", "--steps=2")
    assert again.returncode == 2 and "--resume" in again.stderr
    missing = cli("pretrain", "--corpus", tmp_path / "nowhere", "--out", tmp_path / "x.pt",
                  "--run", tmp_path / "run2")
    assert missing.returncode == 2 and "apt-get install openclipart-png" in missing.stderr
    bad = cli("pretrain", "--corpus", corpus_dir, "--out", tmp_path / "x.pt", "--run",
              tmp_path / "run2", "--stepz=3")
    assert bad.returncode == 2 and "stepz" in bad.stderr


def test_a_crafted_pretraining_checkpoint_is_refused_and_runs_nothing(corpus_dir, tmp_path):
    from _cli import cli, plant_payload

    args = ["pretrain", "--corpus", corpus_dir, "--out", tmp_path / "w.pt", "--run",
            tmp_path / "run", "--quiet", "--views=1", "--batch_size=8", "--steps=4",
            "--width=32", "--held_out_share=0.2", "--workers=1", "--threads=1"]
    cut = cli(*args, "--stop_after=2", "--checkpoint_every=2")
    assert cut.returncode == 0, cut.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    plant_payload(ckpt, tmp_path / "ran")
    r = cli(*args, "--resume", "--checkpoint_every=2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert str(ckpt) in r.stderr and "refused" in r.stderr
    assert not (tmp_path / "ran").exists() and not (tmp_path / "w.pt").exists()
