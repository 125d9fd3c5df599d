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
  extracted once (centre crop, the eval recipe), then the linear layer trains on the cached features:
  the network runs once instead of once per epoch. One process (no torchrun).
* slow (``--fast=false``): the frozen network runs every step on ``data.augment`` views (default the
  fine-tuning recipe: random crop + flip), like TF's linear eval; checkpoints and resume as finetune.py.
``--raw_pixels=true``: no network, the flattened eval-recipe pixels are the features (a logistic
regression reference); ``--standardize=true`` z-scores the features with train statistics (fast path;
folded into the saved linear layer).

Labels: all of data.path or a subset (``data.file_list``, ``--subset.list``, ``--subset.fraction``) as in
finetune.py. Output: config.json, log.jsonl (``eval`` records with top-1/top-5, ``done``), best.pt.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # `python fastclr/linear_eval.py` puts fastclr/ first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastclr import checkpoint as ckpt
from fastclr import config as C
from fastclr import dist, runtime
from fastclr.config import option
from fastclr.finetune import (
    Classifier,
    SubsetConfig,
    TrainRunConfig,
    _load,
    arch_of,
    build_classifier,
    dataset_classes,
    eval_loader,
    fit,
    label_subset,
    labelled_loaders,
)
from fastclr.models import LinearHead
from fastclr.pretrain import build_optimizer
from fastclr.runtime import UserError
from fastclr.schedule import lr_at, scaled_lr
from loaders.common import LoaderConfig, shard_indices

PROG = "linear_eval.py"


@dataclass
class LinearEvalConfig:
    ckpt: str = option("", "pretrain.py checkpoint or run dir (or a finetune/distill checkpoint: its backbone)")
    fast: bool = option(True, "extract features once (centre crop) and train on them; false = network every step")
    raw_pixels: bool = option(False, "no network: logistic regression on the flattened pixels (fast path)")
    standardize: bool = option(False, "z-score features with train mean/std (fast path; folded into the layer)")
    data: LoaderConfig = field(default_factory=lambda: LoaderConfig(augment="finetune"))
    model: C.ModelConfig = field(default_factory=lambda: C.ModelConfig(ft_proj_selector=0))
    optim: C.OptimConfig = field(default_factory=lambda: C.OptimConfig(
        optimizer="sgd", base_lr=0.1, lr_scaling="linear", weight_decay=1e-6, momentum=0.9, warmup_epochs=0.0,
        epochs=90, global_batch_size=4096))
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    run: TrainRunConfig = field(default_factory=lambda: TrainRunConfig(out_dir="runs/linear_eval"))


# The demo's label budgets are small (600 / 6000 images): a smaller batch, the same lr rule, more steps.
_DEMO_LE = {
    "data.path": "", "data.image_size": 32, "data.num_workers": 2, "data.dtype": "float32",
    "optim.base_lr": 0.1, "optim.lr_scaling": "linear", "optim.weight_decay": 1e-6, "optim.epochs": 90,
    "run.device": "cpu", "run.precision": "fp32", "run.eval_every": 10, "run.eval_batch_size": 500,
    "run.log_every": 50,
}
LINEAR_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"data.image_size": 224, "data.dtype": "bfloat16", "data.num_workers": 8,
                 "optim.global_batch_size": 4096, "run.eval_every": 10, "run.eval_batch_size": 500,
                 "run.out_dir": "runs/linear_eval"},
    "demo_1pct": {**_DEMO_LE, "subset.fraction": 0.01, "optim.global_batch_size": 64,
                  "run.out_dir": "runs/demo_le_1pct"},
    "demo_10pct": {**_DEMO_LE, "subset.fraction": 0.1, "optim.global_batch_size": 256,
                   "run.out_dir": "runs/demo_le_10pct"},
}


class LinearProbe(Classifier):
    """A Classifier whose feature extractor (backbone + neck) is frozen: no gradients, and BN stays in
    eval mode (running statistics) even when the loop calls ``model.train()``."""

    def __init__(self, backbone: nn.Module, neck: nn.Module, fc: nn.Module):
        super().__init__(backbone.requires_grad_(False), neck.requires_grad_(False), fc)
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        self.neck.eval()
        return self


class RawPixels(nn.Module):
    """[B, 3, H, W] -> [B, 3*H*W]: the logistic-regression reference has no network."""

    def forward(self, x):
        return x.float().flatten(1)


def make_sgd(o: C.OptimConfig):
    """TF's "momentum" optimizer is Nesterov SGD; its l2 term covers the layer's kernel and bias."""
    def make(model: nn.Module, lr: float):
        params = [p for p in model.parameters() if p.requires_grad]
        if o.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                   nesterov=True)
        return build_optimizer(params, o, lr)
    return make


def load_network(cfg: LinearEvalConfig, num_classes: int) -> tuple[Classifier, dict[str, Any], str]:
    """(a LinearProbe: frozen features and a fresh zero-initialized layer, arch, source)."""
    if cfg.raw_pixels:
        arch = {"raw_pixels": True, "num_classes": num_classes}
        dim = 3 * cfg.data.image_size ** 2
        probe = LinearProbe(RawPixels(), nn.Identity(), LinearHead(dim, num_classes, zero_init=True))
        return probe, arch, "raw pixels"
    if not cfg.ckpt:
        raise UserError("give --ckpt=PATH (a pretrain.py checkpoint or run dir), or --raw_pixels=true")
    file, state = _load(cfg.ckpt, "--ckpt")
    if "arch" in state:  # a fine-tuned / distilled network: evaluate its backbone
        if cfg.model.ft_proj_selector != 0:
            raise UserError("a fine-tuned checkpoint has no full projection head: model.ft_proj_selector=0")
        arch = {**state["arch"], "ft_proj_selector": 0}
        net = build_classifier(arch, num_classes, None, zero_init=True)
        prefix = "backbone."
        net.backbone.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items()
                                      if k.startswith(prefix)})
    else:
        if "model" not in state or "config" not in state:
            raise UserError(f"{file} is not a pretrain.py checkpoint")
        pre = C.from_dict(C.ModelConfig, state["config"]["model"], strict=False)
        arch = {**arch_of(pre), "ft_proj_selector": cfg.model.ft_proj_selector}
        net = build_classifier(arch, num_classes, state["model"], zero_init=True)
    arch["num_classes"] = num_classes
    return LinearProbe(net.backbone, net.neck, net.fc), arch, file


@torch.no_grad()
def extract(net: Classifier, loader, device: torch.device, dtype: torch.dtype):
    """(features [N, D] float32, labels [N]) of one pass of an eval loader, in ascending sample id
    (loader.last_indices): the order of the data set (or of the file list), whatever the backend."""
    net.eval()
    feats, labels, ids = [], [], []
    for batch in loader:
        with runtime.autocast(device, dtype):
            feats.append(net.features(batch.views[0]).float())
        labels.append(batch.labels)
        ids.append(torch.as_tensor(np.asarray(loader.last_indices), device=device))
    order = torch.argsort(torch.cat(ids))
    return torch.cat(feats)[order], torch.cat(labels)[order]


def train_on_features(fc: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, o: C.OptimConfig, seed: int,
                      max_steps: int | None = None, on_epoch=None, on_log=None, log_every: int = 50) -> int:
    """The linear layer on cached features, step for step what the slow path does with the same data:
    each epoch visits ``shard_indices(N, 0, 1, epoch, seed, shuffle=True)`` (the torch loader's order)
    in batches of optim.global_batch_size, the last partial batch dropped; warmup + cosine lr.
    ``on_epoch(epoch, step)`` after every epoch, ``on_log(step, epoch, loss, acc, lr)``. Returns the steps."""
    n, B = len(feats), o.global_batch_size
    steps_per_epoch = n // B
    if steps_per_epoch == 0:
        raise UserError(f"{n} labelled images are fewer than one batch of {B}: lower optim.global_batch_size")
    total = o.epochs * steps_per_epoch
    total = min(total, max_steps) if max_steps is not None else total
    warmup = round(o.warmup_epochs * steps_per_epoch)
    peak = o.lr if o.lr is not None else scaled_lr(o.base_lr, B, o.lr_scaling)
    opt = make_sgd(o)(fc, peak)
    loss_sum = torch.zeros((), device=feats.device)
    acc_sum = torch.zeros((), device=feats.device)
    step = 0
    while step < total:
        epoch = step // steps_per_epoch
        order = shard_indices(n, 0, 1, epoch, seed, True)[: steps_per_epoch * B]
        order = torch.as_tensor(order, device=feats.device)
        for j in range(steps_per_epoch):
            if step >= total:
                break
            lr = lr_at(step, peak, warmup, total)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = order[j * B:(j + 1) * B]
            logits = fc(feats[idx])
            loss = F.cross_entropy(logits, labels[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            acc_sum += (logits.argmax(1) == labels[idx]).float().mean()
            step += 1
            if on_log is not None and (step % log_every == 0 or step == total):
                k = log_every if step % log_every == 0 else (step % log_every)
                # .item() is a host sync: on log steps only
                on_log(step, epoch, (loss_sum / k).item(), (acc_sum / k).item(), lr)
                loss_sum.zero_(); acc_sum.zero_()
        if on_epoch is not None and (step % steps_per_epoch == 0 or step == total):
            on_epoch(math.ceil(step / steps_per_epoch), step)
    return step


def topk(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    k = min(5, logits.shape[1])
    hit = logits.topk(k, dim=1).indices == y[:, None]
    return {"top1": round(100.0 * hit[:, 0].float().mean().item(), 3),
            "top5": round(100.0 * hit.any(1).float().mean().item(), 3),
            "val_loss": round(F.cross_entropy(logits, y).item(), 5), "val_images": len(y)}


# ----------------------------------------------------------------------------- entry point
def main(argv=None) -> int:
    return runtime.run_entry(PROG, LinearEvalConfig, LINEAR_PRESETS, __doc__, run, argv)


def run(cfg: LinearEvalConfig) -> int:
    rank, world = dist.init()
    if cfg.fast and world > 1:
        raise UserError("the fast path runs in one process: drop torchrun, or use --fast=false")
    if (cfg.raw_pixels or cfg.standardize) and not cfg.fast:
        raise UserError("raw_pixels and standardize need the fast path (--fast=true)")
    rank, world, device, dtype, per_rank, train_path, val_path, _, out_dir, ckpts = runtime.start_run(cfg)

    classes = dataset_classes(train_path)
    net, arch, source = load_network(cfg, len(classes))
    file_list, n_labeled = label_subset(cfg.data, cfg.subset, train_path, out_dir)
    where = "" if cfg.raw_pixels else f" (projection-head layer {arch['ft_proj_selector']}; 0 = backbone)"
    dist.print0(f"{PROG}: features of {source}{where}, "
                f"{'all' if n_labeled is None else n_labeled} labelled images, {len(classes)} classes, "
                + ("fast path: features extracted once (centre crop)" if cfg.fast
                   else "slow path: network every step"))

    if not cfg.fast:  # ------------------------------------------------ slow: finetune's loop, head only
        loader, vloader = labelled_loaders(cfg, train_path, val_path, file_list, n_labeled, per_rank, rank, world,
                                           device, dtype)

        def loss_fn(fwd, batch):
            logits = fwd(batch.views[0]).float()
            return F.cross_entropy(logits, batch.labels), (logits.argmax(1) == batch.labels).float().mean()

        return fit(PROG, cfg, net, arch, classes, loss_fn, loader, vloader, bool(val_path), device, dtype,
                   per_rank, world, ckpts, extra_log={"path": "slow", "init": source, "labeled_images": n_labeled},
                   make_optimizer=make_sgd(cfg.optim))

    # ---------------------------------------------------------------- fast: cached features
    t0 = time.perf_counter()
    net = net.to(device)
    if cfg.model.channels_last and not cfg.raw_pixels:
        net = net.to(memory_format=torch.channels_last)
    train_loader = eval_loader(train_path, cfg.data, cfg.run.eval_batch_size, device, file_list=file_list,
                               backend=cfg.data.backend if cfg.data.backend != "dali" else "torch")
    feats, labels = extract(net, train_loader, device, dtype)
    if n_labeled is not None and len(feats) != n_labeled:
        raise UserError(f"data.backend={cfg.data.backend} did not apply the label subset "
                        f"({len(feats)} images, "
                        f"expected {n_labeled}): use data.backend=torch")
    val = None
    if val_path:
        vl = eval_loader(val_path, cfg.data, cfg.run.eval_batch_size, device)
        if vl.classes != classes:
            raise UserError(f"val classes of {val_path} differ from the train classes of {train_path}")
        val = extract(net, vl, device, dtype)
    mu = sd = None
    if cfg.standardize:
        mu, sd = feats.mean(0), feats.std(0).clamp(min=1e-6)
        feats = (feats - mu) / sd
        if val is not None:
            val = ((val[0] - mu) / sd, val[1])
    log = runtime.JsonlLog(os.path.join(out_dir, "log.jsonl"))
    secs = round(time.perf_counter() - t0, 2)
    log.write(event="features", path="fast",
              note="features extracted once with the eval recipe (centre crop); the linear layer trains on "
                   "the cached features", train_images=len(feats),
              val_images=0 if val is None else len(val[0]), dim=feats.shape[1], seconds=secs)
    print(f"{PROG}: fast path: {len(feats)} train + {0 if val is None else len(val[0])} val features "
          f"({feats.shape[1]}-d) extracted once in {secs} s; training the linear layer on them", flush=True)

    fc = net.fc.to(device).float()
    best: dict[str, Any] = {"top1": -1.0}
    last: dict[str, Any] = {}

    def state(step: int) -> dict[str, Any]:
        layer = {k: v.detach().clone() for k, v in fc.state_dict().items()}
        if mu is not None:  # fold the standardization into the layer: W' = W / sd, b' = b - W' mu
            w = layer["weight"] / sd
            layer = {"weight": w, "bias": layer["bias"] - w @ mu}
        model_state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
        model_state.update({f"fc.{k}": v for k, v in layer.items()})
        return {"model": model_state, "arch": arch, "classes": classes, "step": step,
                "config": C.to_dict(cfg)}

    def on_epoch(epoch: int, step: int):
        nonlocal last
        end = step == total_steps
        if val is None or not (end or (cfg.run.eval_every > 0 and epoch % cfg.run.eval_every == 0)):
            return
        with torch.no_grad():
            last = topk(fc(val[0]), val[1])
        log.write(event="eval", step=step, epochs_done=epoch, **last)
        if last["top1"] > best["top1"]:
            best.update(last, step=step, epoch=epoch)
            ckpt.save(os.path.join(out_dir, "best.pt"), {**state(step), "val": last})

    def on_log(step, epoch, loss, acc, lr):
        log.write(step=step, epoch=epoch, loss=round(loss, 5), train_acc=round(acc, 4), lr=lr)

    B = cfg.optim.global_batch_size
    total_steps = cfg.optim.epochs * (len(feats) // B) if len(feats) >= B else 0
    if cfg.run.max_steps is not None:
        total_steps = min(total_steps, cfg.run.max_steps)
    step = train_on_features(fc, feats, labels, cfg.optim, cfg.run.seed, cfg.run.max_steps, on_epoch, on_log,
                             cfg.run.log_every)
    if val is None:
        ckpt.save(os.path.join(out_dir, "best.pt"), state(step))
    ckpt.save(os.path.join(out_dir, "last.pt"), state(step))
    summary = {"event": "done", "path": "fast", "step": step,
               "final_top1": last.get("top1"), "final_top5": last.get("top5"),
               "best_top1": best["top1"] if best["top1"] >= 0 else None, "best_top5": best.get("top5"),
               "best_step": best.get("step"), "init": source, "labeled_images": len(feats),
               "best": os.path.join(out_dir, "best.pt")}
    log.write(**summary)
    log.close()
    msg = f"{PROG}: done: {step} steps on cached features"
    if last:
        msg += f"; val top-1 {last['top1']:.2f}% (top-5 {last['top5']:.2f}%), best {best['top1']:.2f}%"
    print(msg + f"; logs in {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
