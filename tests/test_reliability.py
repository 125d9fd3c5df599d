"""Fault and bad-input tries, one regression test (or more) per fault: symlink loops, names with line
breaks, ... Each reproduces what a user met; see also the SIGKILL-resume tests (test_pretrain.py,
test_finetune.py, test_loader_contract.py), which run with DataLoader workers."""
from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import pytest

from loaders import subsets, synthetic, validate, write_ffcv
from loaders.common import list_image_folder, read_file_list


def small_folder(root, classes=2, per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            synthetic.save_jpeg(synthetic.textured_image(rng, 40, 30), d / f"img{i}.jpg")
    return root


# ---------------------------------------------------------------------------------------------
# Symlinks: each linked folder once, never the data root or a class folder again
# ---------------------------------------------------------------------------------------------

def test_symlink_loop_is_listed_once_and_the_link_named(tmp_path, caplog):
    """Two classes of 3 images plus ``class1/up -> ..`` once listed 246 samples (class 0's images ~40
    times under label 1). A link to a class folder is refused too; a link to a folder outside the
    data root (another disk) is followed, once. The listing, validate and the converter agree."""
    root = small_folder(tmp_path / "data")
    os.symlink("..", root / "class1" / "up")
    os.symlink(root / "class0", root / "class1" / "c0")
    ext = small_folder(tmp_path / "ext", classes=1, per_class=2, seed=1) / "class0"
    os.symlink(ext, root / "class1" / "more")
    os.symlink(ext, root / "class1" / "more_again")
    with caplog.at_level(logging.WARNING):
        samples, classes = list_image_folder(root)
    assert classes == ["class0", "class1"]
    assert Counter(label for _, label in samples) == {0: 3, 1: 5}
    assert len({os.path.realpath(p) for p, _ in samples}) == len(samples) == 8
    for link in ("up", "c0", "more_again"):
        assert str(root / "class1" / link) in caplog.text, link
    assert "class1/more " not in caplog.text  # the first link to ext is followed, not refused
    good, bad, _, _ = validate.validate(str(root), use_dali=False, progress=False)
    assert len(good) == 8 and not bad
    assert len(subsets.folder_entries(root)) == 8
    assert write_ffcv.convert(root, tmp_path / "x.beton", dry_run=True, workers=1, progress=False)["would_write"] == 8


# ---------------------------------------------------------------------------------------------
# A line break in a file name: refused by name everywhere a list file is involved
# ---------------------------------------------------------------------------------------------

def test_file_name_with_a_line_break_is_refused_by_name(tmp_path, caplog, capsys):
    root = small_folder(tmp_path / "data")
    odd = root / "class0" / "a\nb.jpg"
    synthetic.save_jpeg(synthetic.textured_image(np.random.default_rng(3), 40, 30), odd)
    with caplog.at_level(logging.WARNING):
        samples, _ = list_image_folder(root)
    assert len(samples) == 6 and repr(str(odd)) in caplog.text and "line break" in caplog.text
    out = tmp_path / "clean.txt"
    assert validate.main([str(root), "--out", str(out), "--no-dali", "--quiet", "--workers", "1"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 6 and all((root / ln.rsplit(" ", 1)[0]).is_file() for ln in lines)
    listed, _ = read_file_list(out, root)  # what the DALI backend reads
    assert sorted(p for p, _ in listed) == sorted(p for p, _ in samples)
    report = (tmp_path / "clean.txt.bad.txt").read_text()
    assert "'class0/a\\nb.jpg'\tits name contains a line break" in report
    s = write_ffcv.convert(root, tmp_path / "x.beton", dry_run=True, workers=1, progress=False)
    assert s["would_write"] == 6 and s["skipped"] == 1 and "line break" in s["skipped_files"][0][1]


# ---------------------------------------------------------------------------------------------
# Options: declared ranges, checked when the config is parsed (one line, exit 2, no heavy work)
# ---------------------------------------------------------------------------------------------

BAD_OPTIONS = [  # each once accepted silently or crashed later with a traceback
    ("pretrain", "--optim.lr=-1", "--optim.lr: must be > 0"),
    ("pretrain", "--loss.temperature=-0.1", "--loss.temperature: must be > 0"),
    ("pretrain", "--loss.temperature=0", "--loss.temperature: must be > 0"),
    ("pretrain", "--run.ckpt_every=0", "--run.ckpt_every: must be >= 1"),
    ("pretrain", "--run.log_every=0", "--run.log_every: must be >= 1"),
    ("pretrain", "--optim.grad_accum=0", "--optim.grad_accum: must be >= 1"),
    ("pretrain", "--data.image_size=0", "--data.image_size: must be >= 1"),
    ("pretrain", "--data.num_workers=-1", "--data.num_workers: must be >= 0"),
    ("pretrain", "--optim.momentum=1.5", "--optim.momentum: must be >= 0 and < 1"),
    ("pretrain", "--optim.weight_decay=inf", "--optim.weight_decay: expected a finite float"),
    ("finetune", "--subset.fraction=0", "--subset.fraction: must be > 0 and <= 1"),
    ("finetune", "--run.eval_batch_size=0", "--run.eval_batch_size: must be >= 1"),
    ("distill", "--distill.alpha=2", "--distill.alpha: must be >= 0 and <= 1"),
    ("distill", "--distill.temperature=0", "--distill.temperature: must be > 0"),
    ("linear_eval", "--optim.epochs=0", "--optim.epochs: must be >= 1"),
]


@pytest.mark.parametrize("entry, arg, needle", BAD_OPTIONS)
def test_out_of_range_options_are_one_line_errors(entry, arg, needle, capsys):
    import importlib
    mod = importlib.import_module(f"fastclr.{entry}")
    with pytest.raises(SystemExit) as e:
        mod.main([arg, "--run.out_dir=/nonexistent/never_written"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_presets_and_defaults_are_in_range():
    """Every preset of every entry point passes the same checks as the command line."""
    from fastclr import config as C
    from fastclr.distill import DISTILL_PRESETS, DistillConfig
    from fastclr.finetune import FINETUNE_PRESETS, FinetuneConfig
    from fastclr.linear_eval import LINEAR_PRESETS, LinearEvalConfig
    for cls, presets in ((C.PretrainConfig, C.PRETRAIN_PRESETS), (FinetuneConfig, FINETUNE_PRESETS),
                         (DistillConfig, DISTILL_PRESETS), (LinearEvalConfig, LINEAR_PRESETS)):
        for name in presets:
            C.parse_into(cls(), [name], presets)
        C.from_dict(cls, C.to_dict(cls()))  # the defaults, through the checked setter
