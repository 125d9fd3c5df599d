"""SimCLRv2 step 2: fine-tune a pretrained network on a few labels. Read top to bottom: config,
model, data, then ``train`` (setup) and ``fit`` (the loop, shared with distill.py).

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
import inspect
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # `python fastclr/finetune.py` / torchrun put fastclr/ first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import loaders
from fastclr import checkpoint as ckpt
from fastclr import config as C
from fastclr import dist, runtime
from fastclr.config import BaseRunConfig, option
from fastclr.models import LinearHead, build_model, convert_sync_bn
from fastclr.pretrain import build_optimizer, model_kwargs
from fastclr.runtime import UserError
from fastclr.schedule import lr_at, scaled_lr
from loaders import subsets
from loaders.common import LoaderConfig, find_classes

PROG = "finetune.py"
REPO = Path(__file__).resolve().parents[1]
ARCH_KEYS = ("depth", "width", "sk_ratio", "cifar_stem", "num_proj_layers", "proj_out_dim")


# ----------------------------------------------------------------------------- config
@dataclass
class SubsetConfig:
    list: str = option("", "official label subset: one file name per line (1percent.txt); '' = none")
    # typing.Optional, not `X | None`: fastclr.config's parser recognizes typing.Union only
    fraction: Optional[float] = option(  # noqa: UP045
        None, "seeded class-balanced label fraction, >= 1 per class; none = off", gt=0, le=1)
    seed: int = option(0, "seed of the fraction draw", ge=0)


@dataclass
class TrainRunConfig(BaseRunConfig):
    """The ``run`` section of finetune / distill / linear_eval: pretrain's shared fields, other
    defaults, and val evaluation instead of k-NN."""
    out_dir: str = option("runs/finetune", "run directory: config.json, log.jsonl, checkpoints, best.pt")
    ckpt_every: int = option(1000, "steps between checkpoints (also one after every eval and at the end)", ge=1)
    keep_last: int = option(2, "rolling checkpoints kept (best.pt is kept apart; 0 = all)", ge=0)
    val_path: str = option("", "val ImageFolder (empty: the demo val set when data.path is empty, else no eval)")
    eval_every: int = option(1, "epochs between val evaluations (0 = only at the end)", ge=0)
    eval_batch_size: int = option(256, "val batch size", ge=1)


@dataclass
class FinetuneConfig:
    ckpt: str = option("", "pretrain checkpoint (file, or run dir = its newest ckpt), or 'none' = from scratch")
    zero_init_head: bool = option(True, "zero-initialize the classifier (TF zero_init_logits_layer)")
    data: LoaderConfig = field(default_factory=lambda: LoaderConfig(augment="finetune"))
    model: C.ModelConfig = field(default_factory=C.ModelConfig)
    optim: C.OptimConfig = field(default_factory=lambda: C.OptimConfig(
        base_lr=0.005, lr_scaling="sqrt", weight_decay=0.0, warmup_epochs=0.0, epochs=60,
        global_batch_size=1024))
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    run: TrainRunConfig = field(default_factory=TrainRunConfig)


_IMAGENET_FT = {
    "data.image_size": 224, "data.augment": "finetune", "data.dtype": "bfloat16", "data.num_workers": 8,
    "optim.optimizer": "lars", "optim.global_batch_size": 1024, "optim.base_lr": 0.005,
    "optim.lr_scaling": "sqrt", "optim.weight_decay": 0.0, "optim.warmup_epochs": 0,
    "model.ft_proj_selector": 1,
    "run.eval_batch_size": 500, "run.ckpt_every": 2000,
}
# The demo: Fashion-MNIST at 32px on CPU. 1 % = 600 labelled images, 10 % = 6000. B=1024 is more than
# the 1 % set, so a small batch (same sqrt rule: lr = 0.005*sqrt(B)); the architecture of --ckpt=none
# is demo_cpu's (R18, ImageNet stem). 10 %: 10 epochs instead of 30 keeps the chain near one hour.
_DEMO_FT = {
    "data.path": "", "data.image_size": 32, "data.augment": "finetune", "data.num_workers": 2,
    "data.dtype": "float32", "model.depth": 18, "model.width": 1, "model.cifar_stem": False,
    "optim.optimizer": "lars", "optim.base_lr": 0.005, "optim.lr_scaling": "sqrt", "optim.weight_decay": 0.0,
    "optim.warmup_epochs": 0, "run.device": "cpu", "run.precision": "fp32", "run.log_every": 10,
    "run.eval_batch_size": 500,
}
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet_1pct": {**_IMAGENET_FT, "subset.list": "imagenet_subsets/1percent.txt", "optim.epochs": 60,
                      "run.out_dir": "runs/finetune_1pct"},
    "imagenet_10pct": {**_IMAGENET_FT, "subset.list": "imagenet_subsets/10percent.txt", "optim.epochs": 30,
                       "run.out_dir": "runs/finetune_10pct"},
    "demo_1pct": {**_DEMO_FT, "subset.fraction": 0.01, "optim.global_batch_size": 64, "optim.epochs": 60,
                  "run.eval_every": 10, "run.out_dir": "runs/demo_ft_1pct"},
    "demo_10pct": {**_DEMO_FT, "subset.fraction": 0.1, "optim.global_batch_size": 128, "optim.epochs": 10,
                   "run.eval_every": 2, "run.out_dir": "runs/demo_ft_10pct"},
}


# ----------------------------------------------------------------------------- model
class Classifier(nn.Module):
    """backbone -> the first k projection-head layers ("neck") -> linear classifier.

    ``features(x)`` [B, 3, H, W] -> [B, layer_dims[k]] is the pretrained head's
    ``head(h, return_layers=True)[k]``; ``forward(x)`` -> logits [B, num_classes].
    State dict keys: ``backbone.*``, ``neck.<j>.*`` (head layer j), ``fc.*``."""

    def __init__(self, backbone: nn.Module, neck: nn.Module, fc: nn.Module):
        super().__init__()
        self.backbone, self.neck, self.fc = backbone, neck, fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def arch_of(model_cfg: C.ModelConfig) -> dict[str, Any]:
    """The architecture fields of a ModelConfig (a preset name resolved) plus ft_proj_selector."""
    kw = model_kwargs(model_cfg)
    return {**{k: kw[k] for k in ARCH_KEYS}, "ft_proj_selector": model_cfg.ft_proj_selector}


def build_classifier(arch: dict[str, Any], num_classes: int,
                     pretrained: dict[str, torch.Tensor] | None = None, zero_init: bool = True) -> Classifier:
    """A Classifier of ``arch`` (ARCH_KEYS + ft_proj_selector). ``pretrained``: a SimCLRModel state_dict
    (pretrain checkpoint's ``model``) loaded, strictly, before the head is cut at layer k."""
    simclr = build_model(**{k: arch[k] for k in ARCH_KEYS})
    if pretrained is not None:
        simclr.load_state_dict(pretrained)
    k = int(arch["ft_proj_selector"])
    n = len(simclr.head.layers)
    if k < 0:  # TF: -1 = the last layer
        k += n + 1
    if not 0 <= k <= n:
        raise UserError(f"model.ft_proj_selector={arch['ft_proj_selector']} is out of range for a {n}-layer "
                        f"head (0..{n})")
    return Classifier(simclr.backbone, simclr.head.truncate(k),
                      LinearHead(simclr.head.layer_dims[k], num_classes, zero_init=zero_init))


def _load(path: str, what: str) -> tuple[str, dict[str, Any]]:
    """(file, state) of a checkpoint file, or of the newest valid one in a run directory."""
    p = Path(path)
    try:
        if p.is_dir():
            found = ckpt.load_latest_valid(p)
            if found is None:
                raise UserError(f"{what} {path}: no ckpt_*.pt in that directory")
            return str(found[0]), found[1]
        return str(p), ckpt.load(p)
    except UserError:
        raise
    except ckpt.UnusableCheckpoint as e:  # its message names the file and says why
        raise UserError(f"{what}: {e}") from None
    except Exception as e:  # noqa: BLE001  (missing, unreadable: one line for the user)
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{what} {path}: {type(e).__name__}: {first}") from None


def load_pretrained(path: str) -> tuple[str, dict[str, torch.Tensor], C.ModelConfig]:
    """(file, SimCLRModel state_dict, the pretrain ModelConfig) of a pretrain.py checkpoint."""
    file, state = _load(path, "--ckpt")
    if "arch" in state:
        raise UserError(f"{file} is a fine-tuned checkpoint: fine-tuning starts from a pretrain.py one")
    if "model" not in state or "config" not in state or "model" not in state["config"]:
        raise UserError(f"{file} is not a pretrain.py checkpoint (no 'model' / 'config')")
    mcfg = C.from_dict(C.ModelConfig, state["config"]["model"], strict=False)
    return file, state["model"], mcfg


def load_classifier(path: str) -> tuple[str, Classifier, dict[str, Any]]:
    """(file, model, state) of a fine-tuned / distilled checkpoint (finetune.py or distill.py): best.pt,
    a ckpt_*.pt, or a run directory (its best.pt if present, else its newest checkpoint)."""
    p = Path(path)
    if p.is_dir() and (p / "best.pt").is_file():
        p = p / "best.pt"
    file, state = _load(str(p), "checkpoint")
    if "arch" not in state:
        raise UserError(f"{file} is not a fine-tuned checkpoint (no 'arch'): give a finetune/distill run")
    model = build_classifier(state["arch"], int(state["arch"]["num_classes"]), zero_init=False)
    model.load_state_dict(state["model"])
    return file, model, state


# ----------------------------------------------------------------------------- data
def dataset_classes(path: str) -> list[str]:
    """Class names of an ImageFolder or of a .beton (from its manifest)."""
    if str(path).endswith(".beton"):
        return subsets.read_manifest(path)[1]
    return find_classes(path)


def list_length(path: str) -> int:
    """Images in a list file (non-empty, non-comment lines)."""
    return sum(1 for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#"))


def resolve_subset_list(name: str) -> str:
    """An official list by path, else by name under ./imagenet_subsets or the repo's imagenet_subsets/."""
    p = Path(name)
    shared = REPO.parent / "shared" / "imagenet_subsets"  # where the dev checkouts keep the lists
    for cand in (p, REPO / p, REPO / "imagenet_subsets" / p.name, shared / p.name):
        if cand.is_file():
            return str(cand)
    raise UserError(f"subset list {name} not found (the official lists: "
                    f"https://github.com/google-research/simclr/tree/master/imagenet_subsets)")


def label_subset(data_cfg: LoaderConfig, sub: SubsetConfig, train_path: str,
                 out_dir: str) -> tuple[str | None, int | None]:
    """(file_list, number of images) of the labelled images: data.file_list as given, or the subset
    (list or fraction) written by rank 0 to out_dir/labels_subset.txt; (None, None) = all images."""
    chosen = [n for n, on in (("data.file_list", bool(data_cfg.file_list)), ("subset.list", bool(sub.list)),
                              ("subset.fraction", sub.fraction is not None)) if on]
    if len(chosen) > 1:
        raise UserError(f"give one label subset, not {' and '.join(chosen)}")
    if data_cfg.file_list:
        if not Path(data_cfg.file_list).is_file():
            raise UserError(f"data.file_list {data_cfg.file_list} not found")
        return data_cfg.file_list, list_length(data_cfg.file_list)
    if not chosen:
        return None, None
    out = os.path.join(out_dir, "labels_subset.txt")
    if dist.is_main():
        try:
            entries, _ = subsets.make_subset(train_path, resolve_subset_list(sub.list) if sub.list else None,
                                             sub.fraction, sub.seed)
        except (subsets.SubsetError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
        subsets.write_list(entries, out)
    dist.barrier()
    return out, list_length(out)


def build_loader(cfg: LoaderConfig, rank: int, world: int, device: torch.device):
    """loaders.build with its input errors (no images, batch larger than the data, ...) as UserError."""
    try:
        return loaders.build(cfg, rank=rank, world_size=world, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e).splitlines()[0]) from None


def eval_loader(path: str, data_cfg: LoaderConfig, batch_size: int, device: torch.device,
                file_list: str | None = None, backend: str = "torch"):
    """Centre-crop eval loader (in order, nothing dropped) over an ImageFolder or a list file."""
    n = list_length(file_list) if file_list else len(subsets.folder_entries(path))
    c = dataclasses.replace(data_cfg, backend=backend, path=path, file_list=file_list, augment="eval",
                            batch_size=max(1, min(batch_size, n)), train=False, dtype="float32")
    return build_loader(c, 0, 1, device)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` (BN in eval mode) over ``loader``."""
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


def start_epoch(loader, epoch: int, skip: int):
    """An iterator over epoch ``epoch`` positioned after its first ``skip`` batches (a resume)."""
    if "start_step" in inspect.signature(loader.set_epoch).parameters:
        loader.set_epoch(epoch, start_step=skip)
        return iter(loader)
    loader.set_epoch(epoch)
    it = iter(loader)
    for _ in range(skip):  # this backend cannot seek: read and drop (same order, same augmentations)
        next(it)
    return it


def check_subset_honoured(loader, n_images: int | None, world: int, per_rank: int, backend: str) -> None:
    """A backend that ignored data.file_list would train on every label: refuse instead."""
    if n_images is None:
        return
    expected = (n_images // world) // per_rank
    if len(loader) != expected:
        raise UserError(f"data.backend={backend} did not apply the label subset ({len(loader)} steps/epoch, "
                        f"expected {expected} for {n_images} images): use data.backend=torch")


def labelled_loaders(cfg, train_path: str, val_path: str, file_list: str | None, n_labeled: int | None,
                     per_rank: int, rank: int, world: int, device: torch.device, dtype: torch.dtype):
    """(train loader over the labelled subset, checked to honour it; val loader on the main rank, or
    None) for finetune and linear_eval's slow path."""
    data_cfg = dataclasses.replace(cfg.data, path=train_path, file_list=file_list, batch_size=per_rank,
                                   train=True, seed=cfg.run.seed, dtype=runtime.DTYPE_NAME[dtype])
    loader = build_loader(data_cfg, rank, world, device)
    check_subset_honoured(loader, n_labeled, world, per_rank, cfg.data.backend)
    vloader = None
    if val_path and dist.is_main():
        vloader = eval_loader(val_path, cfg.data, cfg.run.eval_batch_size, device)
    return loader, vloader


# ----------------------------------------------------------------------------- entry point
def main(argv=None) -> int:
    return runtime.run_entry(PROG, FinetuneConfig, FINETUNE_PRESETS, __doc__, train, argv)


def train(cfg: FinetuneConfig) -> int:
    # ------------------------------------------------------------------ setup
    if not cfg.ckpt:
        raise UserError("give --ckpt=PATH (a pretrain.py checkpoint or run dir) or --ckpt=none (scratch)")
    rank, world, device, dtype, per_rank, train_path, val_path, _, out_dir, ckpts = runtime.start_run(cfg)

    # ------------------------------------------------------------------ model
    classes = dataset_classes(train_path)
    if cfg.ckpt.lower() == "none":
        arch, pretrained, source = arch_of(cfg.model), None, "random init (supervised from scratch)"
    else:
        file, pretrained, pre_model = load_pretrained(cfg.ckpt)
        # The architecture is the checkpoint's; only where to cut the head is ours.
        arch = {**arch_of(pre_model), "ft_proj_selector": cfg.model.ft_proj_selector}
        source = file
    arch["num_classes"] = len(classes)
    model = build_classifier(arch, len(classes), pretrained, zero_init=cfg.zero_init_head)
    dist.print0(f"{PROG}: r{arch['depth']}_{arch['width']}x (sk {arch['sk_ratio']}) from {source}; "
                f"head cut at layer {arch['ft_proj_selector']} -> {model.fc.in_features}-d features -> "
                f"{len(classes)} classes")

    # ------------------------------------------------------------------ data
    file_list, n_labeled = label_subset(cfg.data, cfg.subset, train_path, out_dir)
    loader, vloader = labelled_loaders(cfg, train_path, val_path, file_list, n_labeled, per_rank, rank, world,
                                       device, dtype)
    if vloader is not None and vloader.classes != classes:
        raise UserError(f"val classes of {val_path} differ from the train classes of {train_path}")
    dist.print0(f"{PROG}: {'all' if n_labeled is None else n_labeled} labelled images"
                f"{f' ({file_list})' if file_list else ''}; val: {val_path or 'none'}")

    def loss_fn(fwd, batch):
        logits = fwd(batch.views[0]).float()
        loss = F.cross_entropy(logits, batch.labels)
        return loss, (logits.argmax(1) == batch.labels).float().mean()

    return fit(PROG, cfg, model, arch, classes, loss_fn, loader, vloader, bool(val_path), device, dtype,
               per_rank, world, ckpts, extra_log={"labeled_images": n_labeled, "init": source},
               make_optimizer=classifier_optimizer(cfg.optim))


def classifier_optimizer(o: C.OptimConfig):
    """make_optimizer for fit(): optim.optimizer over the network, but for LARS the classifier layer is
    plain momentum SGD, as in TF (its LARS excludes 'head_supervised' from the trust ratio and from
    its weight decay; the kernel's l2 term is added to the loss instead = decay without adaptation).
    A zero-initialized layer would otherwise never move: its trust ratio eta*|w|/|g| starts at 0."""
    def make(model: nn.Module, lr: float):
        fc = ckpt.unwrap(model).fc
        head = {id(p) for p in fc.parameters()}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
        if o.optimizer != "lars":
            return build_optimizer([p for p in model.parameters() if p.requires_grad], o, lr)
        groups = [{"params": rest},
                  {"params": [fc.weight], "trust": False, "weight_decay": o.weight_decay},
                  {"params": [fc.bias], "trust": False, "weight_decay": 0.0}]
        return build_optimizer(groups, o, lr)
    return make


# ----------------------------------------------------------------------------- the loop
def fit(prog: str, cfg, model: Classifier, arch: dict[str, Any], classes: list[str],
        loss_fn: Callable, loader, vloader, has_val: bool, device: torch.device, dtype: torch.dtype,
        per_rank: int, world: int, ckpts: ckpt.RunCheckpoints, extra_log: dict[str, Any] | None = None,
        make_optimizer: Callable | None = None) -> int:
    """Train ``model`` with ``loss_fn(fwd, batch) -> (loss, accuracy-like metric)``: LARS/SGD, warmup +
    cosine, checkpoints, resume, eval and best.pt, NaN stop. Used by finetune.py and distill.py.
    ``vloader``: the val loader on rank 0 (None elsewhere); ``has_val``: whether there is one (all ranks).
    ``make_optimizer(model, lr)``: another optimizer than optim.optimizer over all parameters."""
    o, run, out_dir = cfg.optim, cfg.run, cfg.run.out_dir
    steps_per_epoch = len(loader) // o.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"fewer images than one global batch of {o.global_batch_size}: "
                        f"lower optim.global_batch_size")
    total_steps = o.epochs * steps_per_epoch
    if run.max_steps is not None:
        total_steps = min(total_steps, run.max_steps)
    warmup_steps = round(o.warmup_epochs * steps_per_epoch)
    peak_lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, o.global_batch_size, o.lr_scaling)

    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and cfg.model.sync_bn:
        model = convert_sync_bn(model)
    raw_model = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    fwd = torch.compile(model) if cfg.model.compile else model
    optimizer = (make_optimizer(raw_model, peak_lr) if make_optimizer
                 else build_optimizer(raw_model.parameters(), o, peak_lr))
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))

    # ------------------------------------------------------------------ resume
    step, best = 0, {"top1": -1.0}
    found = ckpts.load_resume()
    if found is None and run.resume == "auto":
        dist.print0(f"{prog}: run.resume=auto: no checkpoint in {out_dir}, starting fresh")
    elif found is not None:
        path, state = found
        if "arch" not in state or state["arch"] != arch:
            raise UserError(f"{path} holds another architecture ({state.get('arch')}), not {arch}")
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        step, best = int(state["step"]), dict(state.get("best", best))
        dist.print0(f"{prog}: resumed from {path} at step {step}")

    def check_finite():
        bad = ckpt.first_non_finite(raw_model.state_dict())  # one host sync, at eval/checkpoint time only
        if bad:
            where = f"last good checkpoint: {ckpts.last}" if ckpts.last else "no good checkpoint written yet"
            raise ckpt.NonFiniteState(f"non-finite values in model.{bad} after step {step}; stopping ({where}). "
                                      f"Lower optim.lr or check the data, then --run.resume=auto")

    def weights_state() -> dict[str, Any]:
        return {"model": raw_model.state_dict(), "arch": arch, "classes": classes, "step": step,
                "epoch": step // steps_per_epoch, "config": C.to_dict(cfg)}

    def save_checkpoint():
        tensors = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict()}
        ckpts.save(step, lambda: {**weights_state(), **tensors, "scaler": scaler.state_dict(),
                                  "step_in_epoch": step % steps_per_epoch, "rng": ckpt.rng_state(),
                                  "best": best}, tensors)
        dist.barrier()

    def run_eval(epoch: int):
        """Val top-1/top-5 on rank 0; best.pt when top-1 improves. Returns the metrics (or {})."""
        metrics = {}
        check_finite()  # on every rank (identical weights): a rank-0-only exit would hang the others
        if vloader is not None:
            metrics = evaluate(raw_model, vloader, device, dtype)
            log.write(event="eval", step=step, epochs_done=epoch, **metrics)
            improved = metrics["top1"] > best["top1"]
            if improved:
                best.update(metrics, step=step, epoch=epoch)
            bar.write(f"{prog}: step {step} epoch {epoch}: val top-1 {metrics['top1']:.2f}% "
                      f"top-5 {metrics['top5']:.2f}%{'  (best)' if improved else ''}")
            if improved:
                ckpt.save(os.path.join(out_dir, "best.pt"), {**weights_state(), "val": metrics})
        dist.barrier()
        return metrics

    # ------------------------------------------------------------------ loop
    log = runtime.JsonlLog(os.path.join(out_dir, "log.jsonl"))
    dist.print0(f"{prog}: {world} rank(s) on {device}, {runtime.DTYPE_NAME[dtype]}, global batch "
                f"{o.global_batch_size} ({per_rank}/rank x {o.grad_accum} accum), "
                f"{steps_per_epoch} steps/epoch, {total_steps} steps, {o.optimizer} peak lr {peak_lr:.4g}, "
                f"wd {o.weight_decay}")
    bar = tqdm(total=total_steps, initial=step, desc=prog.replace(".py", ""), unit="step",
               disable=not (dist.is_main() and run.progress), dynamic_ncols=True, mininterval=1.0)
    meter = runtime.StepMeter(device)  # sums on the device: read (a host sync) every log_every steps
    last_eval, last_eval_step = None, -1
    model.train()  # BN in train mode while fine-tuning, as TF does
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        it = start_epoch(loader, epoch, skip * o.grad_accum)
        for _ in range(skip, steps_per_epoch):
            if step >= total_steps:
                break
            lr = lr_at(step, peak_lr, warmup_steps, total_steps)
            runtime.set_lr(optimizer, lr)
            for _micro in range(o.grad_accum):
                batch = meter.next_batch(it)
                with runtime.autocast(device, dtype):
                    loss, acc = loss_fn(fwd, batch)
                scaler.scale(loss / o.grad_accum).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            meter.add(step, loss, acc)
            bar.update(1)
            if step % run.log_every == 0 or step == total_steps:
                w = meter.read(prog, ckpts.last, lambda s: lr_at(s - 1, peak_lr, warmup_steps, total_steps))
                log.write(step=step, epoch=epoch, loss=round(w.loss, 5), train_acc=round(w.acc, 4),
                          lr=lr, images_per_s=round(w.steps * o.global_batch_size / w.seconds, 1),
                          data_wait=round(w.data_wait, 4), gpu_mem_gb=runtime.gpu_memory_gb(device))
                bar.set_postfix(loss=f"{w.loss:.3f}", acc=f"{w.acc:.2f}", lr=f"{lr:.3g}")
            epoch_end = step % steps_per_epoch == 0
            eval_now = has_val and epoch_end and run.eval_every > 0 \
                and (step // steps_per_epoch) % run.eval_every == 0
            if eval_now:
                last_eval = run_eval(step // steps_per_epoch)
                last_eval_step = step
                save_checkpoint()
            elif step % run.ckpt_every == 0 or step == total_steps:
                save_checkpoint()
    bar.close()
    if has_val and last_eval_step != step:
        last_eval = run_eval(math.ceil(step / steps_per_epoch))
        save_checkpoint()
    if dist.is_main() and not os.path.exists(os.path.join(out_dir, "best.pt")):
        ckpt.save(os.path.join(out_dir, "best.pt"), weights_state())  # no val set: the last weights
    last_eval = last_eval or {}
    summary = dict(event="done", step=step, final_top1=last_eval.get("top1"),
                   final_top5=last_eval.get("top5"),
                   best_top1=best["top1"] if best["top1"] >= 0 else None, best_top5=best.get("top5"),
                   best_step=best.get("step"), checkpoint=str(ckpts.last) if ckpts.last else None,
                   best=os.path.join(out_dir, "best.pt"), **(extra_log or {}))
    log.write(**summary)
    log.close()
    if dist.is_main():
        msg = f"{prog}: done: {step} steps"
        if summary["final_top1"] is not None:
            msg += (f"; val top-1 {summary['final_top1']:.2f}% (top-5 {summary['final_top5']:.2f}%), "
                    f"best {summary['best_top1']:.2f}% at step {summary['best_step']}")
        print(msg + f"; logs and checkpoints in {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
