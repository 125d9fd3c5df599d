"""The ImageFolder -> .beton converter (loaders/write_ffcv.py).

The mixed folder (24 good JPEGs + 5 readable odd files + 3 unreadable ones) is converted once per
session by conftest's ``ffcv_mixed_beton``; the .beton is read back in plain Python
(``write_ffcv.read_beton``: OpenCV decode, no FFCV JIT).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ffcv", reason="FFCV not installed: pip install 'fastclr[ffcv]'")
cv2 = pytest.importorskip("cv2")

from conftest import NUM_CLASSES, PER_CLASS  # noqa: E402

from loaders.sources import synthetic  # noqa: F401
from loaders import write_ffcv  # noqa: F401
from loaders.sources.folders import list_image_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOOD = NUM_CLASSES * PER_CLASS + len(synthetic.READABLE)


@pytest.fixture(scope="module")
def converted(ffcv_mixed_beton):
    return ffcv_mixed_beton


@pytest.fixture(scope="module")
def stored(converted):
    """relative path -> (stored RGB image, label), in .beton order via the manifest."""
    files = write_ffcv.read_manifest(converted["out"])["files"]
    return {files[i]: (img, label) for i, img, label in write_ffcv.read_beton(converted["out"])}


def source_like_stored(path: str, shape) -> np.ndarray:
    """The source file as RGB, shrunk like RGBImageField does (INTER_AREA) to the stored shape."""
    with Image.open(path) as im:
        src = np.asarray(im.convert("RGB"))
    if src.shape[:2] != shape[:2]:
        src = cv2.resize(src, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return src


def test_every_good_image_is_written_with_its_label(converted, stored, mixed_folder):
    samples, classes = list_image_folder(mixed_folder)
    unreadable = {f"bad_{k}.JPEG" for k in synthetic.UNREADABLE}
    want = {os.path.relpath(p, mixed_folder): label for p, label in samples
            if os.path.basename(p) not in unreadable}
    assert converted["written"] == len(want) == GOOD and converted["skipped"] == len(unreadable)
    assert sorted(stored) == sorted(want)
    for rel, (img, label) in stored.items():
        assert label == want[rel] == classes.index(rel.split("/")[0]), rel
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert max(img.shape[:2]) <= 256  # --max-resolution default
        src = source_like_stored(os.path.join(mixed_folder, rel), img.shape)
        # JPEG q90 re-encoding + draft-mode decode of large JPEGs: close, not exact.
        err = np.abs(src.astype(np.float32) - img).mean()
        assert err < 6, f"{rel}: mean abs error {err:.1f} vs the source"


def test_unreadable_files_are_listed_with_a_reason(converted):
    lines = Path(converted["skipped_report"]).read_text().splitlines()
    reasons = dict(line.split("\t", 1) for line in lines)
    assert sorted(reasons) == sorted(f"n00000000/bad_{k}.JPEG" for k in synthetic.UNREADABLE)
    assert all(r.strip() for r in reasons.values())
    assert "empty" in reasons["n00000000/bad_empty.JPEG"]
    assert "truncated" in reasons["n00000000/bad_truncated.JPEG"]


def test_cmyk_png_and_gray_come_out_rgb(stored, mixed_folder):
    # bad_png.JPEG holds the lossless original of the picture bad_cmyk.JPEG was made from.
    png, _ = stored["n00000000/bad_png.JPEG"]
    ref = source_like_stored(os.path.join(mixed_folder, "n00000000", "bad_png.JPEG"), png.shape)
    ref = ref.astype(np.float32)
    assert np.abs(png - ref).mean() < 6  # JPEG q90 of a noisy texture
    cmyk, _ = stored["n00000000/bad_cmyk.JPEG"]
    assert cmyk.shape == png.shape
    assert np.abs(cmyk - ref).mean() < 6, "CMYK must convert to the RGB colours of the source"
    assert np.allclose(cmyk.reshape(-1, 3).mean(0), ref.reshape(-1, 3).mean(0), atol=1.5)
    gray, _ = stored["n00000000/bad_gray.JPEG"]
    assert gray.shape[2] == 3 and np.abs(gray[..., 0].astype(int) - gray[..., 1]).max() <= 3


def test_manifest(converted, mixed_folder):
    m = write_ffcv.read_manifest(converted["out"])
    assert m["format"] == write_ffcv.MANIFEST_FORMAT
    assert m["classes"] == [f"n{c:08d}" for c in range(NUM_CLASSES)]
    assert m["num_images"] == GOOD == len(m["files"]) == sum(m["class_counts"].values())
    assert m["class_counts"]["n00000000"] == PER_CLASS + len(synthetic.READABLE)
    assert all(m["class_counts"][f"n{c:08d}"] == PER_CLASS for c in range(1, NUM_CLASSES))
    assert m["num_skipped"] == len(synthetic.UNREADABLE)
    assert m["source_root"] == os.path.abspath(mixed_folder)
    assert m["options"]["max_resolution"] == 256 and m["options"]["write_mode"] == "smart"
    assert m["ffcv_version"] != "unknown" and m["fastclr_version"]
    assert "n00000000/bad_cmyk.JPEG" in m["notes"]


def test_dry_run_writes_nothing(tmp_path, mixed_folder, capsys):
    out = tmp_path / "dry.beton"
    assert write_ffcv.main([mixed_folder, str(out), "--dry-run", "--quiet", "--workers", "1"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert f"{GOOD} of {GOOD + len(synthetic.UNREADABLE)} images valid" in capsys.readouterr().out


def test_subset_by_file_list(tmp_path, image_folder):
    names = ["n00000001_0.JPEG", "n00000001_4.JPEG", "n00000003_2.JPEG"]
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "sub.beton"
    rc = write_ffcv.main([image_folder, str(out), "--subset", str(tmp_path / "list.txt"), "--quiet",
                          "--workers", "1", "--write-mode", "jpg"])
    assert rc == 0
    m = write_ffcv.read_manifest(out)
    assert [os.path.basename(f) for f in m["files"]] == names
    assert [label for _, _, label in write_ffcv.read_beton(out)] == [1, 1, 3]
    assert m["class_counts"] == {"n00000000": 0, "n00000001": 2, "n00000002": 0, "n00000003": 1}


def test_subset_unknown_names_is_a_one_line_error(tmp_path, image_folder, capsys):
    (tmp_path / "list.txt").write_text("n00000001_0.JPEG\nn09999999_1.JPEG\nnope.JPEG\n")
    out = tmp_path / "sub.beton"
    assert write_ffcv.main([image_folder, str(out), "--subset", str(tmp_path / "list.txt")]) == 2  # bad input (every CLI: 2)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "2 of 3 names" in err and "n09999999_1.JPEG" in err
    assert not out.exists()


def test_fraction_and_limit(tmp_path, image_folder, capsys):
    # --fraction is loaders.subsets' class-balanced draw: round(0.34 * 6) = 2 images per class.
    args = [image_folder, str(tmp_path / "f.beton"), "--dry-run", "--quiet", "--workers", "1"]
    assert write_ffcv.main(args + ["--fraction", "0.34", "--seed", "3"]) == 0
    assert f"{2 * NUM_CLASSES} of {2 * NUM_CLASSES} images valid" in capsys.readouterr().out
    samples = [(f"c{c}/{i}.jpg", c) for c in range(3) for i in range([10, 3, 1][c])]
    b = write_ffcv.select_limit(samples, 5)
    assert len(b) == 5 and {lab for _, lab in b} == {0, 1, 2}  # round-robin spans the classes
    assert list(tmp_path.iterdir()) == []


def test_nothing_valid_exits_nonzero(tmp_path, bad_files, capsys):
    (tmp_path / "src" / "a").mkdir(parents=True)
    for kind in synthetic.UNREADABLE:
        os.link(bad_files[kind], tmp_path / "src" / "a" / f"{kind}.jpg")
    out = tmp_path / "x.beton"
    assert write_ffcv.main([str(tmp_path / "src"), str(out), "--quiet", "--workers", "1"]) == 2  # bad input
    assert "no valid image" in capsys.readouterr().err
    assert not out.exists()


def test_writer_failure_midway_keeps_the_final_name_clean(tmp_path, image_folder, monkeypatch):
    """A writer that dies after writing its data (before the header is final) removes its .tmp and
    leaves an existing file of the final name untouched."""
    from ffcv.writer import DatasetWriter

    out = tmp_path / "f.beton"
    out.write_bytes(b"previous good file")

    def boom(self, allocations):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DatasetWriter, "finalize", boom)
    with pytest.raises(OSError, match="No space left"):
        write_ffcv.convert(image_folder, out, workers=1, limit=6, progress=False)
    assert out.read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.beton"]


@pytest.mark.e2e
def test_sigkill_midway_leaves_no_final_file(tmp_path, image_folder):
    """A real converter process killed with SIGKILL while writing: no file under the final name."""
    out = tmp_path / "k.beton"
    slow_writer = (
        "import sys, time\n"
        "from loaders import write_ffcv as w\n"
        "get = w.ValidatedImages.__getitem__\n"
        "w.ValidatedImages.__getitem__ = lambda self, i: (time.sleep(0.5), get(self, i))[1]\n"
        f"sys.exit(w.main([{image_folder!r}, {str(out)!r}, '--workers', '1', '--quiet', '--limit', '12']))\n")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", slow_writer], cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err)
    tmp = Path(str(out) + ".tmp")
    try:
        deadline = time.time() + 90
        while proc.poll() is None and time.time() < deadline and not (tmp.exists() and tmp.stat().st_size):
            time.sleep(0.1)
        assert proc.poll() is None, f"converter ended before it was killed: {log.read_text()[-500:]}"
        assert tmp.exists(), "the converter never started writing"
        time.sleep(1.0)  # a few images into the write
        os.killpg(proc.pid, signal.SIGKILL)  # the converter and its writer workers
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not out.exists()
    assert not Path(write_ffcv.manifest_path(out)).exists()


def test_cli_help_teaches():
    text = write_ffcv.build_parser().format_help()
    for flag in ("--subset", "--fraction", "--limit", "--max-resolution", "--write-mode", "--jpeg-quality",
                 "--compress-probability", "--workers", "--chunk-size", "--dry-run", "manifest.json",
                 "skipped.txt"):
        assert flag in text, flag
