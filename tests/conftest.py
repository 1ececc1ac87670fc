"""Shared fixtures: one tiny SynthShop folder per test session (generated in seconds), and the
torch thread count every test starts from."""
from __future__ import annotations

import os

import pytest
import torch

from mixer_lite.synthshop import make_synthshop


def threads_for_tests() -> int:
    """The torch thread count of every test: ``MIXER_LITE_TEST_THREADS`` when set (CI runs the
    numerics-sensitive tests a second time at another count), else the cores shared among the
    pytest-xdist workers (oversubscribed threads run several times slower)."""
    if os.environ.get("MIXER_LITE_TEST_THREADS"):
        return int(os.environ["MIXER_LITE_TEST_THREADS"])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)




def pytest_collection_modifyitems(items):
    """Tests marked ``long`` first (in their order), the rest after: with pytest-xdist a long test
    collected late would keep one worker busy after the others ran out of work."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(autouse=True)
def torch_threads():
    """Every test starts at :func:`threads_for_tests` threads, whatever ran before it in its worker,
    and what it changes is undone after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads_for_tests())
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "tiny"
    stats = make_synthshop(out, preset="tiny", seed=0, progress=False)
    return out, stats


@pytest.fixture(scope="session")
def mini_dir(tmp_path_factory):
    """A SynthShop folder a fifth of ``tiny`` (60 products, 480 photos) for the tests of how a
    command treats a folder or a run, which no folder's size changes: every command reads and
    checks a folder whole, so on ``tiny`` these tests spent most of their time decoding it."""
    out = tmp_path_factory.mktemp("synth") / "mini"
    stats = make_synthshop(out, preset="tiny", seed=0, progress=False, n_products=60,
                           n_queries=480)
    return out, stats


@pytest.fixture(scope="session")
def scene_dir(tmp_path_factory):
    """A small SynthShop folder with scene docs: 40% of docs shot among other products."""
    out = tmp_path_factory.mktemp("scenes") / "scenes"
    make_synthshop(out, preset="tiny", seed=0, progress=False, n_products=120, n_queries=600,
                   scene_share=0.4)
    return out


@pytest.fixture(scope="session")
def tiny_pack(tiny_dir, tmp_path_factory):
    """The tiny folder packed (``mixer-lite pack``) into shards of about 0.5 MiB: several per
    image table."""
    from mixer_lite.pack import pack_dataset

    out = tmp_path_factory.mktemp("pack") / "tiny.packed"
    pack_dataset(tiny_dir[0], out, shard_mb=0.5, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_data(tiny_dir):
    from mixer_lite.dataset import load_dataset

    return load_dataset(tiny_dir[0])


@pytest.fixture(scope="session")
def mini_data(mini_dir):
    from mixer_lite.dataset import load_dataset

    return load_dataset(mini_dir[0])
