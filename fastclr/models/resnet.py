"""SimCLRv2 ResNet backbones: ResNet v1.5, depth 10..200, width 1-3x, optional selective kernels.

Semantic reference: google-research/simclr ``tf2/resnet.py``. What matches it:

* v1.5: the stride of a bottleneck sits in its 3x3 conv, not the first 1x1.
* ``sk_ratio > 0`` (SimCLRv2's "SK" models) changes three things, as TF does:
  the 3x3 conv of every bottleneck becomes a :class:`SelectiveKernelConv`; every projection
  shortcut becomes ResNet-D style (2x2 average pool, then a stride-1 1x1 conv); the 7x7 stem
  becomes three 3x3 convs (widths 32w, 32w, 64w). Basic blocks (R18/34) keep a plain 3x3 conv,
  as in TF; only their stem and shortcuts change.
* The last BN of each residual block starts with gamma = 0, so every block starts as identity.
* BN: TF's ``batch_norm_decay`` 0.9 is torch ``momentum`` 0.1 (torch weights the *new* batch);
  eps 1e-5.
* Convs: no bias, TF's ``VarianceScaling()`` init (truncated normal, fan_in, scale 1).
* ``cifar_stem``: one 3x3 stride-1 conv and no max-pool, for 32 px images (TF uses it whenever
  image_size <= 32; with it the SK stem is not used, as in TF).

Deviations from TF (each also commented where it happens):

* Max-pool in the stem uses torch/torchvision padding (1 on each side) by default. TF's ``'SAME'``
  pads (0, 1) on even inputs, so the pooling windows are shifted by one pixel. We keep torchvision's
  so a width-1 non-SK backbone exports to torchvision bit for bit. ``tf_maxpool=True`` pads as TF
  does (:class:`TFMaxPool3x3`): models converted from the released TF checkpoints use it, so they
  compute what TF computed.
* Sizes TF does not build, for small images on a CPU budget: depth 10 (one basic block per group),
  ``base_channels`` other than 64 (the first group's channels; each group doubles them) and
  ``stem_stride=2`` (the cifar stem's 3x3 conv at stride 2: a quarter of its compute at half the
  resolution, and still no max-pool). Their defaults (64, 1) build TF's networks.
* Basic blocks (R18/34) get a projection shortcut only where the shape changes (torchvision's
  rule). TF gives the first block of *every* group one, including a 64->64 1x1 conv in group 1.
  Bottleneck nets are unaffected: their first block always changes the channel count.

Module names follow torchvision (conv1/bn1, layer1..layer4, blocks with conv1/bn1/conv2/bn2/
conv3/bn3/downsample.0/.1), so for a width-1 non-SK net the state_dict *is* torchvision's
``resnet{18,34,50,101,152}`` state_dict minus ``fc``. SK-only parts have their own names:
``deep_stem`` (the first two stem convs), ``conv2`` is a :class:`SelectiveKernelConv` with no
``bn2`` after it, and the ResNet-D shortcut is ``downsample.0`` pool, ``.1`` conv, ``.2`` BN.
"""
from __future__ import annotations

import contextlib
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.1  # = 1 - TF batch_norm_decay (0.9)
BN_EPS = 1e-5
SK_RATIO = 0.0625  # the SimCLRv2 release's "sk1"

# depth -> (block type, blocks per group), as TF's resnet() table.
DEPTHS: dict[int, tuple[str, list[int]]] = {
    10: ("basic", [1, 1, 1, 1]),  # not in TF's table (see top)
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
    200: ("bottleneck", [3, 24, 36, 3]),
}


_ERF_SQRT2 = math.erf(math.sqrt(2.0))  # P(|N(0, 1)| < 2)


@torch.no_grad()
def tf_variance_scaling_(weight: torch.Tensor) -> torch.Tensor:
    """In place: TF ``VarianceScaling()`` = normal truncated at 2 sigma, variance 1 / fan_in.

    The std is divided by 0.8796..., the std of a unit normal truncated at +-2, so the *truncated*
    distribution has variance 1 / fan_in, exactly as Keras does. Sampled by inverse CDF in one pass
    (uniform -> erfinv): torch's trunc_normal_ resamples in a loop, which makes the init of the big
    models (R152 3x) slow.
    """
    fan_in = weight[0].numel()  # in_channels * kh * kw
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    weight.uniform_(-_ERF_SQRT2, _ERF_SQRT2).erfinv_().mul_(std * math.sqrt(2.0))
    return weight.clamp_(-2 * std, 2 * std)  # guards the float rounding at the ends only


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free conv, TF-initialized. Padding kernel // 2 equals TF's fixed padding for odd kernels
    at stride 2 and ``'SAME'`` at stride 1."""
    c = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    tf_variance_scaling_(c.weight)
    return c


def bn(ch: int, zero_init: bool = False) -> nn.BatchNorm2d:
    b = nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)
    if zero_init:
        nn.init.zeros_(b.weight)
    return b


class TFAvgPool2x2(nn.Module):
    """The 2x2 average pool of TF's ResNet-D shortcut, padded exactly as TF pads it.

    stride 1: TF ``AveragePooling2D(2, 1, 'SAME')`` pads one row/column at the bottom/right and
      averages only real pixels. Shape kept: [B, C, H, W] -> [B, C, H, W].
    stride 2: TF ``FixedPadding(2)`` (0 before, 1 zero after, counted in the mean) then a VALID
      2x2/2 pool: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)].
    """

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            # Pad both sides, exclude padding from the count, drop the windows that start at -1.
            return F.avg_pool2d(x, 2, 1, padding=1, count_include_pad=False)[:, :, 1:, 1:]
        if x.shape[-2] % 2 or x.shape[-1] % 2:  # on even sizes the padded row is never read
            x = F.pad(x, (0, 1, 0, 1))
        return F.avg_pool2d(x, 2, self.stride)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class TFMaxPool3x3(nn.Module):
    """TF ``max_pooling2d(3, 2, 'SAME')``: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)].

    'SAME' pads ``max((ceil(n/2) - 1) * 2 + 3 - n, 0)`` in total per side pair, the smaller half
    before: (0, 1) on even sizes, (1, 1) on odd ones. Padding never wins the max (-inf)."""

    @staticmethod
    def _pads(n: int) -> tuple[int, int]:
        total = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (top, bottom), (left, right) = self._pads(x.shape[-2]), self._pads(x.shape[-1])
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, 3, 2)


def shortcut(in_ch: int, out_ch: int, stride: int, resnet_d: bool) -> nn.Sequential:
    """Projection shortcut. Plain: 1x1 conv with the stride + BN (torchvision's downsample.0/.1).
    ResNet-D (TF, when SK is on): 2x2 avg-pool with the stride, then a stride-1 1x1 conv + BN, so
    the shortcut sees every pixel instead of 1 in 4."""
    if resnet_d:
        return nn.Sequential(TFAvgPool2x2(stride), conv(in_ch, out_ch, 1), bn(out_ch))
    return nn.Sequential(conv(in_ch, out_ch, 1, stride), bn(out_ch))


class SelectiveKernelConv(nn.Module):
    """TF ``SK_Conv2D`` (arXiv 1903.06586 as SimCLRv2 uses it): two 3x3 streams mixed per channel.

    One 3x3 conv makes 2C channels = two C-channel streams (both 3x3; TF's variant, not the paper's
    3x3 + dilated 3x3), then BN + ReLU. Global context = spatial mean of (stream0 + stream1),
    squeezed to ``max(int(C * sk_ratio), min_dim)`` by a 1x1 conv + BN + ReLU, expanded back to
    2C logits by a 1x1 conv; a softmax over the two streams weights their sum.

    Shapes: [B, in_ch, H, W] -> [B, C, H / stride, W / stride]. The output is a convex combination
    of post-ReLU maps, so the block applies no BN/ReLU after it (TF neither).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, sk_ratio: float, min_dim: int = 32):
        super().__init__()
        self.out_ch = out_ch
        self.conv = conv(in_ch, 2 * out_ch, 3, stride)
        self.bn = bn(2 * out_ch)
        mid = max(int(out_ch * sk_ratio), min_dim)
        self.fc1 = conv(out_ch, mid, 1)
        self.fc_bn = bn(mid)
        self.fc2 = conv(mid, 2 * out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)), inplace=True)  # [B, 2C, H, W]
        a, b = x.chunk(2, dim=1)  # the two streams, [B, C, H, W] each (TF: tf.split on channels)
        s = (a + b).mean((2, 3), keepdim=True)  # [B, C, 1, 1]
        s = F.relu(self.fc_bn(self.fc1(s)), inplace=True)  # [B, mid, 1, 1]
        logits = self.fc2(s).unflatten(1, (2, self.out_ch))  # [B, 2, C, 1, 1]: channel halves = streams
        w = logits.softmax(dim=1)
        return a * w[:, 0] + b * w[:, 1]


class BasicBlock(nn.Module):
    """3x3 -> 3x3 residual block (R18/34). [B, in_ch, H, W] -> [B, planes, H/s, W/s]."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, sk_ratio: float = 0.0):
        super().__init__()
        self.conv1 = conv(in_ch, planes, 3, stride)
        self.bn1 = bn(planes)
        self.conv2 = conv(planes, planes, 3)
        self.bn2 = bn(planes, zero_init=True)
        self.relu = nn.ReLU(inplace=True)
        # Deviation: TF projects in the first block of every group, even 64->64 at stride 1;
        # torchvision (and we) only when the shape changes. See module docstring.
        self.downsample = None
        if stride != 1 or in_ch != planes:
            self.downsample = shortcut(in_ch, planes, stride, resnet_d=sk_ratio > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here: v1.5) -> 1x1 x4 block. [B, in_ch, H, W] -> [B, 4 planes, H/s, W/s].

    With ``sk_ratio > 0`` the 3x3 conv + BN + ReLU is one :class:`SelectiveKernelConv`.
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, sk_ratio: float = 0.0):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv(in_ch, planes, 1)
        self.bn1 = bn(planes)
        if sk_ratio > 0:
            self.conv2 = SelectiveKernelConv(planes, planes, stride, sk_ratio)
            self.bn2 = None  # the SK conv ends in a softmax-weighted sum of post-ReLU maps
        else:
            self.conv2 = conv(planes, planes, 3, stride)
            self.bn2 = bn(planes)
        self.conv3 = conv(planes, out_ch, 1)
        self.bn3 = bn(out_ch, zero_init=True)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:  # = TF's "first block of each group" for bottlenecks
            self.downsample = shortcut(in_ch, out_ch, stride, resnet_d=sk_ratio > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if self.bn2 is not None:
            out = self.relu(self.bn2(out))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """SimCLRv2 ResNet backbone: images [B, 3, H, W] -> pooled features h [B, out_dim].

    ``out_dim`` = 8 * base_channels * width (basic blocks) or 32 * base_channels * width (bottlenecks):
    512 * width and 2048 * width with the default 64 channels. There is no fc layer.
    Works in channels_last: convert with ``model.to(memory_format=torch.channels_last)`` and feed
    channels_last input.
    """

    def __init__(self, depth: int = 50, width: int = 1, sk_ratio: float = 0.0, cifar_stem: bool = False,
                 tf_maxpool: bool = False, base_channels: int = 64, stem_stride: int = 1):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        if width < 1 or int(width) != width:
            raise ValueError(f"width must be a positive integer multiplier, got {width}")
        if sk_ratio < 0:
            raise ValueError(f"sk_ratio must be >= 0, got {sk_ratio}")
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}")
        if stem_stride not in (1, 2) or (stem_stride != 1 and not cifar_stem):
            raise ValueError(f"stem_stride must be 1, or 2 with cifar_stem, got {stem_stride}")
        kind, blocks = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.width, self.sk_ratio, self.cifar_stem = depth, int(width), float(sk_ratio), cifar_stem
        self.tf_maxpool = bool(tf_maxpool) and not cifar_stem
        self.base_channels, self.stem_stride = int(base_channels), int(stem_stride)
        w = self.width
        stem_ch = self.base_channels * w

        self.deep_stem = None
        if cifar_stem:  # TF: used whenever image_size <= 32, with or without SK
            self.conv1 = conv(3, stem_ch, 3, self.stem_stride)
            self.maxpool = nn.Identity()
        else:
            if sk_ratio > 0:  # TF's SK stem: 3x3/2 (32w) -> 3x3 (32w) -> 3x3 (64w)
                half = max(stem_ch // 2, 1)
                self.deep_stem = nn.Sequential(
                    conv(3, half, 3, 2), bn(half), nn.ReLU(inplace=True),
                    conv(half, half, 3, 1), bn(half), nn.ReLU(inplace=True),
                )
                self.conv1 = conv(half, stem_ch, 3, 1)
            else:
                self.conv1 = conv(3, stem_ch, 7, 2)
            # Deviation unless tf_maxpool: torchvision's padding (1, 1), not TF 'SAME' (0, 1 on even
            # sizes): see top.
            self.maxpool = TFMaxPool3x3() if tf_maxpool else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = bn(stem_ch)
        self.relu = nn.ReLU(inplace=True)

        in_ch = stem_ch
        for i, (n, stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
            planes = self.base_channels * w * 2**i
            layers = []
            for j in range(n):
                layers.append(block(in_ch, planes, stride if j == 0 else 1, sk_ratio))
                in_ch = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deep_stem is not None:
            x = self.deep_stem(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)  # [B, out_dim]

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, width={self.width}x, sk_ratio={self.sk_ratio}, cifar_stem={self.cifar_stem}"
                + (", tf_maxpool=True" if self.tf_maxpool else "")
                + (f", base_channels={self.base_channels}" if self.base_channels != 64 else "")
                + (f", stem_stride={self.stem_stride}" if self.stem_stride != 1 else ""))


def build_backbone(depth: int = 50, width: int = 1, sk_ratio: float = 0.0, cifar_stem: bool = False,
                   device: torch.device | str | None = None, tf_maxpool: bool = False, base_channels: int = 64,
                   stem_stride: int = 1) -> ResNet:
    """The backbone alone, created and initialized directly on ``device`` (default: torch's current
    default device). ``device="meta"`` gives shapes only: parameter counts without memory."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return ResNet(depth, width, sk_ratio, cifar_stem, tf_maxpool, base_channels, stem_stride)


_NAME = re.compile(r"r(\d+)_(\d+)x_sk([01])")


def parse_model_name(name: str) -> dict:
    """``"r152_3x_sk1"`` -> ``dict(depth=152, width=3, sk_ratio=0.0625)`` (the release's naming;
    sk1 = selective kernels with sk_ratio 0.0625, sk0 = none)."""
    m = _NAME.fullmatch(name)
    if m is None or int(m[1]) not in DEPTHS:
        raise ValueError(f"bad model name {name!r}: expected r<depth>_<width>x_sk<0|1>, depth in {sorted(DEPTHS)}, "
                         f"e.g. r50_1x_sk0 or r152_3x_sk1")
    return {"depth": int(m[1]), "width": int(m[2]), "sk_ratio": SK_RATIO if m[3] == "1" else 0.0}


def model_name(depth: int, width: int, sk_ratio: float) -> str:
    """Inverse of :func:`parse_model_name` (any sk_ratio > 0 is written sk1)."""
    return f"r{depth}_{width}x_sk{int(sk_ratio > 0)}"


# The SimCLRv2 release's checkpoints, plus small nets for CIFAR-scale runs and tests.
MODEL_PRESETS: dict[str, dict] = {
    name: parse_model_name(name)
    for name in (
        "r18_1x_sk0", "r34_1x_sk0",
        "r50_1x_sk0", "r50_1x_sk1", "r50_2x_sk0", "r50_2x_sk1",
        "r101_1x_sk0", "r101_1x_sk1", "r101_2x_sk0", "r101_2x_sk1",
        "r152_1x_sk0", "r152_1x_sk1", "r152_2x_sk0", "r152_2x_sk1", "r152_3x_sk1",
    )
}
