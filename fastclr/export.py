"""Export a fastclr backbone, as a torchvision ResNet state_dict where the architecture allows.

    python -m fastclr.export runs/r50/ckpt_00500000.pt r50_backbone.pt
    python -m fastclr.export weights.pt out.pt --depth 50 --width 1 --sk-ratio 0   # bare state_dict

fastclr's module names are torchvision's, so a width-1, non-SK, ImageNet-stem ResNet-18/34/50/101/152
backbone state_dict *is* a torchvision ``resnet{depth}`` state_dict without ``fc``. Load it with::

    m = torchvision.models.resnet50()
    m.fc = torch.nn.Identity()                 # features h [B, 2048], as fastclr's backbone
    m.load_state_dict(torch.load("r50_backbone.pt", weights_only=True))

(or keep a classifier: ``m.load_state_dict(sd, strict=False)`` leaves ``fc`` at its random init).
Anything else (selective kernels, width 2x/3x, cifar_stem, depth 10 or 200, base channels other than
64) has no torchvision counterpart: the same file then holds a fastclr backbone state_dict, and the CLI
prints how to load it.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

from fastclr import checkpoint as ckpt
from fastclr.models import build_backbone, model_name, parse_model_name
from fastclr.runtime import EXIT_BAD_INPUT, UserError
from loaders.sources.files import atomic_write

TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


def torchvision_incompatibility(depth: int, width: int, sk_ratio: float, cifar_stem: bool = False,
                                base_channels: int = 64, stem_stride: int = 1) -> str | None:
    """Why this architecture has no torchvision resnet counterpart, or None if it has one."""
    reasons = []
    if sk_ratio > 0:
        reasons.append("selective kernels (sk_ratio > 0)")
    if width != 1:
        reasons.append(f"width {width}x")
    if cifar_stem:
        reasons.append("cifar_stem" + (f" at stride {stem_stride}" if stem_stride != 1 else ""))
    if base_channels != 64:
        reasons.append(f"{base_channels} base channels")
    if depth not in TORCHVISION_DEPTHS:
        reasons.append(f"depth {depth}")
    return ", ".join(reasons) or None


def _unwrap_key(key: str) -> str:
    """'module._orig_mod.backbone.conv1.weight' -> 'backbone.conv1.weight' (any order, any depth)."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def export_backbone(model_or_state_dict, depth: int, width: int = 1, sk_ratio: float = 0.0,
                    cifar_stem: bool = False, base_channels: int = 64, stem_stride: int = 1) -> dict[str, torch.Tensor]:
    """Backbone state_dict out of a SimCLRModel / backbone (module or state_dict), checked.

    Accepts ``backbone.*`` keys (a SimCLRModel; head keys are dropped) or bare backbone keys, with
    or without DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes. The result is checked
    against ``build_backbone(depth, width, sk_ratio, cifar_stem)`` (built on the meta device, so free)
    and raises ValueError on any missing / unexpected key or shape mismatch. For torchvision-
    compatible architectures (see :func:`torchvision_incompatibility`) the keys are exactly
    torchvision's minus ``fc.*``. Tensors are detached and contiguous, on their original device.
    """
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else dict(model_or_state_dict)
    sd = {_unwrap_key(k): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    with torch.device("meta"):
        ref = build_backbone(depth, width, sk_ratio, cifar_stem, base_channels=base_channels,
                             stem_stride=stem_stride).state_dict()
    name = (model_name(depth, width, sk_ratio) + ("_cifar" if cifar_stem else "")
            + (f"_c{base_channels}" if base_channels != 64 else ""))
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    if missing or unexpected:
        raise ValueError(f"weights do not match {name}: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    for k, v in ref.items():
        if not isinstance(sd[k], torch.Tensor) or sd[k].shape != v.shape:
            got = tuple(sd[k].shape) if isinstance(sd[k], torch.Tensor) else type(sd[k]).__name__
            raise ValueError(f"weights do not match {name}: {k} is {got}, expected {tuple(v.shape)}")
    # channels_last weights would be saved with their strides; torchvision expects plain layout.
    return {k: sd[k].detach().contiguous() for k in ref}


def _load(path: str):
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    try:
        return ckpt.read(path)
    except ckpt.UnusableCheckpoint as e:  # names the file and says why, in one line
        raise UserError(str(e)) from None


def _arch(args, config: dict) -> dict:
    """depth/width/sk_ratio/cifar_stem/base_channels/stem_stride: flags override the checkpoint's
    config['model'], where a non-empty preset ``name`` (r50_1x_sk0, ...) sets depth/width/sk_ratio, as in
    training."""
    arch = {k: config.get(k) for k in ("depth", "width", "sk_ratio", "cifar_stem", "base_channels", "stem_stride")}
    if isinstance(config.get("name"), str) and config["name"]:
        try:
            arch.update(parse_model_name(config["name"]))
        except ValueError as e:
            raise UserError(str(e)) from None
    for k in arch:
        if getattr(args, k) is not None:
            arch[k] = getattr(args, k)
    if arch["depth"] is None:
        raise UserError("no architecture: the file has no config['model'] section; pass --depth (and --width, "
                        "--sk-ratio, --cifar-stem if not the defaults 1, 0, off)")
    return {"depth": int(arch["depth"]), "width": int(arch["width"] or 1),
            "sk_ratio": float(arch["sk_ratio"] or 0.0), "cifar_stem": bool(arch["cifar_stem"]),
            "base_channels": int(arch["base_channels"] or 64), "stem_stride": int(arch["stem_stride"] or 1)}


def _save(obj, path: str) -> None:
    """Atomic: a crash never leaves a half-written OUT behind."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise UserError(f"output folder does not exist: {out_dir}")
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastclr.export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Save the backbone of a fastclr checkpoint for use outside fastclr.\n\n"
        "Width-1, non-SK ResNet-18/34/50/101/152 (ImageNet stem) -> a torchvision resnet state_dict\n"
        "without fc. Load it with:\n"
        "    m = torchvision.models.resnet50(); m.fc = torch.nn.Identity()\n"
        "    m.load_state_dict(torch.load('OUT.pt', weights_only=True))\n"
        "SK, 2x/3x, cifar_stem, depth-10/200 or other than 64 base channels have no torchvision twin:\n"
        "OUT.pt then holds a fastclr backbone state_dict, and the command prints the build_backbone(...)\n"
        "call that loads it.",
        epilog="examples:\n"
        "  python -m fastclr.export runs/r50/ckpt_00500000.pt r50.pt\n"
        "  python -m fastclr.export runs/r152/ckpt_00500000.pt r152_3x_sk1.pt  # fastclr format, see message\n"
        "  python -m fastclr.export weights.pt r18.pt --depth 18             # bare state_dict\n"
        "exit status: 0 saved; 2 bad input (missing file, not a checkpoint, weights not matching the architecture)",
    )
    p.add_argument("checkpoint", help="fastclr checkpoint (dict with 'model' state_dict and 'config'), "
                   "or a bare SimCLRModel / backbone state_dict")
    p.add_argument("out", help="where to write the backbone state_dict (.pt)")
    g = p.add_argument_group("architecture (read from the checkpoint's 'arch' or config['model']; flags override "
                             "it)")
    g.add_argument("--depth", type=int, default=None, help="10, 18, 34, 50, 101, 152 or 200")
    g.add_argument("--width", type=int, default=None, help="width multiplier 1, 2 or 3 (default 1)")
    g.add_argument("--sk-ratio", dest="sk_ratio", type=float, default=None,
                   help="selective-kernel ratio: 0 (default) or 0.0625 (the release's sk1)")
    g.add_argument("--cifar-stem", dest="cifar_stem", action="store_true", default=None,
                   help="the model uses the 3x3 stem without max-pool")
    g.add_argument("--base-channels", dest="base_channels", type=int, default=None,
                   help="channels of the first group (default 64)")
    g.add_argument("--stem-stride", dest="stem_stride", type=int, choices=(1, 2), default=None,
                   help="stride of the cifar stem's conv (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        obj = _load(args.checkpoint)
        if not isinstance(obj, dict):
            raise UserError(f"{args.checkpoint} holds a {type(obj).__name__}, not a checkpoint dict or state_dict")
        if "model" in obj and isinstance(obj["model"], dict):
            state_dict = obj["model"]
            config = obj.get("config")
            config = config.get("model") if isinstance(config, dict) else None
            config = config if isinstance(config, dict) else {}
            # A fine-tuned / distilled / linear-eval checkpoint records the network its weights were built
            # as in 'arch'; its config['model'] is the preset's when --ckpt or --student_ckpt brought them.
            if isinstance(obj.get("arch"), dict) and "depth" in obj["arch"]:
                config = {**obj["arch"], "name": ""}
        elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state_dict, config = obj, {}
        else:
            raise UserError(f"{args.checkpoint} is neither a fastclr checkpoint (no 'model' state_dict) "
                            f"nor a state_dict (keys: {list(obj)[:5]})")
        arch = _arch(args, config)
        try:
            sd = export_backbone(state_dict, **arch)
        except ValueError as e:
            raise UserError(str(e)) from None
        _save(sd, args.out)
    except UserError as e:
        print(f"fastclr.export: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    n = sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    if config.get("tf_maxpool"):
        print("fastclr.export: warning: this model pads its stem max-pool as TF does (a converted release); "
              "torchvision's pads (1, 1) where TF pads (0, 1), so its features differ from TF's. "
              "Exact: fastclr.models.build_backbone(..., tf_maxpool=True)", file=sys.stderr)
    why = torchvision_incompatibility(**arch)
    if why is None:
        print(f"saved torchvision resnet{arch['depth']} state_dict without fc ({n / 1e6:.1f}M params) to {args.out}; "
              f"load: m = torchvision.models.resnet{arch['depth']}(); m.fc = torch.nn.Identity(); "
              f"m.load_state_dict(torch.load({args.out!r}, weights_only=True))")
    else:
        call = (f"depth={arch['depth']}, width={arch['width']}, sk_ratio={arch['sk_ratio']}"
                + (", cifar_stem=True" if arch["cifar_stem"] else "")
                + (f", base_channels={arch['base_channels']}" if arch["base_channels"] != 64 else "")
                + (f", stem_stride={arch['stem_stride']}" if arch["stem_stride"] != 1 else ""))
        print(f"not torchvision-compatible ({why}): saved a fastclr backbone state_dict ({n / 1e6:.1f}M params) "
              f"to {args.out}; load: fastclr.models.build_backbone({call})"
              f".load_state_dict(torch.load({args.out!r}, weights_only=True))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
