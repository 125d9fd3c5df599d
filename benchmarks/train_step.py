"""The training step the ``step`` and ``e2e`` stages time. One function, so that it can follow the
trainer fastclr/pretrain.py uses without touching the stages: they only call ``step(views)``."""
from __future__ import annotations

import torch

from benchmarks.timing import autocast


def make_train_step(arch: str, device, dtype):
    """fwd + NT-Xent + bwd + LARS, as fastclr/pretrain.py's loop body does it (single process).

    Returns ``(step, model)``: ``step(views)`` runs one training step on a list of two view batches
    (channels-last, on ``device``); ``dtype`` is the autocast dtype (float32: no autocast)."""
    from fastclr.lars import LARS
    from fastclr.losses import nt_xent
    from fastclr.models import build_model, parse_model_name
    torch.manual_seed(0)
    model = build_model(**parse_model_name(arch)).to(device).to(memory_format=torch.channels_last).train()
    opt = LARS(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-6, eta=1e-3, mode="tf")

    def step(views):
        with autocast(device, dtype):
            _, z = model(views)
        z1, z2 = z.float().chunk(2)
        nt_xent(z1, z2, 0.1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model
