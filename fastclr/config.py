"""Typed dataclass configs with nested sections and ``--section.key=value`` overrides: the config of
every entry point (pretrain, finetune, distill, linear_eval) and the parser. Presets: fastclr.presets.

    cfg = parse(PretrainConfig, sys.argv[1:], presets.PRETRAIN, prog="pretrain.py")
    # argv: [PRESET] [--optim.lr=4.8] [--run.out_dir runs/x] [--help]

Rules (one-line errors for everything a user can get wrong):
* an unknown key is an error that suggests the closest field (``--optim.lrr`` -> ``--optim.lr``);
* values are converted to the field's declared type: int -> float allowed, ``none`` for Optional,
  bools as true/false/1/0/yes/no, tuples as comma lists; a wrong type names the field and the type;
* fields with ``choices`` accept only those;
* presets only assign fields, through the same checked setter as the command line;
* derived values (the scaled learning rate, steps per epoch) are computed where used, never written
  back into the config: the JSON dump is exactly what the user asked for.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple  # noqa: F401  (Tuple: field types)

from loaders.common import LoaderConfig, bounds_text, option, out_of_bounds
from loaders.files import atomic_write_text


class ConfigError(ValueError):
    """A user error in the config or command line; its message is one line."""


# ----------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    name: str = option("", "model preset (r50_1x_sk0, r152_3x_sk1, ...): sets depth/width/sk_ratio; empty = use them")
    depth: int = option(50, "ResNet depth", (18, 34, 50, 101, 152, 200))
    width: int = option(1, "width multiplier", (1, 2, 3))
    sk_ratio: float = option(0.0, "selective kernels: 0 (off) or 0.0625 (SimCLRv2 SK)", ge=0, lt=1)
    cifar_stem: bool = option(False, "3x3 stride-1 stem without max-pool, for 32px images")
    num_proj_layers: int = option(3, "projection head layers (SimCLRv2: 3; 0: none, z = h)", ge=0)
    proj_out_dim: int = option(128, "projection output dimension", ge=1)
    ft_proj_selector: int = option(1, "fine-tune from the output of head layer k (0 = backbone, -1 = last)", ge=-1)
    channels_last: bool = option(True, "run the model in channels_last memory format")
    sync_bn: bool = option(True, "global BatchNorm across ranks (SyncBatchNorm) when distributed")
    compile: Optional[bool] = option(None, "torch.compile the model (and LARS's step): none = auto (on a GPU yes, on "
                                     "the CPU no: compiling costs more there than it saves), true or false")


@dataclass
class OptimConfig:
    optimizer: str = option("lars", "optimizer", ("lars", "sgd", "adamw"))
    lr: Optional[float] = option(None, "absolute learning rate; none = base_lr scaled by lr_scaling", gt=0)
    base_lr: float = option(0.075, "base learning rate before batch scaling (sqrt: 0.075, linear: 0.3)", gt=0)
    lr_scaling: str = option("sqrt", "lr = base_lr*sqrt(B) or base_lr*B/256 (B = global batch)", ("sqrt", "linear"))
    weight_decay: float = option(1e-4, "weight decay (BN and bias excluded)", ge=0)
    momentum: float = option(0.9, "momentum", ge=0, lt=1)
    eta: float = option(0.001, "LARS trust coefficient", gt=0)
    lars_mode: str = option("tf", "tf: official TF LARS; torch: common PyTorch variant", ("tf", "torch"))
    warmup_epochs: float = option(10.0, "linear warmup epochs", ge=0)
    epochs: int = option(800, "training epochs", ge=1)
    global_batch_size: int = option(4096, "images per step over all ranks (per-rank batch = this / world)", ge=1)
    grad_accum: int = option(1, "gradient accumulation steps (per-rank batch = global / world / accum)", ge=1)


@dataclass
class LossConfig:
    temperature: float = option(0.1, "NT-Xent temperature", gt=0)
    chunk_size: Optional[int] = option(None, "memory-lean NT-Xent column chunk; none = automatic, 0 = dense", ge=0)
    queue_size: int = option(0, "memory queue negatives (0 = off; paper: 65536)", ge=0)
    queue_momentum: float = option(0.999, "EMA momentum of the queue encoder", ge=0, le=1)


@dataclass
class BaseRunConfig:
    """The ``run`` fields every entry point shares (pretrain's RunConfig, finetune/distill/linear_eval's
    TrainRunConfig add theirs and override the defaults that differ)."""
    out_dir: str = option("runs/pretrain", "run directory: config.json, log.jsonl, checkpoints")
    seed: int = option(0, "global seed (each rank derives its own)", ge=0)
    device: str = option("auto", "auto (cuda if available), cuda or cpu", ("auto", "cuda", "cpu"))
    precision: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16", ("auto", "fp32", "bf16", "fp16"))
    max_steps: Optional[int] = option(None, "stop after this many steps (none = all epochs)", ge=0)
    log_every: int = option(20, "steps between logs (the only host syncs of the loop)", ge=1)
    tensorboard: bool = option(False, "also write every logged number as TensorBoard scalars (train/loss, eval/top1, "
                               "...) beside log.jsonl; needs fastclr[tensorboard]; tensorboard --logdir runs")
    ckpt_every: int = option(1000, "steps between checkpoints (and one at the end)", ge=1)
    keep_last: int = option(3, "checkpoints kept (0 = all)", ge=0)
    resume: str = option("", "'' = fresh run, 'auto' = newest valid checkpoint in out_dir, or a path")
    overwrite: bool = option(False, "a fresh run may delete the checkpoints (and best.pt, log.jsonl) another "
                             "run left in out_dir; without it that is an error")
    deterministic: bool = option(False, "deterministic algorithms (CPU exact-resume tests)")
    cuda_graphs: Optional[bool] = option(None, "capture the whole step (forward, loss, backward, LARS) as one CUDA "
                                         "graph and replay it: none = auto (on where supported: one GPU, LARS, "
                                         "no grad accumulation, queue or fp16), true or false")
    progress: bool = option(True, "show a progress bar")


@dataclass
class RunConfig(BaseRunConfig):
    knn_eval: bool = option(True, "k-NN top-1 on the val set at the end (trained vs random init)")
    val_path: str = option("", "val ImageFolder for k-NN (empty: the demo val set when data.path is empty)")
    knn_train_size: int = option(10000, "k-NN: train images in the feature bank (class-balanced subset)", ge=1)
    knn_val_size: int = option(2000, "k-NN: val images scored", ge=1)
    probe_labels_per_class: int = option(60, "linear probe at the end: labelled bank images per class (60 = "
                                         "1 % of Fashion-MNIST's train labels; 0 = no probe)", ge=0)


@dataclass
class PretrainConfig:
    data: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------- fine-tune, distill, linear eval
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
    model: ModelConfig = field(default_factory=ModelConfig)
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
    teacher_precision: str = option("auto", "teacher forward precision: auto = bf16 on GPU, fp32 on CPU",
                                    ("auto", "fp32", "bf16", "fp16"))


@dataclass
class DistillConfig:
    teacher: str = option("", "fine-tuned teacher: finetune/distill run dir (its best.pt) or checkpoint file")
    student_ckpt: str = option("", "optional pretrain.py checkpoint (or run dir) the student starts from")
    zero_init_head: bool = option(False, "zero-initialize the student's classifier")
    distill: DistillSection = field(default_factory=DistillSection)
    data: LoaderConfig = field(default_factory=lambda: LoaderConfig(augment="finetune"))
    model: ModelConfig = field(default_factory=ModelConfig)
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
    data: LoaderConfig = field(default_factory=lambda: LoaderConfig(augment="finetune"))
    model: ModelConfig = field(default_factory=lambda: ModelConfig(ft_proj_selector=0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        optimizer="sgd", base_lr=0.1, lr_scaling="linear", weight_decay=1e-6, momentum=0.9, warmup_epochs=0.0,
        epochs=90, global_batch_size=4096))
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    run: TrainRunConfig = field(default_factory=lambda: TrainRunConfig(out_dir="runs/linear_eval"))


# ----------------------------------------------------------------------------- machinery
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or none"
    if origin in (tuple, Tuple):
        return "comma list of " + ", ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    """Convert ``value`` (a CLI string or a Python value from a preset/JSON) to type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] or X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        try:
            return _coerce(value, args[0], key)
        except ConfigError:
            raise ConfigError(f"--{key}: expected {_type_name(tp)}, got {value!r}") from None
    if origin in (tuple, Tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        args = typing.get_args(tp)
        if len(items) != len(args):
            raise ConfigError(f"--{key}: expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(items, args))
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)  # int -> float allowed
            if not math.isfinite(v):
                raise ValueError
            return v
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{key}: expected {'a finite ' if tp is float else ''}{_type_name(tp)}, "
                          f"got {value!r}") from None
    raise ConfigError(f"--{key}: unsupported field type {tp}")


def _fields(obj_or_cls, prefix: str = "") -> List[Tuple[str, dataclasses.Field, Any]]:
    """Flattened (dotted key, field, type) for every leaf field."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, tp))
    return out


def keys(cfg_or_cls) -> List[str]:
    return [k for k, _, _ in _fields(cfg_or_cls)]


def set_value(cfg, key: str, value: Any) -> None:
    """Set dotted ``key`` on ``cfg`` with type coercion, choices and unknown-key checks."""
    table = {k: (f, tp) for k, f, tp in _fields(cfg)}
    if key not in table:
        close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.5)
        if not close:  # maybe the section was right but the leaf name was mistyped, or vice versa
            leaf = key.rsplit(".", 1)[-1]
            close = [k for k in table if k.rsplit(".", 1)[-1] == leaf][:1]
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for the list of options"
        raise ConfigError(f"unknown option --{key}{hint}")
    f, tp = table[key]
    v = _coerce(value, tp, key)
    choices = f.metadata.get("choices")
    if choices and v is not None and v not in choices:
        raise ConfigError(f"--{key}: {v!r} is not one of {', '.join(map(str, choices))}")
    bounds = f.metadata.get("bounds")
    if bounds and v is not None and any(out_of_bounds(x, bounds) for x in (v if isinstance(v, tuple) else (v,))):
        each = "each value " if isinstance(v, tuple) else ""
        raise ConfigError(f"--{key}: {each}must be {bounds_text(bounds)}, got {_fmt(v)}")
    obj = cfg
    *path, leaf = key.split(".")
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, leaf, v)


def get_value(cfg, key: str) -> Any:
    obj = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def apply_preset(cfg, name: str, presets: Dict[str, Dict[str, Any]]) -> None:
    if name not in presets:
        close = difflib.get_close_matches(name, list(presets), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (presets: {', '.join(sorted(presets))})")
    for k, v in presets[name].items():
        set_value(cfg, k, v)


def help_text(cls, presets: Dict[str, Dict[str, Any]], prog: str, description: str = "") -> str:
    lines = [f"usage: {prog} [PRESET] [--section.key=value ...]", ""]
    if description:
        lines += [description.strip(), ""]
    if presets:
        lines.append("presets (a preset only assigns fields; later --key=value overrides win):")
        for name, p in presets.items():
            lines.append(f"  {name:<24} {len(p)} fields, e.g. " + ", ".join(f"{k}={v}" for k, v in list(p.items())[:3]))
        lines.append("")
    lines.append("options (default in brackets):")
    default = cls()
    section = None
    for key, f, tp in _fields(cls):
        sec = key.split(".")[0] if "." in key else ""
        if sec != section:
            section = sec
            lines.append(f"  [{sec or 'general'}]")
        d = get_value(default, key)
        choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds")
        extra = f" {{{','.join(map(str, choices))}}}" if choices else ""
        extra += f" [{bounds_text(bounds)}]" if bounds else ""
        lines.append(f"    --{key}={_fmt(d)!s:<14} {f.metadata.get('help', '')} ({_type_name(tp)}){extra}")
    lines += ["", "Values: bools true/false/1/0, none for optional fields, tuples as a,b. "
              "Unknown options are errors."]
    return "\n".join(lines)


def _fmt(v):
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return v


class HelpRequested(Exception):
    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def parse_into(cfg, argv: List[str], presets: Dict[str, Dict[str, Any]], prog: str = "fastclr", description: str = ""):
    """Apply ``[PRESET] [--k=v | --k v ...]`` to ``cfg`` in place and return it.
    Raises HelpRequested(text) for -h/--help, ConfigError for bad input."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        raise HelpRequested(help_text(type(cfg), presets, prog, description))
    if argv and not argv[0].startswith("-"):
        apply_preset(cfg, argv.pop(0), presets)
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--") or a == "--":
            raise ConfigError(f"unexpected argument {a!r}: options look like --section.key=value "
                              f"(a preset name may only come first)")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        else:
            k = a[2:]
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{k}: missing value (write --{k}=VALUE)")
            v = argv[i + 1]
            i += 2
        set_value(cfg, k, v)
    return cfg


def parse(cls, argv: Optional[List[str]] = None, presets: Optional[Dict[str, Dict[str, Any]]] = None,
          prog: str = "fastclr", description: str = ""):
    """CLI entry: returns a config, or prints help / a one-line error and exits (0 / 2)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return parse_into(cls(), argv, presets or {}, prog, description)
    except HelpRequested as h:
        try:
            print(h.text, flush=True)
        except BrokenPipeError:  # `--help | head`: the reader left, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2)


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: Dict[str, Any], strict: bool = True):
    """Rebuild a config from ``to_dict`` output (e.g. a checkpoint's config). Unknown keys are errors
    when ``strict``, else ignored (reading a checkpoint written by another version)."""
    cfg = cls()
    flat = _flatten(d)
    known = set(keys(cls))
    for k, v in flat.items():
        if k not in known and not strict:
            continue
        set_value(cfg, k, v)
    return cfg


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def save_json(cfg, path: str | os.PathLike) -> None:
    """Write the resolved config atomically."""
    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
