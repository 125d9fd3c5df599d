"""Config: overrides, type coercion, unknown keys, --help, presets, JSON dump."""
import json
import subprocess
import sys

import pytest

from fastclr import config as C
from fastclr.config import ConfigError, PretrainConfig
from fastclr.presets import PRETRAIN as PRETRAIN_PRESETS


def parse(argv):
    return C.parse_into(PretrainConfig(), argv, PRETRAIN_PRESETS, prog="pretrain.py")


def test_defaults_are_the_simclrv2_recipe():
    cfg = PretrainConfig()
    assert cfg.loss.temperature == 0.1 and cfg.optim.weight_decay == 1e-4 and cfg.optim.momentum == 0.9
    assert cfg.model.num_proj_layers == 3 and cfg.optim.lr_scaling == "sqrt" and cfg.optim.base_lr == 0.075


@pytest.mark.parametrize("argv, key, expected", [
    (["--optim.lr=4.8"], "optim.lr", 4.8),
    (["--optim.lr", "4.8"], "optim.lr", 4.8),
    (["--optim.lr=4"], "optim.lr", 4.0),                 # int -> float
    (["--optim.lr=none"], "optim.lr", None),              # Optional
    (["--optim.epochs=100"], "optim.epochs", 100.0),
    (["--data.blur=false"], "data.blur", False),
    (["--data.blur=0"], "data.blur", False),
    (["--model.cifar_stem=1"], "model.cifar_stem", True),
    (["--model.compile=TRUE"], "model.compile", True),
    (["--loss.chunk_size=4096"], "loss.chunk_size", 4096),
    (["--data.file_list=a.txt"], "data.file_list", "a.txt"),
    (["--run.out_dir=x=y"], "run.out_dir", "x=y"),         # only the first '=' splits
])
def test_overrides_are_coerced_to_the_declared_type(argv, key, expected):
    v = C.get_value(parse(argv), key)
    assert v == expected and type(v) is type(expected)


def test_later_override_wins_and_preset_applies_first():
    cfg = parse(["demo_cpu", "--data.image_size=64", "--data.image_size=48"])
    assert cfg.data.image_size == 48
    assert cfg.model.depth == 10 and cfg.data.blur is False and cfg.run.out_dir == "runs/demo"  # from the preset


@pytest.mark.parametrize("argv, needle", [
    (["--optim.lrr=1"], "did you mean --optim.lr?"),
    (["--optm.lr=1"], "did you mean --optim.lr?"),
    (["--lr=1"], "did you mean --optim.lr?"),
    (["--zzz.qqq=1"], "unknown option --zzz.qqq"),
])
def test_unknown_key_is_one_line_error_with_suggestion(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse(argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, needle", [
    (["--optim.grad_accum=1.5"], "--optim.grad_accum: expected int"),
    (["--optim.lr=fast"], "--optim.lr: expected float or none"),
    (["--data.blur=maybe"], "--data.blur: expected bool"),
    (["--data.backend=tensorflow"], "--data.backend: 'tensorflow' is not one of torch, dali, ffcv"),
    (["--model.depth=42"], "--model.depth: 42 is not one of"),
    (["--optim.lr"], "--optim.lr: missing value"),
    (["imagenet_r50_1x", "stray"], "unexpected argument 'stray'"),
    (["imagenet_r5O_1x"], "unknown preset 'imagenet_r5O_1x'; did you mean imagenet_r50_1x?"),
])
def test_wrong_type_or_value_is_one_line_error_naming_the_field(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse(argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", sorted(PRETRAIN_PRESETS))
def test_every_preset_loads_and_only_assigns_known_fields(name):
    cfg = parse([name])
    for k, v in PRETRAIN_PRESETS[name].items():
        assert C.get_value(cfg, k) == v


def test_help_lists_every_field_with_default_and_help():
    with pytest.raises(C.HelpRequested) as h:
        parse(["--help"])
    text = h.value.text
    for key in C.keys(PretrainConfig):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"--{key}="))
        assert len(line.split(")")[0]) > len(key) + 10, line   # has a default and help text
    assert "--optim.base_lr=0.075" in text and "demo_cpu" in text


def test_json_dump_roundtrip_and_derived_values_not_written(tmp_path):
    cfg = parse(["imagenet_r50_1x", "--optim.global_batch_size=1024"])
    path = tmp_path / "run" / "config.json"
    C.save_json(cfg, path)
    d = json.loads(path.read_text())
    assert d["optim"]["global_batch_size"] == 1024 and d["optim"]["lr"] is None  # lr not derived into cfg
    assert C.from_dict(PretrainConfig, d) == cfg
    assert not (tmp_path / "run" / "config.json.tmp").exists()
    with pytest.raises(ConfigError):
        C.from_dict(PretrainConfig, {"optim": {"nope": 1}})
    assert C.from_dict(PretrainConfig, {"optim": {"nope": 1}}, strict=False) == PretrainConfig()


@pytest.mark.e2e
def test_cli_exit_codes_and_stderr():
    code = ("from fastclr import config as C, presets; "
            "C.parse(C.PretrainConfig, None, presets.PRETRAIN, prog='pretrain.py')")
    bad = subprocess.run([sys.executable, "-c", code, "--optim.lrr=1"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "pretrain.py: error: unknown option --optim.lrr; did you mean --optim.lr?"
    ok = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "usage: pretrain.py" in ok.stdout
