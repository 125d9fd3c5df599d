"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks") as one fused step.

The whole step is a handful of ``torch._foreach_*`` kernels over all parameters of a group: one
``_foreach_norm`` for the weight norms, one for the update norms, the trust ratios for every
parameter as one vector op with ``torch.where`` for zero norms, then the momentum and weight
updates. There is no ``.item()`` and no Python branch on a tensor value, so a step never waits for
the GPU (the Python loops below only sort parameters into lists).

Two modes:

``mode="tf"`` reproduces google-research/simclr tf2/lars_optimizer.py (classic_momentum=True), per
parameter w with gradient g and momentum slot v::

    g = g + wd * w                              # only if decayed
    trust = eta * |w| / |g|   if |w| > 0 and |g| > 0, else 1.0    # only if adapted, else 1.0
    scaled_lr = lr * trust
    v = momentum * v + scaled_lr * g
    update = momentum * v + scaled_lr * g      if nesterov, else v
    w = w - update

``mode="torch"``, the common PyTorch variant (trust ratio on the raw gradient, lr after momentum)::

    trust = eta * |w| / (|g| + wd * |w|)   if |w| > 0 and |g| > 0, else 1.0   # only if adapted
    d = (g + wd * w) * trust
    buf = momentum * buf + d
    w = w - lr * (d + momentum * buf   if nesterov, else buf)

Which parameters are decayed and adapted: TF excludes by variable name (batch_normalization, bias).
Here a predicate on the parameter decides, ``exclude=lambda p: p.ndim == 1`` by default (BN weights
and biases); an excluded parameter gets neither weight decay nor trust-ratio adaptation (in TF,
exclude_from_layer_adaptation defaults to exclude_from_weight_decay). A param group can override
both: a ``weight_decay`` key in the group applies to all its parameters, predicate or not, and
``trust=True/False`` forces adaptation on or off.

``lr`` may be a float or a 0-dim tensor (e.g. on the GPU, updated in place by a schedule); both give
bit-identical steps. For a CUDA graph (``capturable=True``): the lr must be a tensor on the parameters'
device, every parameter's momentum buffer and scratch buffer exist from the first step on, and the
step allocates no full-size tensor, so the captured step replays on fixed memory. ``compiled=True``
runs the step through ``torch.compile`` (inductor fuses the chain of foreach kernels into a few
passes over memory; the same source, compiled by inductor's C++ backend, is what the CPU tests run).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer


def exclude_bias_and_norm(p: torch.Tensor) -> bool:
    """Default exclusion: 1-D parameters, i.e. biases and BatchNorm/LayerNorm weights."""
    return p.ndim == 1


class LARS(Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        mode: str = "tf",
        nesterov: bool = False,
        exclude: Callable[[torch.Tensor], bool] = exclude_bias_and_norm,
        capturable: bool = False,
        compiled: bool = False,
    ):
        if mode not in ("tf", "torch"):
            raise ValueError(f"LARS mode must be 'tf' or 'torch', got {mode!r}")
        if not callable(exclude):
            raise TypeError("exclude must be a predicate on a parameter, e.g. lambda p: p.ndim == 1")
        self.exclude = exclude  # kept off param_groups: a lambda there would break state_dict pickling
        self.capturable = capturable
        self._step_fn = _lars_step
        if compiled:
            # dynamic=False: one graph per parameter-list layout, which never changes during a run
            self._step_fn = torch.compile(_lars_step, dynamic=False)
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "mode": mode,
                    "nesterov": nesterov, "trust": None}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # Remember whether the group chose its weight decay itself: then it applies to all of the
        # group's parameters; otherwise the constructor's weight decay skips excluded parameters.
        param_group.setdefault("explicit_weight_decay", "weight_decay" in param_group)
        super().add_param_group(param_group)

    def _flags(self, group: dict, p: torch.Tensor) -> tuple[float, bool]:
        """(weight decay, adapt?) for one parameter of ``group``."""
        excluded = self.exclude(p)
        wd = group["weight_decay"] if (group["explicit_weight_decay"] or not excluded) else 0.0
        adapt = (not excluded) if group["trust"] is None else bool(group["trust"])
        return wd, adapt

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Sort parameters that have a gradient into lists per (device, dtype), as foreach
            # kernels want, adapted parameters first (so their trust ratios are a prefix).
            buckets = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:  # lazily, like torch.optim.SGD
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                scratch = None
                if self.capturable:  # d below, kept across steps: no full-size allocation in the step
                    if p not in self._scratch:
                        self._scratch[p] = torch.empty_like(p, memory_format=torch.preserve_format)
                    scratch = self._scratch[p]
                wd, adapt = self._flags(group, p)
                buckets[(p.device, p.dtype)].append((not adapt, p, p.grad, state["momentum_buffer"], wd, scratch))
            for entries in buckets.values():
                entries.sort(key=lambda e: e[0])  # stable: adapted (False) first, order kept
                _, params, grads, bufs, wds, scratch = map(list, zip(*entries))
                n_adapt = sum(1 for e in entries if not e[0])
                self._step_fn(params, grads, bufs, wds, n_adapt, lr=group["lr"], momentum=group["momentum"],
                              eta=group["eta"], mode=group["mode"], nesterov=group["nesterov"],
                              scratch=scratch if self.capturable else None)
        return loss

    @property
    def _scratch(self) -> dict:
        # Not in self.state: the scratch buffers hold nothing between steps and stay out of checkpoints.
        if not hasattr(self, "_scratch_bufs"):
            self._scratch_bufs = {}
        return self._scratch_bufs


def _lars_step(params, grads, bufs, wds, n_adapt, *, lr, momentum, eta, mode, nesterov, scratch=None):
    """One LARS step over lists of same-device, same-dtype tensors, in place on params and bufs.

    ``wds``: per-parameter weight decay (Python floats, 0.0 = none). The first ``n_adapt``
    parameters get trust-ratio adaptation, the rest a trust ratio of 1. All math is foreach / vector
    ops on the device (no Python loop over parameters, no host sync). ``scratch``: tensors like params
    to hold d (else d is allocated).
    """
    # d = g + wd * w: the only full-size temporary of the step (grouped by weight-decay value,
    # usually two groups, so each group is one foreach op with alpha=wd).
    d = [None] * len(params) if scratch is None else scratch
    groups = defaultdict(list)
    for i, wd in enumerate(wds):
        groups[wd].append(i)
    for wd, idx in groups.items():
        g_sub = [grads[i] for i in idx]
        if scratch is None:
            out = (torch._foreach_add(g_sub, [params[i] for i in idx], alpha=wd) if wd
                   else torch._foreach_mul(g_sub, 1.0))  # a copy: d is scaled in place below, .grad is not
            for i, t in zip(idx, out):
                d[i] = t
        else:
            d_sub = [d[i] for i in idx]
            torch._foreach_copy_(d_sub, g_sub)
            if wd:
                torch._foreach_add_(d_sub, [params[i] for i in idx], alpha=wd)

    # Trust ratios as one [P] vector: adapted prefix from the norms, 1.0 for the rest.
    ones = params[0].new_ones(len(params) - n_adapt)
    if n_adapt:
        w_norms = torch._foreach_norm(params[:n_adapt])
        w_norm = torch.stack(w_norms)
        if mode == "tf":  # eta * |w| / |g + wd * w|
            g_norm = torch.stack(torch._foreach_norm(d[:n_adapt]))
            denom = g_norm
        else:  # eta * |w| / (|g| + wd * |w|)
            g_norm = torch.stack(torch._foreach_norm(grads[:n_adapt]))
            denom = g_norm + torch.stack(torch._foreach_mul(w_norms, wds[:n_adapt]))
        ok = (w_norm > 0) & (g_norm > 0)  # else 1.0, as TF; where() keeps 0/0 out of the result
        trust = torch.cat([torch.where(ok, eta * w_norm / torch.where(ok, denom, 1.0), 1.0), ones])
    else:
        trust = ones

    torch._foreach_mul_(bufs, momentum)
    if mode == "tf":
        torch._foreach_mul_(d, (lr * trust).unbind())  # d <- scaled_lr * (g + wd * w)
        torch._foreach_add_(bufs, d)  # v = momentum * v + scaled_lr * d
        if nesterov:  # update = momentum * v + scaled_lr * d, in d's memory
            torch._foreach_add_(d, bufs, alpha=momentum)
            torch._foreach_sub_(params, d)
        else:
            torch._foreach_sub_(params, bufs)  # w = w - v
    else:
        torch._foreach_mul_(d, trust.unbind())  # d <- (g + wd * w) * trust
        torch._foreach_add_(bufs, d)  # buf = momentum * buf + d
        if nesterov:  # update = d + momentum * buf, in d's memory
            torch._foreach_add_(d, bufs, alpha=momentum)
            torch._foreach_mul_(d, lr)
        else:
            torch._foreach_copy_(d, bufs)
            torch._foreach_mul_(d, lr)
        torch._foreach_sub_(params, d)  # w = w - lr * update (a float and a tensor lr: the same ops)
