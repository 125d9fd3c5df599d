"""Session-scoped test data, built once per run (tmp_path_factory), shared by every test module.

* ``image_folder``: ImageFolder of 4 classes x 6 textured JPEGs, ImageNet-like sizes, with a
  portrait, a tiny (24x18) and a large (1600x1200) image among them, quality 90.
* ``bad_files``: kind -> path for truncated / empty / text (unreadable) and cmyk / png-as-.JPEG /
  gray / 1x1 / 6000x4000 (readable) files.
* ``mixed_folder``: ``image_folder``'s images plus all bad files in class n00000000.
"""
from __future__ import annotations

import os
import shutil

import pytest

from loaders import synthetic

NUM_CLASSES = 4
PER_CLASS = 6
# (w, h): mostly ImageNet-like, one portrait, one tiny, one large.
SIZES = [(500, 375), (480, 360), (375, 500), (24, 18), (640, 427), (1600, 1200), (400, 300), (333, 500),
         (500, 333), (450, 338), (256, 256), (520, 390)]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("images")
    synthetic.make_image_folder(root, NUM_CLASSES, PER_CLASS, seed=1, sizes=SIZES)
    return str(root)


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory) -> dict:
    return synthetic.make_bad_files(tmp_path_factory.mktemp("bad"), seed=2)


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory, image_folder, bad_files) -> str:
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(image_folder, root, dirs_exist_ok=True)
    for path in bad_files.values():
        shutil.copy(path, os.path.join(root, "n00000000", os.path.basename(path)))
    return str(root)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The real Fashion-MNIST demo ImageFolder (train/ 60k, val/ 10k), prepared once per session
    (~25 s on 2 cores) into a temporary cache. Skips with the install command if the source is absent."""
    from loaders import demo_data
    if not os.path.isdir(demo_data.SOURCE):
        pytest.skip(f"Fashion-MNIST source missing at {demo_data.SOURCE}: {demo_data.INSTALL}")
    return demo_data.prepare(tmp_path_factory.mktemp("cache"), progress=False)
