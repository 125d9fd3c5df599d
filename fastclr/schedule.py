"""Learning-rate schedule and batch-size scaling, as google-research/simclr tf2/model.py
(WarmUpAndCosineDecay) and tf2/run.py (flags) define them.

* Warmup: linear from 0, ``lr = step / warmup_steps * base_lr`` for ``step < warmup_steps``.
* Then cosine decay to 0 over the remaining ``total_steps - warmup_steps`` steps (Keras CosineDecay,
  alpha=0, step clipped at the end): ``lr = base_lr * 0.5 * (1 + cos(pi * t / decay_steps))`` with
  ``t = min(step - warmup_steps, decay_steps)``.
* Scaling: ``linear`` = base * B / 256 with base 0.3 (TF's default flags); ``sqrt`` = base * sqrt(B)
  with base 0.075 (the SimCLRv2 recipe for large batches). B is the global batch (all ranks).

Pure Python on ints and floats: the step counter lives on the host, so no tensor is involved.
"""
from __future__ import annotations

import math

DEFAULT_BASE_LR = {"linear": 0.3, "sqrt": 0.075}


def scaled_lr(base: float | None, batch_size: int, rule: str = "linear") -> float:
    """Peak learning rate for a global batch of ``batch_size``; ``base=None`` takes the rule's default."""
    if rule not in DEFAULT_BASE_LR:
        raise ValueError(f"unknown learning-rate scaling {rule!r}: use 'linear' or 'sqrt'")
    if base is None:
        base = DEFAULT_BASE_LR[rule]
    if rule == "linear":
        return base * batch_size / 256.0
    return base * math.sqrt(batch_size)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate at ``step`` (0-based, the step about to be taken): linear warmup, then cosine to 0.

    ``base_lr`` is the peak (already scaled). ``lr_at(0) == 0`` when there is warmup,
    ``lr_at(warmup_steps) == base_lr``, ``lr_at(total_steps) == 0``, and 0 past the end.
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)  # TF would divide by 0 here; we return 0 at the end
    t = min(step - warmup_steps, decay_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t / decay_steps))
