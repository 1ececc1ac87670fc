"""Shared fixtures: one tiny SynthShop folder per test session (generated in seconds)."""
from __future__ import annotations

import pytest

from mixer_lite.synthshop import make_synthshop


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "tiny"
    stats = make_synthshop(out, preset="tiny", seed=0, progress=False)
    return out, stats


@pytest.fixture(scope="session")
def tiny_data(tiny_dir):
    from mixer_lite.dataset import load_dataset

    return load_dataset(tiny_dir[0])
