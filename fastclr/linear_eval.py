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
from typing import Any

if __package__ in (None, ""):  # `python fastclr/linear_eval.py` puts fastclr/ first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from torch import nn

from fastclr import checkpoint as ckpt
from fastclr import config as C
from fastclr import dist, presets, runtime
from fastclr.classifier import cross_entropy, load_probe, train_classifier
from fastclr.config import LinearEvalConfig
from fastclr.labels import dataset_classes, eval_loader, label_subset, train_loader, val_loader
from fastclr.metrics import extract, topk
from fastclr.optimizers import linear_sgd
from fastclr.runtime import UserError
from fastclr.schedule import lr_at, scaled_lr
from loaders.sampling import shard_indices

PROG = "linear_eval.py"


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
    opt = linear_sgd(o)(fc, peak)
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
            runtime.set_lr(opt, lr)
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
        raise UserError(f"data.backend={cfg.data.backend} did not apply the label subset "
                        f"({len(feats)} images, "
                        f"expected {n_labeled}): use data.backend=torch")
    val = None
    if val_path:
        vl = eval_loader(val_path, cfg.data, cfg.run.eval_batch_size, device)
        if vl.classes != classes:
            raise UserError(f"val classes of {val_path} differ from the train classes of {train_path}")
        val = extract(net.features, vl, device, dtype)
    mu = sd = None
    if cfg.standardize:
        mu, sd = feats.mean(0), feats.std(0).clamp(min=1e-6)
        feats = (feats - mu) / sd
        if val is not None:
            val = ((val[0] - mu) / sd, val[1])
    log = runtime.RunLog(out_dir, tensorboard=cfg.run.tensorboard)
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
