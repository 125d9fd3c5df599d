"""A released TF1 checkpoint -> one fastclr file that every command takes.

The file (``torch.load(..., weights_only=True)``) holds:

* ``model``: the SimCLRModel state_dict (backbone + projection head), ``config.model``: its
  architecture, with ``tf_maxpool`` on (the stem's max-pool padded as TF pads it) so the network computes
  what TF computed. finetune.py, linear_eval.py, distill.py (``--student_ckpt``) and fastclr.export take
  it as they take a pretrain.py checkpoint.
* ``classifier`` and ``arch`` when the release has one: the linear layer and the layer it reads
  (``arch["ft_proj_selector"]``: 0 = backbone, k = projection-head layer k), ``arch["num_classes"]``.
  distill.py (``--teacher``) and ``fastclr.zoo eval / predict`` take it as a fine-tuned classifier.
* ``zoo``: where it came from (release, kind, checkpoint, step), which encoder (online / EMA), what
  decided the classifier's input layer, the TF and fastclr versions, the variables not converted.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import fastclr
from fastclr.classifier import ZOO_FORMAT
from fastclr.models import model_name, parse_model_name
from fastclr.runtime import UserError
from fastclr.zoo import catalog, graph, tf1

HEAD_INPUTS = ("backbone", "head1", "head2", "head3")


def layer_of(head_input: str) -> int:
    """``--classifier-input`` -> the layer index (backbone = 0, headK = K)."""
    return 0 if head_input == "backbone" else int(head_input[4:])


def _name_from_folder(folder: Path) -> Tuple[Optional[str], Optional[str]]:
    """(architecture name the folder states, release kind of its parent) or Nones: ``.../finetuned_1pct/
    r50_1x_sk0`` -> (r50_1x_sk0, finetuned_1pct); v1 ``.../pretrain/4x`` or ``ResNet50_4x`` -> (r50_4x, ...)."""
    name, parent = folder.name, folder.parent.name
    kind = parent if parent in catalog.KIND_TEXT else None
    if re.fullmatch(r"r\d+_\d+x_sk[01]", name):
        return name, kind
    m = re.fullmatch(r"(?:ResNet50_)?(\d)x", name)
    if m:
        return f"r50_{m.group(1)}x", kind or ("pretrain" if name.startswith("ResNet50_") else None)
    return None, kind


def _check_name(stated: Optional[str], bb: tf1.Backbone, folder: Path) -> None:
    if stated is None:
        return
    if bb.cifar_stem:
        raise UserError(f"{folder} says {stated}, but the checkpoint has a 3x3 stride-1 (CIFAR) stem")
    got = model_name(bb.depth, bb.width, bb.sk_ratio)
    want = stated if stated.count("_") == 2 else f"{stated}_sk0"
    if parse_model_name(want) != parse_model_name(got):
        raise UserError(f"the folder {folder.name} says {stated}, but the checkpoint's variables are {got}: "
                        f"renamed or mixed-up files?")


def convert_release(src: str, weights: str = "auto", head_input: Optional[str] = None,
                    class_names: Optional[List[str]] = None) -> Tuple[Dict[str, Any], List[str]]:
    """(the fastclr file's dict, report lines) of the release checkpoint at ``src``.

    ``weights``: "auto" (the encoder the release's classifier reads; online when it has none), "online"
    or "ema". ``head_input``: which layer the classifier reads, only for a release without a graph
    (with a graph, the graph decides and a different answer is an error)."""
    folder, prefix = tf1.locate(src)
    reader = tf1.Reader(prefix)
    shapes = reader.shapes
    encoders = [e for e, s in tf1.ENCODER_SCOPE.items() if f"{s}base_model/conv2d/kernel" in shapes]
    if not encoders:
        raise UserError(f"{prefix}: no base_model/conv2d/kernel: not a SimCLR release checkpoint")
    has_clf = "head_supervised/linear_layer/dense/kernel" in shapes

    found = graph.classifier_input(folder, prefix) if has_clf else None
    if found is not None and head_input is not None and layer_of(head_input) != found.layer:
        raise UserError(f"--classifier-input={head_input}, but the release's graph says the classifier reads "
                        f"{'the backbone' if found.layer == 0 else f'head layer {found.layer}'} ({found.evidence})")
    if has_clf and found is None:
        if head_input is None:
            raise UserError(f"cannot tell which layer the classifier reads: {folder} has no graph "
                            f"({prefix.name}.meta, graph.pbtxt or hub/); download the whole release folder, or "
                            f"pass --classifier-input={'|'.join(HEAD_INPUTS)} if you know it")
        found = graph.ClassifierInput(layer_of(head_input), "online", f"--classifier-input={head_input}")

    if weights == "auto":
        weights = found.encoder if found is not None else encoders[0]
    if weights not in encoders:
        raise UserError(f"--weights={weights}: the checkpoint has no {tf1.ENCODER_SCOPE[weights] or 'online '}"
                        f"encoder (it has: {', '.join(encoders)})")
    keep_clf = has_clf and found.encoder == weights
    conv = tf1.convert(reader, weights, with_classifier=keep_clf)
    bb = conv.backbone
    stated, kind = _name_from_folder(folder)
    _check_name(stated, bb, folder)

    layer = found.layer if keep_clf else 1
    dims = [2048 * bb.width] + [2048 * bb.width] * max(conv.num_proj_layers - 1, 0) + [conv.proj_out_dim] * (
        conv.num_proj_layers > 0)
    if keep_clf:
        if layer > conv.num_proj_layers:
            raise UserError(f"the classifier reads head layer {layer}, but the checkpoint's head has "
                            f"{conv.num_proj_layers} layers")
        if conv.classifier_dim != dims[layer]:
            raise UserError(f"the classifier is {conv.classifier_dim} wide but layer {layer} gives {dims[layer]}")
    num_classes = int(conv.classifier["weight"].shape[0]) if keep_clf else None
    name = model_name(bb.depth, bb.width, bb.sk_ratio) if bb.width <= 3 else f"r{bb.depth}_{bb.width}x"
    model_cfg = {"name": "", "depth": bb.depth, "width": bb.width, "sk_ratio": bb.sk_ratio,
                 "cifar_stem": bb.cifar_stem, "tf_maxpool": True, "num_proj_layers": conv.num_proj_layers,
                 "proj_out_dim": conv.proj_out_dim, "ft_proj_selector": layer}
    step = re.search(r"-(\d+)$", prefix.name)
    provenance = {
        "release": stated or name, "kind": kind, "source": str(Path(src).resolve()), "checkpoint": prefix.name,
        "step": int(step.group(1)) if step else None, "weights": weights, "encoders": encoders,
        "classifier_input": found.evidence if keep_clf else None,
        "bn": "eps 1e-5; TF batch_norm_decay 0.9 = torch momentum 0.1; moving statistics copied as they are",
        "tensorflow": _tf_version(), "fastclr": fastclr.__version__,
        "converted": len(conv.used), "not_converted": tf1.unexpected(conv.skipped, weights)}
    state: Dict[str, Any] = {"format": ZOO_FORMAT, "model": conv.model, "config": {"model": model_cfg},
                             "zoo": provenance}
    if keep_clf:
        arch = {k: model_cfg[k] for k in ("depth", "width", "sk_ratio", "cifar_stem", "num_proj_layers",
                                           "proj_out_dim", "tf_maxpool")}
        state["arch"] = {**arch, "ft_proj_selector": layer, "num_classes": num_classes}
        state["classifier"] = conv.classifier
        if class_names is not None and len(class_names) == num_classes:
            state["class_names"] = list(class_names)

    n_backbone = sum(v.numel() for k, v in conv.model.items() if k.startswith("backbone.") and
                     not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    lines = [f"{prefix.name}: {name} ({n_backbone / 1e6:.1f}M backbone parameters), "
             f"{conv.num_proj_layers}-layer projection head, {weights} encoder"
             + (f", {len(encoders)} in the file" if len(encoders) > 1 else "")]
    if keep_clf:
        where = "the backbone" if layer == 0 else f"projection-head layer {layer}"
        lines.append(f"classifier: {num_classes} classes on {where} ({found.evidence})")
    elif has_clf:
        lines.append(f"classifier not converted: it reads the {found.encoder} encoder, not the {weights} one")
    if provenance["not_converted"]:
        nc = provenance["not_converted"]
        lines.append(f"warning: {len(nc)} variables not converted (neither weights of this model nor optimizer "
                     f"state): {', '.join(nc[:4])}{' ...' if len(nc) > 4 else ''}")
    return state, lines


def _tf_version() -> str:
    import tensorflow as tf
    return tf.__version__


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet class names in label order (sorted synsets, TF's order too), from torchvision."""
    from torchvision.models import ResNet50_Weights
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def check_out(out: str, force: bool) -> None:
    """Before the work: OUT's folder exists and OUT is not a file that would be replaced unasked."""
    p = Path(out)
    if not p.parent.resolve().is_dir():
        raise UserError(f"output folder does not exist: {p.parent}")
    if p.is_dir():
        raise UserError(f"{out} is a folder: give a file name, e.g. {p / 'model.pt'}")
    if p.exists() and not force:
        raise UserError(f"{out} exists: choose another name or pass --force to replace it")
