"""Export: fastclr backbones load into torchvision ResNets and compute the same features; the CLI
reads checkpoints / bare state_dicts, explains the non-torchvision (SK, wide, ...) case, and turns
bad input into one line on stderr and exit code 2."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fastclr.export import export_backbone, main, torchvision_incompatibility
from fastclr.models import build_backbone, build_model

SK = 0.0625


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random BN gamma/beta/running stats (also the zero-init ones, so every block matters)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) * 0.5 + 0.5
            if m.bias is not None:
                m.bias.data = torch.randn(c, generator=gen) * 0.1
            m.running_mean = torch.randn(c, generator=gen) * 0.1
            m.running_var = torch.rand(c, generator=gen) + 0.5
            m.num_batches_tracked.fill_(7)
    return model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {d: randomize(build_model(d), d).eval() for d in (18, 50)}


def torchvision_features(depth: int, state_dict: dict) -> nn.Module:
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    tv.fc = nn.Identity()
    tv.load_state_dict(state_dict, strict=True)
    return tv.eval()


@pytest.mark.parametrize("depth", [18, 50])
def test_round_trip_into_torchvision_same_features(models, depth):
    model = models[depth]
    sd = export_backbone(model, depth, 1, 0.0)  # from the SimCLRModel: head dropped
    assert not any(k.startswith(("head.", "backbone.", "fc.")) for k in sd)
    tv = torchvision_features(depth, sd)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model.backbone(x), tv(x)
    assert ours.shape == theirs.shape == (2, model.backbone.out_dim)
    assert ours.abs().max() > 0.1  # not trivially zero
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_export_accepts_wrapped_state_dicts_and_channels_last(models):
    model = models[18]
    ref = export_backbone(model.backbone, 18)
    ddp = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}  # DDP(compile(model))
    sd = export_backbone(ddp, 18)
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    cl = export_backbone(build_backbone(18).to(memory_format=torch.channels_last), 18)
    assert all(v.is_contiguous() for v in cl.values())


def test_export_rejects_mismatched_architecture(models):
    with pytest.raises(ValueError, match="do not match r34_1x_sk0"):
        export_backbone(models[18], 34)
    with pytest.raises(ValueError, match="do not match r18_2x_sk0"):  # shapes differ, keys equal
        export_backbone(models[18], 18, width=2)


def test_torchvision_incompatibility_reasons():
    assert torchvision_incompatibility(50, 1, 0.0) is None
    assert torchvision_incompatibility(152, 1, 0.0) is None
    assert "selective kernels" in torchvision_incompatibility(50, 1, SK)
    assert "width 3x" in torchvision_incompatibility(152, 3, SK)
    assert "cifar_stem" in torchvision_incompatibility(18, 1, 0.0, cifar_stem=True)
    assert "depth 200" in torchvision_incompatibility(200, 1, 0.0)


# ---------------------------------------------------------------- CLI

def save_checkpoint(path, model, **arch):
    model_cfg = {"name": "", "depth": 18, "width": 1, "sk_ratio": 0.0, "cifar_stem": False, "num_proj_layers": 3}
    cfg = {"model": {**model_cfg, **arch}}
    torch.save({"model": model.state_dict(), "config": cfg, "step": 10}, path)
    return str(path)


def test_cli_checkpoint_to_torchvision(tmp_path, models, capsys):
    ckpt = save_checkpoint(tmp_path / "last.pt", models[18])
    out = tmp_path / "r18.pt"
    assert main([ckpt, str(out)]) == 0
    msg = capsys.readouterr().out.strip()
    assert "\n" not in msg and "torchvision resnet18" in msg and "fc = torch.nn.Identity()" in msg
    tv = torchvision_features(18, torch.load(out, weights_only=True))
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), models[18].backbone(x), atol=1e-5, rtol=1e-5)


def test_cli_bare_state_dict_needs_and_takes_flags(tmp_path, models, capsys):
    bare = tmp_path / "bare.pt"
    torch.save(models[18].backbone.state_dict(), bare)
    out = tmp_path / "out.pt"
    assert main([str(bare), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--depth" in err and not out.exists()
    assert main([str(bare), str(out), "--depth", "18", "--width", "1", "--sk-ratio", "0"]) == 0
    torchvision_features(18, torch.load(out, weights_only=True))


def test_cli_sk_model_saved_as_fastclr_with_message(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomize(build_model(18, sk_ratio=SK), 3).eval()
    ckpt = save_checkpoint(tmp_path / "sk.pt", model, sk_ratio=SK)
    out = tmp_path / "sk_backbone.pt"
    assert main([ckpt, str(out)]) == 0
    msg = capsys.readouterr().out.strip()
    assert "\n" not in msg
    assert "not torchvision-compatible (selective kernels" in msg
    assert "build_backbone(depth=18, width=1, sk_ratio=0.0625)" in msg
    loaded = build_backbone(18, sk_ratio=SK).eval()
    loaded.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.backbone(x))


def test_cli_small_network_saved_as_fastclr_from_its_config(tmp_path, capsys):
    torch.manual_seed(0)
    small = dict(depth=10, cifar_stem=True, stem_stride=2, base_channels=16)
    model = randomize(build_model(**small), 3).eval()
    ckpt = save_checkpoint(tmp_path / "small.pt", model, **small)
    out = tmp_path / "small_backbone.pt"
    assert main([ckpt, str(out)]) == 0
    msg = capsys.readouterr().out.strip()
    assert "\n" not in msg and "cifar_stem at stride 2, 16 base channels, depth 10" in msg
    assert "build_backbone(depth=10, width=1, sk_ratio=0.0, cifar_stem=True, base_channels=16, stem_stride=2)" in msg
    loaded = build_backbone(**small).eval()
    loaded.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.backbone(x))
    # A config without the new keys (an older checkpoint) means the defaults: 64 channels, stride 1.
    assert main([save_checkpoint(tmp_path / "old.pt", build_model(18)), str(out)]) == 0
    assert torch.load(out, weights_only=True)["layer1.0.conv1.weight"].shape[0] == 64


def test_cli_classifier_checkpoint_uses_its_arch_not_the_preset(tmp_path, capsys):
    """finetune/distill with --ckpt / --student_ckpt record the preset's config['model'] (here R18) while
    the weights are the checkpoint's network (here a small one): 'arch' says which."""
    from fastclr.classifier import build_classifier
    torch.manual_seed(0)
    arch = dict(depth=10, width=1, sk_ratio=0.0, cifar_stem=True, num_proj_layers=2, proj_out_dim=16,
                tf_maxpool=False, base_channels=16, stem_stride=2, ft_proj_selector=1)
    clf = build_classifier(arch, 4)
    path = tmp_path / "best.pt"
    torch.save({"model": clf.state_dict(), "arch": {**arch, "num_classes": 4},
                "config": {"model": {"name": "", "depth": 18, "width": 1, "cifar_stem": False}}}, path)
    out = tmp_path / "backbone.pt"
    assert main([str(path), str(out)]) == 0
    assert "build_backbone(depth=10, width=1, sk_ratio=0.0, cifar_stem=True, base_channels=16" in capsys.readouterr().out
    loaded = build_backbone(10, cifar_stem=True, base_channels=16, stem_stride=2).eval()
    loaded.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), clf.backbone.eval()(x))


def test_cli_flags_override_config(tmp_path, models, capsys):
    ckpt = save_checkpoint(tmp_path / "c.pt", models[18], depth=34)  # wrong config...
    assert main([ckpt, str(tmp_path / "o.pt")]) == 2
    assert "do not match r34_1x_sk0" in capsys.readouterr().err
    assert main([ckpt, str(tmp_path / "o.pt"), "--depth", "18"]) == 0  # ...fixed by the flag


def test_cli_preset_name_in_config_wins(tmp_path, models):
    ckpt = save_checkpoint(tmp_path / "c.pt", models[18], depth=50, name="r18_1x_sk0")  # as ModelConfig
    assert main([ckpt, str(tmp_path / "o.pt")]) == 0


@pytest.mark.parametrize("kind,says", [("missing", "no such file"), ("text", "not a torch checkpoint"),
                                       ("empty", "not a torch checkpoint"), ("list", "holds a list"),
                                       ("no_model", "neither a fastclr checkpoint"),
                                       ("empty_model", "weights do not match r18_1x_sk0")])
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, kind, says):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    if kind == "text":
        src.write_text("not a checkpoint\n")
    elif kind == "empty":
        src.write_bytes(b"")
    elif kind == "list":
        torch.save([1, 2, 3], src)
    elif kind == "no_model":
        torch.save({"optimizer": {"lr": 0.1}}, src)
    elif kind == "empty_model":
        torch.save({"model": {}, "config": {"model": {"depth": 18}}}, src)
    assert main([str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastclr.export: error: ") and err.count("\n") == 1, err
    assert says in err
    assert not out.exists()


def test_cli_missing_output_folder_exit_2(tmp_path, models, capsys):
    ckpt = save_checkpoint(tmp_path / "last.pt", models[18])
    assert main([ckpt, str(tmp_path / "nope" / "out.pt")]) == 2
    assert "output folder does not exist" in capsys.readouterr().err


def test_cli_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for needle in ("torchvision", "fc = torch.nn.Identity()", "--depth", "--sk-ratio", "exit status"):
        assert needle in text
