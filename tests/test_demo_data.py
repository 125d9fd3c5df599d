"""The embedded demo data set: real Fashion-MNIST files -> ImageFolder, counts, atomic preparation."""
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from loaders import demo_data
from loaders.sources.folders import list_image_folder


@pytest.mark.e2e
def test_real_demo_set_counts_per_class(demo_root):
    for split, per_class in (("train", 6000), ("val", 1000)):
        samples, classes = list_image_folder(demo_root / split)
        assert classes == demo_data.CLASS_DIRS
        counts = np.bincount([lab for _, lab in samples], minlength=10)
        assert counts.tolist() == [per_class] * 10, (split, counts)


def test_demo_images_are_32px_rgb_and_match_the_source(demo_root):
    images, labels = demo_data.load_split("val")
    for i in (0, 1, 9999):
        path = demo_root / "val" / demo_data.CLASS_DIRS[labels[i]] / f"{i:05d}.jpg"
        im = Image.open(path)
        assert im.size == (32, 32) and im.mode == "RGB"
        arr = np.asarray(im, np.float32)
        assert np.abs(arr[2:30, 2:30, 0] - images[i]).mean() < 6    # JPEG q95 of the padded source
        assert np.abs(arr[:, :, 0] - arr[:, :, 2]).max() <= 8           # gray in 3 channels


def test_second_call_reuses_the_cache(demo_root):
    t0 = time.time()
    assert demo_data.prepare(demo_root.parent, progress=False) == demo_root
    assert time.time() - t0 < 1.0


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def small_source(tmp_path):
    """A Fashion-MNIST-format source with 3000 train / 500 val images (same file names)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 3000), ("val", 500)):
        img_name, lbl_name = demo_data.FILES[split]
        _write_idx(src / img_name, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(src / lbl_name, np.arange(n) % 10)
    return src


@pytest.mark.e2e
def test_interrupted_preparation_is_redone(tmp_path, small_source):
    cache = tmp_path / "cache"
    code = ("import sys; from loaders import demo_data; "
            "demo_data.prepare(sys.argv[1], sys.argv[2], progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(cache), str(small_source)])
    deadline = time.time() + 60
    while time.time() < deadline:      # wait until it is writing images, then kill it hard
        tmps = list(cache.glob(".fashion-mnist-32.tmp-*")) if cache.exists() else []
        if tmps and sum(1 for _ in tmps[0].rglob("*.jpg")) > 200:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cache / demo_data.NAME).exists(), "a killed preparation must not look complete"
    assert not demo_data.is_complete(cache / demo_data.NAME)
    root = demo_data.prepare(cache, small_source, progress=False)
    samples, _ = list_image_folder(root / "train")
    assert len(samples) == 3000 and len(list_image_folder(root / "val")[0]) == 500
    assert not list(cache.glob(".fashion-mnist-32.tmp-*")), "stale temp folder must be cleaned"


def test_folder_without_marker_is_rebuilt(tmp_path, small_source):
    cache = tmp_path / "cache"
    (cache / demo_data.NAME / "train" / "0_T-shirt_top").mkdir(parents=True)
    root = demo_data.prepare(cache, small_source, progress=False)
    assert len(list_image_folder(root / "train")[0]) == 3000


@pytest.mark.e2e
def test_missing_source_is_one_line_error_with_install_command(tmp_path):
    with pytest.raises(demo_data.DemoDataError) as e:
        demo_data.prepare(tmp_path / "c", tmp_path / "nope", progress=False)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "\n" not in msg
    r = subprocess.run([sys.executable, "-m", "loaders.demo_data", "--cache", str(tmp_path / "c"),
                        "--source", str(tmp_path / "nope")], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "dataset-fashion-mnist" in r.stderr


def test_fmnist_env_names_the_source_folder(tmp_path, small_source, monkeypatch):
    """$FASTCLR_FMNIST points a machine without Debian's package (a GPU machine) at carried IDX files."""
    monkeypatch.setenv("FASTCLR_FMNIST", str(small_source))
    assert demo_data.source_dir() == str(small_source)
    root = demo_data.prepare(tmp_path / "c", progress=False)
    assert json.loads((root / ".complete").read_text())["source"] == str(small_source)
    monkeypatch.setenv("FASTCLR_FMNIST", str(tmp_path / "nope"))
    with pytest.raises(demo_data.DemoDataError, match=str(tmp_path / "nope")):
        demo_data.prepare(tmp_path / "d", progress=False)


def test_digits_set_via_the_cli_is_a_balanced_exact_split(tmp_path):
    """`python -m loaders.demo_data --dataset digits`: scikit-learn's 1797 digits as a 32 px ImageFolder,
    30 % of each class in val/, every PNG the 8x8 source enlarged 4x exactly (lossless); --source is
    refused in one line (it names the Fashion-MNIST files)."""
    from sklearn.datasets import load_digits
    root_dir = os.path.dirname(os.path.dirname(__file__))
    r = subprocess.run([sys.executable, "-m", "loaders.demo_data", "--dataset", "digits", "--cache",
                        str(tmp_path / "c")], capture_output=True, text=True, cwd=root_dir)
    assert r.returncode == 0, r.stderr
    root = r.stdout.strip().splitlines()[-1]
    train, _ = list_image_folder(os.path.join(root, "train"))
    val, _ = list_image_folder(os.path.join(root, "val"))
    d = load_digits()
    assert len(train) + len(val) == len(d.target) == 1797 and len(val) == 539
    for c in range(10):
        assert sum(1 for _, lab in val if lab == c) == round(0.3 * int((d.target == c).sum()))
    sources = {img.tobytes() for img in np.round(d.images * (255 / 16)).astype(np.uint8)}
    for path, _ in train[:20] + val[:20]:
        img = np.asarray(Image.open(path))
        assert img.shape == (32, 32, 3) and (img == img[:, :, :1]).all()
        assert img[::4, ::4, 0].tobytes() in sources
        assert (np.kron(img[::4, ::4, 0], np.ones((4, 4), np.uint8)) == img[:, :, 0]).all()
    r = subprocess.run([sys.executable, "-m", "loaders.demo_data", "--dataset", "digits", "--source", "x",
                        "--cache", str(tmp_path / "c")], capture_output=True, text=True, cwd=root_dir)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "fashion-mnist" in r.stderr
