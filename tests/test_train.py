"""Training: exact resume, config errors, every loss path, and torchrun (2 gloo ranks) == 1 rank."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mixer_lite.dataset import ImageTable, data_fingerprint, image_files, load_dataset
from mixer_lite.retrieval import embed_docs, evaluate_model, load_index
from mixer_lite.runs import load_run_model
from mixer_lite.sampling import EpochSampler, augment, make_samples, total_steps
import mixer_lite.train as train_module
from mixer_lite.train import build_model, config_from, train

SMALL = ["--model.vit_dim=32", "--model.vit_depth=1", "--model.vit_heads=2",
         "--model.text_dim=32", "--model.text_depth=1", "--model.text_heads=2",
         "--model.embed_dim=32", "--model.n_concepts=4", "--batch_size=32", "--threads=1",
         "--loader_threads=2", "--model.image_weights=none"]


def cfg(*extra):
    return config_from("tiny-cpu", SMALL + list(extra))


def torchrun(command, *args, ranks: int = 2) -> str:
    """``mixer-lite command *args`` on ``ranks`` gloo ranks of one torch thread each; its
    stdout.  The ``--`` keeps torchrun from reading the command's options as its own
    (``--run``).

    A launch one of whose ranks the C++ runtime aborted (SIGABRT, "terminate called without
    an active exception": seen once in many CI runs, two ranks sharing two busy cores) is
    launched once more, from a clean folder unless it resumes, with a warning that shows the
    first launch's error; any other failure, or a second abort, fails the test."""
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
              "--standalone", "-m", "mixer_lite.cli", "--", command, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, capture_output=True, text=True, env=env)
    if done.returncode != 0 and re.search(r"exitcode\s*:\s*-6\b", done.stderr):
        warnings.warn(f"a torchrun rank aborted; launched again:\n{done.stderr[-3000:]}")
        if "--out" in args and "--resume" not in args:
            shutil.rmtree(args[list(args).index("--out") + 1], ignore_errors=True)
        done = subprocess.run(launch, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def step_records(run, steps: int) -> list[dict]:
    """The run's metrics log after its opening record, checked: the initial weights' validation
    opens it, once, then every step 1..steps is logged once."""
    initial, *log = [json.loads(x) for x in (run / "metrics.jsonl").open()]
    assert initial["step"] == 0 and set(initial) == {"step", "val_recall@1", "val_recall@10"}
    assert [x["step"] for x in log] == list(range(1, steps + 1))
    return log


def weights(run):
    return torch.load(run / "model.pt", weights_only=True)["state_dict"]


def test_kill_and_resume_equals_uninterrupted_run(tiny_dir, tiny_pack, tmp_path):
    """The run killed after step 3 and resumed ends with the uninterrupted run's weights.  Its
    batches come from 2 loader worker processes before the kill and 1 after, the uninterrupted
    run's from none: the batches are the same whatever the worker count.  It resumes on the
    folder's pack (the same data, its images read from Arrow shards), and logs to TensorBoard
    too, whose events after the checkpoint are dropped on resume as the log's lines are."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tiny_dir[0]
    c = cfg("--epochs=0.12", "--checkpoint_every=2", "--log_every=1", "--eval_at_end=false")
    full = train(data, tmp_path / "full", c, progress=False)
    assert full["finished"] and full["steps"] >= 5
    killed = train(data, tmp_path / "cut", dataclasses.replace(c, stop_after=3, loader_workers=2,
                                                                tensorboard=True),
                   progress=False)
    assert not killed["finished"] and not (tmp_path / "cut" / "model.pt").exists()
    ck = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 2  # the last checkpoint before the "kill"
    stale = tmp_path / "cut" / "checkpoints" / ".last.pt.x1y2.tmp"  # as a kill -9 mid-save
    stale.write_bytes(b"")
    resumed = train(tiny_pack, tmp_path / "cut",
                    dataclasses.replace(c, loader_workers=1, tensorboard=True), resume=True,
                    progress=False)
    assert not stale.exists()
    assert resumed["finished"]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Step 3 was logged before the kill and again after the resume: the log keeps it once.
    # The initial weights' validation record opens it, also once.
    log = step_records(tmp_path / "cut", full["steps"])
    # Every record says what its steps cost (images per second, the share spent waiting for
    # data, the peak memory so far).
    assert all(x["images_per_s"] > 0 and 0 <= x["data_wait_share"] <= 1 and
               x["peak_mem_mib"] > 0 for x in log)
    board = EventAccumulator(str(tmp_path / "cut" / "tensorboard"))
    board.Reload()
    for key in ("loss", "lr", "images_per_s"):
        events = board.Scalars(key)
        assert [e.step for e in events] == [x["step"] for x in log], key
        np.testing.assert_allclose([e.value for e in events], [x[key] for x in log], rtol=1e-6)


def test_throughput_reports_each_window_from_its_own_steps():
    """Hand-computed: 2 steps of 2 s, 0.5 s of each waiting, 64 images a step."""
    from mixer_lite.train import Throughput

    speed = Throughput(64, torch.device("cpu"))
    speed.add(2.0, 0.5), speed.add(2.0, 0.5)
    first = speed.report()
    assert first["images_per_s"] == 32.0 and first["data_wait_share"] == 0.25
    speed.add(1.0, 0.0)  # the next window starts empty
    second = speed.report()
    assert second["images_per_s"] == 64.0 and second["data_wait_share"] == 0.0
    assert second["peak_mem_mib"] >= first["peak_mem_mib"] > 0


class RowPixels:
    """A stand-in for TrainingImages whose top-left pixel is its image's row, and the others
    that plus a ramp (so a flip or a shift shows): a batch's pixels say which images were read
    and how they were augmented."""

    @staticmethod
    def batch(query_rows, doc_rows):
        ramp = 16 * torch.arange(8)[:, None] + torch.arange(8)
        return tuple(((torch.as_tensor(np.asarray(rows, np.int64))[:, None, None, None] + ramp)
                      % 256).to(torch.uint8).expand(-1, 3, 8, 8).contiguous()
                     for rows in (query_rows, doc_rows))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_micro_batches_split_each_step_over_ranks_and_parts(grad_accum):
    """Micro-batch i of rank r holds the r-th share, part i % grad_accum, of step
    i // grad_accum's batch, and reads exactly its samples' images (query photos, then docs)."""
    from mixer_lite.sampling import MicroBatches, Samples

    rng = np.random.default_rng(0)
    samples = Samples(kind=rng.integers(0, 2, 60).astype(np.int8),
                      row=rng.integers(0, 200, 60), label=rng.integers(0, 9, 60), num_classes=9)
    c = dataclasses.replace(cfg(), batch_size=8, grad_accum=grad_accum, augment=False)
    sampler = EpochSampler(samples.label, cap=16, batch_size=8, seed=0)
    for world in (1, 2):
        per = 8 // world // grad_accum
        for rank in range(world):
            mb = MicroBatches(sampler, samples, RowPixels, c, total_steps=5, rank=rank,
                              world=world)
            assert len(mb) == 5 * grad_accum
            for i in range(len(mb)):
                step, part = divmod(i, grad_accum)
                lo = rank * (8 // world) + part * per
                idx, doc_rows, q, d = mb[i]
                assert np.array_equal(idx, sampler.batch(step)[lo: lo + per])
                kind, row = samples.kind[idx], samples.row[idx]
                assert np.array_equal(doc_rows, row[kind == 1])
                assert q[:, 0, 0, 0].tolist() == row[kind == 0].tolist()
                assert d[:, 0, 0, 0].tolist() == row[kind == 1].tolist()


def test_loader_workers_return_the_batches_the_loop_would_make():
    """2 worker processes, from micro-batch 3 on, return what the dataset makes in this
    process, in order, augmentation included."""
    from mixer_lite.sampling import MicroBatches, Samples, micro_batch_loader

    rng = np.random.default_rng(1)
    samples = Samples(kind=rng.integers(0, 2, 60).astype(np.int8),
                      row=rng.integers(0, 200, 60), label=rng.integers(0, 9, 60), num_classes=9)
    c = dataclasses.replace(cfg(), batch_size=8, augment=True)
    mb = MicroBatches(EpochSampler(samples.label, 16, 8, 0), samples, RowPixels, c, 9)
    got = list(micro_batch_loader(mb, start=3, workers=2))
    assert len(got) == len(mb) - 3
    for i, (idx, doc_rows, q, d) in enumerate(got, start=3):
        want = mb[i]
        assert np.array_equal(idx, want[0]) and np.array_equal(doc_rows, want[1])
        assert torch.equal(q, want[2]) and torch.equal(d, want[3])


def test_existing_run_is_not_overwritten(tiny_dir, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_dir[0], tmp_path / "run", cfg(), progress=False)


@pytest.mark.parametrize("extra", [
    ["--loss=arcface", "--sample_rate=0.3"],
    ["--loss=infonce", "--steps=3"],
    ["--loss=triplet", "--model.fusion=concat"],
    ["--labels=raw_clicks", "--grad_accum=2", "--model.fusion=image_only"],
    ["--model.fusion=text_only", "--model.shared_transform=true"],
    ["--centre_init=docs", "--model.image_encoder=cnn"],
])
def test_every_loss_and_label_path_runs_end_to_end(tiny_dir, tmp_path, extra):
    """Plumbing: each path writes a whole run folder (that each *learns* is test_learning's)."""
    r = train(tiny_dir[0], tmp_path / "run", cfg("--epochs=0.05", "--log_every=1", *extra),
              progress=False)
    assert r["finished"]
    if "--steps=3" in extra:  # steps, when set, decide the run's length instead of epochs
        assert r["steps"] == r["stopped_at"] == 3
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["queries"] == 144 and ev["data"]["fingerprint"] == data_fingerprint(tiny_dir[0])
    log = step_records(tmp_path / "run", r["steps"])
    health = {"cos_own", "cos_other", "cos_batch"} | (
        set() if any(x in extra for x in ("--loss=infonce", "--loss=triplet")) else
        {"centre_norm"})
    assert all(health <= set(x) and np.isfinite(x["loss"]) for x in log)
    # The model it saved is trained (not its initial weights) and scores what eval.json says.
    from mixer_lite.dataset import load_dataset
    from mixer_lite.retrieval import evaluate_model
    from mixer_lite.runs import load_run_model
    from mixer_lite.train import build_model

    data = load_dataset(tiny_dir[0], check_images=False)
    c = cfg("--epochs=0.05", "--log_every=1", *extra)
    initial = build_model(data, make_samples(data, c)[0], c).state_dict()
    saved = weights(tmp_path / "run")
    assert any(not torch.equal(saved[k], initial[k]) for k in saved
               if saved[k].is_floating_point() and "running" not in k)
    again = evaluate_model(load_run_model(tmp_path / "run"), data)
    assert all(abs(again[k] - ev[k]) <= 1 / ev["queries"] + 1e-9
               for k in ("recall@1", "recall@10", "map@10"))


@pytest.mark.parametrize("extra", [[], ["--loss=infonce"], ["--labels=raw_clicks"]])
def test_validation_classes_are_held_out_of_training(tiny_data, extra):
    """Checked against the classes built independently here: no validation query or doc is a
    training sample, each validation query's relevant docs are its class's docs, and the
    split is the same for every loss, label choice and seed."""
    from mixer_lite.classes import build_classes_from_clicks

    c = cfg("--val_share=0.25", *extra)
    samples, stats = make_samples(tiny_data, c)
    classes, _ = build_classes_from_clicks(*tiny_data.clicks_columns(), c.classes)
    val = samples.validation
    q_ids = [tiny_data.query_ids[r] for r in val.query_rows]
    held = [cl for cl in classes if set(cl["query_ids"]) & set(q_ids)]
    assert 0.15 < len(held) / len(classes) < 0.35 and stats["val_queries"] == len(q_ids)
    held_q = {q for cl in held for q in cl["query_ids"]}
    held_d = {tiny_data.doc_row[d] for cl in held for d in cl["doc_ids"]}
    assert set(q_ids) == held_q
    train_q = {tiny_data.query_ids[r] for r in samples.row[samples.kind == 0]}
    assert not train_q & held_q and not set(samples.doc_rows()) & held_d
    docs_of = {q: {tiny_data.doc_row[d] for d in cl["doc_ids"]} for cl in held
               for q in cl["query_ids"]}
    assert all(rel == docs_of[q] for q, rel in zip(q_ids, val.relevant))
    other_seed, _ = make_samples(tiny_data, cfg("--val_share=0.25", "--seed=3"))
    assert np.array_equal(np.sort(other_seed.validation.query_rows), np.sort(val.query_rows))


@pytest.mark.parametrize("loss", ["cosface", "infonce"])
def test_doc_labels_of_gives_each_doc_image_of_a_batch_its_own_label(tiny_data, loss):
    """What doc_mosaic reads to keep a doc's own class out of its layout: the label of each doc
    image images_of gives, in its order (a class sample's class: each doc is in one class; a
    pair's index)."""
    samples, _ = make_samples(tiny_data, cfg(f"--loss={loss}"))
    idx = np.random.default_rng(0).permutation(len(samples.label))[:64]
    doc_rows, labels = samples.images_of(idx)[1], samples.doc_labels_of(idx)
    assert len(labels) == len(doc_rows) > 0
    if samples.pair_doc is None:
        class_of = {int(r): int(c) for r, c, k in zip(samples.row, samples.label, samples.kind)
                    if k == 1}
        assert [class_of[int(r)] for r in doc_rows] == labels.tolist()
    else:
        assert labels.tolist() == [int(samples.label[k]) for k in idx]


@pytest.mark.parametrize("item,msg", [
    ("--lr=fast", "expected float"),
    ("--modle.fusion=concat", "unknown config key 'modle.fusion'"),
    ("--loss=contrastive", "loss must be one of"),
    ("--model.fusion=late", "fusion must be one of"),
    ("--centre_init=zeros", "centre_init must be"),
    ("--steps=-1", "steps must be >= 0"),
    ("--batch_size=30", None),
])
def test_malformed_config_is_rejected(item, msg):
    if msg is None:  # valid on its own; with grad_accum=4 it is not a multiple
        with pytest.raises(ValueError, match="multiple of grad_accum"):
            config_from("tiny-cpu", [item, "--grad_accum=4"])
        return
    with pytest.raises(ValueError, match=msg):
        config_from("tiny-cpu", [item])
    r = subprocess.run([sys.executable, "-m", "mixer_lite.cli", "train", "--data", "x", "--out",
                        "y", item], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_total_steps_from_epochs_or_steps():
    assert total_steps(cfg("--epochs=3.5"), 124) == 434  # round(3.5 x 124)
    assert total_steps(cfg("--epochs=0.01"), 10) == 1     # never zero
    assert total_steps(cfg("--epochs=3.5", "--steps=7"), 124) == 7


def test_unknown_preset():
    with pytest.raises(ValueError, match="presets: tiny-cpu, base-gpu, scratch-cpu$"):
        config_from("huge", [])


def test_class_balanced_sampler_keeps_runs_of_k_of_a_class_together():
    labels = np.repeat(np.arange(30), 8)
    plain = EpochSampler(labels, cap=8, batch_size=16, seed=0)
    pk = EpochSampler(labels, cap=8, batch_size=16, seed=0, per_class=4)
    assert pk.steps_per_epoch == plain.steps_per_epoch
    order = pk.epoch_order(0)
    assert sorted(order) == sorted(plain.epoch_order(0))  # the same samples, regrouped
    runs = labels[order].reshape(-1, 4)
    assert (runs == runs[:, :1]).all()  # every aligned run of 4 is one class
    # uniform shuffling almost never puts 4 of a class side by side
    assert not (labels[plain.epoch_order(0)].reshape(-1, 4) == runs[:, :1]).all()


def test_sampler_caps_classes_and_depends_only_on_seed_and_epoch():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 10)
    s = EpochSampler(labels, cap=5, batch_size=4, seed=1)
    assert s.epoch_len == 5 + 3 + 5 and s.steps_per_epoch == 3
    order = s.epoch_order(2)
    assert np.bincount(labels[order]).tolist() == [5, 3, 5]
    again = EpochSampler(labels, cap=5, batch_size=4, seed=1)
    assert np.array_equal(again.batch(7), s.batch(7))
    assert not np.array_equal(s.epoch_order(3), order)


def test_augment_is_seeded_and_shape_preserving():
    x = torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8)
    a, b = augment(x, 3, 0), augment(x, 3, 0)
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == torch.uint8
    assert not torch.equal(augment(x, 4, 0), a)
    # Each output is one of the 2 x 9 x 9 flips and 4-pixel shifts of its own input, built
    # here by numpy's reflect padding.
    for img, out in zip(x.numpy(), a.numpy()):
        views = [np.pad(v, ((0, 0), (4, 4), (4, 4)), mode="reflect")[:, dy:dy + 16, dx:dx + 16]
                 for v in (img, img[:, :, ::-1]) for dy in range(9) for dx in range(9)]
        assert any(np.array_equal(out, v) for v in views)
    empty = x[:0]  # a batch with no docs (raw-click labels) or no photos
    assert augment(empty, 3, 0).shape == empty.shape


def test_augment_equals_a_loop_over_the_images():
    """The batched crop against one crop per image, from the same draws."""
    import torch.nn.functional as F

    x = torch.randint(0, 255, (7, 3, 12, 10), dtype=torch.uint8)
    g = torch.Generator().manual_seed(5 * 1_000_003 + 11)  # augment's seed for (seed 5, step 11)
    flip = torch.rand(7, generator=g) < 0.5
    dx, dy = torch.randint(0, 9, (2, 7), generator=g)
    want = []
    for i in range(7):
        img = x[i].flip(2) if flip[i] else x[i]
        padded = F.pad(img[None].float(), (4, 4, 4, 4), mode="reflect")[0]
        want.append(padded[:, dy[i]: dy[i] + 12, dx[i]: dx[i] + 10].to(torch.uint8))
    assert torch.equal(augment(x, 11, 5), torch.stack(want))


def assert_same_first_step(one: Path, two: Path, grad_tol: float = 1e-5,
                           centre_tol: float = 1e-6) -> None:
    """The runs in ``one`` and ``two`` took the same first step: the same gradients, compared
    through AdamW's first moment (0.1 x the gradient, linear in it, whereas the weights after
    an Adam step are not: a near-zero gradient's float noise becomes a step of lr), to
    ``grad_tol`` of the largest, and the same class centres after their SGD step, each rank
    holding its shard."""
    ca = torch.load(one / "checkpoints" / "last.pt", weights_only=True)
    cb = torch.load(two / "checkpoints" / "last.pt", weights_only=True)
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 10
    # Some coordinates have an identically zero gradient up to float noise (the key third of
    # an attention bias): the absolute tolerance is relative to the largest gradient of all.
    scale = max(float(s["exp_avg"].abs().max()) for s in sa.values())
    for i in sa:
        torch.testing.assert_close(sb[i]["exp_avg"], sa[i]["exp_avg"], rtol=1e-3,
                                   atol=grad_tol * scale, msg=lambda m, i=i: f"parameter {i}: {m}")
    shards = cb["classifier"] if isinstance(cb["classifier"], list) else [cb["classifier"]]
    torch.testing.assert_close(torch.cat([s["weight"] for s in shards]),
                               ca["classifier"]["weight"], rtol=1e-4, atol=centre_tol)


def test_channels_last_takes_the_same_first_step(tiny_dir, tmp_path):
    """channels_last changes float order, not what a step computes: the gradients and centres
    of a first step with it equal those without (the CNN, BatchNorm included).  Its
    convolutions and BatchNorm round differently on the CPU: measured, its gradients differ by
    6e-4 of the largest and its centres by 9e-4, against 3e-5 and 1e-6 for 1 against 2
    threads, and 0.55 of the largest for the photos fed transposed (a layout error planted to
    check this test).  (``--compile`` measured 3e-5, as threads do; it is not tested here: a
    cold inductor cache compiles for 40 s of the suite's budget.)"""
    base = ("--steps=1", "--eval_at_end=false", "--model.dropout=0", "--val_share=0")
    train(tiny_dir[0], tmp_path / "plain", cfg(*base), progress=False)
    train(tiny_dir[0], tmp_path / "nhwc", cfg(*base, "--channels_last=true"), progress=False)
    assert_same_first_step(tmp_path / "plain", tmp_path / "nhwc", grad_tol=3e-3,
                           centre_tol=3e-3)


def test_torchrun_two_ranks_equal_one_process(tiny_dir, tmp_path):
    """Hybrid parallel: DDP encoders + sharded classifier over 2 gloo ranks, each reading its
    batches through a loader worker process, == 1 process reading them itself, on the
    gradients of a step (weights after several Adam steps differ by float order: by up to
    7e-5 on AVX-512 kernels, where the two runs sum in different orders)."""
    settings = ["--steps=1", "--model.dropout=0", "--augment=false", "--clip_grad=0",
                "--val_share=0", "--centre_init=random",
                "--device=cpu",  # gloo, also on a machine with one GPU
                # BatchNorm statistics are per rank under DDP (as everywhere without
                # SyncBatchNorm), so only a model without it (the ViT, no embedding BatchNorm)
                # can equal one process exactly.
                "--model.image_encoder=vit", "--model.embed_norm=none"]
    args = ["--data", str(tiny_dir[0]), "--config", "tiny-cpu", *SMALL, *settings]
    train(tiny_dir[0], tmp_path / "one", cfg(*settings, "--eval_at_end=false"), progress=False)
    torchrun("train", "--out", tmp_path / "two", *args, "--loader_workers=1")
    assert_same_first_step(tmp_path / "one", tmp_path / "two")
    # The end-of-run evaluation, each rank embedding half of the docs and photos, equals
    # one process evaluating the same model.pt (907 docs: the shares differ by one).
    sharded = json.loads((tmp_path / "two" / "eval.json").read_text())
    whole = evaluate_model(load_run_model(tmp_path / "two"), load_dataset(tiny_dir[0]))
    assert sharded["docs"] == whole["docs"] and whole["docs"] % 2 == 1
    for k in ("recall@1", "recall@10", "recall@50", "map@10", "mrr", "queries"):
        assert sharded[k] == pytest.approx(whole[k], abs=1e-9), k
    # `index` under torchrun: each rank embeds its share of the docs, rank 0 writes once (the
    # `evaluate` command shares them by the evaluate_model path checked above).
    said = torchrun("index", "--run", tmp_path / "two", "--data", tiny_dir[0], "--device=cpu",
                    "--quiet")
    assert len(said.splitlines()) == 1
    index, meta = load_index(tmp_path / "two" / "index")
    data = load_dataset(tiny_dir[0])
    model = load_run_model(tmp_path / "two")
    docs = embed_docs(model, ImageTable(image_files(data, "docs"), 64), data.doc_texts)
    assert meta["doc_ids"] == data.doc_ids
    np.testing.assert_allclose(index.reconstruct_n(0, index.ntotal), docs, atol=1e-5)


@pytest.mark.long
def test_torchrun_kill_and_resume_equals_uninterrupted_run(mini_dir, tmp_path):
    """2 gloo ranks, stopped after step 3 and resumed from the checkpoint of step 2, end with
    the same weights, classifier shards (each rank's own) and centre-optimiser state as 2 ranks
    that never stopped.  Sampled centres (each rank samples its shard by step) and clipping by
    the norm summed over shards are on, so both must be restored per rank."""
    args = ["--data", str(mini_dir[0]), "--config", "tiny-cpu", *SMALL, "--steps=5",
            "--checkpoint_every=2", "--eval_at_end=false", "--val_share=0", "--device=cpu",
            "--sample_rate=0.5", "--clip_grad=1.0", "--centre_optimizer=adamw"]
    torchrun("train", "--out", tmp_path / "full", *args)
    torchrun("train", "--out", tmp_path / "cut", *args, "--stop_after=3")
    assert not (tmp_path / "cut" / "model.pt").exists()
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    torchrun("train", "--out", tmp_path / "cut", *args, "--resume")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    cb = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert ca["step"] == cb["step"] == 5 and len(ca["classifier"]) == 2
    for rank in range(2):
        for key, value in ca["classifier"][rank].items():
            assert torch.equal(value, cb["classifier"][rank][key]), (rank, key)
    assert ca["classifier"][0]["weight"].shape[0] + ca["classifier"][1]["weight"].shape[0] > \
        ca["classifier"][0]["weight"].shape[0]  # two non-empty shards


def test_torchrun_grad_accum_reduces_each_gradient_once(tiny_dir, tmp_path):
    """2 ranks x 2 micro-batches against 1 process x 4: the same four micro-batches (so even
    BatchNorm sees the same statistics), so one step must give the same gradients.

    Compared through the optimiser state after one step: AdamW's first moment is 0.1 x the
    gradient, linear in it, whereas the weights after an Adam step are not (a near-zero
    gradient's float noise becomes a step of lr).  A micro-batch reduced twice doubles its
    share; clipping is off so that nothing rescales it away.  The CNN, the preset's encoder,
    BatchNorm included (the ViT's DDP step is the test above's).

    On ``tiny``: no micro-batch of its first step holds a single photo or doc.  The embedding
    norm normalises a batch of one by its running statistics (``EmbeddingNorm``), which one
    process has updated with the micro-batches before and a rank has not: on ``mini_dir``,
    whose third micro-batch holds one doc, the gradients differed by 2% of the largest (by
    4e-7 without the embedding norm).
    """
    settings = ["--steps=1", "--model.dropout=0", "--augment=false", "--eval_at_end=false",
                "--device=cpu", "--model.image_encoder=cnn", "--centre_init=random",
                "--clip_grad=0", "--val_share=0"]
    train(tiny_dir[0], tmp_path / "one", cfg(*settings, "--grad_accum=4"), progress=False)
    torchrun("train", "--out", tmp_path / "two", "--data", tiny_dir[0], "--config", "tiny-cpu",
             *SMALL, *settings, "--grad_accum=2")
    assert_same_first_step(tmp_path / "one", tmp_path / "two")


def test_margin_warmup_ramps_linearly_then_holds():
    from mixer_lite.optim import margin_at

    c = config_from("tiny-cpu", ["--margin_warmup_frac=0.5"])
    ramp = [margin_at(s, 100, c.margin_value, c.margin_warmup_frac) for s in (0, 25, 50, 90)]
    assert [round(m, 4) for m in ramp] == [0.0, 0.175, 0.35, 0.35]
    assert margin_at(0, 100, 0.35, config_from("tiny-cpu", []).margin_warmup_frac) == 0.35


def test_warmup_cosine_hand_computed_and_logged_by_train(tiny_dir, tmp_path):
    """The schedule's factors by hand (100 steps, 10% warm-up), and the learning rate each
    training step logs is lr x the factor of the next step (the scheduler steps first)."""
    import math

    from mixer_lite.optim import warmup_cosine

    f = warmup_cosine(100, 0.1)
    assert [round(f(s), 6) for s in (0, 4, 9, 10, 55, 100)] == \
        [0.1, 0.5, 1.0, 1.0, 0.5, 0.0]
    assert abs(f(32) - 0.5 * (1 + math.cos(math.pi * 22 / 90))) < 1e-12
    c = cfg("--steps=6", "--warmup_frac=0.34", "--log_every=1", "--eval_at_end=false",
            "--val_share=0")
    train(tiny_dir[0], tmp_path / "run", c, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    g = warmup_cosine(6, 0.34)
    assert [x["lr"] for x in log] == pytest.approx([c.lr * g(s) for s in range(1, 7)])


def test_validation_logs_the_initial_weights_and_changes_nothing_the_run_learns(tiny_dir,
                                                                                 tmp_path):
    """A fresh run's log opens with the validation recall of its initial weights (the model
    ``build_model`` makes, validated here on its own), and validation passes, at the start or
    every 2 steps, leave the trained weights bit-equal to a run that validates only at its end
    (notebook 04 reads a run's own log for its health curves instead of training it again)."""
    from mixer_lite.train import validate

    def run(name, *extra):
        c = cfg("--steps=4", "--val_share=0.25", "--eval_at_end=false", *extra)
        train(tiny_dir[0], tmp_path / name, c, progress=False)
        return c, [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").open()]

    c, end_only = run("end")
    _, every_two = run("every-two", "--val_every=2")
    assert [x["step"] for x in end_only if "val_recall@10" in x] == [0, 4]
    assert [x["step"] for x in every_two if "val_recall@10" in x] == [0, 2, 4]
    a, b = weights(tmp_path / "end"), weights(tmp_path / "every-two")
    assert all(torch.equal(a[k], b[k]) for k in a)
    data = load_dataset(tiny_dir[0], check_images=False)
    samples, _ = make_samples(data, c)
    val = samples.validation
    initial = validate(build_model(data, samples, c), val,
                       ImageTable(image_files(data, "queries", val.query_rows), 64),
                       ImageTable(image_files(data, "docs"), 64), data.doc_texts, "cpu")[0]
    assert initial == pytest.approx({k: v for k, v in end_only[0].items() if k != "step"},
                                    abs=1.5 / len(val.relevant))


def test_frozen_encoder_waits_then_warms_up_while_the_rest_trains(tiny_dir, tmp_path,
                                                                    monkeypatch):
    """encoder_frozen_frac: the factors by hand (10 steps, 2 of warm-up, 4 frozen), and in
    train() the image encoder's weights unchanged through the frozen steps while the rest of
    the model moves, then moving once its rate is above 0."""
    from mixer_lite.optim import frozen_then_warmup, warmup_cosine

    f, base = frozen_then_warmup(10, 0.2, 0.4), warmup_cosine(10, 0.2)
    assert [f(s) for s in range(4)] == [0.0] * 4
    assert f(4) == pytest.approx(base(4) / 2) and f(5) == pytest.approx(base(5))
    assert [f(s) for s in range(6, 11)] == pytest.approx([base(s) for s in range(6, 11)])

    c = cfg("--steps=10", "--warmup_frac=0.2", "--encoder_frozen_frac=0.4",
            "--model.image_encoder=cnn", "--checkpoint_every=1", "--eval_at_end=false")
    data = load_dataset(tiny_dir[0])
    model = build_model(data, make_samples(data, c)[0], c)  # the run's initial weights
    start = {k: v.clone() for k, v in model.state_dict().items()}

    weights_at = {}  # the model's weights after each step, as each checkpoint saves them
    save = train_module.save_checkpoint

    def spy(path, net, objective, opt, sched, step, *args, **kwargs):
        weights_at[step] = {k: v.clone() for k, v in net.state_dict().items()}
        return save(path, net, objective, opt, sched, step, *args, **kwargs)
    monkeypatch.setattr(train_module, "save_checkpoint", spy)
    train(tiny_dir[0], tmp_path / "run", dataclasses.replace(c, stop_after=5), progress=False)
    frozen, thawed = weights_at[4], weights_at[5]
    encoder = [f"image_encoder.{n}" for n, _ in model.image_encoder.named_parameters()]
    rest = [n for n, _ in model.named_parameters() if n not in encoder]
    assert encoder and rest
    assert all(torch.equal(frozen[k], start[k]) for k in encoder)
    assert any(not torch.equal(frozen[k], start[k]) for k in rest)
    assert any(not torch.equal(thawed[k], frozen[k]) for k in encoder)


def test_train_ramps_the_margin_it_hands_the_classifier(tiny_dir, tmp_path, monkeypatch):
    """Inside train(): the margin each step's classifier call sees, against the ramp by hand
    (4 steps, warm-up over half of them, CosFace m = 0.35)."""
    from mixer_lite.losses import MarginClassifier

    seen = []
    forward = MarginClassifier.forward

    def spy(self, *args, **kwargs):
        seen.append(round(self.margin, 6))
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(MarginClassifier, "forward", spy)
    train(tiny_dir[0], tmp_path / "run", cfg("--steps=4", "--margin_warmup_frac=0.5",
                                             "--eval_at_end=false"), progress=False)
    assert seen == [0.0, 0.175, 0.35, 0.35]


def test_class_balanced_batches_reach_the_classifier_through_train(tiny_dir, tmp_path,
                                                                    monkeypatch):
    """samples_per_class=4 through train(): every batch the loop trains on is made of whole
    runs of one class (as EpochSampler promises), counted from the labels the classifier gets."""
    from mixer_lite.losses import MarginClassifier

    batches = []
    forward = MarginClassifier.forward

    def spy(self, emb, labels, *args, **kwargs):
        batches.append(labels.tolist())
        return forward(self, emb, labels, *args, **kwargs)
    monkeypatch.setattr(MarginClassifier, "forward", spy)
    train(tiny_dir[0], tmp_path / "run", cfg("--steps=3", "--samples_per_class=4",
                                             "--augment=false", "--eval_at_end=false"),
          progress=False)
    assert len(batches) == 3
    for labels in batches:
        # Samples of a class come in one run: a label, once left, never comes back.
        runs = [lab for i, lab in enumerate(labels) if i == 0 or labels[i - 1] != lab]
        assert len(runs) == len(set(runs)) and len(runs) <= len(labels) // 2


def test_sampled_centres_with_adamw_touch_only_the_rows_they_used(tiny_dir, tmp_path):
    """sample_rate=0.2 with the row-wise AdamW through train(): centres never sampled keep
    their initial value and an empty optimiser state; sampled ones moved, and there are at
    least ceil(0.2 x classes) and at most that per step."""
    import math

    from mixer_lite.losses import MarginClassifier

    c = cfg("--steps=3", "--sample_rate=0.2", "--centre_optimizer=adamw",
            "--centre_init=random", "--eval_at_end=false")
    train(tiny_dir[0], tmp_path / "run", c, progress=False)
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    state = ck["classifier"]
    n = len(state["weight"])
    start = MarginClassifier(n, c.model.embed_dim, seed=c.seed).weight.detach()
    touched = state["exp_avg_sq"].abs().sum(1) > 0
    assert math.ceil(0.2 * n) <= int(touched.sum()) <= 3 * math.ceil(0.2 * n)
    assert torch.equal(state["weight"][~touched], start[~touched])
    assert (state["weight"][touched] != start[touched]).any(1).all()
    assert int(state["steps"]) == 3


def test_centres_saved_by_any_number_of_ranks_load_into_any_other(monkeypatch):
    """10 class centres with their AdamW state, saved by 1, 2, 3 or 4 ranks, load into 1, 2, 3
    or 4: each rank holds its rows of the global state (10 over 3 ranks: rows 0-3, 4-6, 7-9),
    whatever the sharding they were saved with."""
    from mixer_lite import losses

    full = losses.MarginClassifier(10, 4, seed=0)
    g = torch.Generator().manual_seed(1)
    for name in ("exp_avg", "exp_avg_sq"):
        getattr(full, name).copy_(torch.rand(10, 4, generator=g))
    full.steps.fill_(7)
    state = {k: v.clone() for k, v in full.state_dict().items()}
    rows = {1: [range(0, 10)], 2: [range(0, 5), range(5, 10)],
            3: [range(0, 4), range(4, 7), range(7, 10)],
            4: [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]}

    def load_into(world, shards):
        out = []
        for r in range(world):
            monkeypatch.setattr(losses, "_world", lambda r=r: (r, world))
            c = losses.MarginClassifier(10, 4, model_parallel=True, seed=5)
            c.load_shards(shards)
            out.append({k: v.clone() for k, v in c.state_dict().items()})
        return out

    for saved in rows:
        shards = [{k: (v if v.dim() == 0 else v[list(rr)]) for k, v in state.items()}
                  for rr in rows[saved]]
        for world in rows:
            for rank, got in enumerate(load_into(world, shards)):
                for key in ("weight", "exp_avg", "exp_avg_sq"):
                    assert torch.equal(got[key], state[key][list(rows[world][rank])]), \
                        (saved, world, rank, key)
                assert int(got["steps"]) == 7
    monkeypatch.setattr(losses, "_world", lambda: (0, 1))
    with pytest.raises(ValueError, match=r"hold 9 class centres \(5 \+ 4\), this classifier "
                                         r"has 10"):
        losses.MarginClassifier(10, 4, model_parallel=True).load_shards(
            [{k: v[:5] if v.dim() else v for k, v in state.items()},
             {k: v[5:9] if v.dim() else v for k, v in state.items()}])
    other = {**state, "steps": torch.tensor(6)}
    with pytest.raises(ValueError, match="disagree on steps"):
        losses.MarginClassifier(10, 4, model_parallel=True).load_shards(
            [{k: v[:5] if v.dim() else v for k, v in state.items()},
             {k: v[5:] if v.dim() else v for k, v in other.items()}])


@pytest.mark.long
def test_resuming_on_another_number_of_ranks_continues_the_run(mini_dir, tmp_path):
    """2 gloo ranks stopped after step 3 and resumed in 1 process, and 1 process resumed on 2
    ranks, each from the checkpoint of step 2, end where 1 process that never stopped ends (up
    to float order: the settings make 2 ranks compute what 1 does, as in the test above)."""
    args = ["--steps=4", "--checkpoint_every=2", "--model.dropout=0", "--augment=false",
            "--clip_grad=0", "--val_share=0", "--centre_init=random", "--device=cpu",
            "--eval_at_end=false", "--model.image_encoder=vit", "--model.embed_norm=none"]
    cli_args = ["--data", str(mini_dir[0]), "--config", "tiny-cpu", *SMALL, *args]
    train(mini_dir[0], tmp_path / "one", cfg(*args), progress=False)
    torchrun("train", "--out", tmp_path / "two-then-one", *cli_args, "--stop_after=3")
    train(mini_dir[0], tmp_path / "two-then-one", cfg(*args), resume=True, progress=False)
    train(mini_dir[0], tmp_path / "one-then-two", cfg(*args, "--stop_after=3"), progress=False)
    torchrun("train", "--out", tmp_path / "one-then-two", *cli_args, "--resume")
    want = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)
    for run in ("two-then-one", "one-then-two"):
        got = torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)
        assert got["step"] == 4 and got["world"] == (1 if run == "two-then-one" else 2)
        centres = got["classifier"] if got["world"] == 1 else {
            k: torch.cat([s[k] for s in got["classifier"]]) for k in ("weight", "exp_avg")}
        for key in ("weight", "exp_avg"):
            torch.testing.assert_close(centres[key], want["classifier"][key], rtol=1e-3,
                                       atol=1e-4, msg=lambda m, k=key, r=run: f"{r} {k}: {m}")
        a, b = weights(tmp_path / "one"), weights(tmp_path / run)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-3,
                                       msg=lambda m, k=k, r=run: f"{r} {k}: {m}")


def test_shard_rows_cover_every_row_once_in_rank_order():
    from mixer_lite.retrieval import gather_rows, shard_rows

    for n in (0, 1, 5, 907):
        for world in (1, 2, 3, 8):
            parts = [shard_rows(n, r, world) for r in range(world)]
            assert np.array_equal(np.concatenate(parts), np.arange(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    x = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    assert gather_rows(x, 7, 1) is x


def test_each_rank_takes_its_own_gpu_and_makes_it_current(monkeypatch):
    """On a machine torch says has 4 GPUs (patched: the code path, not the hardware): ``cuda``
    and ``auto`` mean this rank's GPU (LOCAL_RANK), which becomes the current device before any
    collective; a rank past the last GPU is an error naming the count."""
    from mixer_lite.runs import resolve_device, setup_distributed

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert resolve_device("cuda", 2) == torch.device("cuda", 2)
    assert resolve_device("auto", 3) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", 3) == torch.device("cuda", 1)  # named: as named
    assert resolve_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda:5, and torch sees 4"):
        resolve_device("cuda", 5)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert setup_distributed("cuda") == (0, 1, torch.device("cuda", 1))
    assert current == [torch.device("cuda", 1)]


def test_zoom_out_shrinks_half_the_images_onto_their_own_background():
    """Each output is its input untouched, or the input shrunk (checked against a naive numpy
    area average: output pixel i averages input rows floor(i H / s) to ceil((i + 1) H / s))
    into a square at some place, on the (lower) median colour of its border; the same (seed,
    step) gives the same batch; min_scale 1 is the identity."""
    from mixer_lite.sampling import zoom_out

    def shrink(img, s):
        h = img.shape[1]
        spans = [(i * h // s, -(-(i + 1) * h // s)) for i in range(s)]
        return np.array([[[img[c, y0:y1, x0:x1].mean() for x0, x1 in spans] for y0, y1 in spans]
                         for c in range(img.shape[0])])

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (24, 3, 16, 16), dtype=np.uint8))
    x[:, :, :2] = 240  # a light border, as a studio shot's
    out = zoom_out(x, 3, 0, 0.5)
    assert torch.equal(out, zoom_out(x, 3, 0, 0.5)) and not torch.equal(out, zoom_out(x, 4, 0, 0.5))
    assert torch.equal(zoom_out(x, 3, 0, 1.0), x)
    shrunk = 0
    for img, o in zip(x.numpy().astype(np.float64), out.numpy().astype(np.float64)):
        if np.array_equal(img, o):
            continue
        shrunk += 1
        border = np.sort(np.concatenate([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]],
                                        axis=1), axis=1)
        ground = border[:, (border.shape[1] - 1) // 2]
        fits = [(s, y, x0) for s in range(8, 17) for y in range(17 - s) for x0 in range(17 - s)
                if np.abs(o[:, y:y + s, x0:x0 + s] - shrink(img, s)).max() <= 0.5001
                and np.abs(np.delete(o.reshape(3, -1), [r * 16 + c for r in range(y, y + s)
                                                        for c in range(x0, x0 + s)], axis=1)
                           - ground[:, None]).max() == 0]
        assert fits
    assert 6 <= shrunk <= 18  # about half of 24


def test_doc_mosaic_puts_a_doc_among_other_classes_docs_in_the_cells_of_a_2x2_layout():
    """On solid-colour images (each its own ground), a composed doc is its own colour with 1-3
    squares of other classes' colours, each of side 38-50% inside one quadrant, and never a
    colour of its own class; the rest are untouched; the same (seed, step) gives the same
    batch; share 0, or one class in the batch, is the identity."""
    from mixer_lite.sampling import doc_mosaic

    n, side = 20, 64
    colours = torch.arange(n, dtype=torch.uint8)[:, None] * torch.tensor([12, 7, 3],
                                                                        dtype=torch.uint8)
    x = colours[:, :, None, None].expand(n, 3, side, side).clone()
    labels = np.arange(n) // 2  # pairs of docs share a class
    out = doc_mosaic(x, labels, 5, 0, 0.5)
    assert torch.equal(out, doc_mosaic(x, labels, 5, 0, 0.5))
    assert not torch.equal(out, doc_mosaic(x, labels, 6, 0, 0.5))
    assert torch.equal(doc_mosaic(x, labels, 5, 0, 0.0), x)
    assert torch.equal(doc_mosaic(x, np.zeros(n), 5, 0, 0.5), x)
    composed = 0
    for i in range(n):
        if torch.equal(out[i], x[i]):
            continue
        composed += 1
        others = 0
        for j in range(n):
            where = (out[i] == colours[j][:, None, None]).all(0).numpy()
            if j == i or not where.any():
                continue
            assert labels[j] != labels[i], "a doc of its own class pasted beside it"
            rows, cols = np.nonzero(where)
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert h == w and where.sum() == h * w, "each other doc is one square"
            assert round(0.38 * side) <= h <= round(0.5 * side)
            assert rows.min() // 32 == rows.max() // 32 and cols.min() // 32 == cols.max() // 32
            others += 1
        assert 1 <= others <= 3
        assert (out[i] == x[i]).all(0).float().mean() > 0.25  # its own square and ground
    assert 5 <= composed <= 15  # about half of 20
    with pytest.raises(ValueError, match=r"doc_mosaic must be in \[0, 1\] \(0: off\), got 1.5"):
        config_from("tiny-cpu", ["--doc_mosaic=1.5"])


def test_the_end_of_run_evaluation_searches_the_last_validation_passs_doc_embeddings(
        tiny_dir, tmp_path, monkeypatch):
    """A run with a validation split embeds every doc after its last step; its evaluation
    searches those embeddings instead of embedding the docs again.  They must be what the saved
    model gives every doc (embedded here afresh), not an earlier pass's (the initial weights'),
    and the evaluation must equal one of the saved model from scratch."""
    from mixer_lite import retrieval

    searched = []
    real = retrieval.evaluate_embeddings

    def spy(data, doc_emb, *args, **kw):
        searched.append(doc_emb)
        return real(data, doc_emb, *args, **kw)

    monkeypatch.setattr(retrieval, "evaluate_embeddings", spy)
    r = train(tiny_dir[0], tmp_path / "run", cfg("--steps=3"), progress=False)
    monkeypatch.setattr(retrieval, "evaluate_embeddings", real)
    data = load_dataset(tiny_dir[0])
    model = load_run_model(tmp_path / "run")
    fresh = embed_docs(model, ImageTable(image_files(data, "docs"), 64), data.doc_texts)
    assert len(searched) == 1 and searched[0].shape == fresh.shape
    np.testing.assert_allclose(searched[0], fresh, atol=1e-5)  # threads may differ: float order
    again = evaluate_model(model, data)
    for k in ("recall@1", "recall@10", "map@10", "queries", "docs"):
        assert r["eval"][k] == pytest.approx(again[k], abs=1e-9), k


def test_a_run_without_preloading_never_decodes_a_whole_table(tiny_dir, tmp_path, monkeypatch):
    """preload_images=false (data larger than memory): no table of images is decoded whole,
    in training or in the end-of-run evaluation, and the evaluation equals one over preloaded
    images of the same model."""
    from mixer_lite import dataset

    tables = []
    real_init = dataset.ImageTable.__init__

    def spy(self, paths, size, preload=True, *args, **kw):
        tables.append(preload)
        real_init(self, paths, size, preload, *args, **kw)

    monkeypatch.setattr(dataset.ImageTable, "__init__", spy)
    r = train(tiny_dir[0], tmp_path / "run", cfg("--steps=2", "--preload_images=false"),
              progress=False)
    assert len(tables) >= 4 and not any(tables)  # train, validation and docs; eval photos
    monkeypatch.setattr(dataset.ImageTable, "__init__", real_init)
    again = evaluate_model(load_run_model(tmp_path / "run"), load_dataset(tiny_dir[0]))
    for k in ("recall@1", "recall@10", "map@10", "queries"):
        assert r["eval"][k] == pytest.approx(again[k], abs=1e-9), k


def test_fp16_skips_the_steps_that_overflow_and_trains_on(tiny_dir, tmp_path, monkeypatch):
    """fp16 autocast with a loss scale started far too high (on the CPU: the GPU's code path,
    patched in).  The first step overflows and is skipped (no optimiser step, no centre step)
    and the scale halves at each skip until the gradients fit fp16; then the run trains, its
    weights finite, and its checkpoint keeps the scale for a resumed run."""
    import functools

    from mixer_lite.optim import LossScale

    monkeypatch.setattr(train_module, "autocast_dtype",
                        lambda cfg, device: train_module.AMP_DTYPES[cfg.amp_dtype])
    monkeypatch.setattr(train_module, "LossScale", functools.partial(LossScale, init=2.0 ** 20))
    c = cfg("--amp_dtype=fp16", "--steps=12", "--log_every=1", "--checkpoint_every=1",
            "--eval_at_end=false", "--val_share=0")
    train(tiny_dir[0], tmp_path / "run", dataclasses.replace(c, stop_after=1), progress=False)
    first = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert first["optimizer"]["state"] == {} and int(first["classifier"]["steps"]) == 0
    assert first["loss_scale"] == {"value": 2.0 ** 19, "good_steps": 0}
    train(tiny_dir[0], tmp_path / "run", c, resume=True, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    skipped = [x["skipped"] for x in log]
    k = skipped.index(False)  # steps 1..k overflowed, each at half the scale before it
    assert 1 <= k < len(log) - 3 and not any(skipped[k:]), skipped
    assert [x["loss_scale"] for x in log[:k + 1]] == [2.0 ** (20 - i) for i in range(k + 1)]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert int(last["classifier"]["steps"]) == len(log) - k
    assert last["loss_scale"]["value"] == 2.0 ** (20 - k)
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run").values())


FAULTS_OF_A_FREED_BLOCK_AGAIN = """
import resource, numpy as np
from mixer_lite.runs import keep_freed_memory
applied = keep_freed_memory()
def written_then_freed():
    block = np.ones(64 * 2**20 // 4, dtype=np.float32)  # 64 MiB
    del block
for _ in range(3):
    written_then_freed()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
written_then_freed()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc settings: Linux only")
def test_keep_freed_memory_reuses_a_freed_block_without_faulting_it_in_again():
    """A 64 MiB block written and freed, a fourth time: with glibc's defaults it is a fresh
    mapping each time, faulted in page by page (16,384 pages of 4 KiB, fewer with huge pages);
    with the memory kept it is a block freed before, and ``MIXER_LITE_KEEP_FREED_MEMORY=0``
    leaves the defaults."""
    said = {}
    for flag in ("0", "1"):
        done = subprocess.run([sys.executable, "-c", FAULTS_OF_A_FREED_BLOCK_AGAIN], text=True,
                              capture_output=True, env={**os.environ,
                                                        "MIXER_LITE_KEEP_FREED_MEMORY": flag})
        assert done.returncode == 0, done.stderr[-2000:]
        applied, faults = done.stdout.split()
        said[flag] = applied, int(faults)
    assert said["0"][0] == "False" and said["1"][0] == "True"
    assert said["1"][1] < said["0"][1] / 10, said
