"""The embedded default data set: Fashion-MNIST as an ImageFolder of JPEGs, prepared on first use.

Source: Debian's ``dataset-fashion-mnist`` package (/usr/share/datasets/fashion-mnist, MIT licence),
or the folder ``$FASTCLR_FMNIST`` names (a machine without the package, e.g. a GPU machine the four files
were carried to): four IDX .gz files parsed with numpy. Output, in ``$FASTCLR_CACHE`` or ``~/.cache/fastclr``:

    fashion-mnist-32/train/<k_Class>/<index>.jpg   60,000 images, 6,000 per class
    fashion-mnist-32/val/<k_Class>/<index>.jpg     10,000 images, 1,000 per class

Choice (documented in the README): each 28x28 grayscale image is zero-padded by 2 pixels to 32x32
(no resampling, so no blur is invented) and stored as 3-channel RGB, so every backend and the SimCLR
recipe run unchanged at 32px like CIFAR. Being gray, hue and saturation jitter do nothing on it;
brightness, contrast, crops and flips do the work.

Preparation is atomic: images are written to a temporary sibling folder, a ``.complete`` marker
with the counts is written last, and the folder is renamed into place. An interrupted preparation
leaves only a temporary folder, which the next call removes before starting again.

    python -m loaders.demo_data            # prepare (or find) it and print the path
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

SOURCE = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
CLASS_DIRS = [f"{k}_{name}" for k, name in enumerate(CLASSES)]   # sorted order == label order
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
NAME = "fashion-mnist-32"
INSTALL = "apt-get install dataset-fashion-mnist (or set FASTCLR_FMNIST to a folder with its four IDX .gz files)"


class DemoDataError(RuntimeError):
    """One-line, actionable error about the demo data set."""


def resolve(path: str, split: str) -> str:
    """``path``, or the demo set's ``split`` folder ("train" or "val") when path is empty: the one
    place where an empty data path means the embedded demo set (prepared on first use)."""
    return path if path else str(prepare() / split)


def source_dir() -> str:
    """Where the IDX files are read from: $FASTCLR_FMNIST, else Debian's package folder."""
    return os.environ.get("FASTCLR_FMNIST") or SOURCE


def cache_dir() -> Path:
    return Path(os.environ.get("FASTCLR_CACHE") or Path.home() / ".cache" / "fastclr")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (optionally .gz): magic 0x0000 dtype ndim, big-endian dims, then data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DemoDataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DemoDataError(f"{path}: header says {tuple(dims)} but holds {data.size} bytes (truncated?)")
    return data.reshape(tuple(dims))


def load_split(split: str, source: str | os.PathLike | None = None):
    """(images uint8 [N, 28, 28], labels uint8 [N]) of one split."""
    source = source_dir() if source is None else source
    img_name, lbl_name = FILES[split]
    img_path, lbl_path = Path(source) / img_name, Path(source) / lbl_name
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise DemoDataError(f"Fashion-MNIST not found at {p}; install it with: {INSTALL}")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if len(images) != len(labels):
        raise DemoDataError(f"{img_path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def to_rgb32(img28: np.ndarray) -> np.ndarray:
    """28x28 gray -> 32x32x3 RGB: zero padding of 2 px, gray copied to three channels."""
    padded = np.pad(img28, 2)
    return np.repeat(padded[:, :, None], 3, axis=2)


def is_complete(root: Path) -> bool:
    marker = root / ".complete"
    if not marker.is_file():
        return False
    try:
        counts = json.loads(marker.read_text())["counts"]
    except (ValueError, KeyError):
        return False
    return all((root / split).is_dir() for split in counts)


def _write_folder(cache: Path, name: str, splits: dict, class_dirs: list[str], to_rgb, meta: dict,
                  desc: str, progress: bool, ext: str = "jpg", **save_kwargs) -> Path:
    """Write ``splits`` ({split: (images, labels)}) as ``cache/name/<split>/<class>/<index>.<ext>``,
    atomically (a temporary sibling folder, a ``.complete`` marker with the counts last, then a rename)."""
    from PIL import Image
    from tqdm import tqdm

    root = cache / name
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(f".{name}.tmp-*"):   # left by an interrupted preparation
        shutil.rmtree(stale, ignore_errors=True)
    if root.exists():                            # a folder without a valid marker is not trusted
        shutil.rmtree(root)
    tmp = cache / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    counts = {}
    try:
        total = sum(len(x) for x, _ in splits.values())
        bar = tqdm(total=total, desc=desc, unit="img", disable=not progress,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0)
        for split, (images, labels) in splits.items():
            for d in class_dirs:
                (tmp / split / d).mkdir(parents=True, exist_ok=True)
            per_class = np.bincount(labels, minlength=len(class_dirs))
            for i, (img, lab) in enumerate(zip(images, labels)):
                Image.fromarray(to_rgb(img)).save(tmp / split / class_dirs[lab] / f"{i:05d}.{ext}", **save_kwargs)
                bar.update(1)
            counts[split] = {class_dirs[k]: int(n) for k, n in enumerate(per_class)}
        bar.close()
        (tmp / ".complete").write_text(json.dumps({**meta, "counts": counts}, indent=1))
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def prepare(cache: Optional[str | os.PathLike] = None, source: str | os.PathLike | None = None,
            progress: bool = True, quality: int = 95) -> Path:
    """Return the demo root (with train/ and val/), preparing it on first use."""
    cache = Path(cache) if cache is not None else cache_dir()
    source = source_dir() if source is None else source
    root = cache / NAME
    if is_complete(root):
        return root
    splits = {s: load_split(s, source) for s in FILES}  # fails fast, before writing anything
    return _write_folder(cache, NAME, splits, CLASS_DIRS, to_rgb32,
                         {"source": str(source), "format": "32x32 RGB JPEG, 2px zero pad"},
                         "preparing Fashion-MNIST demo set", progress, format="JPEG", quality=quality)


# ----------------------------------------------------------------------------- a second small set: digits
# scikit-learn's copy of the UCI handwritten digits (1797 images of 8x8, 16 gray levels, 10 classes),
# shipped inside the package: the second data set the few-label recipes are chosen on (docs/semisup.md).
# It has no official test split: a seeded class-balanced 30 % is held out as val. Each image is scaled
# to 0-255 and enlarged 4x by pixel repetition to 32x32 (no interpolation, so nothing is invented),
# stored as lossless PNG.
DIGITS_NAME = "digits-32"
DIGITS_DIRS = [str(k) for k in range(10)]
DIGITS_VAL_FRACTION = 0.3


def digits_splits(seed: int = 0) -> dict:
    """{"train": (images uint8 [N, 8, 8], labels), "val": (...)}: a seeded, class-balanced 70/30 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DemoDataError("the digits set comes with scikit-learn: pip install scikit-learn "
                            "(or make install)") from e
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        val[rng.permutation(idx)[:int(round(DIGITS_VAL_FRACTION * len(idx)))]] = True
    return {"train": (images[~val], labels[~val]), "val": (images[val], labels[val])}


def digits_to_rgb32(img8: np.ndarray) -> np.ndarray:
    big = np.kron(img8, np.ones((4, 4), dtype=np.uint8))
    return np.repeat(big[:, :, None], 3, axis=2)


def prepare_digits(cache: Optional[str | os.PathLike] = None, progress: bool = True) -> Path:
    """Return the digits root (train/ 1258 images, val/ 539), preparing it on first use."""
    cache = Path(cache) if cache is not None else cache_dir()
    root = cache / DIGITS_NAME
    if is_complete(root):
        return root
    return _write_folder(cache, DIGITS_NAME, digits_splits(), DIGITS_DIRS, digits_to_rgb32,
                         {"source": "sklearn.datasets.load_digits",
                          "format": "32x32 RGB PNG, 8x8 enlarged 4x by repetition, val: 30 % per class, seed 0"},
                         "preparing the digits set", progress, ext="png", format="PNG")


DATASETS = {"fashion-mnist": prepare, "digits": prepare_digits}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loaders.demo_data",
                                 description="Prepare a small data set as an ImageFolder (once) and print its path: the Fashion-MNIST demo set, or scikit-learn's digits.")
    ap.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS),
                    help="fashion-mnist: the demo set (Debian package); digits: scikit-learn's 8x8 digits")
    ap.add_argument("--cache", default=None, help="cache folder (default: $FASTCLR_CACHE or ~/.cache/fastclr)")
    ap.add_argument("--source", default=None,
                    help=f"folder with the IDX .gz files (default: $FASTCLR_FMNIST, else {SOURCE})")
    args = ap.parse_args(argv)
    try:
        if args.dataset == "digits":
            if args.source:
                raise DemoDataError("--source applies to fashion-mnist only (digits come with scikit-learn)")
            print(prepare_digits(args.cache))
        else:
            print(prepare(args.cache, args.source))
    except DemoDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
