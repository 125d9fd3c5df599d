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
from pathlib import Path

import pytest
# Triton (loaded by torch._dynamo) before anything can import TensorFlow (tests/test_zoo.py): in the
# other order their two LLVM copies collide and the process segfaults (see fastclr.zoo.tf1.import_tf).
import torch._dynamo  # noqa: F401

from loaders.sources import synthetic

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
    if not os.path.isdir(demo_data.source_dir()):
        pytest.skip(f"Fashion-MNIST source missing at {demo_data.source_dir()}: {demo_data.INSTALL}")
    return demo_data.prepare(tmp_path_factory.mktemp("cache"), progress=False)


def copy_as(image_folder: str, root, where) -> str:
    """``image_folder``'s images under ``root`` at ``where(i, class, name)`` (a relative path), plus a
    text file that is not an image: data without labels, as people have it."""
    root = Path(root)
    i = 0
    for c in sorted(os.listdir(image_folder)):
        for name in sorted(os.listdir(os.path.join(image_folder, c))):
            dest = root / where(i, c, name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(image_folder, c, name), dest)
            i += 1
    (root / "notes.txt").write_text("not an image\n")
    return str(root)


@pytest.fixture(scope="session")
def flat_folder(tmp_path_factory, image_folder) -> str:
    """``image_folder``'s 24 images in one folder, no class structure (and notes.txt)."""
    return copy_as(image_folder, tmp_path_factory.mktemp("flat"), lambda i, c, name: f"img{i:03d}.jpg")


@pytest.fixture(scope="session")
def nested_folder(tmp_path_factory, image_folder) -> str:
    """The same 24 images at depths 0 to 3 (camera/day/hour folders), with a symlink loop (``2021/up ->
    ..``) and a second link to one folder, both of which must not list anything twice."""
    depth = ["{n}", "cam{k}/{n}", "2021/03/day{k}/{n}", "2021/04/day{k}/hour{k}/{n}"]
    root = copy_as(image_folder, tmp_path_factory.mktemp("nested"),
                   lambda i, c, name: depth[i % 4].format(k=i % 3, n=f"{c}_{name}"))
    os.symlink("..", os.path.join(root, "2021", "up"))
    os.symlink("cam1", os.path.join(root, "cam1_again"))
    return root


@pytest.fixture
def call(capsys):
    """``call(main, args) -> (exit code, stdout, stderr)``: a command's main() in this process, as its
    CLI runs it (``python fastclr/X.py`` is that main with sys.argv), without the seconds a new
    interpreter spends importing torch. Tests of process behaviour (signals, exit, workers at exit,
    torchrun) start the real CLI instead."""
    def run(main, args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


# --- DALI fixtures ---
# The DALI backend's data. The loader contract test reads `dali_contract_data` for
# backend "dali": the mixed folder (good images + every bad kind) with the clean list written by
# `python -m loaders.validate`, which DALI needs because it cannot skip undecodable files.

@pytest.fixture(scope="session")
def dali_contract_data(tmp_path_factory, mixed_folder):
    """dict(path, file_list, expected_images, bad): the clean list keeps the 24 good images and the 5
    readable odd files (CMYK, PNG named .JPEG, gray, 1x1, 6000x4000: DALI's CPU decoder reads them all)
    and drops the 3 unreadable ones."""
    pytest.importorskip("nvidia.dali", reason="DALI not installed: pip install 'fastclr[dali]'")
    from loaders.sources import synthetic
    from loaders import validate
    out = tmp_path_factory.mktemp("dali_list") / "clean_list.txt"
    rc = validate.main([mixed_folder, "--out", str(out), "--workers", "1", "--quiet"])
    assert rc == 0, f"loaders.validate exited with {rc}"
    expected = NUM_CLASSES * PER_CLASS + len(synthetic.READABLE)
    listed = sum(1 for line in out.read_text().splitlines() if line.strip())
    assert listed == expected, f"validate kept {listed} files, expected {expected}"
    return dict(path=mixed_folder, file_list=str(out), expected_images=expected, bad=0,
                num_classes=NUM_CLASSES)


# --- FFCV fixtures ---
# The FFCV backend's data. `ffcv_mixed_beton` converts the mixed folder once per
# session with loaders.write_ffcv (unreadable files skipped, odd ones converted to RGB); the loader
# contract test reads `ffcv_contract_data` for backend "ffcv".

@pytest.fixture(scope="session")
def ffcv_mixed_beton(tmp_path_factory, mixed_folder) -> dict:
    """write_ffcv.convert's summary dict (``out`` is the .beton, ``manifest`` its manifest)."""
    pytest.importorskip("ffcv", reason="FFCV not installed: pip install 'fastclr[ffcv]'")
    from loaders import write_ffcv
    out = tmp_path_factory.mktemp("ffcv") / "mixed.beton"
    return write_ffcv.convert(mixed_folder, out, workers=2, progress=False)


@pytest.fixture(scope="session")
def ffcv_contract_data(ffcv_mixed_beton):
    """The 24 good images and the 5 readable odd files are in the .beton; the 3 unreadable ones were
    skipped by the converter, so the loader itself sees no bad file."""
    from loaders.sources import synthetic
    expected = NUM_CLASSES * PER_CLASS + len(synthetic.READABLE)
    assert ffcv_mixed_beton["written"] == expected, ffcv_mixed_beton
    return dict(path=ffcv_mixed_beton["out"], file_list=None, expected_images=expected, bad=0,
                num_classes=NUM_CLASSES)


# Fixtures that run whole programs (the benchmark's smoke run, the real demo set's preparation):
# every test that uses one is end to end.
E2E_FIXTURES = {"quick_result", "demo_root"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
