"""Losses against independent references: naive margin softmax, pytorch-metric-learning,
single-process vs 2-process gloo, naive loops for the pairwise baselines."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from pytorch_metric_learning.losses import ArcFaceLoss, CosFaceLoss

from mixer_lite.losses import MarginClassifier, info_nce, margin_logits, triplet_loss


def naive_margin_loss(x, w, labels, kind, m, s, keep=None):
    """Row-by-row margin softmax over the centres in ``keep`` (all by default)."""
    keep = list(range(len(w))) if keep is None else list(keep)
    total = 0.0
    for i in range(len(x)):
        xi = x[i] / x[i].norm()
        logits = []
        for c in keep:
            cos = xi @ (w[c] / w[c].norm())
            if c == labels[i]:
                theta = torch.acos(cos.clamp(-1, 1))
                cos = cos - m if kind == "cosface" else torch.cos(theta + m)
            logits.append(s * cos)
        logits = torch.stack(logits)
        total = total - torch.log_softmax(logits, 0)[keep.index(int(labels[i]))]
    return total / len(x)


def data(n=12, c=20, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(c, d, generator=g), \
        torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("kind,m", [("cosface", 0.35), ("arcface", 0.5)])
def test_full_rate_equals_naive_margin_softmax_values_and_gradients(kind, m):
    x, w, y = data()
    clf = MarginClassifier(20, 8, kind=kind, margin=m, scale=16, sample_rate=1.0)
    clf.weight.data.copy_(w)
    xa = x.clone().requires_grad_(True)
    loss = clf(xa, y)
    loss.backward()
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = naive_margin_loss(xb, wb, y, kind, m, 16)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(clf.dense_grad(), wb.grad, rtol=1e-4, atol=1e-6)


def test_sampled_loss_equals_naive_on_the_sampled_centres():
    x, w, y = data(n=6, c=50)
    clf = MarginClassifier(50, 8, sample_rate=0.2, scale=16, seed=3)
    clf.weight.data.copy_(w)
    keep = clf.sample_centres(y, step=5).tolist()
    assert len(keep) >= 10 and set(y.tolist()) <= set(keep)
    loss = clf(x, y, step=5)
    loss.backward()
    wb = w.clone().requires_grad_(True)
    ref = naive_margin_loss(x, wb, y, "cosface", 0.35, 16, keep)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clf.dense_grad(), wb.grad, rtol=1e-4, atol=1e-6)
    dropped = sorted(set(range(50)) - set(keep))
    assert torch.all(clf.dense_grad()[dropped] == 0)


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_positives_are_always_sampled(rate):
    clf = MarginClassifier(1000, 4, sample_rate=rate)
    for step in range(20):
        y = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(step))
        idx = clf.sample_centres(y, step)
        assert set(y.tolist()) <= set(idx.tolist())
        assert len(idx) == max(math.ceil(rate * 1000), len(set(y.tolist())))
        assert torch.all(idx[1:] > idx[:-1])


@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_logits_equal_pytorch_metric_learning(kind):
    torch.manual_seed(0)
    x, w, y = data(n=64, c=10, d=16)
    if kind == "cosface":
        ref = CosFaceLoss(num_classes=10, embedding_size=16, margin=0.35, scale=30)
        m = 0.35
    else:
        ref = ArcFaceLoss(num_classes=10, embedding_size=16, margin=math.degrees(0.5), scale=30)
        m = 0.5
    ref.W.data.copy_(w.t())  # PML stores centres as [embedding, classes]
    cosine = ref.get_cosine(x)
    mask = F.one_hot(y, 10).bool()
    target = cosine[mask]
    theta = torch.acos(target.clamp(-1, 1))
    assert torch.all(theta < math.pi - m)  # where the two definitions agree by construction
    pml = cosine.clone()
    pml[mask] = ref.modify_cosine_of_target_classes(target)
    pml = ref.scale_logits(pml, x)
    ours = margin_logits(F.normalize(x, dim=-1) @ F.normalize(w, dim=-1).t(), mask, kind, m, 30)
    torch.testing.assert_close(ours, pml, rtol=1e-5, atol=1e-4)
    clf = MarginClassifier(10, 16, kind=kind, margin=m, scale=30)
    clf.weight.data.copy_(w)
    torch.testing.assert_close(clf(x, y), ref(x, y), rtol=1e-5, atol=1e-5)


def test_anchored_samples_move_towards_their_centres_but_never_move_them():
    """Anchored samples (``titles_move_centres=false``): their rows of the loss are the naive
    margin softmax against constant centres, the others' against trainable ones."""
    x, w, y = data()
    anchored = torch.zeros(12, dtype=torch.bool)
    anchored[[1, 4, 5, 9]] = True
    clf = MarginClassifier(20, 8, scale=16)
    clf.weight.data.copy_(w)
    xa = x.clone().requires_grad_(True)
    loss = clf(xa, y, anchored=anchored)
    loss.backward()
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    free = ~anchored
    ref = (naive_margin_loss(xb[free], wb, y[free], "cosface", 0.35, 16) * free.sum()
           + naive_margin_loss(xb[anchored], wb.detach(), y[anchored], "cosface", 0.35, 16)
           * anchored.sum()) / 12
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(clf.dense_grad(), wb.grad, rtol=1e-4, atol=1e-6)
    # the samples' own gradients are those of the plain loss; only the centres' change
    clf.clear_used()
    xc = x.clone().requires_grad_(True)
    clf(xc, y).backward()
    torch.testing.assert_close(xa.grad, xc.grad, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(clf.dense_grad(), wb.grad, atol=1e-4)
    clf.clear_used()
    clf(x, y, anchored=torch.ones(12, dtype=torch.bool)).backward()
    assert torch.count_nonzero(clf.dense_grad()) == 0
    with pytest.raises(ValueError, match="one flag per label"):
        clf(x, y, anchored=anchored[:5])


def test_bad_labels_and_settings_are_rejected():
    clf = MarginClassifier(5, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        clf(torch.randn(2, 4), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="sample_rate"):
        MarginClassifier(5, 4, sample_rate=0)
    with pytest.raises(ValueError, match="margin kind"):
        MarginClassifier(5, 4, kind="sphereface")


# ---- model parallel: 2 gloo processes vs one ---------------------------------------------
ANCHORED = torch.tensor([0, 0, 1, 0, 1, 0, 0, 0, 1, 1], dtype=torch.bool)  # 2 on each rank


def _rank_main(rank, world, init_file, out_dir, rate, anchored=False):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    x, w, y = data(n=10, c=21, d=8, seed=1)
    clf = MarginClassifier(21, 8, kind="arcface", margin=0.5, scale=16, sample_rate=rate,
                           model_parallel=True)
    clf.weight.data.copy_(w[clf.start: clf.start + clf.shard])
    rows = slice(rank * 5, rank * 5 + 5)
    xl = x[rows].clone().requires_grad_(True)
    loss = clf(xl, y[rows], step=3, anchored=ANCHORED[rows] if anchored else None)
    loss.backward()
    torch.save({"loss": loss.detach(), "xgrad": xl.grad, "wgrad": clf.dense_grad(),
                "start": clf.start, "shard": clf.shard,
                "sampled": clf.sample_centres((y - clf.start)[(y >= clf.start) &
                                                              (y < clf.start + clf.shard)], 3)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank may leave while the other still talks to it
    dist.destroy_process_group()
    # Everything this test checks is on disk now. Leaving through interpreter finalisation
    # lets gloo's threads be torn down in an arbitrary order, which aborts the process now and
    # then (std::terminate, about 1 run in 30 under load) after the work has succeeded.
    os._exit(0)


@pytest.mark.parametrize("anchored", [False, True])
def test_two_process_model_parallel_equals_one_process(tmp_path, anchored):
    """2 gloo ranks, each holding about half of the centres, give one process's loss and
    gradients; with anchored samples too, whose flags the ranks gather with the embeddings."""
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), 1.0, anchored),
             nprocs=2)
    x, w, y = data(n=10, c=21, d=8, seed=1)
    clf = MarginClassifier(21, 8, kind="arcface", margin=0.5, scale=16)
    clf.weight.data.copy_(w)
    xa = x.clone().requires_grad_(True)
    loss = clf(xa, y, anchored=ANCHORED if anchored else None)
    loss.backward()
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert (r[0]["start"], r[0]["shard"], r[1]["start"], r[1]["shard"]) == (0, 11, 11, 10)
    for i in range(2):
        torch.testing.assert_close(r[i]["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r[i]["xgrad"], xa.grad[i * 5: i * 5 + 5], rtol=1e-4,
                                   atol=1e-6)
    torch.testing.assert_close(torch.cat([r[0]["wgrad"], r[1]["wgrad"]]), clf.dense_grad(),
                               rtol=1e-4, atol=1e-6)


def test_two_process_sampled_model_parallel_equals_naive_on_the_union(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), 0.4), nprocs=2)
    x, w, y = data(n=10, c=21, d=8, seed=1)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    keep = sorted(set((r[0]["sampled"] + r[0]["start"]).tolist()) |
                  set((r[1]["sampled"] + r[1]["start"]).tolist()))
    assert set(y.tolist()) <= set(keep) and len(keep) < 21
    xb = x.clone().requires_grad_(True)
    ref = naive_margin_loss(xb, w, y, "arcface", 0.5, 16, keep)
    ref.backward()
    torch.testing.assert_close(r[0]["loss"], ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r[0]["xgrad"], r[1]["xgrad"]]), xb.grad, rtol=1e-4,
                               atol=1e-6)


# ---- pairwise baselines ------------------------------------------------------------------
def test_info_nce_equals_naive_loop():
    q, d, _ = data(n=6, c=6)
    t = 0.1
    qn, dn = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    total = 0.0
    for i in range(6):
        row = torch.stack([qn[i] @ dn[j] / t for j in range(6)])
        col = torch.stack([qn[j] @ dn[i] / t for j in range(6)])
        total += -torch.log_softmax(row, 0)[i] - torch.log_softmax(col, 0)[i]
    torch.testing.assert_close(info_nce(q, d, t), total / 12)


def test_triplet_equals_naive_loop():
    q, d, _ = data(n=5, c=5, seed=2)
    qn, dn = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    want = np.mean([max(0.0, 0.2 - float(qn[i] @ dn[i]) +
                        max(float(qn[i] @ dn[j]) for j in range(5) if j != i))
                    for i in range(5)])
    assert float(triplet_loss(q, d, 0.2)) == pytest.approx(want, abs=1e-6)


def test_row_wise_adamw_equals_torch_adamw_at_full_rate():
    x, w, y = data(n=16, c=12)
    clf = MarginClassifier(12, 8, sample_rate=1.0)
    clf.weight.data.copy_(w)
    ref = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.05)
    for step in range(4):
        clf(x, y, step).backward()
        clf.step(lr=0.01, optimizer="adamw", weight_decay=0.05)
        opt.zero_grad()
        ref.grad = None
        naive_margin_loss(x, ref, y, "cosface", 0.35, 30).backward()
        opt.step()
    torch.testing.assert_close(clf.weight.data, ref.data, rtol=1e-4, atol=1e-6)


def test_row_wise_adamw_leaves_unsampled_rows_alone():
    x, w, y = data(n=4, c=100)
    clf = MarginClassifier(100, 8, sample_rate=0.1)
    before = clf.weight.data.clone()
    clf(x, y, step=0).backward()
    used, _ = clf.used_rows()
    clf.step(lr=0.1, optimizer="adamw", weight_decay=0.1)
    changed = torch.nonzero((clf.weight.data != before).any(dim=1)).flatten()
    assert torch.equal(changed, used) and len(used) == 10
    assert clf.weight.grad is None  # no dense gradient was ever made


def test_row_wise_sgd_equals_torch_sgd_at_full_rate():
    x, w, y = data(n=16, c=12)
    clf = MarginClassifier(12, 8, sample_rate=1.0)
    clf.weight.data.copy_(w)
    ref = torch.nn.Parameter(w.clone())
    opt = torch.optim.SGD([ref], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for step in range(4):
        clf(x, y, step).backward()
        clf.step(lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=5e-4)
        opt.zero_grad()
        ref.grad = None
        naive_margin_loss(x, ref, y, "cosface", 0.35, 30).backward()
        opt.step()
    torch.testing.assert_close(clf.weight.data, ref.data, rtol=1e-4, atol=1e-6)


def test_imprint_sets_named_centres_to_their_mean_direction(monkeypatch):
    """Hand-computed: class 0 <- mean of two embeddings, class 1 untouched, class 2 <- one."""
    e = torch.tensor([[3.0, 0.0], [1.0, 2.0], [0.0, -5.0]])
    labels = torch.tensor([0, 0, 2])
    clf = MarginClassifier(3, 2)
    before = clf.weight.detach().clone()
    assert clf.imprint(e, labels) == 2
    torch.testing.assert_close(clf.weight[0], torch.tensor([4.0, 2.0]) / math.sqrt(20))
    torch.testing.assert_close(clf.weight[1], before[1])
    torch.testing.assert_close(clf.weight[2], torch.tensor([0.0, -1.0]))
    # A shard imprints only its own rows: rank 1 of 2 holds class 2 alone.
    import mixer_lite.losses as losses
    monkeypatch.setattr(losses, "_world", lambda: (1, 2))
    shard = MarginClassifier(3, 2, model_parallel=True)
    assert shard.start == 2 and shard.shard == 1
    assert shard.imprint(e, labels) == 1
    torch.testing.assert_close(shard.weight[0], torch.tensor([0.0, -1.0]))


# ---- the ArcFace fallback and clipping by the global norm ---------------------------------
def test_arcface_past_pi_minus_m_falls_back_to_cos_minus_m_sin_m():
    """Hand-computed: at theta = 1.0 the target logit is s cos(theta + m); at theta = 2.9,
    past pi - m = 2.64, it is s (cos(theta) - m sin(m)), so the logit keeps falling with the
    angle instead of rising again as cos(theta + m) would."""
    m, s = 0.5, 10.0
    cos = torch.tensor([[math.cos(1.0), 0.3], [math.cos(2.9), -0.2]])
    mask = torch.tensor([[True, False], [True, False]])
    out = margin_logits(cos, mask, "arcface", m, s)
    # cos(1.5) = 0.0707372; cos(2.9) - 0.5 sin(0.5) = -0.9709582 - 0.2397128 = -1.2106710
    expected = torch.tensor([[0.707372, 3.0], [-12.106710, -2.0]])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    thetas = torch.linspace(2.0, 3.1, 60)
    target = margin_logits(torch.cos(thetas)[:, None], torch.ones(60, 1, dtype=torch.bool),
                           "arcface", m, s)[:, 0]
    assert (target.diff() < 0).all()


def test_clip_global_norm_equals_clip_grad_norm_over_the_encoder_and_the_centres():
    """The encoder's gradients and the sampled centres' (kept per row by the classifier) are
    clipped as one vector, as ``torch.nn.utils.clip_grad_norm_`` clips ordinary parameters."""
    from mixer_lite.optim import clip_global_norm

    torch.manual_seed(0)
    enc = torch.nn.Linear(8, 4)
    clf = MarginClassifier(20, 4, "cosface", 0.35, 30.0, sample_rate=0.5)
    x, y = torch.randn(6, 8), torch.randint(0, 20, (6,))
    clf(enc(x), y, 0).backward()
    grads = [p.grad.clone() for p in enc.parameters()] + [clf.dense_grad()]
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for r, g in zip(ref, grads):
        r.grad = g.clone()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref, 0.1))
    assert ref_norm > 0.1  # the case clips
    norm = clip_global_norm(enc, clf, 0.1, world=1)
    assert abs(norm - ref_norm) < 1e-5 * ref_norm
    for r, p in zip(ref, enc.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(clf.dense_grad(), ref[-1].grad, rtol=1e-5, atol=1e-7)


def _shard_after_backward(rank, world, init_file) -> MarginClassifier:
    """In a gloo process group of ``world`` ranks: this rank's shard of a 21-class classifier
    after the backward of its half of a 10-sample batch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    x, w, y = data(n=10, c=21, d=8, seed=2)
    clf = MarginClassifier(21, 8, kind="cosface", margin=0.35, scale=30, model_parallel=True)
    clf.weight.data.copy_(w[clf.start: clf.start + clf.shard])
    clf(x[rank * 5: rank * 5 + 5], y[rank * 5: rank * 5 + 5], step=0).backward()
    return clf


def _clip_rank_main(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from mixer_lite.optim import clip_global_norm

    clf = _shard_after_backward(rank, world, init_file)
    norm = clip_global_norm(torch.nn.Module(), clf, 0.05, world)
    torch.save({"norm": norm, "wgrad": clf.dense_grad()}, os.path.join(out_dir, f"c{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see _rank_main


def test_two_process_clipping_sums_the_centre_shards_norms(tmp_path):
    """Each rank holds half the centres: the norm it clips by is the norm of all of them, the
    one ``clip_grad_norm_`` finds over the whole classifier in one process."""
    mp.spawn(_clip_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    x, w, y = data(n=10, c=21, d=8, seed=2)
    clf = MarginClassifier(21, 8, kind="cosface", margin=0.35, scale=30)
    clf.weight.data.copy_(w)
    clf(x, y, step=0).backward()
    ref = torch.nn.Parameter(torch.zeros_like(w))
    ref.grad = clf.dense_grad()
    ref_norm = float(torch.nn.utils.clip_grad_norm_([ref], 0.05))
    assert ref_norm > 0.05
    r = [torch.load(tmp_path / f"c{i}.pt") for i in range(2)]
    assert abs(r[0]["norm"] - ref_norm) < 1e-4 * ref_norm and r[0]["norm"] == r[1]["norm"]
    torch.testing.assert_close(torch.cat([r[0]["wgrad"], r[1]["wgrad"]]), ref.grad, rtol=1e-4,
                               atol=1e-7)


def test_loss_scale_unscales_the_encoder_and_the_centres_exactly_and_skips_on_overflow():
    """Backward of the loss times 2^16, unscaled, equals backward of the loss (a power of 2:
    exactly), for the encoder and the sampled centres; an inf anywhere makes the step a skip
    that halves the scale; after growth_interval finite steps the scale doubles."""
    from mixer_lite.optim import LossScale

    def step(scale_by):
        torch.manual_seed(0)
        enc = torch.nn.Linear(8, 4)
        clf = MarginClassifier(20, 4, "cosface", 0.35, 30.0, sample_rate=0.5)
        x, y = torch.randn(6, 8), torch.randint(0, 20, (6,))
        (clf(enc(x), y, 0) * scale_by).backward()
        return enc, clf

    enc, clf = step(1.0)
    scale = LossScale(True, init=2.0 ** 16, growth_interval=3)
    s_enc, s_clf = step(scale.value)
    assert scale.unscale(s_enc, s_clf, world=1, device=torch.device("cpu"))
    for p, q in zip(enc.parameters(), s_enc.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert torch.equal(clf.dense_grad(), s_clf.dense_grad())
    scale.update(True), scale.update(True)
    assert scale.value == 2.0 ** 16 and scale.good_steps == 2
    s_clf._used[0][1].grad[0, 0] = float("inf")  # a centre's gradient overflowed
    assert not scale.unscale(s_enc, s_clf, world=1, device=torch.device("cpu"))
    scale.update(False)
    assert scale.value == 2.0 ** 15 and scale.good_steps == 0
    for _ in range(3):
        scale.update(True)
    assert scale.value == 2.0 ** 16 and scale.good_steps == 0
    off = LossScale(False)
    assert off.value == 1.0 and off.unscale(s_enc, s_clf, 1, torch.device("cpu"))
    off.update(False)
    assert off.value == 1.0


def _overflow_rank_main(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from mixer_lite.optim import LossScale

    clf = _shard_after_backward(rank, world, init_file)
    if rank == 1:  # only rank 1's shard overflowed
        clf._used[0][1].grad[0, 0] = float("nan")
    finite = LossScale(True).unscale(torch.nn.Module(), clf, world, torch.device("cpu"))
    torch.save({"finite": finite}, os.path.join(out_dir, f"o{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see _rank_main


def test_two_process_loss_scale_skips_on_every_rank_when_one_shard_overflows(tmp_path):
    """The centres are sharded: rank 0's gradients are finite, rank 1's are not, and both
    ranks skip the step (a rank that stepped alone would leave the ranks' encoders apart)."""
    mp.spawn(_overflow_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert [torch.load(tmp_path / f"o{i}.pt")["finite"] for i in range(2)] == [False, False]


def test_objectives_train_each_title_beside_its_doc():
    """Docs handed as [B, 2, D] (each doc and its title's embedding, ``region_choice="title"``):
    the classification objective classifies the titles as more samples of their docs' classes
    (against the classifier called on the samples concatenated by hand), and a pairwise one
    averages the loss of the (photo, doc) pairs and of the (photo, title) pairs.  With
    ``titles_move_centres=false`` the titles' rows are the anchored ones.  The same with each
    doc's chosen window third ([B, 3, D], ``window_sample``)."""
    from types import SimpleNamespace

    from mixer_lite.objectives import Classification, Pairwise
    from mixer_lite.train import config_from

    torch.manual_seed(0)
    cfg = config_from("tiny-cpu", ["--model.embed_dim=8"])
    kind = np.array([0, 1, 1, 0, 1])
    samples = SimpleNamespace(kind=kind, label=np.array([3, 1, 3, 0, 2]))
    q, d = F.normalize(torch.randn(2, 8), dim=-1), F.normalize(torch.randn(3, 2, 8), dim=-1)
    ours = Classification(cfg, 5, model_parallel=False)
    ref = Classification(cfg, 5, model_parallel=False)
    ref.load_state_dict(ours.state_dict())
    got = ours(q, d, samples, np.arange(5), 0)
    emb = torch.stack([q[0], d[0, 0], d[1, 0], q[1], d[2, 0], d[0, 1], d[1, 1], d[2, 1]])
    want = ref.classifier(emb, torch.tensor([3, 1, 3, 0, 2, 1, 3, 2]), 0)
    torch.testing.assert_close(got, want)
    # titles_move_centres=false: the titles' rows anchored, the samples' rows not
    anchored_cfg = config_from("tiny-cpu", ["--model.embed_dim=8", "--model.title_sample=true",
                                            "--titles_move_centres=false"])
    ours, ref = Classification(anchored_cfg, 5, False), Classification(anchored_cfg, 5, False)
    ref.load_state_dict(ours.state_dict())
    ours(q, d, samples, np.arange(5), 0).backward()
    ref.classifier(emb, torch.tensor([3, 1, 3, 0, 2, 1, 3, 2]), 0,
                   anchored=torch.arange(8) >= 5).backward()
    torch.testing.assert_close(ours.classifier.dense_grad(), ref.classifier.dense_grad())
    with pytest.raises(ValueError, match="titles_move_centres=false anchors"):
        config_from("tiny-cpu", ["--titles_move_centres=false"])
    with pytest.raises(ValueError, match="titles_move_centres=false anchors"):
        config_from("tiny-cpu", ["--titles_move_centres=false", "--model.title_sample=true",
                                 "--loss=infonce"])
    # [B, 3, D], each doc's chosen window third (``window_sample``): the titles then the windows
    # are more samples of their docs' classes, only the titles anchored; pairwise (below)
    # averages the three pairings
    d3 = F.normalize(torch.randn(3, 3, 8), dim=-1)
    ours, ref = Classification(anchored_cfg, 5, False), Classification(anchored_cfg, 5, False)
    ref.load_state_dict(ours.state_dict())
    got = ours(q, d3, samples, np.arange(5), 0)
    got.backward()
    emb3 = torch.stack([q[0], d3[0, 0], d3[1, 0], q[1], d3[2, 0], *d3[:, 1], *d3[:, 2]])
    want = ref.classifier(emb3, torch.tensor([3, 1, 3, 0, 2, 1, 3, 2, 1, 3, 2]), 0,
                          anchored=torch.tensor([False] * 5 + [True] * 3 + [False] * 3))
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ours.classifier.dense_grad(), ref.classifier.dense_grad())
    pairs = SimpleNamespace(kind=np.zeros(3, dtype=int), label=np.arange(3))
    q3 = F.normalize(torch.randn(3, 8), dim=-1)
    for loss, fn, arg in (("infonce", info_nce, cfg.temperature),
                          ("triplet", triplet_loss, 0.2)):
        pair = Pairwise(config_from("tiny-cpu", [f"--loss={loss}", "--margin=0.2"]))
        torch.testing.assert_close(pair(q3, d, pairs, np.arange(3), 0),
                                   (fn(q3, d[:, 0], arg) + fn(q3, d[:, 1], arg)) / 2)
        torch.testing.assert_close(pair(q3, d3, pairs, np.arange(3), 0),
                                   sum(fn(q3, d3[:, j], arg) for j in range(3)) / 3)
