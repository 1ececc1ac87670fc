"""Image encoder weights that ship with mixer-lite (made by ``mixer-lite pretrain`` from real
drawings; ``mixer_lite/weights/MODEL_CARD.md``): the registry with checksums, loading into a
``cnn`` encoder, the card inside each file, and writing new ones.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
import torch.nn as nn

from .files import file_sha256
from .runs import save_torch


# Pretrained ``cnn`` weights that ship in mixer_lite/weights/ (made by ``mixer-lite pretrain``;
# MODEL_CARD.md there): name -> (file, sha256).
WEIGHTS_FORMAT = "mixer-lite-image-encoder/1"
SHIPPED_WEIGHTS = {
    "openclipart-cnn": ("openclipart-cnn.pt",
                        "213440e836f86c0d76a8fefbbb3247ebe06cfca4e14eb4e642dd205f5cf20c1b"),
    # Pretrained across the icon sets' designers (``mixer-lite pretrain --config
    # designers-cpu``), the icons dataset's concepts left out: MODEL_CARD.md there.
    "designers-cnn": ("designers-cnn.pt",
                      "9ca669cc4c23b7d24c8e04d2df04d057a220ef79af57f2b3cbde519e612c6e83"),
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


def load_image_weights(encoder: nn.Module, cfg) -> dict | None:
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


def export_weights(encoder: nn.Module, model_cfg, card: dict, path) -> str:
    """Write the encoder's weights (with their card) to ``path`` atomically; returns the
    file's sha256."""
    obj = {"format": WEIGHTS_FORMAT, "image_encoder": model_cfg.image_encoder,
           "vit_dim": model_cfg.vit_dim, "image_size": model_cfg.image_size,
           "state_dict": {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()},
           "card": card}
    save_torch(obj, Path(path))
    return file_sha256(path)
