"""Named presets of every entry point: ``python fastclr/pretrain.py imagenet_r50_1x ...``.

A preset only assigns config fields (dotted keys, see fastclr.config); it goes through the same
checked setter as the command line, and later ``--section.key=value`` options win. The ImageNet
presets are the SimCLRv2 recipes (paper appendix and google-research/simclr); the ``demo_*`` presets
are the Fashion-MNIST chain on 2 CPU cores, whose departures from the ImageNet recipe are named in
the README (docs/semisup.md has the measurements behind them).
"""
from __future__ import annotations

from typing import Any, Dict

Preset = Dict[str, Any]

# ----------------------------------------------------------------------------- pretraining
_IMAGENET = {
    "data.image_size": 224, "data.augment": "simclr", "data.num_workers": 8,
    "optim.global_batch_size": 4096, "optim.base_lr": 0.075, "optim.lr_scaling": "sqrt",
    "optim.weight_decay": 1e-4, "optim.momentum": 0.9, "optim.warmup_epochs": 10, "optim.epochs": 800,
    "loss.temperature": 0.1, "model.num_proj_layers": 3, "model.sync_bn": True,
    "run.out_dir": "runs/imagenet", "run.ckpt_every": 2500,
}
# What the two Fashion-MNIST CPU recipes below share.
_DEMO_CPU = {
    "data.path": "", "data.image_size": 32, "data.augment": "simclr", "data.blur": False, "data.num_workers": 2,
    # Crops of at least 20 % of the area, not TF's 8 %: on 28-px garments padded to 32 px an 8 % crop is
    # a 9x9 patch with little of the object. Chosen on a validation split carved from the train images
    # (docs/semisup.md, "What was tried for the demo").
    "data.crop_scale": (0.2, 1.0),
    "optim.global_batch_size": 256, "optim.lr_scaling": "linear", "optim.weight_decay": 1e-6,
    "optim.warmup_epochs": 0.1, "run.device": "cpu", "run.log_every": 10, "run.ckpt_every": 200,
}
PRETRAIN: Dict[str, Preset] = {
    "imagenet_r50_1x": {**_IMAGENET, "model.name": "r50_1x_sk0"},
    "imagenet_r50_1x_sk1": {**_IMAGENET, "model.name": "r50_1x_sk1"},
    "imagenet_r101_2x_sk1": {**_IMAGENET, "model.name": "r101_2x_sk1"},
    "imagenet_r152_3x_sk1": {**_IMAGENET, "model.name": "r152_3x_sk1"},
    # The embedded default: Fashion-MNIST at 32px, sized for `make demo`'s 5-minute budget on 2 CPU cores.
    # Chosen on a validation split carved from the train images (docs/semisup.md, "What was tried for the
    # demo"): k-NN quality stopped rising after a few dozen steps of the ResNet-18 below, so the demo now
    # spends its compute on resolution and epochs instead of width and depth: a ResNet-10 (one block per
    # group) of half width (32 base channels) whose 3x3 stem keeps 16x16 maps (stride 2, no max-pool), in
    # bf16 where the CPU has it; about 2.5 epochs where the ResNet-18 managed 0.77.
    "demo_cpu": {
        **_DEMO_CPU,
        "model.depth": 10, "model.width": 1, "model.base_channels": 32, "model.cifar_stem": True,
        "model.stem_stride": 2,
        # TF's ImageNet values, not its CIFAR ones (T 0.5, jitter 0.5): on the validation split both
        # lost k-NN points at this scale; lr 1.0 is TF's CIFAR-10 value.
        "loss.temperature": 0.1, "data.jitter_strength": 1.0, "optim.base_lr": 1.0,
        # 599 steps of 256 (2.56 epochs of 234 steps): the cosine ends there.
        "optim.epochs": 2.56, "run.out_dir": "runs/demo",
        # The online k-NN every quarter epoch, on a small bank: the val panel shows the curve as it trains,
        # for a few percent of its time.
        "run.knn_every": 0.25, "run.knn_online_train_size": 1000, "run.knn_online_val_size": 500,
    },
    # The pretraining of `make semisup` (experiments/semisup.sh sets the epochs): the demo's ResNet-18
    # recipe before the small network above. The chain's fine-tuning and distillation recipes were chosen
    # on it and its distillation student is an R18 (docs/semisup.md).
    "semisup_cpu": {
        **_DEMO_CPU,
        # The ImageNet stem, not the CIFAR one: at 32px it downsamples 4x at once, a fraction of the CIFAR
        # stem's compute, which is what lets the chain pretrain for epochs on 2 cores.
        "model.depth": 18, "model.width": 1, "model.cifar_stem": False,
        "data.jitter_strength": 0.5, "loss.temperature": 0.2, "optim.base_lr": 0.3,
        "optim.epochs": 4, "run.out_dir": "runs/semisup/pretrain", "run.knn_every": 0.1,
        "run.knn_online_train_size": 1000, "run.knn_online_val_size": 500,
    },
}

# ----------------------------------------------------------------------------- fine-tuning
_IMAGENET_FT = {
    "data.image_size": 224, "data.augment": "finetune", "data.num_workers": 8,
    "optim.optimizer": "lars", "optim.global_batch_size": 1024, "optim.base_lr": 0.005,
    "optim.lr_scaling": "sqrt", "optim.weight_decay": 0.0, "optim.warmup_epochs": 0,
    "model.ft_proj_selector": 1,
    "run.eval_batch_size": 500, "run.ckpt_every": 2000,
}
# The demo: Fashion-MNIST at 32px on CPU. 1 % = 600 labelled images, 10 % = 6000. B=1024 is more than
# the 1 % set, so a small batch; the architecture of --ckpt=none is semisup_cpu's (R18, ImageNet stem).
# 10 %: 10 epochs instead of 30 keeps the chain near one hour.
# The few-label recipe deviates from the paper's in five ways, chosen on validation splits of two data
# sets, Fashion-MNIST and scikit-learn's digits (docs/semisup.md, "Few-label fine-tuning on two data
# sets"): with the paper's recipe fine-tuning ended under the linear probe on digits. (1) LP-FT: the
# classifier starts as a fitted linear probe, not zeros, so the first updates are informed rather than
# noise into the backbone; (2) BN in eval mode: batches of a handful of images give noisy statistics, and
# the probe was fitted with the pretrained ones; (3) at least 400 steps, however few the labels (10 %
# of a small set makes 10 steps in 10 epochs); (4) lr 0.015 * sqrt(B), 3x the paper's: with frozen BN
# 10x diverges, the paper's barely moves the backbone at B 64; (5) crops of 60-100 % of the area: a
# 32-px image cropped to 8 % is a patch of a few pixels. Digits also need --data.flip=false (a mirrored
# digit is another symbol); that is the data set's property, not the recipe's.
_DEMO_FT = {
    "data.path": "", "data.image_size": 32, "data.augment": "finetune", "data.num_workers": 2,
    "data.crop_scale": (0.6, 1.0), "model.depth": 18, "model.width": 1,
    "model.cifar_stem": False, "probe_steps": 500, "frozen_bn": True, "min_steps": 400,
    "optim.optimizer": "lars", "optim.base_lr": 0.015, "optim.lr_scaling": "sqrt", "optim.weight_decay": 0.0,
    "optim.warmup_epochs": 0, "run.device": "cpu", "run.log_every": 10,
    "run.eval_batch_size": 500,
}
FINETUNE: Dict[str, Preset] = {
    "imagenet_1pct": {**_IMAGENET_FT, "subset.list": "imagenet_subsets/1percent.txt", "optim.epochs": 60,
                      "run.out_dir": "runs/finetune_1pct"},
    "imagenet_10pct": {**_IMAGENET_FT, "subset.list": "imagenet_subsets/10percent.txt", "optim.epochs": 30,
                       "run.out_dir": "runs/finetune_10pct"},
    "demo_1pct": {**_DEMO_FT, "subset.fraction": 0.01, "optim.global_batch_size": 64, "optim.epochs": 60,
                  "run.eval_every": 10, "run.out_dir": "runs/demo_ft_1pct"},
    "demo_10pct": {**_DEMO_FT, "subset.fraction": 0.1, "optim.global_batch_size": 128, "optim.epochs": 10,
                   "run.eval_every": 2, "run.out_dir": "runs/demo_ft_10pct"},
}

# ----------------------------------------------------------------------------- distillation
_IMAGENET_D = {
    "data.image_size": 224, "data.augment": "finetune", "data.num_workers": 8,
    "optim.global_batch_size": 4096, "optim.base_lr": 0.075, "optim.lr_scaling": "sqrt",
    "optim.weight_decay": 1e-4, "optim.warmup_epochs": 10, "optim.epochs": 400,
    "run.eval_batch_size": 500, "run.eval_every": 10, "run.ckpt_every": 2500,
}
# Demo: Fashion-MNIST 32px on CPU; two passes over the 60k unlabeled train images (with one pass the
# fresh R18 student stayed under its 1 %-label teacher: docs/semisup.md). Crops of 35-100 % of the area,
# as the demo fine-tuning: the teacher's soft labels on a 9x9 patch of a garment teach little (chosen on
# the validation split, docs/semisup.md "Distillation crops").
_DEMO_D = {
    "data.path": "", "data.image_size": 32, "data.augment": "finetune", "data.num_workers": 2,
    "data.crop_scale": (0.35, 1.0), "model.depth": 18, "model.width": 1, "model.cifar_stem": False,
    "optim.global_batch_size": 256, "optim.base_lr": 0.3, "optim.lr_scaling": "linear",
    "optim.weight_decay": 1e-6, "optim.warmup_epochs": 0.1, "optim.epochs": 2,
    "run.device": "cpu", "run.log_every": 10, "run.eval_batch_size": 500,
}
DISTILL: Dict[str, Preset] = {
    "imagenet_distill": {**_IMAGENET_D, "model.name": "r50_1x_sk0", "distill.temperature": 1.0,
                         "run.out_dir": "runs/distill"},
    "imagenet_self_distill": {**_IMAGENET_D, "distill.student": "teacher", "distill.temperature": 0.1,
                              "run.out_dir": "runs/self_distill"},
    "demo_distill": {**_DEMO_D, "distill.temperature": 1.0, "run.out_dir": "runs/demo_distill"},
    "demo_self_distill": {**_DEMO_D, "distill.student": "teacher", "distill.temperature": 0.1,
                          "run.out_dir": "runs/demo_self_distill"},
}

# ----------------------------------------------------------------------------- linear evaluation
# The demo's label budgets are small (600 / 6000 images): a smaller batch, the same lr rule, more steps.
_DEMO_LE = {
    "data.path": "", "data.image_size": 32, "data.num_workers": 2,
    "optim.base_lr": 0.1, "optim.lr_scaling": "linear", "optim.weight_decay": 1e-6, "optim.epochs": 90,
    "run.device": "cpu", "run.eval_every": 10, "run.eval_batch_size": 500,
    "run.log_every": 50,
}
LINEAR: Dict[str, Preset] = {
    "imagenet": {"data.image_size": 224, "data.num_workers": 8,
                 "optim.global_batch_size": 4096, "run.eval_every": 10, "run.eval_batch_size": 500,
                 "run.out_dir": "runs/linear_eval"},
    "demo_1pct": {**_DEMO_LE, "subset.fraction": 0.01, "optim.global_batch_size": 64,
                  "run.out_dir": "runs/demo_le_1pct"},
    "demo_10pct": {**_DEMO_LE, "subset.fraction": 0.1, "optim.global_batch_size": 256,
                   "run.out_dir": "runs/demo_le_10pct"},
}
