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
  "image weight" that the notebooks plot.  ``fusion_gate=False`` drops it: the doc is its
  fused concepts alone, so everything of the image it keeps passes through the title's
  attention (``docs/EXPERIMENTS.md``, "Scene docs").  ``fusion_gate_input="agreement"``
  gives each doc one share, read from how far its fused concepts agree with its whole image
  (:class:`AgreementGate`); ``"constant"`` one learned share per dimension that reads nothing
  (:class:`ConstantGate`).
* Optional modality dropout (``text_dropout``): in training, that share of docs skips the text
  and is embedded from its image vector alone.
* Encoders by config (:mod:`mixer_lite.encoders`): a small BatchNorm CNN (the ``tiny-cpu``
  preset's, starting from the weights that ship in ``mixer_lite/weights/``, pretrained on real
  drawings by :mod:`mixer_lite.pretrain`; ``image_weights="none"`` starts from random weights)
  or a ViT, and a word-level text transformer from scratch (fast on a CPU at 64x64), any
  torchvision backbone, or any Hugging Face model by name or local path.
* The ablations (``fusion``: image only, text only, concatenation, tokens attending directly)
  are one small doc head each, chosen once at construction; the paper's is ``_concept_head``.
* ``fusion="zoom"`` (ours, for docs whose image shows more than the product): the concepts'
  attention picks a region (:func:`attention_box`), which is cut out, resampled to full size
  and encoded again (:func:`zoom_to`), so the doc is the named product at the scale a photo
  shows it.  Trained through the retrieval loss alone its boxes stay whole and it retrieves
  worse than image-only docs (``docs/EXPERIMENTS.md``, "Scene docs", "A fusion that zooms").
* ``fusion="regions"`` (ours, the same need): the regions the concepts attend over are not the
  encoder's feature-map cells but candidate windows (:func:`candidate_boxes`: the whole image
  and a 3 x 3 grid of windows ``region_side`` of its side), each cut out, resampled to full
  size and encoded again, so a product that is half of a scene is seen at the scale a photo
  shows it; the concepts choose among them by the same :class:`ConceptFusion`, and the loss,
  not a box's gradient, decides which window pays.  The windows are encoded without gradient
  and with the encoder's running statistics (the encoder learns from whole images and photos;
  the choice and the doc transform learn from the windows): a training step costs what a
  ``concept`` one does, embedding a doc about ten times as much.  On scene docs it beats
  image-only docs and loses a third of the single docs' recall (``docs/EXPERIMENTS.md``,
  "Scene docs", "Candidate windows"); an option, off.  ``region_choice="title"`` lets the
  title's own embedding choose instead, trained beside its doc as a sample of the doc's class
  (``docs/EXPERIMENTS.md``, "The title in the photos' space"), and ``region_whole_bias``
  favours the whole image in that choice, so that a window must match the title clearly better
  to replace it and the encoder keeps learning from whole doc images (``docs/EXPERIMENTS.md``,
  "The whole image unless a window beats it"); ``region_whole="concepts"`` makes that whole
  candidate the paper's fused doc, so single-product docs keep what concept fusion gives them
  (``docs/EXPERIMENTS.md``, "The fused doc unless a window beats it").  ``title_sample``
  trains the concept head's title embedding beside its doc the same way, with no windows: what
  that training alone does to Mixer's docs (``docs/EXPERIMENTS.md``, "The title beside its doc,
  on Mixer alone"); an option, off.  ``window_sample`` also trains, beside each doc, the
  candidate its title weighs most (a window or the whole image), cut out and encoded *with*
  gradient, as one more sample of the doc's class, so the encoder learns the products the
  windows frame; it lost seven points of validation recall (``docs/EXPERIMENTS.md``, "The
  chosen window as a sample of its class"); an option, off.

The model knows no files: it takes image tensors (floats in [0, 1], N x 3 x H x W) and token
batches made by :meth:`MixerModel.tokenize`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoders import (HFTextEncoder, ScratchTextEncoder, WordTokenizer, batchnorm_layers,
                       build_image_encoder, normalise_pixels, resolve_text_model)

FUSIONS = ("concept", "image_only", "text_only", "concat", "direct", "zoom", "regions")
CONCEPT_TEXT = ("residual", "none", "gated")
CONCEPT_ATTENTION = ("softmax", "cosine", "slots")
REGION_CHOICE = ("concepts", "title")
REGION_WHOLE = ("image", "concepts")
REGION_PICK = ("blend", "argmax")
# What the fusion gate reads: "vectors", a per-dimension share from a linear map of [image;
# fused]; "agreement", one share per doc from the cosine of the two; "constant", nothing: one
# learned share per dimension, the same for every doc (ConceptFusion).
GATE_INPUTS = ("vectors", "agreement", "constant")


@dataclass
class ModelConfig:
    """Architecture; every field can be overridden from the command line (``--model.x=...``)."""

    image_size: int = 64
    image_encoder: str = "vit"          # "vit" | "cnn" | "torchvision:<name>"
    image_pretrained: bool = False      # torchvision: its default (ImageNet) weights
    image_weights: str = "none"         # cnn: a shipped name (weights.SHIPPED_WEIGHTS), a file,
                                        # or none
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
    fusion_gate: bool = True            # doc = g * image + (1 - g) * fused; False: doc = fused
    fusion_gate_bias: float = 0.0       # added to the gate's initial bias: 3 starts at 95% image
    fusion_gate_input: str = "vectors"  # what the gate reads: GATE_INPUTS
    concept_keeps_slot: bool = True     # concept = slot + what it read; False: what it read
    region_side: float = 0.625          # regions: the candidate windows' side (1 = the image)
    region_choice: str = "concepts"     # regions: what chooses the window: REGION_CHOICE
    region_whole_bias: float = 0.0      # regions, title: added to the whole image's choice logit
    region_whole: str = "image"         # regions, title: the whole-image candidate: REGION_WHOLE
    region_pick: str = "blend"          # regions, title, served: the candidates blended by
                                        # their weights, or the top one alone: REGION_PICK
    title_sample: bool = False          # concept: the title's embedding trains beside its doc
    window_sample: bool = False         # regions, title: the chosen candidate trains beside it
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
        if self.region_choice not in REGION_CHOICE:
            raise ValueError(f"ModelConfig.region_choice must be one of {REGION_CHOICE}, "
                             f"got {self.region_choice!r}")
        if self.region_choice != "concepts" and self.fusion != "regions":
            raise ValueError(f"ModelConfig.region_choice={self.region_choice!r} chooses among "
                             f"the windows of fusion='regions', not fusion={self.fusion!r}")
        if self.region_whole not in REGION_WHOLE:
            raise ValueError(f"ModelConfig.region_whole must be one of {REGION_WHOLE}, "
                             f"got {self.region_whole!r}")
        if self.region_pick not in REGION_PICK:
            raise ValueError(f"ModelConfig.region_pick must be one of {REGION_PICK}, "
                             f"got {self.region_pick!r}")
        title_only = {"region_whole_bias": self.region_whole_bias != 0,
                      "region_whole": self.region_whole != "image",
                      "region_pick": self.region_pick != "blend"}  # set away from default
        for name in (n for n, set_ in title_only.items() if set_):
            if self.region_choice != "title":
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} shapes the "
                                 f"title's choice among the windows: it needs "
                                 f"region_choice='title', not {self.region_choice!r}")
        if self.title_sample and self.fusion != "concept":
            raise ValueError(f"ModelConfig.title_sample trains the concept head's title beside "
                             f"its doc: it needs fusion='concept', not {self.fusion!r} (with "
                             f"fusion='regions', region_choice='title' trains the title already)")
        if self.window_sample and not self.title_chooses:
            raise ValueError("ModelConfig.window_sample trains the window the title chooses: it "
                             "needs fusion='regions' and region_choice='title'")
        if not math.isfinite(self.fusion_gate_bias):
            raise ValueError(f"ModelConfig.fusion_gate_bias must be finite, "
                             f"got {self.fusion_gate_bias}")
        if self.fusion_gate_input not in GATE_INPUTS:
            raise ValueError(f"ModelConfig.fusion_gate_input must be one of {GATE_INPUTS}, "
                             f"got {self.fusion_gate_input!r}")
        gate_only = {"fusion_gate_bias": ("starts", self.fusion_gate_bias != 0),
                     "fusion_gate_input": ("shapes", self.fusion_gate_input != "vectors")}
        for name, (verb, set_) in gate_only.items():
            if set_ and not (self.fusion_gate and self.fuses_concepts):
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} {verb} the gate "
                                 f"of the concept fusion: it needs fusion_gate=True and a "
                                 f"fusion that holds one ('concept', 'direct', or 'regions' "
                                 f"whose windows the concepts weigh), not "
                                 f"fusion={self.fusion!r}, fusion_gate={self.fusion_gate!r}")
        if not math.isfinite(self.region_whole_bias):
            raise ValueError(f"ModelConfig.region_whole_bias must be finite, "
                             f"got {self.region_whole_bias}")
        if not 0 < self.region_side <= 1:
            raise ValueError(f"ModelConfig.region_side must be in (0, 1], "
                             f"got {self.region_side}")
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

    @property
    def title_chooses(self) -> bool:
        """Whether the title's own embedding chooses among the doc's windows."""
        return self.fusion == "regions" and self.region_choice == "title"

    @property
    def fuses_concepts(self) -> bool:
        """Whether the doc head holds a :class:`ConceptFusion` (and so its gate): the concept
        heads, and windows whose weights the concepts give rather than the title alone."""
        return self.fusion in ("concept", "direct") or (
            self.fusion == "regions" and (not self.title_chooses or self.region_whole == "concepts"))

    @property
    def trains_title(self) -> bool:
        """Whether training returns each doc's title embedding beside the doc, a sample of the
        doc's class (the title chooses a window, or ``title_sample``)."""
        return self.title_chooses or self.title_sample


# --------------------------------------------------------------------------------------------
# Attention with exact zeros on masked keys
# --------------------------------------------------------------------------------------------
class SingleHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V with masked keys given exactly zero weight.

    One head, so the weights returned are the weights used: nothing is averaged away.
    ``values=False`` keeps only the weights (:meth:`weights`; no value or output projection).
    """

    def __init__(self, dim: int, dropout: float = 0.0, values: bool = True):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)  # a key bias shifts all scores equally: no-op
        if values:
            self.v = nn.Linear(dim, dim)
            self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def weights(self, query, keys, key_mask=None):
        """query [B, Q, d], keys [B, K, d], key_mask [B, K] (True = real) -> weights [B, Q, K]."""
        scores = self.q(query) @ self.k(keys).transpose(1, 2) / math.sqrt(query.shape[-1])
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        return scores.softmax(dim=-1)

    def forward(self, query, keys, key_mask=None):
        """(out [B, Q, d], weights [B, Q, K])."""
        weights = self.weights(query, keys, key_mask)
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
                 init_temperature: float = 10.0, values: bool = True):
        super().__init__(dim, dropout, values)
        self.kind = kind
        if kind != "softmax":
            self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))

    def weights(self, query, keys, query_mask=None):
        if self.kind == "softmax":
            return super().weights(query, keys)
        scores = self.log_temperature.exp() * (
            F.normalize(self.q(query), dim=-1) @ F.normalize(self.k(keys), dim=-1).transpose(1, 2))
        if self.kind == "cosine":
            return scores.softmax(dim=-1)
        if query_mask is not None:
            scores = scores.masked_fill(~query_mask[..., None], float("-inf"))
        share = scores.softmax(dim=1)                    # each region among the concepts
        return share / share.sum(dim=-1, keepdim=True).clamp_min(1e-8)

    def forward(self, query, keys, query_mask=None):
        weights = self.weights(query, keys, query_mask)
        return self.out(self.dropout(weights) @ self.v(keys)), weights


def attention_box(weights: torch.Tensor, grid: int, min_half: float = 0.15) -> torch.Tensor:
    """The region attention points at: [B, 3] = (centre x, centre y, half side) in
    ``grid_sample``'s coordinates (the image spans -1..1).

    ``weights`` [B, P] or [B, K, P] (concepts, averaged) over a ``grid`` x ``grid`` of regions
    in row-major order.  The half side is the map's standard deviation (the larger axis) over
    that of a uniform map, at least ``min_half`` and bent smoothly below 1 (a softplus): a
    uniform map gives 0.97 of the image (a product that fills its shot stays whole), a map
    evenly on one object a third of the side wide a box around it (0.35).  The centre is the
    map's mean position drawn toward the image's centre as the box grows (by ``1 - half`` over
    the farthest region centre), so the box stays inside the image.  No clamp at the whole
    image: it would leave a box there no gradient to shrink by.  Differentiable in the
    weights."""
    m = weights.mean(dim=1) if weights.dim() == 3 else weights
    m = m / m.sum(dim=-1, keepdim=True)
    centres = (torch.arange(grid, device=m.device, dtype=m.dtype) + 0.5) / grid * 2 - 1
    ys, xs = centres.repeat_interleave(grid), centres.repeat(grid)
    cx, cy = m @ xs, m @ ys
    sx = (m @ xs ** 2 - cx ** 2).clamp_min(1e-8).sqrt()
    sy = (m @ ys ** 2 - cy ** 2).clamp_min(1e-8).sqrt()
    uniform = math.sqrt((grid ** 2 - 1) / 3) / grid
    ratio = torch.maximum(sx, sy) / uniform
    half = (1 - F.softplus(20 * (1 - ratio)) / 20).clamp_min(min_half)
    inward = (1 - half) / (1 - 1 / grid)
    return torch.stack([cx * inward, cy * inward, half], dim=-1)


def zoom_to(images: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Each image's ``box`` (:func:`attention_box`) resampled to the image's own size
    (bilinear; differentiable in the box)."""
    zero = torch.zeros_like(box[:, 0])
    theta = torch.stack([torch.stack([box[:, 2], zero, box[:, 0]], dim=-1),
                         torch.stack([zero, box[:, 2], box[:, 1]], dim=-1)], dim=1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def window_grid(sides: tuple[float, ...], places: int) -> torch.Tensor:
    """Square windows of each of ``sides`` (share of the image's side) at ``places`` x
    ``places`` evenly spaced positions, the first and last touching the image's edges, as boxes
    [len(sides) * places**2, 3] (centre x, centre y, half side; ``grid_sample``'s coordinates),
    row-major within a side."""
    boxes = []
    for side in sides:
        at = torch.linspace(-(1 - side), 1 - side, places).tolist() if places > 1 else [0.0]
        boxes += [[x, y, side] for y in at for x in at]
    return torch.tensor(boxes)


def candidate_boxes(side: float) -> torch.Tensor:
    """The regions of ``fusion="regions"``: [10, 3] boxes (centre x, centre y, half side) in
    ``grid_sample``'s coordinates, the whole image first, then a 3 x 3 grid of windows
    ``side`` of the image's side (:func:`window_grid`; corners touching the image's corners)."""
    return torch.cat([torch.tensor([[0.0, 0.0, 1.0]]), window_grid((side,), 3)])


def boxes_on_grid(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """Each box as weights over a ``grid`` x ``grid`` of cells (row-major), each cell weighed by
    the share of its area inside the box, summing to 1: [len(boxes), grid * grid].  A map over
    boxes times this is a map over cells, as the other fusions' maps are."""
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid * 2 - 1
    lo, hi = edges[:-1], edges[1:]

    def overlap(centre, half):  # [B, grid]: each cell's share inside the box along one axis
        return ((torch.minimum(hi, centre + half) - torch.maximum(lo, centre - half))
                .clamp_min(0) * grid / 2)

    x, y, half = (boxes[:, i, None].float() for i in range(3))
    inside = (overlap(y, half)[:, :, None] * overlap(x, half)[:, None, :]).flatten(1)
    return inside / inside.sum(dim=1, keepdim=True)


def _feed_forward(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(4 * dim, dim))


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
    SynthShop small (``docs/EXPERIMENTS.md``, "How the earlier tiny-cpu preset was chosen").
    Centring each dimension over the batch removes that
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
    layer.  With ``keep_slot=False`` the concept is what the slot read alone, so it carries
    nothing that is the same for every title.  Returns the concept vectors [B, K, d] and the
    token-to-concept weights [B, K, T].
    """

    def __init__(self, dim: int, n_concepts: int, dropout: float, keep_slot: bool = True):
        super().__init__()
        self.keep_slot = keep_slot
        self.slots = nn.Parameter(torch.randn(n_concepts, dim) * dim ** -0.5)
        self.read = SingleHeadAttention(dim, dropout)
        self.norm = nn.LayerNorm(dim)
        self.ff = _feed_forward(dim, dropout)

    def forward(self, tokens, mask):
        slots = self.slots.expand(len(tokens), -1, -1)
        read, weights = self.read(slots, tokens, mask)
        concepts = self.norm(slots + read if self.keep_slot else read)
        return concepts + self.ff(concepts), weights


# AdamW moves a parameter by at most about the sum of its learning rates over the run, 0.055
# in the ``tiny-cpu`` preset on icons and 0.11 on SynthShop ``small``: a gate logit read at 1x
# from one parameter could not move its share by more than a few hundredths, read at 50x it can
# reach logits of a few units (docs/EXPERIMENTS.md, "The gate mixes at fixed shares").
GATE_GAIN = 50.0


class AgreementGate(nn.Module):
    """One gate logit per doc from how far its fused concepts agree with its whole image:
    ``GAIN * (scale * cos(image, fused) + bias)``.  A linear map of [image; fused] (the
    ``vectors`` gate) cannot compute that agreement, a product of the two; a scene doc whose
    title picks one of several objects should be where the two disagree.  Our option, off in
    every preset: trained on scene docs it gave every doc one share, the two halves' cosine
    being alike in scene and single docs (``docs/EXPERIMENTS.md``, "A gate that reads the
    agreement").  ``scale`` starts at 0, so every doc starts at one share (``start``, a logit)
    and training decides which way agreement pushes it, at ``GATE_GAIN``."""

    GAIN = GATE_GAIN

    def __init__(self, start: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.full((1,), start / self.GAIN))

    def forward(self, image_and_fused):
        image, fused = image_and_fused.chunk(2, dim=-1)
        agreement = F.cosine_similarity(image, fused, dim=-1)[:, None]
        return self.GAIN * (self.scale * agreement + self.bias)


class ConstantGate(nn.Module):
    """One learned gate logit per dimension, the same for every doc: ``GATE_GAIN * bias``.  The
    trained ``vectors`` gate, fixed dimension by dimension at its mean over the docs, retrieves
    within 0.3 points of itself (``docs/EXPERIMENTS.md``, "The gate mixes at fixed shares"), so
    this asks whether a mix that never looks at the doc does as well trained from the start.
    Our option, off in every preset: level on icons (three seeds), 3.7 points below the
    ``vectors`` gate on SynthShop's scene docs (seed 0; ``docs/EXPERIMENTS.md``, "A gate that
    reads nothing").  Every dimension starts at the logit ``start`` (a number, or one per
    dimension; +inf gives a doc its image vector alone, -inf its fused vector alone, which
    :func:`measures.fusion_halves` forces on a trained model)."""

    GAIN = GATE_GAIN

    def __init__(self, dim: int, start: float | torch.Tensor = 0.0):
        super().__init__()
        self.bias = nn.Parameter(torch.as_tensor(start, dtype=torch.float32).expand(dim)
                                 / self.GAIN)

    def forward(self, image_and_fused):
        return (self.GAIN * self.bias).expand(len(image_and_fused), -1)


class ConceptFusion(nn.Module):
    """Text-to-image attention plus a learned image/text gate (concept-aware modality fusion).

    ``queries`` (concepts, or raw text tokens in the ``direct`` ablation) attend over the doc
    image's patch tokens (:class:`ConceptImageAttention`, of the kind ``attention`` names),
    and the results are averaged (masked) into one fused vector.  A per-dimension sigmoid gate
    of [image; fused] decides how much each doc relies on its image (``gate=False``: none; the
    fused vector is the doc; ``gate_input="agreement"``: one share per doc,
    :class:`AgreementGate`; ``"constant"``: one share per dimension for every doc,
    :class:`ConstantGate`).  ``gate_bias`` is added to the gate's initial bias: a positive
    one starts every doc near its image vector, so the fused vector enters only as far as
    training moves the gate (as Flamingo's cross-attention starts behind a closed tanh gate;
    our option, off in every preset: ``docs/EXPERIMENTS.md``, "A gate that starts at the
    image").  Returns (doc vector, attention weights, gate or None).

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
                 attention: str = "softmax", temperature: float = 10.0, gate: bool = True,
                 gate_bias: float = 0.0, gate_input: str = "vectors"):
        super().__init__()
        self.text = text
        self.attend = ConceptImageAttention(dim, dropout, attention, temperature)
        self.norm = nn.LayerNorm(dim)
        self.ff = _feed_forward(dim, dropout)
        if not gate:
            self.gate = None
        elif gate_input == "agreement":
            self.gate = AgreementGate(gate_bias)
        elif gate_input == "constant":
            self.gate = ConstantGate(dim, gate_bias)
        else:
            self.gate = nn.Linear(2 * dim, dim)
            with torch.no_grad():
                self.gate.bias.add_(gate_bias)
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
        if self.gate is None:
            return text_vec, weights, None
        gate = torch.sigmoid(self.gate(torch.cat([image_vec, text_vec], dim=-1)))
        return gate * image_vec + (1 - gate) * text_vec, weights, gate


def _note_gate(info: dict, gate) -> None:
    """A doc head's gate, where its fusion has one, into ``embed_docs``' attention info."""
    if gate is not None:
        info["gate"], info["image_weight"] = gate, gate.mean(dim=-1)


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
        if cfg.fusion in ("concept", "text_only", "zoom", "regions"):
            self.concept_memory = ConceptMemory(d, cfg.n_concepts, cfg.dropout,
                                                cfg.concept_keeps_slot)
        if cfg.fusion == "zoom":
            self.region_attention = ConceptImageAttention(d, cfg.dropout, cfg.concept_attention,
                                                          cfg.concept_temperature, values=False)
        if cfg.fusion == "regions":
            self.register_buffer("regions", candidate_boxes(cfg.region_side), persistent=False)
        self.title_chooses = cfg.title_chooses
        self.trains_title = cfg.trains_title
        if self.title_chooses:
            self.choice_scale = nn.Parameter(torch.tensor(math.log(cfg.concept_temperature)))
        if cfg.fuses_concepts:
            self.fusion = ConceptFusion(d, cfg.dropout, cfg.concept_text, cfg.concept_attention,
                                        cfg.concept_temperature, cfg.fusion_gate,
                                        cfg.fusion_gate_bias, cfg.fusion_gate_input)
        if cfg.fusion == "concat":
            self.concat_proj = nn.Linear(2 * d, d)
        self.out_proj = nn.Linear(d, d)
        norm = (lambda: EmbeddingNorm(d)) if cfg.embed_norm == "batch" else nn.Identity
        self.doc_norm = norm()
        self.query_norm = self.doc_norm if cfg.shared_transform else norm()
        if self.trains_title:
            self.title_norm = norm()
        self.doc_head = getattr(self, f"_{cfg.fusion}_head")  # one per FUSIONS entry

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
        weights over the text tokens), ``gate`` [B, embed_dim] (the image/text gate, per
        dimension: 1 = image only), ``image_weight`` [B] (its mean over dimensions),
        ``token_mask`` [B, T] and ``grid`` (patches per side); ``zoom`` adds ``zoom_box`` [B, 3]
        and ``regions`` adds ``region_weights`` [B, K, 10] (each concept's weights over the
        candidate windows, whose spread over the patches is ``text_to_image``).  Entries an
        ablation lacks are absent.
        """
        return self._doc_head(images, self._encode_docs(images), tokens, return_attention)

    def _encode_docs(self, images):
        """The doc images through the shared encoder; None for text-only docs, which never
        look at them."""
        return self.encode_images(images) if self.cfg.fusion != "text_only" else None

    def _doc_head(self, images, encoded, tokens, return_attention=False):
        """The doc path after the image encoder; ``encoded`` = (patches, pooled) or None."""
        device = images.device
        info: dict = {}
        image_vec = self.doc_transform(encoded[1]) if encoded is not None else None
        text = mask = None
        if self.uses_text:
            if tokens is None:
                raise ValueError(f"fusion={self.cfg.fusion!r} needs a token batch: "
                                 f"model.tokenize(texts)")
            mask = tokens["attention_mask"].to(device)
            text = self.text_proj(self.text_encoder(tokens["input_ids"].to(device), mask))
            info["token_mask"] = mask
        out = self.doc_head(images, encoded, image_vec, text, mask, info)
        if self.training and self.cfg.text_dropout > 0 and image_vec is not None \
                and text is not None:
            # Modality dropout: these docs must be classified from their image alone, so the
            # title cannot carry the doc side while the image, the side a query photo has to
            # match, stays under-trained.
            drop = torch.rand(len(out), device=out.device) < self.cfg.text_dropout
            out = torch.where(drop[:, None], image_vec, out)
        emb = F.normalize(self.doc_norm(self.out_proj(out)), dim=-1)
        return (emb, info) if return_attention else emb

    # ---- one doc head per fusion mode (cfg.fusion), chosen at construction ------------------
    # Each takes the images, the encoded image, its transformed pooled vector, the projected
    # text tokens and their mask, fills ``info`` with what it can show, and returns the doc
    # vector.
    def _concept_head(self, images, encoded, image_vec, text, mask, info):
        """The paper's: concepts read the title (:class:`ConceptMemory`), then attend over the
        image regions and are gated against the image vector (:class:`ConceptFusion`)."""
        concepts, info["token_to_concept"] = self.concept_memory(text, mask)
        if self.trains_title and self.training:  # only training reads it (_training_docs)
            self._title_embedding(concepts, info)
        return self._attend_to_image(concepts, None, encoded[0], image_vec, info)

    def _title_embedding(self, concepts, info):
        """The title's own embedding (the mean concept, as a text-only doc, through its own
        norm) into ``info``, where :meth:`_training_docs` finds it; returns it projected and
        not yet normalised."""
        title = self.out_proj(concepts.mean(dim=1))
        info["title_embedding"] = F.normalize(self.title_norm(title), dim=-1)
        return title

    def _direct_head(self, images, encoded, image_vec, text, mask, info):
        """Ablation: the title's tokens attend over the image directly, without the memory."""
        return self._attend_to_image(text, mask, encoded[0], image_vec, info)

    def _attend_to_image(self, queries, query_mask, patches, image_vec, info):
        out, info["text_to_image"], gate = self.fusion(queries, self.doc_transform(patches),
                                                       image_vec, query_mask)
        _note_gate(info, gate)
        info["grid"] = int(round(math.sqrt(patches.shape[1])))
        return out

    def _image_only_head(self, images, encoded, image_vec, text, mask, info):
        """Ablation: the doc is its image; the title is never read."""
        return image_vec

    def _text_only_head(self, images, encoded, image_vec, text, mask, info):
        """Ablation: the doc is the mean of its concepts; the image is never read."""
        concepts, info["token_to_concept"] = self.concept_memory(text, mask)
        return concepts.mean(dim=1)

    def _concat_head(self, images, encoded, image_vec, text, mask, info):
        """Ablation: the image vector and the title's mean token, concatenated and projected."""
        m = mask[..., None].to(text.dtype)
        return self.concat_proj(torch.cat([image_vec, (text * m).sum(1) / m.sum(1)], dim=-1))

    def _zoom_head(self, images, encoded, image_vec, text, mask, info):
        """Concepts read the title and attend over the image's regions; the region they point
        at is cut out, resampled to full size and encoded again by the shared encoder: the
        doc is that region, seen at the scale a photo shows its product."""
        concepts, info["token_to_concept"] = self.concept_memory(text, mask)
        weights = self.region_attention.weights(concepts, self.doc_transform(encoded[0]))
        info["text_to_image"], info["grid"] = weights, int(round(math.sqrt(weights.shape[-1])))
        info["zoom_box"] = box = attention_box(weights, info["grid"])
        region = zoom_to(normalise_pixels(images), box)
        return self.doc_transform(self.image_encoder(region)[1])

    def _regions_head(self, images, encoded, image_vec, text, mask, info):
        """Candidate windows of the image (:func:`candidate_boxes`), each encoded again at full
        size; the doc is what its title chooses among them.

        ``region_choice="concepts"``: the concepts attend over the windows and are gated against
        the whole image as in :meth:`_concept_head`.  ``"title"``: the title's own embedding
        (the mean concept, as a text-only doc) weighs each window by its cosine with it (softmax
        at a learned temperature); trained as a sample of the doc's class besides the doc
        (:meth:`forward`), it lives where photos of the product do, so it picks the window a
        photo would match (``docs/EXPERIMENTS.md``, "The title in the photos' space");
        ``region_whole_bias`` is added to the whole image's logit, and ``region_whole="concepts"``
        makes the whole-image candidate :meth:`_concept_head`'s doc vector (the concepts attend
        over its patches), so a doc no window wins is the paper's fused doc.
        ``region_pick="argmax"``: served (eval mode), a doc is its top candidate alone, not the
        blend training learns through (a single shot's whole image then keeps none of its
        windows; ``docs/EXPERIMENTS.md``, "The top candidate alone, served")."""
        concepts, info["token_to_concept"] = self.concept_memory(text, mask)
        windows = self.regions[1:]
        n, k = len(images), len(windows)
        pixels = normalise_pixels(images)
        cut = zoom_to(pixels.repeat_interleave(k, dim=0), windows.repeat(n, 1))
        was_training = self.image_encoder.training
        self.image_encoder.eval()
        with torch.no_grad():
            pooled = self.image_encoder(cut)[1].view(n, k, -1)
        self.image_encoder.train(was_training)
        regions = self.doc_transform(torch.cat([encoded[1][:, None], pooled.to(encoded[1].dtype)],
                                               dim=1))
        whole_map = None  # where the whole-image candidate looks: None = everywhere alike
        if self.title_chooses:
            if self.cfg.region_whole == "concepts":
                fused, whole_map, gate = self.fusion(concepts, self.doc_transform(encoded[0]),
                                                     image_vec)
                regions = torch.cat([fused[:, None], regions[:, 1:]], dim=1)
                _note_gate(info, gate)
            title = self._title_embedding(concepts, info)
            cosine = F.normalize(self.out_proj(regions), dim=-1) @ \
                F.normalize(title, dim=-1)[:, :, None]
            logits = self.choice_scale.exp() * cosine.transpose(1, 2)
            logits[..., 0] += self.cfg.region_whole_bias  # a window must beat the whole image
            weights = torch.softmax(logits, dim=-1)
            if self.cfg.region_pick == "argmax" and not self.training:  # training blends
                weights = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(weights.dtype)
            out = (weights @ regions).squeeze(1)
        else:
            out, weights, gate = self.fusion(concepts, regions, image_vec)
            _note_gate(info, gate)
        info["region_weights"], info["grid"] = weights, int(round(math.sqrt(encoded[0].shape[1])))
        cells = boxes_on_grid(self.regions, info["grid"]).to(weights.dtype)
        if whole_map is None:
            info["text_to_image"] = weights @ cells
        else:  # the whole image's share spread where its concepts look
            info["text_to_image"] = weights[..., 1:] @ cells[1:] + \
                weights[..., :1] * whole_map.mean(dim=1, keepdim=True)
        return out

    def forward(self, query_images, doc_images, tokens: dict | None = None):
        """Both paths in one call (what DDP wraps): (query embeddings, doc embeddings), the
        docs as :meth:`_training_docs` returns them.

        An encoder with BatchNorm gets query photos and doc images as one batch, so training
        normalises by the statistics of both domains together, as its running statistics (used
        at evaluation) do.  Any other encoder is batch-independent and gets one call per domain,
        which is equivalent and keeps each domain's matrix shapes (and so its float sums) its
        own.
        """
        n_q, n_d = len(query_images), len(doc_images)
        if self.encode_domains_together and n_q and n_d and self.cfg.fusion != "text_only":
            patches, pooled = self.encode_images(torch.cat([query_images, doc_images]))
            return (self._query_head(pooled[:n_q]),
                    self._training_docs(doc_images, (patches[n_q:], pooled[n_q:]), tokens))
        q = self.embed_queries(query_images) if n_q else None
        d = self._training_docs(doc_images, self._encode_docs(doc_images), tokens) \
            if n_d else None
        return q, d

    def _training_docs(self, images, encoded, tokens):
        """The docs :meth:`forward` returns: their embeddings [B, D]; when the title chooses
        the window (``region_choice="title"``) or ``title_sample`` is on, and the model trains,
        [B, 2, D]: each doc and its title's embedding, which the objective trains as a sample of
        the doc's class too; with ``window_sample`` [B, 3, D], the chosen window's embedding
        (:meth:`_chosen_window`) third."""
        if not (self.trains_title and self.training):
            return self._doc_head(images, encoded, tokens)
        emb, info = self._doc_head(images, encoded, tokens, return_attention=True)
        samples = [emb, info["title_embedding"].to(emb.dtype)]
        if self.cfg.window_sample:
            samples.append(self._chosen_window(images, info["region_weights"]).to(emb.dtype))
        return torch.stack(samples, dim=1)

    def _chosen_window(self, images, region_weights):
        """Each doc's candidate that its title weighs most in ``region_weights`` [B, 1, 10],
        the whole image among them, cut out, resampled to full size and embedded as an
        image-only doc is, with gradient into the encoder: what a photo of the product should
        match when the title chose right.  A doc no window wins trains its whole image, not a
        part of its product no photo shows (the windows alone cost single docs 8.7 points,
        ``docs/EXPERIMENTS.md``, "The chosen window as a sample of its class").  The choice
        itself gets no gradient from it."""
        pick = region_weights[:, 0].detach().argmax(dim=-1)
        cut = zoom_to(normalise_pixels(images), self.regions[pick])
        window = self.doc_transform(self.image_encoder(cut)[1])
        return F.normalize(self.doc_norm(self.out_proj(window)), dim=-1)

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
