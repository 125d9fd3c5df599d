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


def prepare(cache: Optional[str | os.PathLike] = None, source: str | os.PathLike | None = None,
            progress: bool = True, quality: int = 95) -> Path:
    """Return the demo root (with train/ and val/), preparing it on first use."""
    from PIL import Image
    from tqdm import tqdm

    cache = Path(cache) if cache is not None else cache_dir()
    source = source_dir() if source is None else source
    root = cache / NAME
    if is_complete(root):
        return root
    splits = {s: load_split(s, source) for s in FILES}  # fails fast, before writing anything
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(f".{NAME}.tmp-*"):   # left by an interrupted preparation
        shutil.rmtree(stale, ignore_errors=True)
    if root.exists():                            # a folder without a valid marker is not trusted
        shutil.rmtree(root)
    tmp = cache / f".{NAME}.tmp-{uuid.uuid4().hex[:8]}"
    counts = {}
    try:
        total = sum(len(x) for x, _ in splits.values())
        bar = tqdm(total=total, desc="preparing Fashion-MNIST demo set", unit="img", disable=not progress,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0)
        for split, (images, labels) in splits.items():
            for d in CLASS_DIRS:
                (tmp / split / d).mkdir(parents=True, exist_ok=True)
            per_class = np.bincount(labels, minlength=len(CLASSES))
            for i, (img, lab) in enumerate(zip(images, labels)):
                Image.fromarray(to_rgb32(img)).save(tmp / split / CLASS_DIRS[lab] / f"{i:05d}.jpg",
                                                    format="JPEG", quality=quality)
                bar.update(1)
            counts[split] = {CLASS_DIRS[k]: int(n) for k, n in enumerate(per_class)}
        bar.close()
        (tmp / ".complete").write_text(json.dumps({"source": str(source), "counts": counts,
                                                   "format": "32x32 RGB JPEG, 2px zero pad"}, indent=1))
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loaders.demo_data",
                                 description="Prepare the Fashion-MNIST demo ImageFolder (once) and print its path.")
    ap.add_argument("--cache", default=None, help="cache folder (default: $FASTCLR_CACHE or ~/.cache/fastclr)")
    ap.add_argument("--source", default=None,
                    help=f"folder with the IDX .gz files (default: $FASTCLR_FMNIST, else {SOURCE})")
    args = ap.parse_args(argv)
    try:
        print(prepare(args.cache, args.source))
    except DemoDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
