"""Running ``mixer-lite`` as a user does (a subprocess), shared by the CLI and fault tests."""
from __future__ import annotations

import subprocess
import sys

# A model small enough that a tiny run trains in seconds, through the same code as tiny-cpu.
# The shipped pretrained weights are for width 128, so this narrow cnn starts from scratch.
TINY_MODEL = ["--model.vit_dim=32", "--model.text_dim=32", "--model.text_depth=1",
              "--model.text_heads=2", "--model.embed_dim=32", "--model.n_concepts=4",
              "--model.image_weights=none", "--batch_size=32", "--threads=1"]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mixer_lite.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)
