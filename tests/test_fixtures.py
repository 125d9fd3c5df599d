"""The fixtures are what they claim: later loader and converter tests rely on these properties."""
import os

import numpy as np
from PIL import Image

from conftest import NUM_CLASSES, PER_CLASS
from loaders.sources import synthetic
from loaders.sources.folders import list_image_folder


def test_image_folder_layout_and_sizes(image_folder):
    samples, classes = list_image_folder(image_folder)
    assert len(classes) == NUM_CLASSES and len(samples) == NUM_CLASSES * PER_CLASS
    sizes = [Image.open(p).size for p, _ in samples]
    assert any(h > w for w, h in sizes), "needs a portrait image"
    assert min(w * h for w, h in sizes) < 32 * 32, "needs a tiny image"
    assert max(w for w, h in sizes) >= 1500, "needs a large image"
    mean_w = np.mean([w for w, _ in sizes])
    assert 300 < mean_w < 700
    for p, _ in samples:
        im = Image.open(p)
        assert im.format == "JPEG" and im.mode == "RGB"


def test_images_are_textured_not_flat(image_folder):
    samples, _ = list_image_folder(image_folder)
    arr = np.asarray(Image.open(samples[0][0]), dtype=np.float32)
    assert arr.std(axis=(0, 1)).min() > 10, "each channel must vary across the image"
    # different images differ in colour
    means = [np.asarray(Image.open(p), np.float32).mean((0, 1)) for p, _ in samples[:6]]
    assert np.ptp(np.stack(means), axis=0).max() > 20


def test_bad_files_have_the_intended_defects(bad_files):
    assert set(bad_files) == set(synthetic.UNREADABLE) | set(synthetic.READABLE)
    assert os.path.getsize(bad_files["empty"]) == 0
    assert Image.open(bad_files["cmyk"]).mode == "CMYK"
    assert Image.open(bad_files["png"]).format == "PNG" and bad_files["png"].endswith(".JPEG")
    assert Image.open(bad_files["gray"]).mode == "L"
    assert Image.open(bad_files["tiny"]).size == (1, 1)
    assert Image.open(bad_files["huge"]).size == (6000, 4000)
    for kind in synthetic.UNREADABLE:
        try:
            Image.open(bad_files[kind]).load()
        except Exception:
            continue
        raise AssertionError(f"{kind} file decoded without error")


def test_mixed_folder_holds_good_and_bad(mixed_folder, bad_files):
    samples, _ = list_image_folder(mixed_folder)
    assert len(samples) == NUM_CLASSES * PER_CLASS + len(bad_files)
