"""The optimizers of every training script, from the ``optim`` config section.

* pretraining and distillation: ``build_optimizer`` (LARS by default, TF's lars_optimizer);
* fine-tuning: ``classifier_optimizer``: LARS for the network, plain momentum for the new linear layer
  (TF excludes 'head_supervised' from LARS adaptation);
* linear evaluation: ``linear_sgd``: Nesterov momentum SGD (TF's "momentum" optimizer).
Each ``*_optimizer`` returns ``make(model, lr)``, what the trainer calls once the model is on its device.
"""
from __future__ import annotations

import torch
from torch import nn

from fastclr import checkpoint as ckpt
from fastclr.config import OptimConfig
from fastclr.lars import LARS


def build_optimizer(params, o: OptimConfig, lr, capturable: bool = False, compiled: bool = False):
    """``o.optimizer`` over ``params`` (a list of tensors or of param groups) at learning rate ``lr``
    (a float, or a 0-dim tensor for a captured step). ``capturable`` / ``compiled``: LARS's CUDA-graph
    and torch.compile forms (see fastclr.lars)."""
    if o.optimizer == "lars":
        return LARS(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, eta=o.eta, mode=o.lars_mode,
                    capturable=capturable, compiled=compiled)
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)


def pretrain_optimizer(o: OptimConfig):
    """make(model, lr, **kw): ``build_optimizer`` over all trainable parameters."""
    def make(model: nn.Module, lr, **kw):
        return build_optimizer([p for p in model.parameters() if p.requires_grad], o, lr, **kw)
    return make


def classifier_optimizer(o: OptimConfig):
    """make(model, lr, **kw): optim.optimizer over the network, but for LARS the classifier layer is
    plain momentum SGD, as in TF (its LARS excludes 'head_supervised' from the trust ratio and from
    its weight decay; the kernel's l2 term is added to the loss instead = decay without adaptation).
    A zero-initialized layer would otherwise never move: its trust ratio eta*|w|/|g| starts at 0."""
    def make(model: nn.Module, lr, **kw):
        if o.optimizer != "lars":
            return build_optimizer([p for p in model.parameters() if p.requires_grad], o, lr, **kw)
        fc = ckpt.unwrap(model).fc
        head = {id(p) for p in fc.parameters()}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
        groups = [{"params": rest},
                  {"params": [fc.weight], "trust": False, "weight_decay": o.weight_decay},
                  {"params": [fc.bias], "trust": False, "weight_decay": 0.0}]
        return build_optimizer(groups, o, lr, **kw)
    return make


def linear_sgd(o: OptimConfig):
    """make(model, lr, **kw): TF's "momentum" optimizer, Nesterov SGD, whose l2 term covers the layer's
    kernel and bias (``optim.optimizer=sgd``, the linear-eval default); another optimizer otherwise."""
    def make(model: nn.Module, lr, **kw):
        params = [p for p in model.parameters() if p.requires_grad]
        if o.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)
        return build_optimizer(params, o, lr, **kw)
    return make
