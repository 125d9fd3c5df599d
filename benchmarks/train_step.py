"""The training step the ``step`` and ``e2e`` stages time: fastclr.trainer's TrainStep / GraphedStep
with pretraining's loss and LARS, the code pretrain.py runs every step (single process). The stages only
call ``step(views)``.

Variants (what pretrain.py picks by default on a GPU: ``compiled+graph``):
    eager           the plain step
    compiled        the model (and LARS's step) through torch.compile
    graph           the whole step captured as one CUDA graph and replayed (GPU only)
    compiled+graph  both
"""
from __future__ import annotations

import torch

VARIANTS = ("eager", "compiled", "graph", "compiled+graph")
GRAPH_WARMUP = 3  # eager steps before the capture (GraphedStep's default)


def make_train_step(arch: str, device, dtype, variant: str = "eager"):
    """fwd + NT-Xent + bwd + LARS, through the trainer's step classes.

    Returns ``(step, model)``: ``step(views)`` runs one training step on a list of two view batches
    (channels-last, on ``device``); ``dtype`` is the autocast dtype (float32: no autocast). A graph
    variant needs GRAPH_WARMUP + 1 calls before it replays (warmup, then capture)."""
    from fastclr.config import OptimConfig
    from fastclr.losses import contrastive_loss
    from fastclr.models import build_model, parse_model_name
    from fastclr.optimizers import build_optimizer
    from fastclr.trainer import GraphedStep, TrainStep
    from loaders.base import Batch
    if variant not in VARIANTS:
        raise ValueError(f"unknown step variant {variant!r}; choose from {VARIANTS}")
    device = torch.device(device)
    graph, compiled = "graph" in variant, variant.startswith("compiled")
    if graph and device.type != "cuda":
        raise RuntimeError("a CUDA graph needs a GPU")
    torch.manual_seed(0)
    model = build_model(**parse_model_name(arch)).to(device).to(memory_format=torch.channels_last).train()
    lr = torch.tensor(0.3, device=device) if graph else 0.3
    opt = build_optimizer(list(model.parameters()), OptimConfig(weight_decay=1e-6), lr, capturable=graph,
                          compiled=compiled)
    forward = torch.compile(model) if compiled else model
    cls = GraphedStep if graph else TrainStep
    train_step = cls(model, forward, contrastive_loss(0.1), opt, device, dtype)

    def step(views):
        train_step(lambda: Batch(views, None))

    return step, model
