"""fastclr models: ``build_model`` returns a :class:`SimCLRModel` (ResNet backbone + projection head).

    from fastclr.models import build_model, parse_model_name
    model = build_model(**parse_model_name("r50_1x_sk1"))
    h, z = model([view1, view2])             # one backbone pass over both views

Pieces: :mod:`fastclr.models.resnet` (backbones, presets), :mod:`fastclr.models.heads`
(projection / linear heads).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .heads import LinearHead, ProjectionHead, ProjectionLayer
from .resnet import (
    BN_EPS,
    BN_MOMENTUM,
    DEPTHS,
    MODEL_PRESETS,
    SK_RATIO,
    ResNet,
    SelectiveKernelConv,
    build_backbone,
    model_name,
    parse_model_name,
)

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "DEPTHS",
    "MODEL_PRESETS",
    "SK_RATIO",
    "LinearHead",
    "ProjectionHead",
    "ProjectionLayer",
    "ResNet",
    "SelectiveKernelConv",
    "SimCLRModel",
    "build_backbone",
    "build_model",
    "convert_sync_bn",
    "model_kwargs",
    "model_name",
    "parse_model_name",
]


class SimCLRModel(nn.Module):
    """Backbone + projection head, run once over all views.

    ``forward(views)`` with K views of [B, 3, H, W] each returns ``(h, z)``: h [K*B, C] backbone
    features, z [K*B, proj_out_dim] head output; rows k*B..(k+1)*B-1 come from view k. The views are
    concatenated along the batch and go through the backbone in a single pass, as TF does: one big
    batch is faster than K small ones, and BN normalizes with statistics over all K*B images.
    A single tensor is also accepted (treated as one view).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[torch.Tensor] | tuple[torch.Tensor, ...] | torch.Tensor):
        x = views if isinstance(views, torch.Tensor) else torch.cat(list(views), dim=0)
        h = self.backbone(x)
        return h, self.head(h)


def build_model(
    depth: int = 50,
    width: int = 1,
    sk_ratio: float = 0.0,
    cifar_stem: bool = False,
    num_proj_layers: int = 3,
    proj_out_dim: int = 128,
    bn_momentum: float = BN_MOMENTUM,
    device: torch.device | str | None = None,
    tf_maxpool: bool = False,
    base_channels: int = 64,
    stem_stride: int = 1,
) -> SimCLRModel:
    """SimCLRv2 model. Head hidden width = backbone width (2048 * width for R50+).

    ``bn_momentum`` is torch's (weight of the new batch) = 1 - TF ``batch_norm_decay``; it is set on
    every BN of backbone and head. ``device``: create and initialize the weights there (e.g. "cuda"
    skips a CPU copy of a 795M-parameter model; "meta" allocates nothing).
    ``tf_maxpool``: the stem's max-pool padded as TF pads it (models converted from TF checkpoints).
    ``base_channels`` / ``stem_stride``: small networks TF does not build (fastclr.models.resnet).
    Presets: ``build_model(**parse_model_name("r152_3x_sk1"))``.
    """
    with torch.device(device) if device is not None else contextlib.nullcontext():
        backbone = build_backbone(depth, width, sk_ratio, cifar_stem, tf_maxpool=tf_maxpool,
                                  base_channels=base_channels, stem_stride=stem_stride)
        model = SimCLRModel(backbone, ProjectionHead(backbone.out_dim, num_proj_layers, proj_out_dim))
    if bn_momentum != BN_MOMENTUM:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = bn_momentum
    return model


def model_kwargs(m) -> dict:
    """``build_model`` arguments of a ``fastclr.config.ModelConfig``: a named preset (``m.name``, e.g.
    r50_1x_sk0) sets depth/width/sk_ratio, else the fields do."""
    kw = dict(depth=m.depth, width=m.width, sk_ratio=m.sk_ratio)
    if m.name:
        kw.update(parse_model_name(m.name))
    return dict(**kw, cifar_stem=m.cifar_stem, num_proj_layers=m.num_proj_layers, proj_out_dim=m.proj_out_dim,
                tf_maxpool=m.tf_maxpool, base_channels=m.base_channels,
                # a preset's stride of the cifar stem means nothing with the ImageNet stem (config: applies)
                stem_stride=m.stem_stride if m.cifar_stem else 1)


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (SimCLR's global BN) when torch.distributed runs >1 process.

    No-op (model returned unchanged) in a single process. Also a no-op, with a note on rank 0, under
    the gloo backend: torch's SyncBatchNorm only runs on GPU/XPU, so CPU multi-process runs keep
    per-rank BN statistics. Call it before wrapping the model in DDP.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return model
    if dist.get_backend() == "gloo":
        if dist.get_rank() == 0:
            print("convert_sync_bn: gloo backend (CPU) has no SyncBatchNorm; BN statistics stay per rank")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
