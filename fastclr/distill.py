"""SimCLRv2 step 3: distill a fine-tuned teacher into a student on the unlabeled images.

    torchrun --nproc_per_node=8 fastclr/distill.py imagenet_distill --teacher=runs/finetune_1pct \\
        --data.path=/data/imagenet/train --run.val_path=/data/imagenet/val          # R152 3x -> R50 1x
    torchrun --nproc_per_node=8 fastclr/distill.py imagenet_self_distill --teacher=runs/finetune_1pct ...
    python fastclr/distill.py demo_self_distill --teacher=runs/demo_ft_1pct --student_ckpt=runs/demo

Loss (SimCLRv2 Eq. 3/4, tau^2-scaled as the official colab's add_kd_loss, see fastclr.losses.distill_loss):
``(1 - alpha) * tau^2 * CE(softmax(teacher / tau), softmax(student / tau)) + alpha * CE(student, label)``.
The teacher (a finetune.py / distill.py checkpoint, or a released fine-tuned model converted by
``python -m fastclr.zoo convert``) runs in eval mode without gradients, channels_last, in bf16 on GPU
(fp32 on CPU) and compiled where the student is (``model.compile``: on a GPU by default); teacher and
student see the same augmented view of each image (one view, the
``finetune`` recipe: crop + flip). Every train image is used and its label ignored, so data.path may
be a folder in any layout (flat, nested, class folders whose names are not used) and the classes are
the teacher's; except with ``distill.alpha > 0``: then the images of the labelled subset
(``subset.list`` / ``subset.fraction``, the one the teacher was fine-tuned on) add the cross-entropy
term, and data.path needs class folders.

The student is the ``model.*`` architecture from scratch, the teacher's architecture
(``distill.student=teacher``: self-distillation), or the architecture of its own pretrain checkpoint
(``--student_ckpt``), whose weights it then starts from. Temperature: 1.0 for big-to-small
distillation, 0.1 for self-distillation (the presets).

``--distill.cache_teacher=true`` (needs ``data.augment=eval``: without augmentation the teacher's
logits never change) runs the teacher once over the data set in order and reads its logits by sample
id (``loader.last_used_indices``) afterwards: one teacher pass in all instead of one per epoch. The cache
holds N x classes values on the training device.

Output: like finetune.py (config.json, log.jsonl, ckpt_*.pt, best.pt with ``arch``), so a student can
be evaluated, fine-tuned further or be the next teacher.
"""
from __future__ import annotations

import dataclasses
import os
import sys

if __package__ in (None, ""):  # `python fastclr/distill.py` / torchrun put fastclr/ first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from torch import nn

from fastclr import dist, presets, runtime
from fastclr.classifier import (arch_of, build_classifier, full_arch, load_classifier, load_pretrained,
                               train_classifier)
from fastclr.config import DistillConfig
from fastclr.labels import build_loader, dataset_classes, make_subset, train_loader, val_loader
from fastclr.losses import distill_loss
from fastclr.optimizers import classifier_optimizer
from fastclr.runtime import UserError
from fastclr.trainer import resolve_compile
from loaders import subsets
from loaders.sources.files import count_list

PROG = "distill.py"


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
    """Sample ids of the images in the loader's last batch: ``last_used_indices`` (the torch backend
    replaces an unreadable image by the next readable one; the others never hold a bad file)."""
    return np.asarray(loader.last_used_indices)


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
    return runtime.run_entry(PROG, DistillConfig, presets.DISTILL, __doc__, train, argv)


def teacher_classes(t_file: str, t_state: dict, train_path: str, labels: bool) -> list[str]:
    """The student's classes: the teacher's. Without labels (distill.alpha = 0) the training images may be
    in any layout and only the teacher's class names matter (a teacher that records none takes the
    training folder's class folders, or is named by output index). With labels the training folder's
    class folders must be the teacher's classes."""
    names = list(t_state.get("classes") or t_state.get("class_names") or [])
    n = int(t_state["arch"]["num_classes"])
    if not labels and names:
        return names
    try:
        folders = dataset_classes(train_path)
    except UserError:
        if labels:
            raise UserError(f"distill.alpha > 0 labels images by the class folders of data.path, and {train_path} has "
                            f"none (expected root/<class>/<image>)") from None
        return [str(i) for i in range(n)]
    if not labels and len(folders) != n:
        return [str(i) for i in range(n)]
    if names and names != folders:
        raise UserError(f"the teacher {t_file} was trained on other classes than those of {train_path}")
    if n != len(folders):
        raise UserError(f"the teacher {t_file} has {n} outputs but {train_path} has {len(folders)} class folders "
                        f"(labels are the sorted folder names)")
    return folders


def train(cfg: DistillConfig) -> int:
    # ------------------------------------------------------------------ setup
    d = cfg.distill
    if not cfg.teacher:
        raise UserError("give --teacher=PATH: a finetune.py (or distill.py) run directory or checkpoint")
    if d.cache_teacher and cfg.data.augment != "eval":
        raise UserError("distill.cache_teacher=true needs data.augment=eval (augmented views change)")
    run = runtime.start_run(cfg)
    device = run.device
    t_dtype = runtime.resolve_precision(d.teacher_precision, device, cfg.data.image_size)

    # ------------------------------------------------------------------ teacher
    t_file, teacher, t_state = load_classifier(cfg.teacher)
    classes = teacher_classes(t_file, t_state, run.train_path, labels=d.alpha > 0)
    teacher = teacher.to(device).eval().requires_grad_(False)
    if cfg.model.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    t_forward = torch.compile(teacher) if resolve_compile(cfg, run) else teacher  # on a GPU by default

    # ------------------------------------------------------------------ student
    t_arch = {k: v for k, v in full_arch(t_state["arch"]).items() if k != "num_classes"}
    pretrained, source = None, "random init"
    if cfg.student_ckpt:
        s_file, pretrained, s_model = load_pretrained(cfg.student_ckpt)
        arch = arch_of(s_model, cfg.model.ft_proj_selector)
        source = s_file
        if d.student == "teacher" and {k: arch[k] for k in arch if k != "ft_proj_selector"} != \
                {k: t_arch[k] for k in t_arch if k != "ft_proj_selector"}:
            raise UserError(f"distill.student=teacher, but --student_ckpt {s_file} is another architecture")
    elif d.student == "teacher":
        arch = dict(t_arch)
    else:
        arch = arch_of(cfg.model, cfg.model.ft_proj_selector)
    arch["num_classes"] = len(classes)
    student = build_classifier(arch, len(classes), pretrained, zero_init=cfg.zero_init_head)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    dist.print0(f"{PROG}: teacher {t_file} (r{t_arch['depth']}_{t_arch['width']}x, "
                f"{n_t / 1e6:.1f}M params) -> "
                f"student r{arch['depth']}_{arch['width']}x ({n_s / 1e6:.1f}M params) from {source}; "
                f"tau {d.temperature}, alpha {d.alpha}")

    # ------------------------------------------------------------------ data: every train image
    # (a data.file_list restricts the unlabeled set: the loader is checked to apply it)
    n_listed = count_list(cfg.data.file_list) if cfg.data.file_list else None
    loader = train_loader(cfg, run, cfg.data.file_list, n_listed, labels=d.alpha > 0)
    if loader.listing_note:
        dist.print0(f"{PROG}: {loader.listing_note}")
    vloader = val_loader(cfg, run, classes)

    labels_of = None
    if d.alpha > 0:
        if not (cfg.subset.list or cfg.subset.fraction is not None):
            raise UserError("distill.alpha > 0 needs the labelled subset: --subset.list or --subset.fraction")
        entries, indices = make_subset(run.train_path, cfg.subset)
        if dist.is_main():
            subsets.write_list(entries, os.path.join(run.out_dir, "labels_subset.txt"))
        labels_of = known_labels(loader, run.train_path, entries, indices, device)
        dist.print0(f"{PROG}: {len(entries)} labelled images add alpha * cross-entropy")

    cache = None
    if d.cache_teacher:
        # Same data, same (eval) recipe, in order: each sample's logits once, read back by sample id.
        n = len(getattr(loader, "samples", None) or subsets.read_manifest(run.train_path)[0])
        cache_cfg = dataclasses.replace(loader.cfg, train=False, batch_size=max(1, min(cfg.run.eval_batch_size, n)))
        cache = cache_logits(t_forward, build_loader(cache_cfg, 0, 1, device), n, len(classes), device, t_dtype)
        dist.print0(f"{PROG}: cached the teacher's logits of {n} images (no teacher pass while training)")

    def loss_fn(forward, batch):
        ids = None
        if cache is not None or labels_of is not None:
            ids = torch.as_tensor(batch_ids(loader), device=device)
        cached = cache[ids] if cache is not None else None
        labels = labels_of[ids] if labels_of is not None else None
        loss, agree = distill_step(forward, t_forward, batch.views[0], d.temperature, labels, d.alpha, cached, t_dtype)
        return loss, {"train_acc": agree}

    # ------------------------------------------------------------------ the loop
    return train_classifier(PROG, cfg, run, student, arch, classes, loss_fn, loader, vloader,
                            classifier_optimizer(cfg.optim),
                            extra_log={"teacher": t_file, "init": source, "temperature": d.temperature,
                                       "alpha": d.alpha})


if __name__ == "__main__":
    raise SystemExit(main())
