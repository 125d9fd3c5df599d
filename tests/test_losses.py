"""nt_xent against a naive float64 loop, chunked == dense, extra negatives, fp32 under autocast,
the momentum queue, and the distillation loss. The 2-process tests are in test_dist.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastclr import losses
from fastclr.losses import MomentumQueue, distill_loss, nt_xent

# ----------------------------------------------------------------------------- references


def naive_nt_xent_per_anchor(z1, z2, temperature, extra=None):
    """Per-anchor NT-Xent losses and 'positive ranks first' flags, one anchor and one negative at a
    time in float64. Anchors are ordered cat(z1, z2); anchor a's positive is (a + B) mod 2B.
    Differentiable w.r.t. z1 and z2. Returns (losses [2B], correct [2B] bool)."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    extra = [] if extra is None else list(extra.double())
    out, correct = [], []
    for a in range(2 * b):
        pos = (a + b) % (2 * b)
        pos_sim = torch.dot(z[a], z[pos]) / temperature
        denom = torch.exp(pos_sim)
        best_negative = -math.inf
        for c in range(2 * b):
            if c in (a, pos):
                continue
            sim = torch.dot(z[a], z[c]) / temperature
            denom = denom + torch.exp(sim)
            best_negative = max(best_negative, sim.item())
        for e in extra:
            sim = torch.dot(z[a], e) / temperature
            denom = denom + torch.exp(sim)
            best_negative = max(best_negative, sim.item())
        out.append(torch.log(denom) - pos_sim)
        correct.append(pos_sim.item() > best_negative)
    return torch.stack(out), torch.tensor(correct)


def _views(b, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=dtype)
    z2 = z1 + 0.7 * torch.randn(b, d, generator=g, dtype=dtype)  # correlated, so accuracy is not trivially 0
    return z1.requires_grad_(), z2.requires_grad_()


def _loss_and_grads(fn, z1, z2):
    loss = fn(z1, z2)
    g1, g2 = torch.autograd.grad(loss, [z1, z2])
    return loss.detach(), g1, g2


# ----------------------------------------------------------------------------- nt_xent


@pytest.mark.parametrize("b,d,t", [(1, 4, 0.1), (2, 3, 0.5), (5, 8, 0.1), (8, 16, 1.0), (6, 2, 0.07)])
def test_nt_xent_matches_naive_loop(b, d, t):
    z1, z2 = _views(b, d, seed=b * 100 + d)
    per_anchor, correct = naive_nt_xent_per_anchor(z1, z2, t)
    _, rg1, rg2 = _loss_and_grads(lambda a, c: naive_nt_xent_per_anchor(a, c, t)[0].mean(), z1, z2)
    loss, acc = nt_xent(z1, z2, t, return_accuracy=True)
    g1, g2 = torch.autograd.grad(loss, [z1, z2])
    torch.testing.assert_close(loss.detach(), per_anchor.mean().detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, rg1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g2, rg2, rtol=1e-10, atol=1e-12)
    assert acc.item() == pytest.approx(correct.double().mean().item())


def test_nt_xent_float32_inputs_give_float32_loss_close_to_float64():
    z1, z2 = _views(6, 8, seed=3, dtype=torch.float32)
    loss = nt_xent(z1, z2, 0.1)
    assert loss.dtype == torch.float32
    ref = naive_nt_xent_per_anchor(z1.double(), z2.double(), 0.1)[0].mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_nt_xent_is_fp32_under_autocast():
    z1, z2 = _views(6, 8, seed=4, dtype=torch.float32)
    z1b, z2b = z1.detach().bfloat16().requires_grad_(), z2.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent(z1b, z2b, 0.1)
    assert loss.dtype == torch.float32
    # the same bf16 values, upcast and computed in fp32 outside autocast: identical
    expect = nt_xent(z1b.detach().float(), z2b.detach().float(), 0.1)
    torch.testing.assert_close(loss.detach(), expect, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert z1b.grad.dtype == torch.bfloat16 and torch.isfinite(z1b.grad.float()).all()


def test_nt_xent_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        nt_xent(torch.randn(4, 8), torch.randn(5, 8))


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 20, 64])
@pytest.mark.parametrize("with_extra", [False, True])
def test_chunked_equals_dense(chunk, with_extra):
    z1, z2 = _views(10, 6, seed=chunk)
    extra = F.normalize(torch.randn(13, 6, dtype=torch.float64), dim=1) if with_extra else None
    dense, dacc = nt_xent(z1, z2, 0.2, chunk_size=0, extra_negatives=extra, return_accuracy=True)
    chunked, cacc = nt_xent(z1, z2, 0.2, chunk_size=chunk, extra_negatives=extra, return_accuracy=True)
    dg = torch.autograd.grad(dense, [z1, z2])
    cg = torch.autograd.grad(chunked, [z1, z2])
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    for a, b in zip(cg, dg):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert cacc.item() == dacc.item()


def test_chunked_float32_close_to_dense():
    z1, z2 = _views(32, 16, seed=11, dtype=torch.float32)
    dense = _loss_and_grads(lambda a, b: nt_xent(a, b, 0.1, chunk_size=0), z1, z2)
    chunked = _loss_and_grads(lambda a, b: nt_xent(a, b, 0.1, chunk_size=10), z1, z2)
    for c, d in zip(chunked, dense):
        torch.testing.assert_close(c, d, rtol=1e-5, atol=1e-6)


def test_chunked_path_is_chosen_above_threshold(monkeypatch):
    calls = []
    real = losses._ChunkedLSE.apply
    monkeypatch.setattr(losses._ChunkedLSE, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    z1, z2 = _views(4, 3, seed=0)
    nt_xent(z1, z2)  # 8 columns: dense
    assert calls == []
    monkeypatch.setattr(losses, "CHUNK_THRESHOLD", 7)
    monkeypatch.setattr(losses, "DEFAULT_CHUNK", 3)
    nt_xent(z1, z2)
    assert calls == [3]
    nt_xent(z1, z2, chunk_size=0)  # forced dense
    assert calls == [3]


def test_chunked_backward_saves_no_full_logit_matrix():
    """Memory stays O(2B x chunk) in backward too: nothing of size [2B, columns] is kept for it."""
    b, d, k, chunk = 16, 4, 400, 32  # 32 rows x 432 columns; D << 2B, so [N, M] dwarfs [M, D]
    z1, z2 = _views(b, d, seed=5)
    extra = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nt_xent(z1, z2, 0.1, chunk_size=chunk, extra_negatives=extra)
    full = 2 * b * (2 * b + k)
    assert max(saved) < full / 4, f"a saved tensor has {max(saved)} elements; the logits have {full}"
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        saved.clear()
        nt_xent(z1, z2, 0.1, chunk_size=0, extra_negatives=extra)
    assert max(saved) >= full  # the dense path does keep them: the check above can fail
    loss.backward()


def test_extra_negatives_equal_appended_columns():
    b, d, k, t = 5, 6, 9, 0.3
    z1, z2 = _views(b, d, seed=21)
    extra = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1)
    # reference 1: the naive loop with the extra vectors as negatives
    per_anchor, correct = naive_nt_xent_per_anchor(z1, z2, t, extra)
    # reference 2: one logits matrix [2B, 2B + K], self masked, cross-entropy on the positive column
    q = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = torch.cat([q @ q.T, q @ extra.T], 1) / t
    logits = logits.masked_fill(torch.eye(2 * b, 2 * b + k, dtype=torch.bool), -math.inf)
    target = (torch.arange(2 * b) + b) % (2 * b)
    ref = F.cross_entropy(logits, target)
    rg = torch.autograd.grad(ref, [z1, z2])
    for chunk in (0, 4):
        loss, acc = nt_xent(z1, z2, t, chunk_size=chunk, extra_negatives=extra, return_accuracy=True)
        torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss.detach(), per_anchor.mean().detach(), rtol=1e-12, atol=1e-12)
        for a, r in zip(torch.autograd.grad(loss, [z1, z2]), rg):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13)
        assert acc.item() == pytest.approx(correct.double().mean().item())


def test_extra_negatives_get_no_gradient():
    z1, z2 = _views(4, 3, seed=1)
    extra = F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1).requires_grad_()
    nt_xent(z1, z2, 0.1, extra_negatives=extra).backward()
    assert extra.grad is None and z1.grad is not None


@pytest.mark.parametrize("chunk", [4096, 3])
def test_contrastive_accuracy_is_tfs_logits_ab_argmax(chunk):
    """TF's contrast_acc: argmax over logits_ab (view-1 rows vs view-2 columns) hits the diagonal.
    It ignores the view-1 negatives, so it reads at least as high as nt_xent's strict accuracy."""
    from fastclr.losses import contrastive_accuracy
    z1, z2 = _views(16, 4, seed=7)
    z1, z2 = z1.detach(), z2.detach()
    ab = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T
    want = (ab.argmax(1) == torch.arange(16)).double().mean()
    got = contrastive_accuracy(z1, z2, chunk=chunk)
    assert got.item() == pytest.approx(want.item())
    _, strict = nt_xent(z1, z2, 0.1, return_accuracy=True)
    assert 0 < strict.item() < got.item() < 1  # these views: the two definitions differ


def test_accuracy_is_one_when_views_are_identical_and_spread():
    z = torch.eye(6, dtype=torch.float64)  # orthogonal images: positive (cos 1) beats negatives (cos 0)
    loss, acc = nt_xent(z, z.clone(), 0.1, return_accuracy=True)
    assert acc.item() == 1.0 and loss.item() < 1e-3


# ----------------------------------------------------------------------------- memory queue


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_queue_ema_update_is_lerp_and_copies_buffers():
    model = _small_model()
    mq = MomentumQueue(model, dim=3, size=10, momentum=0.9)
    before = [p.detach().clone() for p in mq.ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(16, 4))  # moves BN running stats
    mq.update(model)
    for e, old, new in zip(mq.ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * old + 0.1 * new)
        assert not e.requires_grad
    for e, src in zip(mq.ema.buffers(), model.buffers()):
        assert torch.equal(e, src)
    out = mq(torch.randn(2, 4))
    assert out.shape == (2, 3) and not out.requires_grad


def test_queue_enqueue_is_fifo_and_wraps():
    mq = MomentumQueue(_small_model(), dim=3, size=5)
    assert torch.allclose(mq.negatives().norm(dim=1), torch.ones(5))  # random unit vectors to start
    keys = [torch.full((2, 3), float(i)) for i in range(1, 5)]  # 4 batches of 2 keys -> wraps
    for k in keys:
        mq.enqueue(k)
    # writes went to rows 0-1, 2-3, 4-0, 1-2: newest at 1, 2 (batch 4), then 4, 0 (batch 3), 3 (batch 2)
    assert mq.queue[:, 0].tolist() == [3.0, 4.0, 4.0, 2.0, 3.0]
    assert mq.ptr.item() == 3
    with pytest.raises(ValueError):
        mq.enqueue(torch.zeros(6, 3))


@pytest.mark.parametrize("chunk", [0, 4])
def test_enqueue_before_backward_is_caught(chunk):
    """negatives() is the live buffer (no copy); changing it before backward must fail loudly."""
    mq = MomentumQueue(_small_model(), dim=3, size=8)
    z1, z2 = _views(4, 3, seed=2, dtype=torch.float32)
    loss = nt_xent(z1, z2, 0.1, chunk_size=chunk, extra_negatives=mq.negatives())
    mq.enqueue(F.normalize(torch.randn(2, 3), dim=1))
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_queue_state_dict_round_trip():
    model = _small_model()
    mq = MomentumQueue(model, dim=3, size=7, momentum=0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    mq.update(model)
    mq.enqueue(F.normalize(torch.randn(3, 3), dim=1))
    state = mq.state_dict()
    assert {"queue", "ptr"} <= set(state) and any(k.startswith("ema.") for k in state)

    fresh = MomentumQueue(_small_model(), dim=3, size=7, momentum=0.99)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue, mq.queue) and fresh.ptr.item() == 3
    for a, b in zip(fresh.ema.state_dict().values(), mq.ema.state_dict().values()):
        assert torch.equal(a, b)
    # and both continue identically
    k = F.normalize(torch.randn(2, 3), dim=1)
    fresh.enqueue(k)
    mq.enqueue(k)
    assert torch.equal(fresh.queue, mq.queue) and torch.equal(fresh.ptr, mq.ptr)


# ----------------------------------------------------------------------------- distillation


def naive_distill(student, teacher, tau, labels=None, alpha=0.0):
    """Row by row, class by class, float64."""
    s, t = student.double(), teacher.double()
    total = 0.0
    for i in range(s.shape[0]):
        zt = sum(math.exp(v / tau) for v in t[i].tolist())
        zs = sum(math.exp(v / tau) for v in s[i].tolist())
        total += -sum(math.exp(t[i, c].item() / tau) / zt * (s[i, c].item() / tau - math.log(zs))
                      for c in range(s.shape[1]))
    kd = tau**2 * total / s.shape[0]
    if labels is None or alpha == 0.0:
        return kd
    ces = [math.log(sum(math.exp(v) for v in s[i].tolist())) - s[i, y].item()
           for i, y in enumerate(labels.tolist()) if y >= 0]
    ce = sum(ces) / len(ces) if ces else 0.0
    return (1 - alpha) * kd + alpha * ce


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_distill_matches_reference(tau):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(6, 5, generator=g), 3 * torch.randn(6, 5, generator=g)
    assert distill_loss(s, t, tau).item() == pytest.approx(naive_distill(s, t, tau), rel=1e-5)


def test_distill_with_labels_ignores_unlabeled_rows():
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(6, 5, generator=g, requires_grad=True), torch.randn(6, 5, generator=g, requires_grad=True)
    labels = torch.tensor([2, -1, 0, -1, 4, 1])
    loss = distill_loss(s, t, 2.0, labels=labels, alpha=0.3)
    assert loss.item() == pytest.approx(naive_distill(s, t, 2.0, labels, 0.3), rel=1e-5)
    loss.backward()
    assert t.grad is None and s.grad is not None  # the teacher is a target, not trained
    # no labeled row in the batch: the CE term is 0, not NaN
    none = distill_loss(s, t, 2.0, labels=torch.full((6,), -1), alpha=0.3)
    assert none.item() == pytest.approx(0.7 * naive_distill(s, t, 2.0), rel=1e-5)


def test_distill_is_zero_gradient_at_teacher():
    t = torch.randn(4, 10)
    s = t.clone().requires_grad_()
    distill_loss(s, t, 1.5).backward()
    assert s.grad.abs().max() < 1e-6


# ----------------------------------------------------------------------------- GPU: no host sync


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [0, 64])
def test_nt_xent_fwd_bwd_no_host_sync(chunk):
    dev = torch.device("cuda")
    z1 = torch.randn(128, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    z2 = torch.randn(128, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    mq_extra = F.normalize(torch.randn(512, 128, device=dev), dim=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # warm up: lazy CUDA/cuBLAS init may sync
        nt_xent(z1, z2, 0.1, chunk_size=chunk, extra_negatives=mq_extra).backward()
    z1.grad = z2.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, acc = nt_xent(z1, z2, 0.1, chunk_size=chunk, extra_negatives=mq_extra, return_accuracy=True)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(z1.grad.float()).all() and 0 <= acc.item() <= 1


@pytest.mark.gpu
def test_queue_update_and_enqueue_no_host_sync():
    dev = torch.device("cuda")
    model = _small_model().to(dev)
    mq = MomentumQueue(model, dim=3, size=64)
    mq.update(model)
    mq.enqueue(torch.randn(8, 3, device=dev))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mq.update(model)
        mq.enqueue(torch.randn(8, 3, device=dev))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert mq.ptr.item() == 16
