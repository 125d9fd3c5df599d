"""The networks of SimCLRv2's steps 2 and 3 and of linear evaluation, and loading them from checkpoints.

A ``Classifier`` is the pretrained backbone, the first k layers of the projection head ("neck",
SimCLRv2 fine-tunes from the head's middle: k = 1) and a linear layer. Its architecture travels as an
``arch`` dict (``ARCH_KEYS`` + ``ft_proj_selector`` + ``num_classes``) inside every fine-tuned,
distilled or linear-eval checkpoint, so any of them can be reloaded, evaluated or become a teacher.
A ``LinearProbe`` is a Classifier whose features are frozen (BN in eval mode too).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastclr import checkpoint as ckpt
from fastclr import config as C
from fastclr.models import LinearHead, build_model, model_kwargs
from fastclr.runtime import UserError

# The format tag of a file written by ``python -m fastclr.zoo convert`` (a released TF model).
ZOO_FORMAT = "fastclr.zoo/1"
ARCH_KEYS = ("depth", "width", "sk_ratio", "cifar_stem", "num_proj_layers", "proj_out_dim", "tf_maxpool",
             "base_channels", "stem_stride")


class Classifier(nn.Module):
    """backbone -> the first k projection-head layers ("neck") -> linear classifier.

    ``features(x)`` [B, 3, H, W] -> [B, layer_dims[k]] is the pretrained head's
    ``head(h, return_layers=True)[k]``; ``forward(x)`` -> logits [B, num_classes].
    State dict keys: ``backbone.*``, ``neck.<j>.*`` (head layer j), ``fc.*``."""

    def __init__(self, backbone: nn.Module, neck: nn.Module, fc: nn.Module):
        super().__init__()
        self.backbone, self.neck, self.fc = backbone, neck, fc
        self.frozen_bn = False

    def freeze_bn(self) -> Classifier:
        """Keep every BatchNorm in eval mode from now on, even when the loop calls ``train()``: it
        normalises with the pretrained running statistics and does not update them, while its scale and
        shift still learn. For few-label fine-tuning, where a batch of a handful of images gives noisy
        batch statistics, and the running statistics of pretraining are already those the probe's
        features were computed with."""
        self.frozen_bn = True
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


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


# What a checkpoint written before a key existed means by its absence.
_ARCH_DEFAULTS = {"tf_maxpool": False, "base_channels": 64, "stem_stride": 1}


def full_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """``arch`` with the keys that older checkpoints lack filled in, so two arch dicts compare equal
    exactly when they build the same network."""
    return {**_ARCH_DEFAULTS, **arch}


def arch_of(model_cfg: C.ModelConfig, ft_proj_selector: int) -> dict[str, Any]:
    """The architecture fields of a ModelConfig (a preset name resolved) and where the classifier sits."""
    kw = model_kwargs(model_cfg)
    return {**{k: kw[k] for k in ARCH_KEYS}, "ft_proj_selector": ft_proj_selector}


def build_classifier(arch: dict[str, Any], num_classes: int,
                     pretrained: dict[str, torch.Tensor] | None = None, zero_init: bool = True) -> Classifier:
    """A Classifier of ``arch`` (ARCH_KEYS + ft_proj_selector). ``pretrained``: a SimCLRModel state_dict
    (pretrain checkpoint's ``model``) loaded, strictly, before the head is cut at layer k."""
    arch = full_arch(arch)
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


def load_checkpoint(path: str, what: str) -> tuple[str, dict[str, Any]]:
    """(file, state) of a checkpoint file, or of the newest usable one in a run directory; anything
    unusable is a one-line UserError naming ``what`` (the option it came from) and the file."""
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


def is_converted(state: dict) -> bool:
    """Whether a checkpoint was converted from a released TF model (fastclr.zoo)."""
    return state.get("format") == ZOO_FORMAT


def converted_classifier_state(state: dict) -> dict[str, torch.Tensor]:
    """The Classifier state_dict of a converted release: its backbone, the head layers below the one the
    classifier reads (``neck``) and the classifier (``fc``)."""
    k = int(state["arch"]["ft_proj_selector"])
    out = {key: v for key, v in state["model"].items() if key.startswith("backbone.")}
    for key, v in state["model"].items():
        m = re.match(r"head\.layers\.(\d+)\.(.+)$", key)
        if m and int(m.group(1)) < k:
            out[f"neck.{m.group(1)}.{m.group(2)}"] = v
    out.update({f"fc.{name}": v for name, v in state["classifier"].items()})
    return out


def load_pretrained(path: str) -> tuple[str, dict[str, torch.Tensor], C.ModelConfig]:
    """(file, SimCLRModel state_dict, the pretrain ModelConfig) of a pretrain.py checkpoint."""
    file, state = load_checkpoint(path, "--ckpt")
    if "arch" in state and not is_converted(state):
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
    file, state = load_checkpoint(str(p), "checkpoint")
    if "arch" not in state:
        if is_converted(state):
            raise UserError(f"{file} has no classifier (the release has none, or it reads the other encoder "
                            f"than the one converted): fine-tune it first (finetune.py --ckpt={file})")
        raise UserError(f"{file} is not a fine-tuned checkpoint (no 'arch'): give a finetune/distill run")
    model = build_classifier(state["arch"], int(state["arch"]["num_classes"]), zero_init=False)
    model.load_state_dict(converted_classifier_state(state) if is_converted(state) else state["model"])
    return file, model, state


def load_probe(ckpt_path: str, ft_proj_selector: int, num_classes: int, raw_pixels: bool = False,
               image_size: int = 0) -> tuple[LinearProbe, dict[str, Any], str]:
    """(a LinearProbe: frozen features and a fresh zero-initialized layer, arch, source) for linear
    evaluation: of a pretrain.py checkpoint (head cut at ``ft_proj_selector``), of a fine-tuned or
    distilled one (its backbone), or of the raw pixels (``raw_pixels``, images of ``image_size``)."""
    if raw_pixels:
        arch = {"raw_pixels": True, "num_classes": num_classes}
        dim = 3 * image_size ** 2
        probe = LinearProbe(RawPixels(), nn.Identity(), LinearHead(dim, num_classes, zero_init=True))
        return probe, arch, "raw pixels"
    if not ckpt_path:
        raise UserError("give --ckpt=PATH (a pretrain.py checkpoint or run dir), or --raw_pixels=true")
    file, state = load_checkpoint(ckpt_path, "--ckpt")
    if "arch" in state and not is_converted(state):  # a fine-tuned / distilled network: its backbone
        if ft_proj_selector != 0:
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
        arch = arch_of(pre, ft_proj_selector)
        net = build_classifier(arch, num_classes, state["model"], zero_init=True)
    arch["num_classes"] = num_classes
    return LinearProbe(net.backbone, net.neck, net.fc), arch, file


# ----------------------------------------------------------------------------- training a classifier
def fit_probe_head(model: Classifier, loader, device: torch.device, dtype: torch.dtype,
                   max_iter: int) -> dict[str, float]:
    """The first stage of LP-FT (linear probing, then fine-tuning; Kumar et al., ICLR 2022): fit
    ``model.fc`` as a logistic regression on the frozen features of ``loader`` (an eval loader over the
    labelled images: centre crop, BN in eval mode), so that fine-tuning starts from a classifier that
    already separates the classes instead of from zeros. With a handful of labels the gradients of a
    zero-initialised layer reach the backbone as noise for the first steps and move the pretrained
    features away before the layer has learned anything; a fitted layer makes the first updates small
    and informed.

    The fit is scikit-learn's default logistic regression: mean cross-entropy + |w|^2 / (2n) (C=1, the
    bias not penalised), full batch, L-BFGS for at most ``max_iter`` iterations from zeros. The penalty
    keeps the logits bounded on a separable handful of images (an unregularised fit grows them without
    end, and fine-tuning from such a layer diverges); L-BFGS needs no learning rate, where SGD with
    weight decay oscillates once lr * decay is large. Deterministic. Returns the fitted layer's loss and
    accuracy on those features."""
    from fastclr.metrics import extract

    was_training = model.training
    model.eval()
    with torch.no_grad():
        feats, labels = extract(model.features, loader, device, dtype)
    model.train(was_training)
    fc, n = model.fc, len(feats)
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.zero_()
    opt = torch.optim.LBFGS(fc.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def objective():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fc(feats), labels) + 0.5 / n * fc.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    with torch.no_grad():
        logits = fc(feats)
        return {"probe_loss": float(F.cross_entropy(logits, labels)),
                "probe_train_acc": float((logits.argmax(1) == labels).float().mean() * 100), "probe_images": n,
                "probe_weight_norm": float(fc.weight.norm())}


def cross_entropy(forward, batch):
    """loss_fn for the trainer: cross-entropy on the labels, and the batch's accuracy."""
    logits = forward(batch.views[0]).float()
    return F.cross_entropy(logits, batch.labels), {"train_acc": (logits.argmax(1) == batch.labels).float().mean()}



def train_classifier(prog: str, cfg, run, model: nn.Module, arch: dict[str, Any], classes: list[str],
                     loss_fn, loader, vloader, make_optimizer, extra_log: dict[str, Any] | None = None,
                     export_weights=None, typed_cfg=None) -> int:
    """The loop of finetune.py, distill.py and linear_eval.py: the trainer, plus val top-1/top-5
    every run.eval_every epochs and at the end (``vloader`` on rank 0, None elsewhere), best.pt when
    top-1 improves (the last weights when there is no val set), and checkpoints that carry ``arch``
    and ``classes`` so any of them reloads as a classifier."""
    from fastclr import dist
    from fastclr.metrics import evaluate
    from fastclr.trainer import Task, Trainer

    best: dict[str, Any] = {"top1": -1.0}
    last: dict[str, Any] = {}
    best_path = os.path.join(run.out_dir, "best.pt")

    def fields() -> dict[str, Any]:
        return {"arch": arch, "classes": classes, "best": dict(best)}

    def load_fields(path: str, state: dict) -> None:
        if full_arch(state.get("arch") or {}) != full_arch(arch):
            raise UserError(f"{path} holds another architecture ({state.get('arch')}), not {arch}")
        best.update(state.get("best", {}))

    def on_epoch_end(epochs_done: int, step: int) -> None:
        if vloader is not None:
            metrics = evaluate(trainer.model, vloader, run.device, run.dtype)
            trainer.log.write(event="eval", step=step, epochs_done=epochs_done, **metrics)
            improved = metrics["top1"] > best["top1"]
            if improved:
                best.update(metrics, step=step, epoch=epochs_done)
                ckpt.save(best_path, {**trainer.weights_state(), "val": metrics})
            trainer.say(f"{prog}: step {step} epoch {epochs_done}: val top-1 {metrics['top1']:.2f}% "
                              f"top-5 {metrics['top5']:.2f}%{'  (best)' if improved else ''}")
            last.clear()
            last.update(metrics)
        dist.barrier()

    task = Task(model=model, loss_fn=loss_fn, make_optimizer=make_optimizer, checkpoint_fields=fields,
                load_fields=load_fields, on_epoch_end=on_epoch_end if run.val_path else None,
                eval_every=cfg.run.eval_every, export_weights=export_weights)
    trainer = Trainer(prog, cfg, run, task, loader, typed_cfg=typed_cfg)
    summary = trainer.fit()
    if dist.is_main() and not os.path.exists(best_path):
        ckpt.save(best_path, trainer.weights_state())  # no val set: the last weights
    summary = dict(step=summary["step"], final_top1=last.get("top1"), final_top5=last.get("top5"),
                   best_top1=best["top1"] if best["top1"] >= 0 else None, best_top5=best.get("top5"),
                   best_step=best.get("step"), checkpoint=summary["checkpoint"], best=best_path,
                   **(extra_log or {}))
    message = f"{summary['step']} steps"
    if summary["final_top1"] is not None:
        message += (f"; val top-1 {summary['final_top1']:.2f}% (top-5 {summary['final_top5']:.2f}%), "
                    f"best {summary['best_top1']:.2f}% at step {summary['best_step']}")
    return trainer.finish(summary, message)
