"""Models: parameter counts against the SimCLRv2 release, shapes of every preset, TF semantics of the
SK block / ResNet-D shortcut / projection head, init, channels_last + bf16, SimCLRModel, sync BN.

Big models are built on the meta device (shapes only, no memory, no init cost)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fastclr.models import (
    MODEL_PRESETS,
    LinearHead,
    ProjectionHead,
    SimCLRModel,
    build_backbone,
    build_model,
    convert_sync_bn,
    model_name,
    parse_model_name,
)
from fastclr.models.resnet import BasicBlock, Bottleneck, SelectiveKernelConv, TFAvgPool2x2

SK = 0.0625

# "Param (M)" column of the SimCLRv2 README (google-research/simclr): it counts the backbone only
# (r50_1x_sk0 = 24M is torchvision's resnet50 minus fc, 23.5M; with the 3-layer head it would be 32M).
RELEASE_PARAMS_M = {
    "r50_1x_sk0": 24, "r50_1x_sk1": 35, "r50_2x_sk0": 94, "r50_2x_sk1": 140,
    "r101_1x_sk0": 43, "r101_1x_sk1": 65, "r101_2x_sk0": 170, "r101_2x_sk1": 257,
    "r152_1x_sk0": 58, "r152_1x_sk1": 89, "r152_2x_sk0": 233, "r152_2x_sk1": 354, "r152_3x_sk1": 795,
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- parameter counts and naming

def test_r50_1x_backbone_is_torchvision_resnet50_minus_fc():
    with torch.device("meta"):
        ours = build_backbone(50)
        tv = torchvision.models.resnet50()
    assert n_params(ours) == 23_508_032 == n_params(tv) - n_params(tv.fc)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_width1_backbone_state_dict_is_torchvision_minus_fc(depth):
    with torch.device("meta"):
        ours = build_backbone(depth).state_dict()
        tv = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    tv = {k: v for k, v in tv.items() if not k.startswith("fc.")}
    assert list(ours) == list(tv)
    assert all(ours[k].shape == tv[k].shape for k in tv)


def test_r152_3x_sk1_counts():
    """795M (release) is the backbone; the 3-layer 6144-wide head adds 76.3M on top."""
    with torch.device("meta"):
        model = build_model(**parse_model_name("r152_3x_sk1"))
    backbone, head = n_params(model.backbone), n_params(model.head)
    assert backbone == 794_704_160
    assert abs(backbone - 795e6) / 795e6 < 0.01
    d = 6144  # 2048 * 3
    # two (Linear no bias + BN gamma/beta) layers, then Linear + BN gamma only (TF center=False)
    assert head == 2 * (d * d + 2 * d) + d * 128 + 128 == 76_308_608


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_preset_shapes_and_release_param_counts(name):
    """Every preset: output shapes (meta forward at 224 px); release checkpoints: backbone size."""
    cfg = MODEL_PRESETS[name]
    with torch.device("meta"):
        model = build_model(**cfg)
        h, z = model([torch.empty(2, 3, 224, 224), torch.empty(2, 3, 224, 224)])
    c = (512 if cfg["depth"] < 50 else 2048) * cfg["width"]
    assert model.backbone.out_dim == c
    assert h.shape == (4, c) and z.shape == (4, 128)
    if name in RELEASE_PARAMS_M:
        n, m = n_params(model.backbone), RELEASE_PARAMS_M[name]
        # the table is rounded to whole millions; beyond that, within 1 %
        assert abs(n / 1e6 - m) <= max(0.5, 0.01 * m), n


@pytest.fixture(scope="module")
def real_models():
    """Real (CPU, initialized) models, built once: init of ~90M parameters is the slow part."""
    torch.manual_seed(0)
    names = ("r18_1x_sk0", "r50_1x_sk0", "r50_1x_sk1")
    return {name: build_model(**parse_model_name(name)) for name in names}


@pytest.mark.parametrize("name,size", [("r18_1x_sk0", 64), ("r50_1x_sk0", 64), ("r50_1x_sk1", 32)])
def test_real_tiny_forward(real_models, name, size):
    model = real_models[name].train()
    views = [torch.rand(2, 3, size, size) for _ in range(2)]
    with torch.no_grad():
        h, z = model(views)
    c = 512 if name.startswith("r18") else 2048
    assert h.shape == (4, c) and z.shape == (4, 128)
    assert torch.isfinite(h).all() and torch.isfinite(z).all()


def test_real_tiny_forward_cifar_stem():
    torch.manual_seed(0)
    model = build_model(18, cifar_stem=True, num_proj_layers=2, proj_out_dim=32)
    with torch.no_grad():
        h, z = model([torch.rand(2, 3, 32, 32)])
    assert h.shape == (2, 512) and z.shape == (2, 32) and torch.isfinite(z).all()


def _feature_map_sides(backbone: nn.Module, size: int) -> list[int]:
    sides = []
    hooks = [getattr(backbone, f"layer{i}").register_forward_hook(lambda m, i, o: sides.append(o.shape[-1]))
             for i in range(1, 5)]
    with torch.no_grad():
        backbone(torch.rand(2, 3, size, size))
    for h in hooks:
        h.remove()
    return sides


@pytest.mark.parametrize("depth,base,stride,sides", [
    (10, 32, 2, [16, 8, 4, 2]), (10, 16, 1, [32, 16, 8, 4]), (18, 32, 2, [16, 8, 4, 2])])
def test_small_networks_channels_blocks_and_resolution(depth, base, stride, sides):
    torch.manual_seed(0)
    model = build_model(depth, cifar_stem=True, stem_stride=stride, base_channels=base)
    bb = model.backbone
    blocks = [len(getattr(bb, f"layer{i}")) for i in range(1, 5)]
    assert blocks == ([1, 1, 1, 1] if depth == 10 else [2, 2, 2, 2])
    assert bb.conv1.stride == (stride, stride) and bb.conv1.out_channels == base
    assert [getattr(bb, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)] == [base * 2**i for i in range(4)]
    assert bb.out_dim == 8 * base and model.head.layers[0].linear.in_features == 8 * base
    assert _feature_map_sides(bb, 32) == sides
    # With the defaults the network is exactly TF's R18 cifar stem one (same parameter shapes).
    ref = {k: v.shape for k, v in build_backbone(18, cifar_stem=True).state_dict().items()}
    assert {k: v.shape for k, v in build_backbone(18, cifar_stem=True, base_channels=64, stem_stride=1)
            .state_dict().items()} == ref
    # Half the base channels: every conv after the stem has a quarter of the weights (in and out halve).
    half = build_backbone(depth, cifar_stem=True, base_channels=base // 2, stem_stride=stride)

    def conv_weights(m: nn.Module) -> int:
        return sum(c.weight.numel() for c in m.modules() if isinstance(c, nn.Conv2d))
    assert [conv_weights(getattr(half, f"layer{i}")) * 4 for i in range(1, 5)] == [
        conv_weights(getattr(bb, f"layer{i}")) for i in range(1, 5)]


def test_odd_base_channels_build_the_sk_stem_too():
    # The SK stem's first convs have half the stem's channels, rounded down.
    bb = build_backbone(18, sk_ratio=SK, base_channels=7)
    assert bb.deep_stem[0].out_channels == 3 and bb.conv1.out_channels == 7 and bb.out_dim == 56
    with torch.no_grad():
        assert bb(torch.rand(2, 3, 32, 32)).shape == (2, 56)
        assert build_backbone(18, sk_ratio=SK, base_channels=1)(torch.rand(2, 3, 32, 32)).shape == (2, 8)


def test_bad_arguments_raise():
    for kwargs in ({"depth": 51}, {"width": 0}, {"sk_ratio": -1.0}, {"base_channels": 0},
                   {"stem_stride": 2}, {"cifar_stem": True, "stem_stride": 3}):
        with pytest.raises(ValueError):
            build_backbone(**kwargs)


# ---------------------------------------------------------------- channels_last, bf16

@pytest.mark.parametrize("name", ["r18_1x_sk0", "r50_1x_sk1"])
def test_channels_last_bf16_autocast_fwd_bwd(real_models, name):
    model = copy.deepcopy(real_models[name]).train().to(memory_format=torch.channels_last)
    layouts = []
    for i in range(1, 5):
        getattr(model.backbone, f"layer{i}").register_forward_hook(
            lambda m, inp, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    views = [torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, z = model(views)
        loss = z.float().pow(2).sum() + h.float().mean()
    loss.backward()
    assert z.dtype == torch.bfloat16 and z.shape == (4, 128)
    assert layouts == [True] * 4, "activations left channels_last"
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_channels_last_fp32_eval_matches_contiguous(real_models):
    model = copy.deepcopy(real_models["r18_1x_sk0"]).eval()
    x = torch.rand(2, 3, 64, 64)
    ref = model.backbone(x)
    model = model.to(memory_format=torch.channels_last)
    out = model.backbone(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- TF semantics: SK conv, ResNet-D

def tf_bn(x, bn, training, axes):
    """TF BatchNormalization on any layout: statistics over ``axes``, channels on the last axis."""
    if training:
        mean, var = x.mean(axes, keepdim=True), x.var(axes, unbiased=False, keepdim=True)
    else:
        mean, var = bn.running_mean, bn.running_var
    y = (x - mean) / torch.sqrt(var + bn.eps) * bn.weight
    return y + bn.bias if bn.bias is not None else y


def tf_conv_nhwc(x, weight, stride):
    """TF Conv2dFixedPadding on NHWC: explicit (k-1)//2 / rest padding then VALID when stride > 1,
    'SAME' at stride 1 (odd kernels: symmetric). weight: torch OIHW."""
    k = weight.shape[-1]
    if stride > 1:
        beg = (k - 1) // 2
        x = F.pad(x, (0, 0, beg, k - 1 - beg, beg, k - 1 - beg))
        pad = 0
    else:
        pad = k // 2
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, stride=stride, padding=pad)
    return y.permute(0, 2, 3, 1)


def tf_sk_conv(x, sk: SelectiveKernelConv, training: bool):
    """TF SK_Conv2D.call, step by step on NHWC, with the module's weights. x, result: NCHW."""
    x = x.permute(0, 2, 3, 1)
    c = sk.out_ch
    inputs = F.relu(tf_bn(tf_conv_nhwc(x, sk.conv.weight, sk.conv.stride[0]), sk.bn, training, (0, 1, 2)))
    inputs = torch.stack(torch.split(inputs, c, dim=3))  # [2, B, H, W, C]
    g = inputs.sum(0).mean((1, 2), keepdim=True)  # [B, 1, 1, C]
    g = g @ sk.fc1.weight[:, :, 0, 0].T  # 1x1 conv, no bias
    g = F.relu(tf_bn(g, sk.fc_bn, training, (0, 1, 2)))
    mixing = g @ sk.fc2.weight[:, :, 0, 0].T  # [B, 1, 1, 2C]
    mixing = torch.softmax(torch.stack(torch.split(mixing, c, dim=3)), dim=0)
    return (inputs * mixing).sum(0).permute(0, 3, 1, 2)


def tf_resnet_d_pool(x, stride):
    """TF's ResNet-D pool, literally: stride 2 = FixedPadding(2) (zeros counted) + VALID 2x2/2;
    stride 1 = AveragePooling2D(2, 1, 'SAME') (pad bottom/right, average real pixels only)."""
    _b, _c, h, w = x.shape
    if stride == 2:
        xp = F.pad(x, (0, 1, 0, 1))
        oh, ow = (h + 1 - 2) // 2 + 1, (w + 1 - 2) // 2 + 1
        return torch.stack([torch.stack([xp[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((2, 3))
                                         for j in range(ow)], -1) for i in range(oh)], -2)
    return torch.stack([torch.stack([x[:, :, i:i + 2, j:j + 2].mean((2, 3))  # slicing drops the pad
                                     for j in range(w)], -1) for i in range(h)], -2)


def randomize_bn(module: nn.Module, gen: torch.Generator):
    """Random gamma/beta/running stats everywhere, so zero-init gammas don't hide a path."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen, dtype=m.weight.dtype) + 0.5
            if m.bias is not None:
                m.bias.data = torch.randn(c, generator=gen, dtype=m.weight.dtype) * 0.3
            m.running_mean = torch.randn(c, generator=gen, dtype=m.weight.dtype) * 0.3
            m.running_var = torch.rand(c, generator=gen, dtype=m.weight.dtype) + 0.5


@pytest.mark.parametrize("stride,size", [(1, 6), (2, 6), (2, 7)])
@pytest.mark.parametrize("training", [True, False])
def test_sk_conv_matches_tf_math(stride, size, training):
    gen = torch.Generator().manual_seed(stride * 10 + size)
    torch.manual_seed(0)
    sk = SelectiveKernelConv(8, 16, stride, SK, min_dim=4).double().train(training)
    randomize_bn(sk, gen)
    x = torch.randn(3, 8, size, size, generator=gen, dtype=torch.float64)
    ref = tf_sk_conv(x, sk, training)
    out = sk(x)
    assert out.shape == ref.shape == (3, 16, math.ceil(size / stride), math.ceil(size / stride))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_sk_mid_dim_is_max_of_ratio_and_32():
    assert SelectiveKernelConv(64, 64, 1, SK).fc1.out_channels == 32  # int(64 * 0.0625) = 4 -> 32
    with torch.device("meta"):
        assert SelectiveKernelConv(2048, 2048, 1, SK).fc1.out_channels == 128


@pytest.mark.parametrize("stride,size", [(1, 5), (1, 6), (2, 6), (2, 7)])
def test_resnet_d_pool_matches_tf(stride, size):
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    torch.testing.assert_close(TFAvgPool2x2(stride)(x), tf_resnet_d_pool(x, stride))


@pytest.mark.parametrize("stride,size", [(1, 6), (2, 7)])
def test_sk_bottleneck_matches_tf_math(stride, size):
    """Whole TF BottleneckBlock with SK (eval mode): 1x1 -> SK -> 1x1 -> BN + ResNet-D shortcut."""
    gen = torch.Generator().manual_seed(size)
    torch.manual_seed(0)
    blk = Bottleneck(16, 8, stride, SK).double().eval()
    randomize_bn(blk, gen)
    assert blk.bn2 is None and isinstance(blk.downsample[0], TFAvgPool2x2)
    x = torch.randn(2, 16, size, size, generator=gen, dtype=torch.float64)

    def conv_bn(t, conv, bn, relu):  # NCHW in/out, TF conv semantics
        y = tf_bn(tf_conv_nhwc(t.permute(0, 2, 3, 1), conv.weight, conv.stride[0]), bn, False, (0, 1, 2))
        return (F.relu(y) if relu else y).permute(0, 3, 1, 2)

    short = conv_bn(tf_resnet_d_pool(x, stride), blk.downsample[1], blk.downsample[2], relu=False)
    y = conv_bn(x, blk.conv1, blk.bn1, relu=True)
    y = tf_sk_conv(y, blk.conv2, training=False)
    y = conv_bn(y, blk.conv3, blk.bn3, relu=False)
    torch.testing.assert_close(blk(x), F.relu(y + short), atol=1e-10, rtol=1e-10)


def test_sk_stem_and_resnet_d_shortcuts_are_used():
    with torch.device("meta"):
        plain, sk = build_backbone(50), build_backbone(50, sk_ratio=SK)
        cifar_sk = build_backbone(50, sk_ratio=SK, cifar_stem=True)
    assert plain.deep_stem is None and plain.conv1.kernel_size == (7, 7)
    convs = [m for m in sk.deep_stem if isinstance(m, nn.Conv2d)] + [sk.conv1]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [
        ((3, 3), (2, 2), 32), ((3, 3), (1, 1), 32), ((3, 3), (1, 1), 64)]
    assert cifar_sk.deep_stem is None and cifar_sk.conv1.stride == (1, 1)  # TF: cifar stem wins
    assert isinstance(cifar_sk.maxpool, nn.Identity)
    for i, stride in zip(range(1, 5), (1, 2, 2, 2), strict=True):
        ds = getattr(sk, f"layer{i}")[0].downsample
        assert isinstance(ds[0], TFAvgPool2x2) and ds[0].stride == stride and ds[1].stride == (1, 1)
        assert isinstance(getattr(sk, f"layer{i}")[0].conv2, SelectiveKernelConv)
        assert getattr(plain, f"layer{i}")[0].downsample[0].stride == (stride, stride)


# ---------------------------------------------------------------- init

def test_last_bn_of_every_block_is_zero_init(real_models):
    for model in real_models.values():
        model = model.backbone
        blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        assert len(blocks) == (8 if model.depth == 18 else 16)
        for blk in blocks:
            last = blk.bn2 if isinstance(blk, BasicBlock) else blk.bn3
            assert torch.all(last.weight == 0) and torch.all(last.bias == 0)
        zero = {id(b.bn2 if isinstance(b, BasicBlock) else b.bn3) for b in blocks}
        for m in model.modules():  # every other BN: gamma 1, and TF's momentum / eps
            if isinstance(m, nn.BatchNorm2d):
                assert m.momentum == 0.1 and m.eps == 1e-5
                if id(m) not in zero:
                    assert torch.all(m.weight == 1)


def test_conv_init_is_tf_variance_scaling(real_models):
    backbone = real_models["r50_1x_sk1"].backbone
    w = backbone.layer3[1].conv2.conv.weight  # 3x3, 256 -> 512: fan_in 2304
    std = math.sqrt(1 / 2304)
    assert abs(w.std().item() / std - 1) < 0.02
    assert w.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-7  # truncated at 2 sigma
    assert all(m.bias is None for m in backbone.modules() if isinstance(m, nn.Conv2d))


# ---------------------------------------------------------------- heads

def test_projection_head_structure_follows_tf():
    head = ProjectionHead(64)
    assert head.layer_dims == [64, 64, 64, 128] and head.out_dim == 128
    for j, layer in enumerate(head.layers):
        last = j == 2
        assert layer.linear.bias is None  # BN follows every dense layer
        assert (layer.bn.bias is None) == last  # TF: center=False on the last layer only
        assert isinstance(layer.relu, nn.Identity) == last
        assert abs(layer.linear.weight.std().item() - 0.01) < 0.002
    assert n_params(head) == 2 * (64 * 64 + 128) + 64 * 128 + 128


def test_projection_head_layers_and_truncate():
    torch.manual_seed(0)
    head = ProjectionHead(32, num_layers=3, out_dim=16)
    head.train()
    head(torch.randn(8, 32))  # populate running stats
    head.eval()
    h = torch.randn(4, 32)
    outs = head(h, return_layers=True)
    assert [o.shape[1] for o in outs] == [32, 32, 32, 16]
    assert outs[0] is h
    torch.testing.assert_close(outs[-1], head(h))
    assert (outs[1] >= 0).all() and (outs[2] >= 0).all()  # ReLU on middle layers
    for k in range(4):
        torch.testing.assert_close(head.truncate(k)(h), outs[k])
    assert head.truncate(1)[0] is head.layers[0]  # shares weights
    with pytest.raises(ValueError):
        head.truncate(4)


def test_projection_head_zero_layers_is_identity():
    head = ProjectionHead(32, num_layers=0)
    h = torch.randn(2, 32)
    assert head(h) is h and head.out_dim == 32 and n_params(head) == 0


def test_linear_head_init():
    torch.manual_seed(0)
    lin = LinearHead(512, 1000)
    assert lin(torch.randn(2, 512)).shape == (2, 1000)
    assert abs(lin.weight.std().item() - 0.01) < 0.001 and torch.all(lin.bias == 0)
    zero = LinearHead(512, 10, zero_init=True)
    assert torch.all(zero.weight == 0) and torch.all(zero.bias == 0)


# ---------------------------------------------------------------- SimCLRModel, builder, names

def test_simclr_model_one_backbone_pass_over_concatenated_views(real_models):
    model = copy.deepcopy(real_models["r18_1x_sk0"])
    assert isinstance(model, SimCLRModel)
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    views = [torch.rand(3, 3, 32, 32) for _ in range(3)]
    model.train()
    with torch.no_grad():
        h, z = model(views)
    assert calls == [9] and h.shape == (9, 512) and z.shape == (9, 128)
    model.eval()
    with torch.no_grad():
        h, z = model(views)
        for k, v in enumerate(views):  # rows k*B..(k+1)*B-1 come from view k
            torch.testing.assert_close(h[3 * k:3 * k + 3], model.backbone(v), atol=1e-5, rtol=1e-5)
        h1, z1 = model(views[0])  # a single tensor is one view
    assert h1.shape == (3, 512) and z1.shape == (3, 128)


def test_build_model_head_width_and_bn_momentum():
    model = build_model(50, width=2, proj_out_dim=256, bn_momentum=0.01, device="meta")
    assert next(model.parameters()).is_meta
    assert model.head.layer_dims == [4096, 4096, 4096, 256]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == 0.01 for m in bns)


def test_parse_model_name():
    assert parse_model_name("r152_3x_sk1") == {"depth": 152, "width": 3, "sk_ratio": 0.0625}
    assert parse_model_name("r50_1x_sk0") == {"depth": 50, "width": 1, "sk_ratio": 0.0}
    for bad in ("r51_1x_sk0", "resnet50", "r50_1x_sk2", "r50_1x"):
        with pytest.raises(ValueError):
            parse_model_name(bad)
    for name, cfg in MODEL_PRESETS.items():
        assert model_name(**cfg) == name
    assert set(RELEASE_PARAMS_M) <= set(MODEL_PRESETS) and "r18_1x_sk0" in MODEL_PRESETS


# ---------------------------------------------------------------- sync BN

def test_convert_sync_bn_is_noop_without_distributed():
    model = build_model(18, device="meta")
    assert convert_sync_bn(model) is model
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_convert_sync_bn_when_distributed(monkeypatch, capsys, backend):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    model = build_model(18, device="meta")
    n_bn = sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in model.modules())
    last_gamma = model.head.layers[-1].bn.weight
    out = convert_sync_bn(model)
    syncs = [m for m in out.modules() if isinstance(m, nn.SyncBatchNorm)]
    if backend == "gloo":  # torch's SyncBatchNorm is GPU-only: CPU runs keep local BN, and say so
        assert not syncs and "gloo" in capsys.readouterr().out
        return
    assert len(syncs) == n_bn
    assert out.head.layers[-1].bn.bias is None and out.head.layers[-1].bn.weight is last_gamma


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pretrain_step_on_cuda_matches_cpu():
    """The training step as pretrain.py runs it on a GPU (channels_last, NT-Xent, fused LARS) gives the
    CPU's loss and update in fp32 (TF32 off), and close ones under bf16 autocast."""
    from fastclr.lars import LARS
    from fastclr.losses import nt_xent

    torch.manual_seed(0)
    ref = build_model(**parse_model_name("r18_1x_sk0")).train()
    x = torch.rand(16, 3, 64, 64)
    before = torch.cat([p.detach().flatten() for p in ref.parameters()])

    def step(device, dtype):
        model = copy.deepcopy(ref).to(device).to(memory_format=torch.channels_last)
        opt = LARS(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-6, eta=1e-3, mode="tf")
        xs = x.to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            _, z = model(xs)
        z1, z2 = z.float().chunk(2)
        loss = nt_xent(z1, z2, 0.1)
        loss.backward()
        opt.step()
        after = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
        return loss.item(), after - before

    loss_cpu, d_cpu = step("cpu", torch.float32)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            loss_gpu, d_gpu = step("cuda", torch.float32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    assert d_cpu.norm() > 0
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-4)
    assert F.cosine_similarity(d_gpu, d_cpu, dim=0) > 0.999
    assert d_gpu.norm() == pytest.approx(d_cpu.norm().item(), rel=1e-3)
    loss_bf16, d_bf16 = step("cuda", torch.bfloat16)
    assert math.isfinite(loss_bf16) and loss_bf16 == pytest.approx(loss_cpu, rel=5e-2)
    assert torch.isfinite(d_bf16).all() and F.cosine_similarity(d_bf16, d_cpu, dim=0) > 0.9
