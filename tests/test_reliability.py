"""Fault and bad-input tries, one regression test (or more) per fault: symlink loops, names with line
breaks, ... Each reproduces what a user met; see also the SIGKILL-resume tests (test_pretrain.py,
test_finetune.py, test_loader_contract.py), which run with DataLoader workers."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from loaders.sources import synthetic
from loaders import subsets, validate, write_ffcv
from loaders.sources.folders import list_image_folder, read_file_list

ROOT = Path(__file__).resolve().parents[1]


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
    ("linear_eval", "--optim.epochs=0", "--optim.epochs: must be > 0"),
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
    from fastclr import presets as P
    for cls, presets in ((C.PretrainConfig, P.PRETRAIN), (C.FinetuneConfig, P.FINETUNE),
                         (C.DistillConfig, P.DISTILL), (C.LinearEvalConfig, P.LINEAR)):
        for name in presets:
            C.parse_into(cls(), [name], presets)
        C.from_dict(cls, C.to_dict(cls()))  # the defaults, through the checked setter


# ---------------------------------------------------------------------------------------------
# Checkpoints: runs never mix, non-finite states are never written, refusals say why
# ---------------------------------------------------------------------------------------------

TINY = ["demo_cpu", "--data.image_size=32", "--data.num_workers=0", "--optim.global_batch_size=8",
        "--optim.warmup_epochs=0", "--run.knn_eval=false", "--run.progress=false", "--run.log_every=1"]


def pretrain(args, capsys):
    """pretrain.main in this process: (exit code, stdout, stderr)."""
    from fastclr import pretrain as pt
    try:
        code = pt.main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def fake_ckpts(folder, steps):
    from fastclr import checkpoint as ck
    for s in steps:
        ck.save(ck.path_for(folder, s), {"model": {"w": torch.zeros(2)}, "step": s})


def test_fresh_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path, image_folder, capsys):
    """ckpt 4..20 of an earlier run: a fresh run with keep_last=3 once wrote ckpt 4 and 8 and deleted
    them at once, and resume=auto later continued the other run. Now: a one-line refusal that leaves
    the files alone, or --run.overwrite=true, which deletes them first."""
    from fastclr import checkpoint as ck
    out = tmp_path / "run"
    fake_ckpts(out, [4, 8, 12, 16, 20])
    args = TINY + [f"--data.path={image_folder}", f"--run.out_dir={out}", "--run.max_steps=4", "--run.ckpt_every=2", "--optim.epochs=2",
                   "--run.keep_last=3"]
    code, _, err = pretrain(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--run.resume=auto" in err and "--run.overwrite=true" in err and "ckpt_00000004.pt" in err
    assert [s for s, _ in ck.list_checkpoints(out)] == [4, 8, 12, 16, 20]
    assert not (out / "config.json").exists()  # nothing of the refused run was written
    code, _, err = pretrain(args + ["--run.overwrite=true"], capsys)
    assert code == 0, err
    assert [s for s, _ in ck.list_checkpoints(out)] == [2, 4]
    assert ck.load(ck.path_for(out, 4))["step"] == 4


def test_pruning_deletes_only_this_runs_older_files(tmp_path):
    """A garbage ckpt_00000099.pt (newer than anything this run writes) with keep_last=1 once pushed
    every good checkpoint out. Pruning now only deletes this run's own older files."""
    from fastclr import checkpoint as ck
    fake_ckpts(tmp_path, [2, 4])
    ck.path_for(tmp_path, 99).write_bytes(b"garbage")
    run = ck.RunCheckpoints(tmp_path, keep_last=1, resume="auto")
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint ckpt_00000099.pt"):
        path, state = run.load_resume()
    assert state["step"] == 4
    tensors = {"model": {"w": torch.ones(2)}}
    for step in (6, 8):
        run.save(step, lambda s=step: {**tensors, "step": s}, tensors)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [8, 99]  # 2, 4, 6: this run's, pruned
    with pytest.warns(UserWarning, match="ckpt_00000099"):
        assert ck.load_latest_valid(tmp_path)[1]["step"] == 8


@pytest.mark.e2e
def test_non_finite_state_is_never_written_and_resume_skips_it(tmp_path, image_folder, capsys):
    """lr 1e6: BatchNorm's running_var goes inf while the loss still looks finite. The run once
    checked parameters only, wrote such a checkpoint and named it "last good"; resume=auto then died at
    its first step. Now every checkpoint on disk is finite, the one named exists, the step in the
    message counts like log.jsonl, and resume=auto passes over a non-finite file with a warning."""
    from fastclr import checkpoint as ck
    out = tmp_path / "nan"
    args = TINY + [f"--data.path={image_folder}", f"--run.out_dir={out}", "--optim.lr=1e6", "--run.ckpt_every=2",
                   "--optim.epochs=20"]
    code, _, err = pretrain(args, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "non-finite" in err
    for _, p in ck.list_checkpoints(out):
        ck.check_usable(p, ck.load(p))  # raises on any NaN/inf in weights, buffers or optimizer state
    logged = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    step = int(re.search(r"step (\d+)", err).group(1))
    assert step in (logged[-1], logged[-1] + 1), (step, logged)  # a bad state after it / a bad loss at it
    named = re.search(r"last good checkpoint: (\S+?ckpt_\d{8}\.pt)", err)
    assert named and os.path.isfile(named.group(1)), err

    # a non-finite checkpoint (as an older fastclr wrote them) newer than a good one: skipped by name
    good_step, good = ck.list_checkpoints(out)[-1]
    state = ck.load(good)
    state["model"] = dict(state["model"])
    key = next(k for k in state["model"] if k.endswith("running_var"))
    state["model"][key] = torch.full_like(state["model"][key], float("inf"))
    state["step"] = good_step + 1
    ck.save(ck.path_for(out, good_step + 1), state)
    with pytest.warns(UserWarning, match=rf"skipping unreadable checkpoint ckpt_{good_step + 1:08d}\.pt: "
                                         rf"non-finite values in model\.{re.escape(key)}"):
        # (weights trained at lr 1e6 may diverge again: only the resume point matters here; the changed
        # lr is a trajectory change, so it is allowed by name)
        _, stdout, err = pretrain(args[:-3] + ["--optim.lr=0.01", "--run.resume=auto", "--run.allow_config_change=true",
                                               f"--run.max_steps={good_step + 1}", "--optim.epochs=20"], capsys)
    assert f"resumed from {good} at step {good_step}" in stdout, (stdout, err)


def test_unsafe_and_unreadable_checkpoints_are_refused_by_name_and_reason(tmp_path, image_folder, capsys):
    """A malicious pickle was refused, but the message repeated torch's advice to load it with
    weights_only=False and was cut before the reason; a folder whose only checkpoint was refused said
    it held no checkpoint."""
    from fastclr import checkpoint as ck
    from fastclr import finetune as ft

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    evil = tmp_path / "evil" / "ckpt_00000001.pt"
    evil.parent.mkdir()
    torch.save({"model": {}, "step": 1, "x": Evil()}, evil)
    with pytest.raises(ck.UnusableCheckpoint) as e:
        ck.load(evil)
    msg = str(e.value)
    assert str(evil) in msg and "refused" in msg and "posix.system" in msg and "\n" not in msg
    assert "False" not in msg and "weights_only=" not in msg  # never advice to turn the check off

    with pytest.raises(SystemExit) as e:
        ft.main(["demo_1pct", f"--ckpt={evil.parent}", f"--data.path={image_folder}", "--run.progress=false",
                 f"--run.out_dir={tmp_path / 'ft'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "posix.system" in err and str(evil) in err, err
    assert "no ckpt_" not in err

    code, _, err = pretrain(TINY + [f"--data.path={image_folder}", f"--run.out_dir={evil.parent}",
                                    "--run.resume=auto"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "posix.system" in err, err

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ck.UnusableCheckpoint, match=r"empty\.pt: not a torch checkpoint"):
        ck.load(empty)


@pytest.mark.e2e
def test_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, image_folder):
    """The real CLI with a file-size limit (what a full disk looks like to the writer): a checkpoint
    write once gave a 32-line traceback and left ckpt_*.pt.tmp behind, keeping the disk full."""
    import resource
    import signal
    import subprocess

    def limit():  # 4 MiB per file: config.json and log.jsonl fit, an R18 checkpoint does not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
    out = tmp_path / "full"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "fastclr" / "pretrain.py"), *TINY, f"--data.path={image_folder}",
                        f"--run.out_dir={out}", "--run.max_steps=1"], capture_output=True, text=True, env=env,
                       preexec_fn=limit, timeout=300)
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1, err
    assert "cannot write ckpt_00000001.pt" in err and str(out) in err and "GiB free" in err, err
    assert not list(out.glob("*.tmp")) and not list(out.glob("ckpt_*"))


# ---------------------------------------------------------------------------------------------
# Bad data: one line, naming the file
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_a_folder_of_only_bad_files_is_one_line(tmp_path, bad_files, capsys, workers):
    root = tmp_path / "bad"
    for c, kinds in enumerate((("truncated", "empty"), ("text",))):
        (root / f"c{c}").mkdir(parents=True)
        for k in kinds:
            shutil.copy(bad_files[k], root / f"c{c}" / f"{k}.jpg")
    code, _, err = pretrain(TINY + [f"--data.path={root}", f"--run.out_dir={tmp_path / 'out'}",
                                    "--optim.global_batch_size=2", f"--data.num_workers={workers}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "none of the 3 images" in err and str(root) in err and "loaders.validate" in err


def test_dali_bad_file_and_missing_listed_file_are_one_line(tmp_path, image_folder, bad_files, capsys):
    pytest.importorskip("nvidia.dali", reason="DALI not installed: pip install 'fastclr[dali]'")
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    bad = root / "n00000001" / "zz_text.JPEG"
    shutil.copy(bad_files["text"], bad)
    common = TINY + ["--data.backend=dali", f"--data.path={root}", "--optim.global_batch_size=25",
                     "--run.max_steps=1"]
    code, _, err = pretrain(common + [f"--run.out_dir={tmp_path / 'a'}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"DALI cannot decode {bad}" in err and "loaders.validate" in err
    listed = tmp_path / "list.txt"
    listed.write_text("n00000000/no_such_file.JPEG 0\n" + "".join(
        f"{os.path.relpath(p, root)} {lab}\n" for p, lab in list_image_folder(image_folder)[0][:23]))
    code, _, err = pretrain(common[:-2] + ["--optim.global_batch_size=8", f"--data.file_list={listed}",
                                           "--run.max_steps=3", f"--run.out_dir={tmp_path / 'b'}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot read" in err and "no_such_file.JPEG" in err


# ---------------------------------------------------------------------------------------------
# The converter: manifest and .beton never mismatch, 16-bit images stay images, truncation named
# ---------------------------------------------------------------------------------------------

def test_manifest_and_beton_from_different_conversions_are_detected(tmp_path, monkeypatch):
    """The manifest was renamed into place after the .beton: a kill in between left a new .beton
    (500 samples) beside an old manifest (2,000), and subsets map through the manifest."""
    pytest.importorskip("ffcv", reason="FFCV not installed: pip install 'fastclr[ffcv]'")
    from loaders.sources import manifest
    small = small_folder(tmp_path / "small", per_class=2)
    big = small_folder(tmp_path / "big", per_class=4, seed=5)
    out = tmp_path / "out.beton"
    write_ffcv.convert(small, out, workers=1, progress=False)
    assert len(write_ffcv.read_manifest(out)["files"]) == 4  # consistent pair: read, checked

    # killed between the two renames of a second conversion: new manifest, old .beton
    real_replace = os.replace
    calls = []

    def killed_after_first(src, dst):  # os.replace, killed when the .beton's turn comes
        calls.append(str(dst))
        if str(dst).endswith(".beton"):
            assert calls[-2].endswith(".manifest.json")  # the manifest moved first
            raise KeyboardInterrupt
        return real_replace(src, dst)
    monkeypatch.setattr(manifest.os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        write_ffcv.convert(big, out, workers=1, progress=False)
    monkeypatch.undo()
    for read in (write_ffcv.read_manifest, subsets.read_manifest):
        with pytest.raises(ValueError, match="does not describe"):
            read(out)

    # the other way round: a new .beton copied over beside the old manifest
    write_ffcv.convert(small, out, workers=1, progress=False)
    write_ffcv.convert(big, tmp_path / "big.beton", workers=1, progress=False)
    shutil.copy(tmp_path / "big.beton", out)
    with pytest.raises(ValueError, match="does not describe"):
        subsets.beton_indices(out, tmp_path / "list.txt")


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    """PIL's I;16 -> RGB clips: 99.6 % of the pixels came out 255 in the converter, while OpenCV
    (torch backend) was right. Every path now decodes with loaders.sources.decode."""
    import cv2
    from loaders.sources.decode import decode_rgb, pil_to_rgb
    from PIL import Image
    root = small_folder(tmp_path / "data")
    a = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    png = root / "class1" / "deep.png"
    cv2.imwrite(str(png), a)
    want = np.repeat((a >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    data = png.read_bytes()
    np.testing.assert_array_equal(decode_rgb(data), want)             # torch backend (OpenCV)
    with Image.open(png) as im:
        assert im.mode.startswith("I")
        np.testing.assert_array_equal(pil_to_rgb(im), want)           # the PIL fallback
    err, warn = validate.check_file(str(png))
    assert err is None and "more than 8 bits" in warn
    pytest.importorskip("ffcv", reason="FFCV not installed: pip install 'fastclr[ffcv]'")
    out = tmp_path / "deep.beton"
    write_ffcv.convert(root, out, workers=1, progress=False, write_mode="raw")
    files = write_ffcv.read_manifest(out)["files"]
    stored = {files[i]: img for i, img, _ in write_ffcv.read_beton(out)}
    np.testing.assert_array_equal(stored["class1/deep.png"], want)


def test_truncated_beton_is_named(tmp_path, ffcv_mixed_beton):
    pytest.importorskip("ffcv", reason="FFCV not installed: pip install 'fastclr[ffcv]'")
    import loaders
    from loaders.config import LoaderConfig
    cut = tmp_path / "cut.beton"
    data = open(ffcv_mixed_beton["out"], "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.beton is truncated"):
        loaders.build(LoaderConfig(backend="ffcv", path=str(cut), image_size=32, batch_size=4), device="cpu")
