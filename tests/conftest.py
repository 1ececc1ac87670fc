"""Shared fixtures: one tiny SynthShop folder per test session (generated in seconds)."""
from __future__ import annotations

import os

import pytest
import torch

from mixer_lite.synthshop import make_synthshop


def pytest_configure(config):
    # Under pytest-xdist every worker is a process: share the cores instead of each torch
    # taking all of them (oversubscribed threads run several times slower).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "tiny"
    stats = make_synthshop(out, preset="tiny", seed=0, progress=False)
    return out, stats


@pytest.fixture(scope="session")
def tiny_data(tiny_dir):
    from mixer_lite.dataset import load_dataset

    return load_dataset(tiny_dir[0])
