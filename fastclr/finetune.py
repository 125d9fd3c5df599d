"""SimCLRv2 step 2: fine-tune a pretrained network on a few labels. Read top to bottom: the model, the
labelled data, the loss; the loop is fastclr.trainer's (via classifier.train_classifier).

    torchrun --nproc_per_node=8 fastclr/finetune.py imagenet_1pct --ckpt=runs/imagenet/ckpt_00031250.pt \\
        --data.path=/data/imagenet/train --run.val_path=/data/imagenet/val
    python fastclr/finetune.py demo_1pct --ckpt=runs/demo                  # the Fashion-MNIST demo, CPU
    python fastclr/finetune.py demo_1pct --ckpt=none                        # supervised from scratch

The network is the pretrained backbone plus the projection head up to layer ``model.ft_proj_selector``
(SimCLRv2: 1, "fine-tune from the middle of the head"), then a new linear classifier (zero-initialized,
TF's ``zero_init_logits_layer``); everything is trained, BN in train mode, as TF does. The architecture
comes from the checkpoint's config; ``--ckpt=none`` trains the ``model.*`` architecture from scratch
(the supervised baseline). Defaults follow the SimCLRv2 recipe (paper, appendix): LARS, lr
0.005*sqrt(B), B = 1024, no weight decay, no warmup, cosine decay, random crop + flip only; 60 epochs
on 1 % of the labels, 30 on 10 %.

Labels: all of data.path, or a subset: ``data.file_list`` ('relpath label' lines), ``--subset.list``
(official list of file names, e.g. 1percent.txt) or ``--subset.fraction=0.01 --subset.seed=0``
(seeded class-balanced draw). The subset actually used is written to run.out_dir/labels_subset.txt.

The run directory gets config.json, log.jsonl (train logs every log_every steps, an ``eval`` record
with top-1/top-5 on run.val_path every eval_every epochs, a ``done`` record), rolling ckpt_*.pt files
(``--run.resume=auto`` continues exactly) and best.pt (the weights with the best val top-1).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

if __package__ in (None, ""):  # `python fastclr/finetune.py` / torchrun put fastclr/ first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastclr import dist, presets, runtime
from fastclr.classifier import (arch_of, build_classifier, cross_entropy, fit_probe_head, load_pretrained,
                                train_classifier)
from fastclr.config import FinetuneConfig
from fastclr.labels import dataset_classes, eval_loader, label_subset, train_loader, val_loader
from fastclr.optimizers import classifier_optimizer
from fastclr.runtime import UserError

PROG = "finetune.py"


def main(argv=None) -> int:
    return runtime.run_entry(PROG, FinetuneConfig, presets.FINETUNE, __doc__, train, argv)


def train(cfg: FinetuneConfig) -> int:
    # ------------------------------------------------------------------ setup
    if not cfg.ckpt:
        raise UserError("give --ckpt=PATH (a pretrain.py checkpoint or run dir) or --ckpt=none (scratch)")
    run = runtime.start_run(cfg)

    # ------------------------------------------------------------------ model
    classes = dataset_classes(run.train_path)
    if cfg.ckpt.lower() == "none":
        arch = arch_of(cfg.model, cfg.model.ft_proj_selector)
        pretrained, source = None, "random init (supervised from scratch)"
    else:
        file, pretrained, pre_model = load_pretrained(cfg.ckpt)
        # The architecture is the checkpoint's; only where to cut the head is ours.
        arch = arch_of(pre_model, cfg.model.ft_proj_selector)
        source = file
    arch["num_classes"] = len(classes)
    model = build_classifier(arch, len(classes), pretrained, zero_init=cfg.zero_init_head)
    if pretrained is not None and cfg.frozen_bn:  # a scratch run (a preset's default) keeps batch statistics
        model.freeze_bn()
    dist.print0(f"{PROG}: r{arch['depth']}_{arch['width']}x (sk {arch['sk_ratio']}) from {source}; "
                f"head cut at layer {arch['ft_proj_selector']} -> {model.fc.in_features}-d features -> "
                f"{len(classes)} classes")

    # ------------------------------------------------------------------ data
    file_list, n_labeled = label_subset(cfg.data, cfg.subset, run.train_path, run.out_dir)
    loader = train_loader(cfg, run, file_list, n_labeled)
    vloader = val_loader(cfg, run, classes)
    dist.print0(f"{PROG}: {'all' if n_labeled is None else n_labeled} labelled images"
                f"{f' ({file_list})' if file_list else ''}; val: {run.val_path or 'none'}")
    extra = {"labeled_images": n_labeled, "init": source}
    typed = cfg
    cfg = stretch_schedule(cfg, len(loader) // cfg.optim.grad_accum, extra)
    if cfg.probe_steps and run.resumed is not None:
        dist.print0(f"{PROG}: LP-FT: resuming, the classifier comes from {run.resumed[0]}")
    elif cfg.probe_steps:
        # LP-FT: the classifier starts as a linear probe of the (pretrained) features. Every rank fits
        # the same layer from the same features (deterministic). A resumed run takes its classifier from
        # the checkpoint and does not fit one: the fit's side effects would make the resume inexact.
        t0 = time.perf_counter()
        model = model.to(run.device)
        probe_data = eval_loader(run.train_path, cfg.data, cfg.run.eval_batch_size, run.device, file_list=file_list)
        fit = fit_probe_head(model, probe_data, run.device, run.dtype, cfg.probe_steps)
        extra.update(fit, probe_seconds=round(time.perf_counter() - t0, 2))
        dist.print0(f"{PROG}: LP-FT: classifier fitted as a linear probe on {fit['probe_images']} frozen "
                    f"features (L-BFGS, at most {cfg.probe_steps} iterations): train accuracy "
                    f"{fit['probe_train_acc']:.1f}%, loss {fit['probe_loss']:.3f}")

    # ------------------------------------------------------------------ the loop (BN: TF's train mode or frozen_bn)
    return train_classifier(PROG, cfg, run, model, arch, classes, cross_entropy, loader, vloader,
                            classifier_optimizer(cfg.optim), extra_log=extra, typed_cfg=typed)


def stretch_schedule(cfg: FinetuneConfig, steps_per_epoch: int, extra: dict) -> FinetuneConfig:
    """min_steps: an epoch schedule sized for a large labelled set leaves a small one with a handful of
    steps (10 epochs of 100 images in batches of 100 are 10 steps). Returns cfg with the epochs
    stretched so that the run makes min_steps, and the warmup and evaluation period with them (the
    schedule keeps its shape); cfg itself when the epochs already make them."""
    o = cfg.optim
    if not cfg.min_steps or steps_per_epoch <= 0 or round(o.epochs * steps_per_epoch) >= cfg.min_steps:
        return cfg
    factor = cfg.min_steps / (o.epochs * steps_per_epoch)
    optim = dataclasses.replace(o, epochs=cfg.min_steps / steps_per_epoch, warmup_epochs=o.warmup_epochs * factor)
    eval_every = max(1, round(cfg.run.eval_every * factor)) if cfg.run.eval_every else 0
    extra.update(schedule_stretched={"min_steps": cfg.min_steps, "steps_per_epoch": steps_per_epoch,
                                     "epochs": [o.epochs, optim.epochs],
                                     "eval_every": [cfg.run.eval_every, eval_every]})
    dist.print0(f"{PROG}: {steps_per_epoch} steps/epoch would make {round(o.epochs * steps_per_epoch)} steps; "
                f"min_steps={cfg.min_steps}: optim.epochs {o.epochs:g} -> {optim.epochs:g}"
                + (f", warmup_epochs {o.warmup_epochs:g} -> {optim.warmup_epochs:g}" if o.warmup_epochs else "")
                + (f", run.eval_every {cfg.run.eval_every} -> {eval_every}" if cfg.run.eval_every else ""))
    return dataclasses.replace(cfg, optim=optim, run=dataclasses.replace(cfg.run, eval_every=eval_every))


if __name__ == "__main__":
    raise SystemExit(main())
