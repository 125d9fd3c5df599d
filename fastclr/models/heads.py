"""Heads: the SimCLRv2 projection head and the linear (supervised) head.

Semantic reference: google-research/simclr ``tf2/model.py`` (``LinearLayer``, ``ProjectionHead``
in 'nonlinear' mode, ``SupervisedHead``).

Projection head, as TF builds it with ``use_bn=True`` on every layer:

* every layer is ``Linear(bias=False) -> BatchNorm1d``: TF drops the dense bias whenever BN follows
  (the BN shift does that job);
* middle layers: hidden width = input width (TF: ``num_classes=lambda input_shape: input_shape[-1]``),
  BN with shift (``center=True``, TF's ``use_bias=True``), then ReLU;
* last layer: ``proj_out_dim`` wide, BN *without* shift (``center=False``: TF passes
  ``use_bias=False`` on to BN), no ReLU;
* dense kernels start as N(0, 0.01) (TF ``RandomNormal(stddev=0.01)``); BN gamma 1, beta 0;
  BN momentum 0.1 (TF decay 0.9), eps 1e-5.

``num_proj_layers=0`` is TF's 'none' mode: z = h.
"""
from __future__ import annotations

import torch
from torch import nn

from .resnet import BN_EPS, BN_MOMENTUM


class ProjectionLayer(nn.Module):
    """One head layer: [B, in_dim] -> [B, out_dim] = (ReLU)(BN(x @ W^T))."""

    def __init__(self, in_dim: int, out_dim: int, relu: bool):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)  # BN follows: no bias (TF)
        nn.init.normal_(self.linear.weight, std=0.01)
        # TF's last layer: BN(center=False), a scale but no shift. The shift is removed by hand rather
        # than with BatchNorm1d(bias=False), which older torch releases lack; F.batch_norm takes
        # bias=None, and convert_sync_batchnorm copies the None over. (In those releases BatchNorm's
        # reset_parameters() zeroes the bias unconditionally: do not call it on this layer.)
        self.bn = nn.BatchNorm1d(out_dim, eps=BN_EPS, momentum=BN_MOMENTUM)
        if not relu:
            self.bn.bias = None
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.linear(x)))


class ProjectionHead(nn.Module):
    """SimCLRv2 projection head: h [B, in_dim] -> z [B, out_dim].

    ``head(h, return_layers=True)`` returns ``[h, l1, ..., lN]`` (TF's ``hiddens_list``; index k
    is what ``ft_proj_selector=k`` fine-tunes from, and ``lN`` is z). ``truncate(k)`` gives the
    first k layers as a module, for fine-tuning "from the middle of the head"::

        neck = model.head.truncate(1)                  # shares weights with the head
        clf = nn.Sequential(model.backbone, neck, LinearHead(model.head.layer_dims[1], 1000))
    """

    def __init__(self, in_dim: int, num_layers: int = 3, out_dim: int = 128, hidden_dim: int | None = None):
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        hidden = hidden_dim or in_dim
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim] * (num_layers > 0)
        self.layers = nn.ModuleList(
            ProjectionLayer(dims[j], dims[j + 1], relu=j < num_layers - 1) for j in range(num_layers)
        )
        self.layer_dims = dims  # width of return_layers[k], k = 0..num_layers
        self.out_dim = dims[-1]

    def forward(self, h: torch.Tensor, return_layers: bool = False):
        outs = [h]
        for layer in self.layers:
            outs.append(layer(outs[-1]))
        return outs if return_layers else outs[-1]

    def truncate(self, k: int) -> nn.Sequential:
        """The first k layers (k=0: identity), sharing parameters with this head.
        [B, in_dim] -> [B, layer_dims[k]]."""
        if not 0 <= k <= len(self.layers):
            raise ValueError(f"ft_proj_selector must be in 0..{len(self.layers)}, got {k}")
        return nn.Sequential(*self.layers[:k])


class LinearHead(nn.Linear):
    """Supervised / linear-eval classifier: [B, in_dim] -> logits [B, num_classes].

    TF ``SupervisedHead``: dense with bias, no BN, kernel N(0, 0.01), bias 0. ``zero_init=True``
    zeros the kernel too (TF's ``--zero_init_logits_layer``, used for fine-tuning and linear eval).
    """

    def __init__(self, in_dim: int, num_classes: int, zero_init: bool = False):
        super().__init__(in_dim, num_classes, bias=True)
        if zero_init:
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=0.01)
        nn.init.zeros_(self.bias)
