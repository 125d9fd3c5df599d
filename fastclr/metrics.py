"""Evaluation metrics over loaders: top-1/top-5 of a classifier, and the features of a network (or the
raw pixels) in data-set order, which the k-NN probe and the linear evaluation's fast path train on."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastclr import runtime
from loaders.base import Batch
from loaders.sampling import shard_indices


def topk(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """top-1 / top-5 accuracy (%) and mean cross-entropy of ``logits`` [N, C] for labels ``y`` [N]."""
    k = min(5, logits.shape[1])
    hit = logits.topk(k, dim=1).indices == y[:, None]
    return {"top1": round(100.0 * hit[:, 0].float().mean().item(), 3),
            "top5": round(100.0 * hit.any(1).float().mean().item(), 3),
            "val_loss": round(F.cross_entropy(logits, y).item(), 5), "val_images": len(y)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """``topk`` of ``model`` (BN in eval mode) over ``loader``, with sums kept on the device (one host
    sync at the end)."""
    was_training = model.training
    model.eval()
    top1 = torch.zeros((), device=device)
    top5 = torch.zeros((), device=device)
    loss = torch.zeros((), device=device)
    n = 0
    for batch in loader:
        with runtime.autocast(device, dtype):
            logits = model(batch.views[0]).float()
        y = batch.labels
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices == y[:, None]
        top1 += hit[:, 0].sum()
        top5 += hit.any(dim=1).sum()
        loss += F.cross_entropy(logits, y, reduction="sum")
        n += len(y)
    model.train(was_training)
    n = max(n, 1)
    return {"top1": round(100.0 * top1.item() / n, 3), "top5": round(100.0 * top5.item() / n, 3),
            "val_loss": round(loss.item() / n, 5), "val_images": n}


@torch.no_grad()
def extract(features: Callable[[torch.Tensor], torch.Tensor] | None, loader, device: torch.device,
            dtype: torch.dtype, channels_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32, labels [N]) of one pass of an eval loader, in ascending sample id
    (``loader.last_indices``): the order of the data set (or of the file list), whatever the backend.
    ``features``: a network's feature function (call it in eval mode), or None for the raw pixels of
    the eval crop, flattened and centred per image (the reference a learned feature must beat)."""
    feats, labels, ids = [], [], []
    for batch in loader:
        x = batch.views[0]
        if features is None:
            h = x.flatten(1).float()
            h = h - h.mean(1, keepdim=True)
        else:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with runtime.autocast(device, dtype):
                h = features(x)
        feats.append(h.float())
        labels.append(batch.labels)
        ids.append(torch.as_tensor(np.asarray(loader.last_indices), device=feats[-1].device))
    order = torch.argsort(torch.cat(ids))
    return torch.cat(feats)[order], torch.cat(labels)[order]


class FeatureLoader:
    """Cached features served as a loader (the contract the trainer reads: ``len``, ``set_epoch``,
    iteration yielding ``Batch([features], labels)``). An epoch visits ``shard_indices(N, 0, 1, epoch,
    seed, shuffle=train)`` in batches of ``batch_size`` (the last partial one dropped in training):
    the torch loader's order for the same seed, so a layer trained on cached features steps through
    the images as the same layer trained on the network's outputs would."""

    num_skipped = 0

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int = 0,
                 train: bool = True):
        self.feats, self.labels, self.batch_size, self.seed, self.train = feats, labels, batch_size, seed, train
        self.epoch, self._start = 0, 0
        self.last_indices: np.ndarray | None = None

    def __len__(self) -> int:
        n = len(self.feats)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self._start = int(epoch), int(start_step)

    def __iter__(self):
        epoch, start = self.epoch, self._start
        self.epoch, self._start = epoch + 1, 0
        order = torch.from_numpy(shard_indices(len(self.feats), 0, 1, epoch, self.seed, self.train).copy())
        order = order.to(self.feats.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            self.last_indices = idx.cpu().numpy()
            yield Batch([self.feats[idx]], self.labels[idx])
