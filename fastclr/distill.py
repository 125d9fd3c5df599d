"""SimCLRv2 step 3: distill a fine-tuned teacher into a student on the unlabeled images.

    torchrun --nproc_per_node=8 fastclr/distill.py imagenet_distill --teacher=runs/finetune_1pct \\
        --data.path=/data/imagenet/train --run.val_path=/data/imagenet/val          # R152 3x -> R50 1x
    torchrun --nproc_per_node=8 fastclr/distill.py imagenet_self_distill --teacher=runs/finetune_1pct ...
    python fastclr/distill.py demo_self_distill --teacher=runs/demo_ft_1pct --student_ckpt=runs/demo

Loss (SimCLRv2 Eq. 3/4, tau^2-scaled as the official colab's add_kd_loss, see fastclr.losses.distill_loss):
``(1 - alpha) * tau^2 * CE(softmax(teacher / tau), softmax(student / tau)) + alpha * CE(student, label)``.
The teacher (a finetune.py / distill.py checkpoint) runs in eval mode without gradients, in bf16 on GPU
(fp32 on CPU); teacher and student see the same augmented view of each image (one view, the
``finetune`` recipe: crop + flip). Every train image is used and its label ignored, except with
``distill.alpha > 0``: then the images of the labelled subset (``subset.list`` / ``subset.fraction``,
the one the teacher was fine-tuned on) add the cross-entropy term.

The student is the ``model.*`` architecture from scratch, the teacher's architecture
(``distill.student=teacher``: self-distillation), or the architecture of its own pretrain checkpoint
(``--student_ckpt``), whose weights it then starts from. Temperature: 1.0 for big-to-small
distillation, 0.1 for self-distillation (the presets).

``--distill.cache_teacher=true`` (needs ``data.augment=eval``: without augmentation the teacher's
logits never change) runs the teacher once over the data set in order and reads its logits by sample
id (``loader.last_indices``) afterwards: one teacher pass in all instead of one per epoch. The cache
holds N x classes values on the training device.

Output: like finetune.py (config.json, log.jsonl, ckpt_*.pt, best.pt with ``arch``), so a student can
be evaluated, fine-tuned further or be the next teacher.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # `python fastclr/distill.py` / torchrun put fastclr/ first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from torch import nn

from fastclr import config as C
from fastclr import dist, runtime
from fastclr.config import option
from fastclr.finetune import (
    SubsetConfig,
    TrainRunConfig,
    arch_of,
    build_classifier,
    build_loader,
    check_subset_honoured,
    classifier_optimizer,
    dataset_classes,
    eval_loader,
    fit,
    list_length,
    load_classifier,
    load_pretrained,
    resolve_subset_list,
)
from fastclr.losses import distill_loss
from fastclr.runtime import UserError
from loaders import subsets
from loaders.common import LoaderConfig

PROG = "distill.py"


@dataclass
class DistillSection:
    temperature: float = option(1.0, "temperature tau (paper: 1.0 big-to-small, 0.1 self-distillation)", gt=0)
    alpha: float = option(0.0, "weight of the cross-entropy on the labelled subset (0 = labels unused)",
                          ge=0, le=1)
    student: str = option("model", "student architecture: model.* section, or the teacher's (self-distillation)",
                      ("model", "teacher"))
    cache_teacher: bool = option(False, "compute the teacher's logits once (needs data.augment=eval)")
    teacher_precision: str = option("auto", "teacher forward precision: auto = bf16 on GPU, fp32 on CPU",
                                ("auto", "fp32", "bf16", "fp16"))


@dataclass
class DistillConfig:
    teacher: str = option("", "fine-tuned teacher: finetune/distill run dir (its best.pt) or checkpoint file")
    student_ckpt: str = option("", "optional pretrain.py checkpoint (or run dir) the student starts from")
    zero_init_head: bool = option(False, "zero-initialize the student's classifier")
    distill: DistillSection = field(default_factory=DistillSection)
    data: LoaderConfig = field(default_factory=lambda: LoaderConfig(augment="finetune"))
    model: C.ModelConfig = field(default_factory=C.ModelConfig)
    # SimCLRv2 distills with the pretraining schedule (LARS, sqrt-scaled lr, wd, batch 4096), 400 epochs.
    optim: C.OptimConfig = field(default_factory=lambda: C.OptimConfig(
        base_lr=0.075, lr_scaling="sqrt", weight_decay=1e-4, warmup_epochs=10, epochs=400,
        global_batch_size=4096))
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    run: TrainRunConfig = field(default_factory=lambda: TrainRunConfig(out_dir="runs/distill"))


_IMAGENET_D = {
    "data.image_size": 224, "data.augment": "finetune", "data.dtype": "bfloat16", "data.num_workers": 8,
    "optim.global_batch_size": 4096, "optim.base_lr": 0.075, "optim.lr_scaling": "sqrt",
    "optim.weight_decay": 1e-4, "optim.warmup_epochs": 10, "optim.epochs": 400,
    "run.eval_batch_size": 500, "run.eval_every": 10, "run.ckpt_every": 2500,
}
# Demo: Fashion-MNIST 32px on CPU; two passes over the 60k unlabeled train images (one pass left the
# fresh R18 student 1.2 points under its 1 %-label teacher: 76.0 vs 77.2, make semisup 2026-11-28).
_DEMO_D = {
    "data.path": "", "data.image_size": 32, "data.augment": "finetune", "data.num_workers": 2,
    "data.dtype": "float32", "model.depth": 18, "model.width": 1, "model.cifar_stem": False,
    "optim.global_batch_size": 256, "optim.base_lr": 0.3, "optim.lr_scaling": "linear",
    "optim.weight_decay": 1e-6, "optim.warmup_epochs": 0.1, "optim.epochs": 2,
    "run.device": "cpu", "run.precision": "fp32", "run.log_every": 10, "run.eval_batch_size": 500,
}
DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet_distill": {**_IMAGENET_D, "model.name": "r50_1x_sk0", "distill.temperature": 1.0,
                         "run.out_dir": "runs/distill"},
    "imagenet_self_distill": {**_IMAGENET_D, "distill.student": "teacher", "distill.temperature": 0.1,
                              "run.out_dir": "runs/self_distill"},
    "demo_distill": {**_DEMO_D, "distill.temperature": 1.0, "run.out_dir": "runs/demo_distill"},
    "demo_self_distill": {**_DEMO_D, "distill.student": "teacher", "distill.temperature": 0.1,
                          "run.out_dir": "runs/demo_self_distill"},
}


# ----------------------------------------------------------------------------- the step
def teacher_logits(teacher: nn.Module, x: torch.Tensor, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """[B, C] float32 logits of the frozen teacher (eval mode, no graph)."""
    with torch.no_grad(), runtime.autocast(device, dtype):
        return teacher(x).float()


def distill_step(student: nn.Module, teacher: nn.Module | None, x: torch.Tensor, temperature: float,
                 labels: torch.Tensor | None = None, alpha: float = 0.0, cached: torch.Tensor | None = None,
                 teacher_dtype: torch.dtype = torch.float32):
    """(loss, agreement): the distillation loss of the student on the view ``x`` [B, 3, H, W] against
    the teacher's logits on the same view (or ``cached`` [B, C] ones), and the fraction of rows where
    student and teacher agree on the top class. ``labels`` [B]: class ids, -1 = unlabeled."""
    t = cached.float() if cached is not None else teacher_logits(teacher, x, x.device, teacher_dtype)
    s = student(x).float()
    loss = distill_loss(s, t, temperature, labels=labels, alpha=alpha)
    return loss, (s.argmax(1) == t.argmax(1)).float().mean()


def batch_ids(loader) -> np.ndarray:
    """Sample ids of the images in the loader's last batch. The torch backend replaces an unreadable
    image by the next readable one (``last_used_indices``); DALI and FFCV never hold a bad file
    (validated list, converter), so there the batch's ids are ``last_indices``."""
    used = getattr(loader, "last_used_indices", None)
    return np.asarray(loader.last_indices if used is None else used)


@torch.no_grad()
def cache_logits(teacher: nn.Module, loader, n: int, num_classes: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """[n, C] teacher logits of every sample, indexed by sample id (one in-order pass of ``loader``).
    The rows of unreadable images stay NaN: training never meets those ids (see ``batch_ids``)."""
    out = torch.full((n, num_classes), float("nan"), device=device)
    for batch in loader:
        idx = torch.as_tensor(batch_ids(loader), device=device)
        out[idx] = teacher_logits(teacher, batch.views[0], device, dtype)
    missing = int(torch.isnan(out[:, 0]).sum())
    skipped = int(getattr(loader, "num_skipped", 0) or 0)
    if missing > skipped:
        raise UserError(f"the teacher cache pass missed {missing - skipped} of {n} samples "
                        "(no loader.last_indices?)")
    return out


def known_labels(loader, train_path: str, entries, indices, device) -> torch.Tensor:
    """[N] int64 over the loader's sample ids: the label of each image of the labelled subset, -1 else."""
    if indices is not None:  # .beton: the subset came as sample indices
        n = len(subsets.read_manifest(train_path)[0])
        out = torch.full((n,), -1, dtype=torch.long)
        out[torch.as_tensor(indices)] = torch.as_tensor([lab for _, lab in entries])
        return out.to(device)
    samples = getattr(loader, "samples", None)
    if samples is None:
        raise UserError("distill.alpha > 0 needs sample ids: use data.backend=torch")
    pos = {os.path.normpath(p): i for i, (p, _) in enumerate(samples)}
    out = torch.full((len(samples),), -1, dtype=torch.long)
    for rel, lab in entries:
        i = pos.get(os.path.normpath(os.path.join(train_path, rel)))
        if i is None:
            raise UserError(f"labelled image {rel} is not among the training images of {train_path}")
        out[i] = lab
    return out.to(device)


# ----------------------------------------------------------------------------- entry point
def main(argv=None) -> int:
    return runtime.run_entry(PROG, DistillConfig, DISTILL_PRESETS, __doc__, train, argv)


def train(cfg: DistillConfig) -> int:
    # ------------------------------------------------------------------ setup
    d = cfg.distill
    if not cfg.teacher:
        raise UserError("give --teacher=PATH: a finetune.py (or distill.py) run directory or checkpoint")
    if d.cache_teacher and cfg.data.augment != "eval":
        raise UserError("distill.cache_teacher=true needs data.augment=eval (augmented views change)")
    rank, world, device, dtype, per_rank, train_path, val_path, _, out_dir, ckpts = runtime.start_run(cfg)
    t_dtype = runtime.resolve_precision(d.teacher_precision, device)

    # ------------------------------------------------------------------ teacher
    t_file, teacher, t_state = load_classifier(cfg.teacher)
    classes = dataset_classes(train_path)
    if list(t_state.get("classes", classes)) != list(classes):
        raise UserError(f"the teacher {t_file} was trained on other classes than those of {train_path}")
    teacher = teacher.to(device).eval().requires_grad_(False)
    if cfg.model.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ student
    t_arch = {k: v for k, v in t_state["arch"].items() if k != "num_classes"}
    pretrained, source = None, "random init"
    if cfg.student_ckpt:
        s_file, pretrained, s_model = load_pretrained(cfg.student_ckpt)
        arch = {**arch_of(s_model), "ft_proj_selector": cfg.model.ft_proj_selector}
        source = s_file
        if d.student == "teacher" and {k: arch[k] for k in arch if k != "ft_proj_selector"} != \
                {k: t_arch[k] for k in t_arch if k != "ft_proj_selector"}:
            raise UserError(f"distill.student=teacher, but --student_ckpt {s_file} is another architecture")
    elif d.student == "teacher":
        arch = dict(t_arch)
    else:
        arch = arch_of(cfg.model)
    arch["num_classes"] = len(classes)
    student = build_classifier(arch, len(classes), pretrained, zero_init=cfg.zero_init_head)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    dist.print0(f"{PROG}: teacher {t_file} (r{t_arch['depth']}_{t_arch['width']}x, "
                f"{n_t / 1e6:.1f}M params) -> "
                f"student r{arch['depth']}_{arch['width']}x ({n_s / 1e6:.1f}M params) from {source}; "
                f"tau {d.temperature}, alpha {d.alpha}")

    # ------------------------------------------------------------------ data: every train image
    data_cfg = dataclasses.replace(cfg.data, path=train_path, batch_size=per_rank, train=True,
                                   seed=cfg.run.seed, dtype=runtime.DTYPE_NAME[dtype])
    loader = build_loader(data_cfg, rank, world, device)
    if cfg.data.file_list:  # a restricted unlabeled set: make sure the backend applied it
        check_subset_honoured(loader, list_length(cfg.data.file_list), world, per_rank, cfg.data.backend)
    vloader = None
    if val_path and dist.is_main():
        vloader = eval_loader(val_path, cfg.data, cfg.run.eval_batch_size, device)
    if vloader is not None and vloader.classes != classes:
        raise UserError(f"val classes of {val_path} differ from the train classes of {train_path}")

    labels_of = None
    if d.alpha > 0:
        if cfg.subset.list or cfg.subset.fraction is not None:
            try:
                entries, indices = subsets.make_subset(
                    train_path, resolve_subset_list(cfg.subset.list) if cfg.subset.list else None,
                    cfg.subset.fraction, cfg.subset.seed)
            except (subsets.SubsetError, FileNotFoundError) as e:
                raise UserError(str(e)) from None
            if dist.is_main():
                subsets.write_list(entries, os.path.join(out_dir, "labels_subset.txt"))
        else:
            raise UserError("distill.alpha > 0 needs the labelled subset: --subset.list or --subset.fraction")
        labels_of = known_labels(loader, train_path, entries, indices, device)
        dist.print0(f"{PROG}: {len(entries)} labelled images add alpha * cross-entropy")

    cache = None
    if d.cache_teacher:
        # Same data, same (eval) recipe, in order: each sample's logits once, read back by sample id.
        cache_cfg = dataclasses.replace(data_cfg, train=False, batch_size=cfg.run.eval_batch_size)
        n = len(getattr(loader, "samples", None) or subsets.read_manifest(train_path)[0])
        cache_cfg = dataclasses.replace(cache_cfg, batch_size=max(1, min(cache_cfg.batch_size, n)))
        cache = cache_logits(teacher, build_loader(cache_cfg, 0, 1, device), n, len(classes), device, t_dtype)
        dist.print0(f"{PROG}: cached the teacher's logits of {n} images (no teacher pass while training)")

    def loss_fn(fwd, batch):
        x = batch.views[0]
        ids = None
        if cache is not None or labels_of is not None:
            ids = torch.as_tensor(batch_ids(loader), device=device)
        cached = cache[ids] if cache is not None else None
        labels = labels_of[ids] if labels_of is not None else None
        return distill_step(fwd, teacher, x, d.temperature, labels, d.alpha, cached, t_dtype)

    return fit(PROG, cfg, student, arch, classes, loss_fn, loader, vloader, bool(val_path), device, dtype,
               per_rank, world, ckpts, extra_log={"teacher": t_file, "init": source, "temperature": d.temperature,
                                           "alpha": d.alpha},
               make_optimizer=classifier_optimizer(cfg.optim))


if __name__ == "__main__":
    raise SystemExit(main())
