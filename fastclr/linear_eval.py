"""Linear evaluation: a frozen pretrained network (BN in eval mode) and one trained linear layer.

    python fastclr/linear_eval.py imagenet --ckpt=runs/imagenet --data.path=/data/imagenet/train \\
        --run.val_path=/data/imagenet/val
    python fastclr/linear_eval.py demo_1pct --ckpt=runs/demo            # Fashion-MNIST, 1 % of the labels
    python fastclr/linear_eval.py demo_1pct --raw_pixels=true           # logistic regression on pixels

Recipe (google-research/simclr README, linear eval on ImageNet; TF's "momentum" optimizer): SGD with
Nesterov momentum 0.9, lr 0.1 * B / 256 (TF's default linear scaling), B = 4096, weight decay 1e-6, no
warmup, cosine decay, 90 epochs, zero-initialized classifier, on the backbone output
(``model.ft_proj_selector=0``; k > 0 takes projection-head layer k instead).

Two paths, same result without augmentation:
* fast (``--fast=true``, default): the features of every labelled train image and every val image are
  extracted once (centre crop, the eval recipe), then the linear layer trains on the cached features
  (``metrics.FeatureLoader``, in the torch loader's image order): the network runs once instead of once
  per epoch. One process (no torchrun).
* slow (``--fast=false``): the frozen network runs every step on ``data.augment`` views (default the
  fine-tuning recipe: random crop + flip), like TF's linear eval.
Both run through the trainer (classifier.train_classifier): the same schedule, optimizer, evaluations,
checkpoints, exact resume and best.pt (the whole probe: it scores images).
``--raw_pixels=true``: no network, the flattened eval-recipe pixels are the features (a logistic
regression reference); ``--standardize=true`` z-scores the features with train statistics (fast path;
folded into the saved linear layer).

Labels: all of data.path or a subset (``data.file_list``, ``--subset.list``, ``--subset.fraction``) as in
finetune.py. Output: config.json, log.jsonl (``eval`` records with top-1/top-5, ``done``), best.pt.
"""
from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # `python fastclr/linear_eval.py` puts fastclr/ first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn

from fastclr import dist, presets, runtime
from fastclr.classifier import cross_entropy, load_probe, train_classifier
from fastclr.config import LinearEvalConfig
from fastclr.labels import dataset_classes, eval_loader, label_subset, train_loader, val_loader
from fastclr.metrics import FeatureLoader, extract
from fastclr.optimizers import linear_sgd
from fastclr.runtime import UserError

PROG = "linear_eval.py"


class CachedFeatureHead(nn.Module):
    """The linear layer the fast path trains: [B, D] cached features -> logits, with the optional
    standardization (train mean / std, ``--standardize=true``) as buffers, in fp32 whatever the run's
    precision (the features are cached in fp32; a linear layer costs nothing)."""

    def __init__(self, fc: nn.Linear, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.fc = fc
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.mean is not None:
                x = (x - self.mean) / self.std
            return self.fc(x)


def export_probe(probe: nn.Module, head: CachedFeatureHead):
    """state_dict -> the whole probe's state_dict (what best.pt holds: a classifier that scores images),
    the standardization folded into the layer: W' = W / std, b' = b - W' mean."""
    frozen = {k: v for k, v in probe.state_dict().items() if not k.startswith("fc.")}

    def export(state: dict) -> dict:
        w, b = state["fc.weight"].detach().clone(), state["fc.bias"].detach().clone()
        if state.get("mean") is not None:
            w = w / state["std"]
            b = b - w @ state["mean"]
        return {**frozen, "fc.weight": w, "fc.bias": b}
    return export


# ----------------------------------------------------------------------------- entry point
def main(argv=None) -> int:
    return runtime.run_entry(PROG, LinearEvalConfig, presets.LINEAR, __doc__, run, argv)


def run(cfg: LinearEvalConfig) -> int:
    rank, world = dist.init()
    if cfg.fast and world > 1:
        raise UserError("the fast path runs in one process: drop torchrun, or use --fast=false")
    if (cfg.raw_pixels or cfg.standardize) and not cfg.fast:
        raise UserError("raw_pixels and standardize need the fast path (--fast=true)")
    run = runtime.start_run(cfg)
    device, dtype, train_path, val_path, out_dir = run.device, run.dtype, run.train_path, run.val_path, run.out_dir

    classes = dataset_classes(train_path)
    net, arch, source = load_probe(cfg.ckpt, cfg.model.ft_proj_selector, len(classes), cfg.raw_pixels,
                                   cfg.data.image_size)
    file_list, n_labeled = label_subset(cfg.data, cfg.subset, train_path, out_dir)
    where = "" if cfg.raw_pixels else f" (projection-head layer {arch['ft_proj_selector']}; 0 = backbone)"
    dist.print0(f"{PROG}: features of {source}{where}, "
                f"{'all' if n_labeled is None else n_labeled} labelled images, {len(classes)} classes, "
                + ("fast path: features extracted once (centre crop)" if cfg.fast
                   else "slow path: network every step"))

    if not cfg.fast:  # ------------------------------------------------ slow: the trainer, head only
        loader = train_loader(cfg, run, file_list, n_labeled)
        return train_classifier(PROG, cfg, run, net, arch, classes, cross_entropy, loader,
                                val_loader(cfg, run, classes), linear_sgd(cfg.optim),
                                extra_log={"path": "slow", "init": source, "labeled_images": n_labeled})

    # ---------------------------------------------------------------- fast: cached features
    t0 = time.perf_counter()
    net = net.to(device)
    if cfg.model.channels_last and not cfg.raw_pixels:
        net = net.to(memory_format=torch.channels_last)
    features_loader = eval_loader(train_path, cfg.data, cfg.run.eval_batch_size, device, file_list=file_list,
                                  backend=cfg.data.backend if cfg.data.backend != "dali" else "torch")
    net.eval()
    feats, labels = extract(net.features, features_loader, device, dtype)
    if n_labeled is not None and len(feats) != n_labeled:
        raise UserError(f"data.backend={cfg.data.backend} did not apply the label subset ({len(feats)} images, "
                        f"expected {n_labeled}): use data.backend=torch")
    vloader = None
    if val_path:
        vl = eval_loader(val_path, cfg.data, cfg.run.eval_batch_size, device)
        if vl.classes != classes:
            raise UserError(f"val classes of {val_path} differ from the train classes of {train_path}")
        vloader = FeatureLoader(*extract(net.features, vl, device, dtype), cfg.run.eval_batch_size, train=False)
    mean = std = None
    if cfg.standardize:
        mean, std = feats.mean(0), feats.std(0).clamp(min=1e-6)
    secs = round(time.perf_counter() - t0, 2)
    log = runtime.RunLog(out_dir, tensorboard=cfg.run.tensorboard)
    log.write(event="features", path="fast",
              note="features extracted once with the eval recipe (centre crop); the linear layer trains on "
                   "the cached features", train_images=len(feats),
              val_images=0 if vloader is None else len(vloader.feats), dim=feats.shape[1], seconds=secs)
    log.close()
    print(f"{PROG}: fast path: {len(feats)} train + {0 if vloader is None else len(vloader.feats)} val features "
          f"({feats.shape[1]}-d) extracted once in {secs} s; training the linear layer on them", flush=True)

    # The trainer, on the cached features: the same schedule, optimizer, image order, evaluations,
    # checkpoints and best.pt as the slow path; best.pt holds the whole probe.
    head = CachedFeatureHead(net.fc, mean, std)
    loader = FeatureLoader(feats, labels, run.per_rank, seed=cfg.run.seed)
    return train_classifier(PROG, cfg, run, head, arch, classes, cross_entropy, loader, vloader,
                            linear_sgd(cfg.optim), extra_log={"path": "fast", "init": source,
                                                              "labeled_images": len(feats)},
                            export_weights=export_probe(net, head))


if __name__ == "__main__":
    raise SystemExit(main())
