"""The configs of every entry point (pretrain, finetune, distill, linear_eval): typed dataclasses in
sections (``--section.key=value``), each field with its default, a help line and, where it matters,
choices or a range. The parser is loaders.options (re-exported here: ``config.parse``,
``config.from_dict``, ...); the named presets are in fastclr.presets.

    cfg = parse(PretrainConfig, sys.argv[1:], presets.PRETRAIN, prog="pretrain.py")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from loaders.config import DataConfig
from loaders.options import (ConfigError, HelpRequested, apply_preset, from_dict, get_value,  # noqa: F401
                             help_text, keys, option, parse, parse_into, save_json, set_value, to_dict)


# ----------------------------------------------------------------------------- sections
LARS = ("optim.optimizer", ("lars",))
# In distill.py the labelled subset only serves the cross-entropy term (finetune.py has no distill section).
ALPHA = ("distill.alpha", lambda v: v > 0, " > 0")
def _architecture_applies(cfg) -> Optional[str]:
    """Whether the model.* architecture options build the network of this command: not where a
    checkpoint brings the architecture (finetune/linear_eval --ckpt, distill --student_ckpt or
    distill.student=teacher) or where there is no network (linear_eval --raw_pixels=true)."""
    if getattr(cfg, "raw_pixels", False):
        return "does nothing with --raw_pixels=true (no network)"
    ckpt = getattr(cfg, "ckpt", None)
    if ckpt and ckpt.lower() != "none":
        return "does nothing with --ckpt: the architecture is the checkpoint's"
    if getattr(cfg, "student_ckpt", ""):
        return "does nothing with --student_ckpt: the student's architecture is that checkpoint's"
    d = getattr(cfg, "distill", None)
    if d is not None and d.student == "teacher":
        return "does nothing with distill.student=teacher: the student is the teacher's architecture"
    return None


ARCH = _architecture_applies


def _cifar_stem_applies(cfg) -> Optional[str]:
    why = _architecture_applies(cfg)
    if why is None and not cfg.model.cifar_stem:
        return "applies only with --model.cifar_stem=true (the ImageNet stem has its own strides)"
    return why


@dataclass
class ModelConfig:
    name: str = option("", "model preset (r50_1x_sk0, r152_3x_sk1, ...): sets depth/width/sk_ratio; empty = use "
                       "them", applies=ARCH)
    depth: int = option(50, "ResNet depth (10: one basic block per group, for small images on a CPU)",
                        (10, 18, 34, 50, 101, 152, 200), applies=ARCH)
    width: int = option(1, "width multiplier (4: SimCLRv1's ResNet-50 4x)", (1, 2, 3, 4), applies=ARCH)
    sk_ratio: float = option(0.0, "selective kernels: 0 (off) or 0.0625 (SimCLRv2 SK)", ge=0, lt=1, applies=ARCH)
    cifar_stem: bool = option(False, "3x3 stride-1 stem without max-pool, for 32px images", applies=ARCH)
    stem_stride: int = option(1, "stride of the cifar stem's conv (2: half the resolution after the stem, a quarter "
                              "of the compute)", (1, 2), applies=_cifar_stem_applies)
    base_channels: int = option(64, "channels of the first ResNet group, doubled by each next one and times width "
                                "(64: the paper's ResNets; 32 or 16: small networks for CPU runs)", ge=1,
                                applies=ARCH)
    tf_maxpool: bool = option(False, "pad the stem's max-pool as TF 'SAME' does (0 before, 1 after on even sizes) "
                              "instead of torchvision's (1, 1): set by fastclr.zoo for converted TF models",
                              applies=ARCH)
    num_proj_layers: int = option(3, "projection head layers (SimCLRv2: 3; 0: none, z = h)", ge=0, applies=ARCH)
    proj_out_dim: int = option(128, "projection output dimension", ge=1, applies=ARCH)
    channels_last: bool = option(True, "run the model in channels_last memory format")
    sync_bn: bool = option(True, "global BatchNorm across ranks (SyncBatchNorm) when distributed")
    compile: Optional[bool] = option(None, "torch.compile the model (and LARS's step): none = auto (on a GPU yes, on "
                                     "the CPU no: compiling costs more there than it saves), true or false")


@dataclass
class ClassifierModelConfig(ModelConfig):
    """The model section of fine-tuning, distillation and linear evaluation: where the classifier sits."""
    ft_proj_selector: int = option(1, "fine-tune from the output of head layer k (0 = backbone, -1 = last)", ge=-1)


@dataclass
class OptimConfig:
    optimizer: str = option("lars", "optimizer", ("lars", "sgd", "adamw"))
    lr: Optional[float] = option(None, "absolute learning rate; none = base_lr scaled by lr_scaling", gt=0)
    base_lr: float = option(0.075, "base learning rate before batch scaling (sqrt: 0.075, linear: 0.3)", gt=0)
    lr_scaling: str = option("sqrt", "lr = base_lr*sqrt(B) or base_lr*B/256 (B = global batch)", ("sqrt", "linear"))
    weight_decay: float = option(1e-4, "weight decay (BN and bias excluded)", ge=0)
    momentum: float = option(0.9, "momentum", ge=0, lt=1)
    eta: float = option(0.001, "LARS trust coefficient", gt=0, applies=LARS)
    lars_mode: str = option("tf", "tf: official TF LARS; torch: common PyTorch variant", ("tf", "torch"), applies=LARS)
    warmup_epochs: float = option(10.0, "linear warmup epochs", ge=0)
    epochs: float = option(800, "training epochs: the length of the warmup + cosine schedule (a fraction of an "
                           "epoch allowed); run.max_steps may stop the run earlier", gt=0)
    global_batch_size: int = option(4096, "images per step over all ranks (per-rank batch = this / world)", ge=1)
    grad_accum: int = option(1, "gradient accumulation steps (per-rank batch = global / world / accum)", ge=1)


@dataclass
class LossConfig:
    temperature: float = option(0.1, "NT-Xent temperature", gt=0)
    chunk_size: Optional[int] = option(None, "memory-lean NT-Xent column chunk; none = automatic, 0 = dense", ge=0)
    queue_size: int = option(0, "memory queue negatives (0 = off; paper: 65536)", ge=0)
    queue_momentum: float = option(0.999, "EMA momentum of the queue encoder", ge=0, le=1,
                                   applies=("loss.queue_size", lambda v: v > 0, " > 0"))


@dataclass
class BaseRunConfig:
    """The ``run`` fields every entry point shares (pretrain's RunConfig, finetune/distill/linear_eval's
    TrainRunConfig add theirs and override the defaults that differ)."""
    out_dir: str = option("runs/pretrain", "run directory: config.json, log.jsonl, checkpoints")
    seed: int = option(0, "global seed (each rank derives its own)", ge=0)
    device: str = option("auto", "auto (cuda if available), cuda or cpu", ("auto", "cuda", "cpu"))
    precision: str = option("auto", "auto (bf16 on GPU; on CPU bf16 where it is native and the maps after the "
                           "stem are >= 16 px, else fp32), fp32, bf16 or fp16", ("auto", "fp32", "bf16", "fp16"))
    max_steps: Optional[int] = option(None, "stop after this many steps (none = all epochs)", ge=1)
    log_every: int = option(20, "steps between logs (the only host syncs of the loop)", ge=1)
    tensorboard: bool = option(False, "also write every logged number as TensorBoard scalars (train/loss, eval/top1, "
                               "...) beside log.jsonl; needs fastclr[tensorboard]; tensorboard --logdir runs")
    ckpt_every: int = option(1000, "steps between checkpoints (and one at the end)", ge=1)
    keep_last: int = option(3, "checkpoints kept (0 = all)", ge=0)
    resume: str = option("", "'' = fresh run, 'auto' = newest valid checkpoint in out_dir, or a path")
    allow_config_change: bool = option(False, "resume although options that change the run's trajectory differ from "
                                       "the checkpoint's (the log records a new segment; both configs are kept)",
                                       applies=("run.resume", bool, " set"))
    stop_signals: str = option("TERM,INT,USR1", "signals that stop the run after the step in flight with a "
                               "checkpoint (exit status 3); comma list of TERM, INT, USR1, USR2, HUP; '' = none")
    overwrite: bool = option(False, "a fresh run may delete the checkpoints (and best.pt, log.jsonl) another "
                             "run left in out_dir; without it that is an error")
    deterministic: bool = option(False, "deterministic algorithms (CPU exact-resume tests)")
    cuda_graphs: Optional[bool] = option(None, "capture the whole step (forward, loss, backward, LARS) as one CUDA "
                                         "graph and replay it: none = auto (on where supported: one GPU, LARS, "
                                         "no grad accumulation, queue or fp16), true or false")
    progress: bool = option(True, "show a progress bar")


ONLINE = ("run.knn_every", lambda v: v > 0, " > 0")
FINAL_KNN = ("run.knn_eval", bool, "=true")


def _some_knn_applies(cfg) -> Optional[str]:
    """The k-NN bank serves the final check and the online one: it does nothing when both are off."""
    if not cfg.run.knn_eval and not cfg.run.knn_every > 0:
        return "does nothing with run.knn_eval=false and run.knn_every=0 (no k-NN runs)"
    return None


@dataclass
class RunConfig(BaseRunConfig):
    knn_eval: bool = option(True, "k-NN top-1 on the val set at the end (trained vs random init vs raw pixels)")
    val_path: str = option("", "labelled val ImageFolder (root/<class>/<image>) for the k-NN checks (empty: the "
                           "demo val set when data.path is empty, else no k-NN)")
    knn_bank: str = option("train", "where the k-NN's labelled feature bank comes from: train = data.path's class "
                           "folders; val = a class-balanced part of run.val_path, scored on the rest (for data "
                           "without labels, or a .beton)", ("train", "val"), applies=_some_knn_applies)
    knn_train_size: int = option(10000, "k-NN at the end: images in the feature bank (class-balanced subset)", ge=1,
                                applies=FINAL_KNN)
    knn_val_size: int = option(2000, "k-NN at the end: val images scored", ge=1, applies=FINAL_KNN)
    knn_every: float = option(1.0, "epochs between online k-NN checks while pretraining runs (eval records in "
                              "log.jsonl, TensorBoard and fastclr.plot; 0 = none)", ge=0)
    knn_online_train_size: int = option(2000, "online k-NN: images in the feature bank", ge=1, applies=ONLINE)
    knn_online_val_size: int = option(1000, "online k-NN: val images scored", ge=1, applies=ONLINE)
    probe_labels_per_class: int = option(60, "linear probe at the end: labelled bank images per class (60 = "
                                         "1 % of Fashion-MNIST's train labels; 0 = no probe)", ge=0)


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------- fine-tune, distill, linear eval
@dataclass
class SubsetConfig:
    list: str = option("", "official label subset: one file name per line (1percent.txt); '' = none",
                       applies=ALPHA)
    fraction: Optional[float] = option(
        None, "seeded class-balanced label fraction, >= 1 per class; none = off", gt=0, le=1, applies=ALPHA)
    seed: int = option(0, "seed of the fraction draw", ge=0, applies=("subset.fraction", lambda v: v is not None,
                                                                      " set"))


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
    min_steps: int = option(0, "at least this many optimizer steps: on a labelled set too small for optim.epochs "
                               "to make them, the epochs (and warmup_epochs, run.eval_every) are stretched by the "
                               "same factor, and the run says so; 0 = optim.epochs as given", ge=0)
    probe_steps: int = option(0, "LP-FT: first fit the classifier as a linear probe (logistic regression, L-BFGS "
                                 "for at most this many iterations) on the frozen features of the labelled images "
                                 "(centre crop), then fine-tune everything from it; 0 = fine-tune from the "
                                 "initialised classifier (the paper)", ge=0)
    frozen_bn: bool = option(False, "BatchNorm stays in eval mode while fine-tuning: the pretrained running "
                                    "statistics normalise and are not updated (scale and shift still learn); "
                                    "False = batch statistics, as TF; needs a pretrained --ckpt",
                             applies=("ckpt", lambda v: v.lower() != "none", " != none (random init has no "
                                                                             "statistics to keep)"))
    data: DataConfig = field(default_factory=lambda: DataConfig(augment="finetune"))
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        base_lr=0.005, lr_scaling="sqrt", weight_decay=0.0, warmup_epochs=0.0, epochs=60,
        global_batch_size=1024))
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    run: TrainRunConfig = field(default_factory=TrainRunConfig)


@dataclass
class DistillSection:
    temperature: float = option(1.0, "temperature tau (paper: 1.0 big-to-small, 0.1 self-distillation)", gt=0)
    alpha: float = option(0.0, "weight of the cross-entropy on the labelled subset (0 = labels unused)",
                          ge=0, le=1)
    student: str = option("model", "student architecture: model.* section, or the teacher's (self-distillation)",
                          ("model", "teacher"))
    cache_teacher: bool = option(False, "compute the teacher's logits once (needs data.augment=eval)")
    teacher_precision: str = option("auto", "teacher forward precision: auto = as run.precision's auto",
                                    ("auto", "fp32", "bf16", "fp16"))


@dataclass
class DistillConfig:
    teacher: str = option("", "fine-tuned teacher: finetune/distill run dir (its best.pt) or checkpoint file")
    student_ckpt: str = option("", "optional pretrain.py checkpoint (or run dir) the student starts from")
    zero_init_head: bool = option(False, "zero-initialize the student's classifier")
    distill: DistillSection = field(default_factory=DistillSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(augment="finetune"))
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    # SimCLRv2 distills with the pretraining schedule (LARS, sqrt-scaled lr, wd, batch 4096), 400 epochs.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        base_lr=0.075, lr_scaling="sqrt", weight_decay=1e-4, warmup_epochs=10, epochs=400,
        global_batch_size=4096))
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    run: TrainRunConfig = field(default_factory=lambda: TrainRunConfig(out_dir="runs/distill"))


@dataclass
class LinearEvalConfig:
    ckpt: str = option("", "pretrain.py checkpoint or run dir (or a finetune/distill checkpoint: its backbone)")
    fast: bool = option(True, "extract features once (centre crop) and train on them; false = network every step")
    raw_pixels: bool = option(False, "no network: logistic regression on the flattened pixels (fast path)")
    standardize: bool = option(False, "z-score features with train mean/std (fast path; folded into the layer)")
    data: DataConfig = field(default_factory=lambda: DataConfig(augment="finetune"))
    model: ClassifierModelConfig = field(default_factory=lambda: ClassifierModelConfig(ft_proj_selector=0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        optimizer="sgd", base_lr=0.1, lr_scaling="linear", weight_decay=1e-6, momentum=0.9, warmup_epochs=0.0,
        epochs=90, global_batch_size=4096))
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    run: TrainRunConfig = field(default_factory=lambda: TrainRunConfig(out_dir="runs/linear_eval"))
