"""The rest of what trying fastclr on a cluster found, one regression test per fault, through the real
commands: every reader of a .beton checks its manifest, DALI resumes exactly, EXIF orientation is the
same in every backend and the converter, and the small ones (ranges, a plain pickle, plot inputs, a
quiet converter, names with line breaks, the non-finite-loss line)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import loaders
from fastclr import checkpoint as ck
from loaders.config import LoaderConfig

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "fastclr" / "pretrain.py")
TINY = ["demo_cpu", "--data.image_size=32", "--data.num_workers=0", "--optim.global_batch_size=8",
        "--run.knn_eval=false", "--run.progress=false", "--run.log_every=1"]


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    return e


def cli(args, **kw):
    return subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300, **kw)


def last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.mark.e2e
def test_every_reader_of_a_beton_checks_its_manifest(tmp_path, image_folder, call):
    """A .beton beside a manifest of another conversion (a kill between the two renames): pretraining
    and loaders.preview refuse it in one line, as fine-tuning already did."""
    pytest.importorskip("ffcv", reason="FFCV not installed: pip install 'fastclr[ffcv]'")
    from loaders import write_ffcv
    out = tmp_path / "x.beton"
    write_ffcv.convert(image_folder, out, workers=1, progress=False)
    mf = Path(write_ffcv.manifest_path(out))
    m = json.loads(mf.read_text())
    mf.write_text(json.dumps({**m, "beton_id": "0" * 32}))
    from fastclr import pretrain
    from loaders import preview
    code, _, err = call(pretrain.main, [*TINY, "--data.backend=ffcv", f"--data.path={out}",
                                        f"--run.out_dir={tmp_path / 'run'}", "--run.max_steps=1"])
    assert code == 2 and "does not describe" in last_line(err), err
    code, _, err = call(preview.main, ["--data.backend=ffcv", f"--data.path={out}", "--data.image_size=32",
                                       "-n", "2", "--out", str(tmp_path / "p.png")])
    assert code == 2 and "does not describe" in last_line(err), err


@pytest.mark.e2e
def test_dali_resumes_exactly(tmp_path, image_folder):
    """DALI draws its crops inside its pipeline; its checkpoint travels in fastclr's: a run stopped at
    step 4 and resumed ends bitwise where the uninterrupted run ends (the deviation 'DALI resume' is
    gone)."""
    pytest.importorskip("nvidia.dali", reason="DALI not installed: pip install 'fastclr[dali]'")
    common = [*TINY, "--data.backend=dali", "--data.dali_photometry=torch", f"--data.path={image_folder}",
              "--optim.epochs=3", "--run.deterministic=true", "--run.ckpt_every=100"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert cli([sys.executable, PRETRAIN, *common, f"--run.out_dir={ref}"]).returncode == 0
    assert cli([sys.executable, PRETRAIN, *common, f"--run.out_dir={cut}", "--run.max_steps=4"]).returncode == 0
    r = cli([sys.executable, PRETRAIN, *common, f"--run.out_dir={cut}", "--run.resume=auto"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    (sa, a), (sb, b) = [ck.list_checkpoints(d)[-1] for d in (ref, cut)]
    assert sa == sb == 9
    a, b = ck.load(a)["model"], ck.load(b)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert isinstance(ck.load(ck.list_checkpoints(cut)[0][1])["loader"]["states"][0], (bytes, str))


def exif_turned_folder(root: Path) -> Path:
    """One 48x32 JPEG whose left 20 columns are white, tagged EXIF orientation 6 (turn 90 degrees
    clockwise to view): as shown it is 32 wide and 48 tall, white at the top."""
    a = np.zeros((32, 48, 3), np.uint8)
    a[:, :20] = 255
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    (root / "c0").mkdir(parents=True)
    for i in range(4):
        im.save(root / "c0" / f"{i}.jpg", exif=exif.tobytes(), quality=95)
    return root


def top_minus_bottom(view: torch.Tensor) -> float:
    v = view.float().mean(0)  # [H, W]
    h = v.shape[0]
    return float(v[: h // 4].mean() - v[-(h // 4):].mean())


@pytest.mark.e2e
def test_exif_orientation_is_applied_by_every_backend_and_the_converter(tmp_path):
    folder = exif_turned_folder(tmp_path / "img")
    cfg = LoaderConfig(path=str(folder), augment="eval", image_size=16, batch_size=4, num_workers=0, train=False)
    seen = {"torch": next(iter(loaders.build(cfg))).views[0]}
    if loaders.available("dali")[0]:
        seen["dali"] = next(iter(loaders.build(LoaderConfig(**{**vars(cfg), "backend": "dali"})))).views[0]
    if loaders.available("ffcv")[0]:
        from loaders import write_ffcv
        beton = tmp_path / "x.beton"
        write_ffcv.convert(folder, beton, workers=1, progress=False)
        seen["ffcv"] = next(iter(loaders.build(LoaderConfig(**{**vars(cfg), "backend": "ffcv",
                                                                "path": str(beton)})))).views[0]
    assert len(seen) == 3, f"a backend is missing: {sorted(seen)}"
    for name, views in seen.items():
        for v in views:
            assert top_minus_bottom(v) > 0.5, name  # white at the top, as a viewer shows it
    from loaders.sources.decode import read_rgb
    assert read_rgb(str(folder / "c0" / "0.jpg")).shape == (48, 32, 3)
    assert read_rgb(str(folder / "c0" / "0.jpg"), exif=False).shape == (32, 48, 3)  # TF's view (zoo eval)


# ----------------------------------------------------------------------------- the small ones
@pytest.mark.e2e
def test_small_faults_are_one_line(tmp_path, image_folder, call):
    from fastclr import pretrain
    base = [*TINY, f"--data.path={image_folder}"]
    for extra, msg in ((["--data.image_size=100000"], "--data.image_size: must be >= 1 and <= 4096"),
                       (["--run.max_steps=0"], "--run.max_steps: must be >= 1")):
        code, _, err = call(pretrain.main, base + extra + [f"--run.out_dir={tmp_path / 'x'}"])
        assert code == 2 and msg in last_line(err), err
    # the non-finite loss stop reads as the other errors do, and names the checkpoint to go back to
    code, _, err = call(pretrain.main, base + [f"--run.out_dir={tmp_path / 'nan'}", "--run.max_steps=6",
                                               "--optim.lr=1e30", "--optim.optimizer=sgd", "--run.ckpt_every=1"])
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("pretrain.py: error: non-finite loss at step") and "checkpoint" in err, err


def test_a_plain_pickle_is_refused_without_torchs_warning(tmp_path, capfd):
    import pickle
    p = tmp_path / "x.pt"
    p.write_bytes(pickle.dumps({"step": 1}, protocol=4))
    with pytest.raises(ck.UnusableCheckpoint, match="not a torch checkpoint"):
        ck.load(p)
    assert "please file an issue" not in capfd.readouterr().err


def test_plot_takes_non_finite_values_and_refuses_an_unknown_format(tmp_path, capsys):
    from fastclr import plot
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": NaN, "lr": 0.1}\n{"step": 2, "loss": Infinity, '
                                        '"lr": 0.1}\n{"step": 3, "loss": 2.0, "lr": 0.1}\n')
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "c.foo")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown image format .foo" in err and "\n" not in err and not (tmp_path / "c.foo").exists()


@pytest.mark.e2e
def test_converter_quiet_and_names_with_line_breaks(tmp_path):
    pytest.importorskip("ffcv", reason="FFCV not installed: pip install 'fastclr[ffcv]'")
    from loaders.sources import synthetic
    folder = tmp_path / "img"
    synthetic.make_image_folder(folder, 2, 3, seed=1, sizes=[(40, 30)])
    odd = folder / "n00000000" / "two\nlines.jpg"
    odd.write_bytes((folder / "n00000000").joinpath(sorted(os.listdir(folder / "n00000000"))[0]).read_bytes())
    r = cli([sys.executable, "-m", "loaders.write_ffcv", str(folder), str(tmp_path / "o.beton"), "--quiet",
             "--workers", "1"])
    assert r.returncode == 0, r.stderr
    assert "it/s" not in r.stderr and "%|" not in r.stderr  # no progress bar, FFCV's included
    skipped = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped ")]
    assert len(skipped) == 1 and "two\\nlines.jpg" in skipped[0] and "line break" in skipped[0], r.stderr
    assert not any(ln.strip() == "lines.jpg" or ln.startswith("lines.jpg") for ln in r.stderr.splitlines())
