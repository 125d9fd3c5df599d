"""Losses: NT-Xent across ranks (with correct gradients), an optional momentum memory queue, and
the SimCLRv2 distillation loss.

NT-Xent follows google-research/simclr tf2/objective.py (add_contrastive_loss): each rank takes
its own 2B anchors as rows against the 2B*W embeddings of all ranks as columns, masks each anchor's
similarity with itself, and labels the positive (the other view of the same image) with a rank
offset. Nothing here syncs with the host: no ``.item()``, no branch on tensor values.

Gradient convention under torch.distributed (W ranks, B images per rank)
-----------------------------------------------------------------------
* The loss on rank r, ``L_r``, is the mean over its 2B local anchors.
* The global objective is ``L = mean_r L_r`` = the mean over all 2BW anchors = exactly what one
  process computes from the concatenated global batch.
* The all-gather's backward all-reduces (SUM) the gradient of the gathered tensor and keeps this
  rank's slice, because every rank's loss depends on every rank's embeddings through the columns.
  So the gradient rank r gets for its local embeddings is ``d(sum_r' L_r')/dz_r = W * dL/dz_r``.
* DDP averages parameter gradients over ranks, which divides that W back out: the update equals
  the single-process gradient of ``L`` on the global batch. (TF does the same: it divides each
  replica's loss by W and sums gradients across replicas.)

tests/test_losses.py checks ``grad on rank r == W * dL/dz_r`` with two real gloo processes.

Loss scale vs TF: TF's ``reduce_mean(loss_a + loss_b)`` sums the two views' losses and averages over
B, which is 2x our mean over 2B anchors. Multiply by 2 to compare loss values with TF logs.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fastclr import dist as fdist

LARGE_NUM = 1e9  # logit given to an anchor's self-similarity; exp(-1e9 - x) == 0, as in TF
CHUNK_THRESHOLD = 16384  # more columns than this -> the chunked (memory-lean) path by default
DEFAULT_CHUNK = 4096  # columns per chunk on the chunked path

gather_nograd = fdist.gather_nograd  # all ranks' queue keys, [W*n, D], no gradient (re-exported)


# ----------------------------------------------------------------------------- all-gather


class _AllGatherWithGrad(torch.autograd.Function):
    """``[n, D]`` local -> ``[W*n, D]`` rank-major; backward = all-reduce(SUM) then own slice.

    The SUM is right because each rank's loss uses every rank's rows as columns: the full gradient
    of rank r's rows is the sum of what every rank's loss sends them (see the module docstring).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        return fdist.all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce is in place
        torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        r = fdist.rank()
        return grad[r * ctx.n:(r + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` ([n, D] each) as ``[W*n, D]``, differentiable; ``x`` itself when W == 1."""
    if fdist.world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


# ----------------------------------------------------------------------------- NT-Xent


def _chunk_logits(q, kc, c0, self_idx, inv_t):
    """Logits of anchors ``q`` [N, D] against columns ``kc`` [c, D] that start at global column
    ``c0``, with each anchor's self column set to -LARGE_NUM: [N, c]."""
    logits = (q @ kc.T) * inv_t
    cols = torch.arange(c0, c0 + kc.shape[0], device=q.device)
    return logits.masked_fill(cols[None, :] == self_idx[:, None], -LARGE_NUM)


def _column_chunks(k, extra, chunk):
    """(start column, [c, D] block, is_trainable) over the columns k then extra, ``chunk`` at a time."""
    for c0 in range(0, k.shape[0], chunk):
        yield c0, k[c0:c0 + chunk], True
    if extra is not None:
        for e0 in range(0, extra.shape[0], chunk):
            yield k.shape[0] + e0, extra[e0:e0 + chunk], False


def _max_negative(logits, c0, pos_idx):
    """Row max of ``logits`` [N, c] (columns from ``c0``) with the positive column left out: [N]."""
    cols = torch.arange(c0, c0 + logits.shape[1], device=logits.device)
    return logits.masked_fill(cols[None, :] == pos_idx[:, None], -float("inf")).amax(1)


def _dense_lse(q, k, extra, self_idx, pos_idx, inv_t):
    """All logits at once ([N, M] in memory). Returns (logsumexp per anchor [N], max negative [N])."""
    logits = _chunk_logits(q, k, 0, self_idx, inv_t)
    if extra is not None:
        logits = torch.cat([logits, (q @ extra.T) * inv_t], 1)
    with torch.no_grad():
        max_neg = _max_negative(logits, 0, pos_idx)
    return torch.logsumexp(logits, 1), max_neg


class _ChunkedLSE(torch.autograd.Function):
    """logsumexp over all columns, one chunk of columns at a time (online logsumexp).

    Forward keeps only a running max and running sum per anchor; backward recomputes each chunk's
    logits from q, k and the saved logsumexp. Peak memory for logits is [N, chunk] both ways,
    instead of [N, M]. Inputs: q [N, D] anchors, k [M, D] trainable columns, extra [K, D] or None
    (frozen columns, no gradient), self_idx / pos_idx [N] (column of each anchor's self / positive).
    Outputs: lse [N] (differentiable), max negative logit [N] (not differentiable).
    """

    @staticmethod
    def forward(ctx, q, k, extra, self_idx, pos_idx, inv_t, chunk):
        n = q.shape[0]
        run_max = q.new_full((n,), -float("inf"))
        run_sum = q.new_zeros(n)
        max_neg = q.new_full((n,), -float("inf"))
        for c0, kc, _ in _column_chunks(k, extra, chunk):
            logits = _chunk_logits(q, kc, c0, self_idx, inv_t)
            new_max = torch.maximum(run_max, logits.amax(1))
            # rescale the old sum to the new max; the masked self logit (-1e9) contributes 0
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(1)
            run_max = new_max
            max_neg = torch.maximum(max_neg, _max_negative(logits, c0, pos_idx))
        lse = run_max + torch.log(run_sum)
        ctx.save_for_backward(q, k, extra, self_idx, lse)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        ctx.mark_non_differentiable(max_neg)
        return lse, max_neg

    @staticmethod
    def backward(ctx, grad_lse, _grad_max_neg):
        q, k, extra, self_idx, lse = ctx.saved_tensors
        inv_t = ctx.inv_t
        with torch.autocast(q.device.type, enabled=False):  # stay fp32 even if backward runs under autocast
            dq = torch.zeros_like(q)
            dk = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
            for c0, kc, trainable in _column_chunks(k, extra, ctx.chunk):
                logits = _chunk_logits(q, kc, c0, self_idx, inv_t)
                # d lse_j / d logit_jc = softmax_jc; logit = (q k^T) * inv_t. Masked columns get 0.
                g = torch.exp(logits - lse[:, None]) * (grad_lse[:, None] * inv_t)  # [N, c]
                dq += g @ kc
                if dk is not None and trainable:
                    dk[c0:c0 + kc.shape[0]] = g.T @ q
        return dq, dk, None, None, None, None, None


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    chunk_size: int | None = None,
    extra_negatives: torch.Tensor | None = None,
    return_accuracy: bool = False,
):
    """NT-Xent (normalized temperature-scaled cross-entropy) on two views, across all ranks.

    Args:
        z1, z2: ``[B, D]`` this rank's embeddings of view 1 and view 2 (row i of both = image i).
            L2-normalized here. Every rank must pass the same B.
        temperature: logits are cosine similarities / temperature.
        chunk_size: columns per chunk for the memory-lean path. None: chunked (DEFAULT_CHUNK) when
            there are more than CHUNK_THRESHOLD columns, dense otherwise. 0: always dense. The two
            paths give the same loss and gradients.
        extra_negatives: ``[K, D]`` L2-normalized negatives without gradient (a memory queue),
            appended as columns. Must not be modified in place before backward.
        return_accuracy: also return the contrastive accuracy.

    Returns:
        loss: 0-dim float32 (float64 for float64 inputs), the mean over this rank's 2B anchors of
            ``-log softmax(logits)[positive]``, each anchor against 2BW - 1 other embeddings
            (+ K extra negatives). See the module docstring for the gradient convention.
        accuracy (if return_accuracy): 0-dim tensor, the fraction of this rank's anchors whose
            positive scores above every negative (stricter than TF's logged metric, which is
            ``contrastive_accuracy``). A tensor, so reading it is the caller's sync.

    Computed in float32 (or float64) with autocast disabled, whatever the input dtype.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent expects two [B, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    world, rank = fdist.world_size(), fdist.rank()
    dtype = torch.promote_types(z1.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays (tests)
    with torch.autocast(z1.device.type, enabled=False):
        q = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # [2B, D] local anchors (rows)
        if world > 1:
            # one collective: [W*2B, D] rank-major -> [2BW, D] as [all ranks' z1 ; all ranks' z2],
            # the column order one process gets from cat(z1_global, z2_global)
            g = all_gather_with_grad(q)
            k = g.view(world, 2, b, -1).transpose(0, 1).reshape(2 * world * b, -1)
        else:
            k = q
        # Row j < B is view 1 of local image i = j, row j >= B view 2 of image i = j - B.
        # Its self column is view(j)'s block + rank offset + i; its positive is the other view's.
        j = torch.arange(2 * b, device=q.device)
        view, i = j // b, j % b
        self_idx = view * (world * b) + rank * b + i
        pos_idx = (1 - view) * (world * b) + rank * b + i

        extra = None if extra_negatives is None else extra_negatives.detach().to(dtype)
        n_cols = k.shape[0] + (0 if extra is None else extra.shape[0])
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK if n_cols > CHUNK_THRESHOLD else 0
        inv_t = 1.0 / temperature

        pos_logit = (q * k[pos_idx]).sum(1) * inv_t  # [2B]
        if chunk_size:
            lse, max_neg = _ChunkedLSE.apply(q, k, extra, self_idx, pos_idx, inv_t, int(chunk_size))
        else:
            lse, max_neg = _dense_lse(q, k, extra, self_idx, pos_idx, inv_t)
        loss = (lse - pos_logit).mean()
    if return_accuracy:
        return loss, (pos_logit.detach() > max_neg).to(dtype).mean()
    return loss


@torch.no_grad()
def contrastive_accuracy(z1: torch.Tensor, z2: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """TF's ``contrast_acc`` (google-research/simclr tf2/metrics.py on objective.py's ``logits_ab``):
    the fraction of this rank's view-1 embeddings whose most similar view-2 embedding, among all
    ranks' view-2 embeddings, is its own positive. The view-1 negatives (TF's ``logits_aa``) and view-2
    anchors play no part. ``z1, z2``: ``[B, D]``; a 0-dim tensor (reading it is the caller's sync).

    nt_xent's ``return_accuracy`` is stricter (every anchor of both views against all 2BW - 1 other
    embeddings) and reads lower; this is the number TF logs. Columns in chunks of ``chunk``: memory
    [B, chunk] whatever the global batch."""
    b = z1.shape[0]
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        q = F.normalize(z1.to(dtype), dim=1)
        k = fdist.gather_nograd(F.normalize(z2.to(dtype), dim=1))  # [W*B, D], rank-major
        pos = fdist.rank() * b + torch.arange(b, device=q.device)
        pos_logit = (q * k[pos]).sum(1)
        best_other = q.new_full((b,), -float("inf"))
        for c0 in range(0, k.shape[0], chunk):
            best_other = torch.maximum(best_other, _max_negative(q @ k[c0:c0 + chunk].T, c0, pos))
        return (pos_logit > best_other).to(dtype).mean()


def contrastive_loss(temperature: float, chunk_size: int | None = None, queue: "MomentumQueue | None" = None):
    """The pretraining loss as the trainer's ``loss_fn(forward, batch) -> (loss, metrics)``: both views
    through the model in one pass, NT-Xent on the projections (the queue's keys as extra negatives),
    multiplied by 2 to be TF's objective: ``loss_a + loss_b`` averaged over images is twice our mean over
    the 2B anchors, and with LARS the factor sets the size of weight decay relative to the gradient and
    the update of the non-adapted BN/bias parameters. Metrics: TF's contrast_acc and the strict one."""
    def loss_fn(forward, batch):
        _, z = forward(batch.views)
        z1, z2 = z.float().chunk(2)
        negatives = queue.negatives() if queue is not None else None
        loss, acc_all = nt_xent(z1, z2, temperature, chunk_size=chunk_size, extra_negatives=negatives,
                                return_accuracy=True)
        return 2.0 * loss, {"contrastive_acc": contrastive_accuracy(z1, z2), "contrastive_acc_all": acc_all}
    return loss_fn


# ----------------------------------------------------------------------------- memory queue


class MomentumQueue(nn.Module):
    """An EMA ("momentum") copy of the encoder + head and a FIFO queue of its keys as extra negatives.

    Off by default in pretraining; SimCLRv2 reports a small gain from such a memory. Usage per step::

        loss = nt_xent(z1, z2, T, extra_negatives=mq.negatives())
        loss.backward(); opt.step()
        mq.update(model)                        # EMA step (pass the unwrapped module, not DDP)
        keys = F.normalize(mq(x), dim=1)        # EMA embeddings of one view, no grad
        mq.enqueue(gather_nograd(keys))         # all ranks' keys: the same queue on every rank

    Enqueue after backward: ``negatives()`` is the buffer itself, and autograd raises if it changed.
    The queue starts as random unit vectors (as MoCo does), replaced as keys arrive. The write
    pointer is a tensor, so enqueue never syncs with the host.

    Buffers / state: ``ema`` (module), ``queue`` [K, D], ``ptr`` (0-dim int64). ``state_dict()``
    and ``load_state_dict()`` cover all three (nn.Module).
    """

    def __init__(self, model: nn.Module, dim: int, size: int = 65536, momentum: float = 0.999):
        super().__init__()
        self.momentum = momentum
        self.ema = copy.deepcopy(model).requires_grad_(False)
        param = next(model.parameters())
        queue = F.normalize(torch.randn(size, dim, device=param.device), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=param.device))

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        """The EMA model's forward, without gradient."""
        return self.ema(*args, **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = m * ema + (1 - m) * model for parameters (one fused lerp); buffers (BN stats) copied."""
        ema_p, src_p = list(self.ema.parameters()), list(model.parameters())
        ema_b, src_b = list(self.ema.buffers()), list(model.buffers())
        if len(ema_p) != len(src_p) or len(ema_b) != len(src_b):
            raise ValueError("update(model): model does not match the EMA copy (pass the unwrapped module)")
        torch._foreach_lerp_(ema_p, src_p, 1.0 - self.momentum)
        if ema_b:
            torch._foreach_copy_(ema_b, src_b)

    def negatives(self) -> torch.Tensor:
        """The queue, ``[K, D]`` (no copy): pass as ``nt_xent(..., extra_negatives=...)``."""
        return self.queue

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` [N, D] (all ranks' keys, L2-normalized, N <= K) over the oldest entries."""
        n, size = keys.shape[0], self.queue.shape[0]
        if n > size:
            raise ValueError(f"enqueue: {n} keys do not fit a queue of {size}")
        idx = (self.ptr + torch.arange(n, device=self.queue.device)) % size  # wraps around, on device
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.ptr.copy_((self.ptr + n) % size)


# ----------------------------------------------------------------------------- distillation


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """SimCLRv2 distillation: ``tau^2 * mean_i -sum_y softmax(t_i/tau)_y * log_softmax(s_i/tau)_y``,
    plus an optional label term: ``(1 - alpha) * distill + alpha * CE(student_logits, labels)``.

    Args:
        student_logits, teacher_logits: ``[N, C]``; the teacher gets no gradient.
        temperature: tau. The tau^2 factor follows the official TF code (add_kd_loss in
            google-research/simclr tf2/colabs/distillation_self_training.ipynb; tf2/run.py has no
            distillation); it keeps gradient size independent of tau. The paper's Eq. 3 omits it;
            at the paper's tau = 1 the two agree.
        labels: ``[N]`` int64 class ids, -1 for unlabeled rows (ignored), or None.
        alpha: weight of the cross-entropy on labeled rows (the paper's Eq. 4 with its alpha = 1 - ours).
            The CE is the mean over labeled rows (0 when a batch has none), at temperature 1.

    Returns a 0-dim float32 tensor. Computed in float32 with autocast disabled. No host sync.
    """
    with torch.autocast(student_logits.device.type, enabled=False):
        s = student_logits.float()
        t = teacher_logits.detach().float()
        soft = -(F.softmax(t / temperature, dim=1) * F.log_softmax(s / temperature, dim=1)).sum(1)
        loss = soft.mean() * temperature**2
        if labels is None or alpha == 0.0:
            return loss
        labeled = labels >= 0
        ce = F.cross_entropy(s, labels.clamp(min=0), reduction="none")
        # mean over labeled rows; clamp keeps a batch without labels at 0 instead of 0/0
        ce = (ce * labeled).sum() / labeled.sum().clamp(min=1)
        return (1.0 - alpha) * loss + alpha * ce
