"""The training step the ``step`` and ``e2e`` stages time: fastclr.trainer.TrainStep with pretraining's
loss, the code pretrain.py runs every step (single process). The stages only call ``step(views)``."""
from __future__ import annotations

import torch


def make_train_step(arch: str, device, dtype):
    """fwd + NT-Xent + bwd + LARS, through the trainer's TrainStep.

    Returns ``(step, model)``: ``step(views)`` runs one training step on a list of two view batches
    (channels-last, on ``device``); ``dtype`` is the autocast dtype (float32: no autocast)."""
    from fastclr.config import OptimConfig
    from fastclr.losses import contrastive_loss
    from fastclr.models import build_model, parse_model_name
    from fastclr.optimizers import build_optimizer
    from fastclr.trainer import TrainStep
    from loaders.common import Batch
    device = torch.device(device)
    torch.manual_seed(0)
    model = build_model(**parse_model_name(arch)).to(device).to(memory_format=torch.channels_last).train()
    opt = build_optimizer(list(model.parameters()), OptimConfig(weight_decay=1e-6), lr=0.3)
    train_step = TrainStep(model, model, contrastive_loss(0.1), opt, device, dtype)

    def step(views):
        train_step(lambda: Batch(views, None))

    return step, model
