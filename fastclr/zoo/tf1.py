"""Read a released TF1 checkpoint with TensorFlow's own reader and map every tensor onto fastclr's model.

How the TF1 code (google-research/simclr ``resnet.py``, ``model_util.py``) names its variables, and
where each lands:

* ``base_model/conv2d[_N]/kernel`` [kh, kw, in, out] and ``base_model/batch_normalization[_N]/
  {gamma,beta,moving_mean,moving_variance}``: ``tf.layers`` numbers convs and BNs separately, in the
  order the code creates them. That order is :func:`tf1_order`: the stem (the SK stem's three convs),
  then per block the projection shortcut *first* (TF computes it before the main path), then the main
  path; an SK conv is its 3x3 conv + BN, then the two 1x1 convs of the mixing weights with a BN between.
  Kernels become [out, in, kh, kw]; BN moving statistics are copied as they are (TF's decay 0.9 is
  torch's momentum 0.1, eps 1e-5 in both).
* ``head_contrastive/nl_<j>/dense/kernel`` [in, out] and ``.../batch_normalization/*``: projection-head
  layer j (no dense bias: BN follows; the last layer's BN has no beta, as fastclr's).
* ``head_supervised/linear_layer/dense/{kernel,bias}``: the classifier, on the layer the release's
  graph says it reads (fastclr.zoo.graph).
* ``ema_model/...``: a second copy of the encoder kept by some releases; ``weights="ema"`` converts it.
* ``global_step`` and optimizer slots (``*/Momentum``) are not weights and are skipped.

The architecture (depth, width, SK, stem) is inferred from the conv kernels alone: the one candidate
whose :func:`tf1_order` gives exactly the checkpoint's list of kernel shapes.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from fastclr.models import DEPTHS, SK_RATIO, build_model
from fastclr.models.resnet import Bottleneck, ResNet, SelectiveKernelConv, TFAvgPool2x2
from fastclr.runtime import UserError

_INDEX = re.compile(r"^(?P<prefix>.+)\.index$")
_SKIP = re.compile(r"(^global_step$|/Momentum$|/ExponentialMovingAverage$|/Adam(_1)?$|/RMSProp(_1)?$|"
                   r"^beta[12]_power$)")
BN_PARTS = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
            ("moving_variance", "running_var"))
ENCODER_SCOPE = {"online": "", "ema": "ema_model/"}


def import_tf():
    """TensorFlow, quietly; a one-line UserError when it is not installed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Triton (loaded by torch._dynamo) must be loaded before TensorFlow: in the other order the two
    # LLVM copies collide and the process dies with a segmentation fault when torch first compiles.
    import torch._dynamo  # noqa: F401
    try:
        with _quiet_stderr():  # TF's C++ logs a few startup lines whatever TF_CPP_MIN_LOG_LEVEL says
            import tensorflow as tf
    except ImportError:
        raise UserError("reading TF checkpoints needs TensorFlow: pip install 'fastclr[tf]' "
                        "(training never imports it)") from None
    return tf


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for the duration (C++ writes there directly, not via sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ----------------------------------------------------------------------------- locating the files
def locate(src: str | os.PathLike) -> Tuple[Path, Path]:
    """(release folder, checkpoint prefix ``.../model.ckpt-N``) of a release folder, a prefix or an
    ``.index`` file. One-line UserErrors for what is not a TF1 checkpoint or only part of one."""
    p = Path(src)
    if not p.exists() and not Path(str(p) + ".index").exists():
        raise UserError(f"no such file or folder: {p}")
    if p.is_dir():
        indexes = sorted(p.glob("*.index"))
        if not indexes:
            if (p / "saved_model.pb").is_file() or (p / "saved_model").is_dir():
                raise UserError(f"{p} is a TF2 SavedModel: fastclr converts the TF1 checkpoints of the same "
                                f"models (gs://simclr-checkpoints/simclrv2/..., the folder with model.ckpt-*.index)")
            raise UserError(f"{p} holds no TF checkpoint (no model.ckpt-*.index): not a release folder, or the "
                            f"download is incomplete")
        if len(indexes) > 1:
            named = _newest_in_checkpoint_file(p)
            if named is None:
                raise UserError(f"{p} holds {len(indexes)} checkpoints ({', '.join(i.name for i in indexes[:3])}): "
                                f"give one as SRC (the path without .index)")
            index = p / (named + ".index")
        else:
            index = indexes[0]
        folder = p
    else:
        index = p if p.suffix == ".index" else Path(str(p) + ".index")
        if not index.is_file():
            raise UserError(f"{p} is not a TF checkpoint (no {index.name} beside it)")
        folder = index.parent
    prefix = Path(_INDEX.match(str(index)).group("prefix"))
    data = sorted(folder.glob(prefix.name + ".data-*-of-*"))
    if not data:
        raise UserError(f"partial download: {prefix.name}.data-00000-of-00001 is missing in {folder}")
    want = int(data[0].name.rsplit("-of-", 1)[1])
    if len(data) != want:
        raise UserError(f"partial download: {len(data)} of the {want} {prefix.name}.data-* shards are in {folder}")
    return folder, prefix


def _newest_in_checkpoint_file(folder: Path) -> Optional[str]:
    """The ``model_checkpoint_path`` a TF ``checkpoint`` file names, if it names one that is here."""
    f = folder / "checkpoint"
    if not f.is_file():
        return None
    m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', f.read_text(errors="replace"), re.M)
    if m and (folder / (Path(m.group(1)).name + ".index")).is_file():
        return Path(m.group(1)).name
    return None


class Reader:
    """TensorFlow's checkpoint reader: names and shapes, and tensors as float32 torch tensors."""

    def __init__(self, prefix: Path):
        tf = import_tf()
        self.prefix = prefix
        try:
            self._r = tf.train.load_checkpoint(str(prefix))
            self.shapes: Dict[str, Tuple[int, ...]] = {k: tuple(v) for k, v in
                                                       self._r.get_variable_to_shape_map().items()}
        except Exception as e:  # noqa: BLE001  (tf.errors.*: DataLoss, NotFound, ... on a bad file)
            raise UserError(f"{prefix}: TensorFlow cannot read this checkpoint (a partial download or another "
                            f"kind of file?): {_first_line(e)}") from None

    def get(self, name: str) -> torch.Tensor:
        try:
            arr = self._r.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{self.prefix}: cannot read {name} (a truncated .data file?): {_first_line(e)}") from None
        return torch.from_numpy(arr.astype("float32", copy=True))


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


# ----------------------------------------------------------------------------- TF's creation order
def tf1_order(backbone: ResNet) -> Tuple[List[str], List[str]]:
    """(conv module names, BN module names) of a fastclr bottleneck ResNet in the order the TF1 code
    creates them, i.e. the order of ``conv2d``, ``conv2d_1``, ... and ``batch_normalization``, ...."""
    convs, bns = [], []
    if backbone.deep_stem is not None:
        convs += ["deep_stem.0", "deep_stem.3"]
        bns += ["deep_stem.1", "deep_stem.4"]
    convs.append("conv1")
    bns.append("bn1")
    for li in range(1, 5):
        for bi, block in enumerate(getattr(backbone, f"layer{li}")):
            if not isinstance(block, Bottleneck):
                raise UserError("ResNet-18/34 checkpoints are not converted: fastclr builds their shortcuts as "
                                "torchvision does, not as TF does")
            p = f"layer{li}.{bi}"
            if block.downsample is not None:  # TF builds the shortcut before the main path
                c = 1 if isinstance(block.downsample[0], TFAvgPool2x2) else 0
                convs.append(f"{p}.downsample.{c}")
                bns.append(f"{p}.downsample.{c + 1}")
            convs.append(f"{p}.conv1")
            bns.append(f"{p}.bn1")
            if isinstance(block.conv2, SelectiveKernelConv):
                convs += [f"{p}.conv2.conv", f"{p}.conv2.fc1", f"{p}.conv2.fc2"]
                bns += [f"{p}.conv2.bn", f"{p}.conv2.fc_bn"]
            else:
                convs.append(f"{p}.conv2")
                bns.append(f"{p}.bn2")
            convs.append(f"{p}.conv3")
            bns.append(f"{p}.bn3")
    return convs, bns


def tf_name(kind: str, i: int) -> str:
    """``tf.layers``' name of the i-th layer of a kind: conv2d, conv2d_1, conv2d_2, ..."""
    return kind if i == 0 else f"{kind}_{i}"


def _indexed(shapes: Dict[str, tuple], scope: str, kind: str, leaf: str) -> List[str]:
    """The variables ``<scope><kind>[_N]/<leaf>`` of a checkpoint, by N; UserError on a gap."""
    pat = re.compile(rf"^{re.escape(scope)}{kind}(?:_(\d+))?/{leaf}$")
    found = {}
    for name in shapes:
        m = pat.match(name)
        if m:
            found[int(m.group(1) or 0)] = name
    if found and sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))[:3]
        raise UserError(f"the checkpoint lacks {scope}{tf_name(kind, missing[0])}/{leaf} (and {len(missing) - 1} "
                        f"more): not a complete release checkpoint")
    return [found[i] for i in range(len(found))]


@dataclass
class Backbone:
    depth: int
    width: int
    sk_ratio: float
    cifar_stem: bool


def _candidates(n_convs: int):
    for depth, (kind, blocks) in DEPTHS.items():
        if kind != "bottleneck":
            continue
        for sk in (0.0, SK_RATIO):
            for cifar in (False, True):
                stem = 1 if cifar or not sk else 3
                if stem + sum(blocks) * (5 if sk else 3) + 4 == n_convs:
                    yield depth, sk, cifar


def infer_backbone(shapes: Dict[str, tuple], scope: str) -> Backbone:
    """The architecture whose TF creation order gives exactly the checkpoint's conv kernel shapes."""
    kernels = _indexed(shapes, f"{scope}base_model/", "conv2d", "kernel")
    if not kernels:
        raise UserError(f"no {scope}base_model/conv2d*/kernel variables: not a SimCLR release checkpoint")
    got = [shapes[k] for k in kernels]
    stem_out = got[0][3]
    for depth, sk, cifar in _candidates(len(got)):
        width = stem_out * (2 if sk and not cifar else 1) // 64
        if width < 1:
            continue
        bb = build_model(depth, width, sk, cifar, num_proj_layers=0, device="meta").backbone
        sd = bb.state_dict()
        want = [tuple(sd[f"{c}.weight"].permute(2, 3, 1, 0).shape) for c in tf1_order(bb)[0]]
        if want == got:
            return Backbone(depth, width, sk, cifar)
    raise UserError(f"the {len(got)} conv kernels of {scope}base_model (stem {got[0]}) match no ResNet-50/101/152/"
                    f"200 fastclr can build (widths 1-4, with or without selective kernels of ratio {SK_RATIO})")


# ----------------------------------------------------------------------------- the conversion
@dataclass
class Converted:
    """The converted tensors and what was learned on the way."""
    backbone: Backbone
    num_proj_layers: int
    proj_out_dim: int
    model: Dict[str, torch.Tensor]                  # SimCLRModel state_dict
    classifier: Optional[Dict[str, torch.Tensor]]   # {"weight": [C, D], "bias": [C]} or None
    classifier_dim: Optional[int]                   # D: the width of the layer it reads
    used: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)


def head_layers(shapes: Dict[str, tuple], scope: str) -> List[str]:
    """Scopes ``<scope>head_contrastive/nl_<j>/`` of the projection head, by j."""
    found = {}
    for name in shapes:
        m = re.match(rf"^{re.escape(scope)}head_contrastive/nl_(\d+)/dense/kernel$", name)
        if m:
            found[int(m.group(1))] = f"{scope}head_contrastive/nl_{m.group(1)}/"
    if sorted(found) != list(range(len(found))):
        raise UserError(f"the projection head of the checkpoint skips a layer (has nl_{sorted(found)})")
    if any(re.match(rf"^{re.escape(scope)}head_contrastive/l_0/", n) for n in shapes):
        raise UserError("the checkpoint has a linear projection head (head_contrastive/l_0): fastclr builds the "
                        "nonlinear SimCLRv2 head only")
    return [found[j] for j in range(len(found))]


def convert(reader: Reader, encoder: str = "online", with_classifier: bool = True) -> Converted:
    """Every weight of ``encoder`` ("online" or "ema") and the classifier, as fastclr tensors."""
    shapes, scope = reader.shapes, ENCODER_SCOPE[encoder]
    bbc = infer_backbone(shapes, scope)
    heads = head_layers(shapes, scope)
    hidden = 2048 * bbc.width
    if heads:
        out_dim = shapes[heads[-1] + "dense/kernel"][1]
        for j, h in enumerate(heads):
            k = shapes[h + "dense/kernel"]
            want = (hidden, hidden if j < len(heads) - 1 else out_dim)
            if k != want:
                raise UserError(f"{h}dense/kernel is {k}, expected {want}: fastclr's head is as wide as the backbone")
    else:
        out_dim = 128
    model = build_model(bbc.depth, bbc.width, bbc.sk_ratio, bbc.cifar_stem, num_proj_layers=len(heads),
                        proj_out_dim=out_dim, device="meta", tf_maxpool=True)
    want = model.state_dict()
    sd: Dict[str, torch.Tensor] = {}
    used: List[str] = []

    def put(key: str, name: str, transform=None):
        t = reader.get(name)
        t = transform(t) if transform else t
        if tuple(t.shape) != tuple(want[key].shape):
            raise UserError(f"{name} is {tuple(t.shape)} but {key} needs {tuple(want[key].shape)}")
        sd[key] = t.contiguous()
        used.append(name)

    convs, bns = tf1_order(model.backbone)
    for i, c in enumerate(convs):
        put(f"backbone.{c}.weight", f"{scope}base_model/{tf_name('conv2d', i)}/kernel", lambda t: t.permute(3, 2, 0, 1))
    for j, b in enumerate(bns):
        for tf_leaf, leaf in BN_PARTS:
            put(f"backbone.{b}.{leaf}", f"{scope}base_model/{tf_name('batch_normalization', j)}/{tf_leaf}")
    for j, h in enumerate(heads):
        put(f"head.layers.{j}.linear.weight", h + "dense/kernel", lambda t: t.t())
        for tf_leaf, leaf in BN_PARTS:
            key = f"head.layers.{j}.bn.{leaf}"
            if key in want:
                put(key, f"{h}batch_normalization/{tf_leaf}")
            elif h + f"batch_normalization/{tf_leaf}" in shapes:
                raise UserError(f"{h}batch_normalization/{tf_leaf} exists, but the head's last BN has no shift in "
                                f"SimCLRv2 (TF center=False)")
    for key, t in want.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(want) - set(sd))
    if missing:  # the mapping and the model disagree: a fastclr bug, not the user's
        raise RuntimeError(f"conversion left {len(missing)} tensors unset, e.g. {missing[:3]}")

    classifier = dim = None
    ck, cb = "head_supervised/linear_layer/dense/kernel", "head_supervised/linear_layer/dense/bias"
    if with_classifier and ck in shapes:
        if cb not in shapes:
            raise UserError(f"the checkpoint has {ck} but no {cb}")
        kernel, bias = reader.get(ck), reader.get(cb)
        classifier, dim = {"weight": kernel.t().contiguous(), "bias": bias}, kernel.shape[0]
        used += [ck, cb]
    taken = set(used)
    skipped = sorted(n for n in shapes if n not in taken)
    return Converted(bbc, len(heads), out_dim, sd, classifier, dim, used, skipped)


def unexpected(skipped: List[str], encoder: str) -> List[str]:
    """The skipped variables that are neither optimizer state nor the other encoder's copy nor a
    classifier left out on purpose: what the conversion does not understand."""
    other = "" if encoder == "ema" else "ema_model/"
    out = []
    for n in skipped:
        if _SKIP.search(n) or (other and n.startswith(other)) or n.startswith("head_supervised/"):
            continue
        if encoder == "ema" and not n.startswith("ema_model/") and (
                n.startswith("base_model/") or n.startswith("head_contrastive/")):
            continue
        out.append(n)
    return out
