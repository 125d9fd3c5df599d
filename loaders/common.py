"""Shared pieces of every backend: the Batch type, the loader config, image listing with the one
label mapping (sorted class folder names), file lists, and exact per-rank epoch sharding."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .options import option

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


# Exit status of every fastclr command: 0 done; 1 the work failed (a full disk, non-finite weights, a
# failed write); 2 bad input (options, data, checkpoints, a file list) - fix it and rerun.
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class DataError(RuntimeError):
    """The data cannot be used: every image of a shard unreadable, a file the DALI decoder cannot read,
    a listed file missing. Its message is one line that names the file and the fix; the entry points
    print it without a traceback."""


class Batch(NamedTuple):
    """One training batch. ``views``: list of [B, 3, H, W] tensors on the training device,
    channels_last, in the training dtype. ``labels``: int64 [B] or None."""
    views: list
    labels: Optional[object]


@dataclass
class LoaderConfig:
    """What a backend needs to know besides the AugmentSpec. Also the ``data`` config section."""
    backend: str = option("torch", "data backend", ("torch", "dali", "ffcv"))
    path: str = option("", "ImageFolder root (torch, dali) or .beton file (ffcv); empty = the Fashion-MNIST demo set")
    file_list: Optional[str] = option(None, "optional list file of images to use ('relpath [label]' per line)")
    augment: str = option("simclr", "augment recipe preset", ("simclr", "finetune", "eval"))
    image_size: int = option(224, "output side of every view, pixels", ge=1)
    batch_size: int = option(256, "images per rank per step", ge=1)
    num_workers: int = option(2, "torch: DataLoader workers; dali: CPU threads; ffcv: workers", ge=0)
    train: bool = option(True, "shuffle and drop the last partial batch")
    seed: int = option(0, "base seed; per-rank and per-epoch seeds derive from it", ge=0)
    dtype: str = option("float32", "dtype of the views", ("float32", "bfloat16", "float16"))
    decode_device: str = option("cpu", "torch backend: decode JPEGs on cpu workers or cuda (nvJPEG)", ("cpu", "cuda"))
    photometry_device: str = option("auto", "where colour ops run: auto (the training device) or cpu", ("auto", "cpu"))
    photometry_mode: str = option("auto", "colour-op kernels: auto (GPU: fused, CPU: subset), fused (the whole recipe "
                                  "as two torch.compile'd graphs: no host sync; on a CPU it compiles once, "
                                  "~1 min cold), subset (each op on its own samples: exact work, host syncs) or "
                                  "where (every op on the whole batch, masked: no host sync)",
                                  ("auto", "fused", "subset", "where"))
    jitter_strength: float = option(1.0, "colour jitter strength s (brightness/contrast/saturation 0.8s, hue 0.2s)",
                                    ge=0)
    blur: bool = option(True, "gaussian blur p=0.5 (TF turns it off for 32px CIFAR-like data)")
    crop_scale: Tuple[float, float] = option((0.08, 1.0), "random crop of the simclr and finetune recipes: area "
                                             "fraction range (TF: 0.08,1; crops also cover >= 10 % of the "
                                             "image, as in TF)", gt=0, le=1)
    # DALI
    # The default is what the GPU benchmark measured faster (README, "DALI's two choices"); "torch" keeps
    # the exact TF colour ops (README: deviations).
    dali_photometry: str = option("dali", "dali: colour ops as native DALI ops (faster) or in torch (exact TF ops, "
                                  "shared augment.py)", ("dali", "torch"))
    dali_roi_decode: bool = option(False, "dali: ROI-decode each view (image_random_crop) instead of decode once")
    hw_decoder_load: float = option(0.65, "dali: share of JPEG decoding on the A100/H100 hardware decoder",
                                    ge=0, le=1)
    device_memory_padding: int = option(211025920, "dali: nvJPEG device buffer preallocation, bytes", ge=0)
    host_memory_padding: int = option(140544512, "dali: nvJPEG pinned host buffer preallocation, bytes", ge=0)
    dali_prefetch: int = option(2, "dali: prefetch queue depth", ge=1)
    # FFCV
    ffcv_order: str = option("random", "ffcv: sample order", ("random", "quasi_random"))
    os_cache: bool = option(True, "ffcv: read the .beton through the OS page cache (False: FFCV's own cache)")
    batches_ahead: int = option(3, "ffcv: batches prepared ahead", ge=1)


# The names fastclr accepts for a tensor dtype (data.dtype, run.precision), and the canonical one.
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


def parse_dtype(name: str):
    """``"bf16"`` / ``"bfloat16"`` / ... -> the torch dtype."""
    import torch
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return getattr(torch, _DTYPE_NAMES[name])


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (what data.dtype takes)."""
    return str(dtype).removeprefix("torch.")


def find_classes(root: str | os.PathLike) -> List[str]:
    """Sorted class folder names: the one label mapping shared by every backend and the converter."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class folders in {root}: expected ImageFolder layout root/<class>/<image>")
    return classes


def _within(path: str, parent: str) -> bool:
    """Whether real path ``path`` is ``parent`` or lies below it."""
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


_warned_links: set = set()  # a process names each refused link once, however often it lists a folder


def _refuse_link(link: str, target: str, why: str) -> None:
    if link not in _warned_links:
        _warned_links.add(link)
        log.warning("not following the symlink %s -> %s: %s", link, target, why)


def bad_name_reason(name: str) -> Optional[str]:
    """Why a file name cannot be used, or None. List files hold one path per line, so a name with a
    line break would split its line (and DALI's reader would then look for two files that do not exist)."""
    if "\n" in name or "\r" in name:
        return "its name contains a line break (list files hold one path per line): rename it"
    return None


class FolderScan(NamedTuple):
    samples: List[Tuple[str, int]]   # (absolute path, label), sorted by class then folder then name
    classes: List[str]
    refused: List[Tuple[str, str]]   # (path, reason): files whose names cannot be used


def scan_image_folder(root: str | os.PathLike, classes: Optional[Sequence[str]] = None) -> FolderScan:
    """Every image under ``root/<class>/`` (subfolders included), labelled by the sorted class names.

    Linked folders are followed once each, by their real path: a link to a folder already listed (a
    loop such as ``class1/up -> ..``, or a second link to the same place), to a class folder, or to
    the data root or above it is not followed, and a warning names it. Without that, one loop lists
    the whole data set again under the wrong label, dozens of times. ``classes``: list only these
    class folders (each must be one of root's). Files whose names cannot be used are ``refused``.
    """
    root = Path(root)
    all_classes = find_classes(root)
    root_real = os.path.realpath(root)
    class_real = {c: os.path.realpath(root / c) for c in all_classes}
    visited = set()
    samples, refused = [], []
    for label, c in enumerate(all_classes):
        if classes is not None and c not in classes:
            continue
        top = str(root / c)
        if class_real[c] in visited:  # two class names for one folder: the same images, two labels
            _refuse_link(top, class_real[c], "another class folder is the same folder")
            continue
        visited.add(class_real[c])
        # Plain subfolders first, then links in name order, so a link to a folder of the tree never
        # wins over the folder itself.
        dirs: List[Tuple[str, List[str]]] = []
        pending = [top]
        links: List[str] = []
        while pending or links:
            if not pending:
                link = links.pop(0)
                target = os.path.realpath(link)
                if _within(root_real, target):
                    why = "it points at the data root or above it"
                elif target in class_real.values():
                    why = "it points at a class folder"
                elif target in visited:
                    why = "its target is already listed (a symlink loop, or a second link to one folder)"
                else:
                    visited.add(target)
                    pending.append(link)
                    continue
                _refuse_link(link, target, why)
                continue
            folder = pending.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as e:
                log.warning("cannot list %s: %s", folder, e.strerror or e)
                continue
            files = []
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_symlink() and e.is_dir():
                    links.append(e.path)
                elif e.is_dir(follow_symlinks=False):
                    real = os.path.realpath(e.path)
                    if real not in visited:
                        visited.add(real)
                        pending.append(e.path)
                elif e.name.lower().endswith(IMG_EXTENSIONS):
                    why = bad_name_reason(e.name)
                    if why:
                        refused.append((e.path, why))
                    else:
                        files.append(e.name)
            dirs.append((folder, files))
        for folder, files in sorted(dirs):
            samples += [(os.path.join(folder, f), label) for f in files]
    return FolderScan(samples, all_classes, refused)


def list_image_folder(root: str | os.PathLike) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(samples, classes): samples are (absolute path, label), sorted by class then file name
    (see ``scan_image_folder``). Files whose names cannot be used are left out with a warning."""
    samples, classes, refused = scan_image_folder(root)
    for path, why in refused[:5]:
        log.warning("leaving out %r: %s", path, why)
    if len(refused) > 5:
        log.warning("... and %d more files with unusable names", len(refused) - 5)
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root}")
    return samples, classes


def read_file_list(list_path: str | os.PathLike, root: str | os.PathLike) -> Tuple[List[Tuple[str, int]], List[str]]:
    """Samples from a list file, labelled with the ImageFolder mapping of ``root``.

    Each non-empty line is ``relative/path [label]`` (the format ``loaders.validate`` writes and DALI
    reads). Without a label the class is the path's first folder. Lines starting with # are comments.
    """
    from .files import read_list
    classes = find_classes(root)
    index = {c: i for i, c in enumerate(classes)}
    samples, bad = [], []
    for n, (rel, label) in enumerate(read_list(list_path), 1):
        if label is None:
            cls = Path(rel).parts[0] if len(Path(rel).parts) > 1 else None
            if cls not in index:
                bad.append(f"entry {n}: {rel!r} has no label and no class folder of {root}")
                continue
            label = index[cls]
        samples.append((os.path.join(root, rel), label))
    if bad:
        raise ValueError(f"{len(bad)} unusable lines in {list_path}, e.g. {bad[0]}")
    if not samples:
        raise ValueError(f"file list {list_path} is empty")
    return samples, classes


def seed_words(seed: int, *words: int) -> List[int]:
    """The entropy of one random stream: the run's seed (``data.seed``, 32 bits) and the words that
    name the stream (epoch, rank, batch or position, a constant per kind of stream). Every random
    stream of every backend is a function of these only, so batches never depend on the worker
    count, and a resumed run replays them."""
    return [int(seed) & 0xFFFFFFFF, *map(int, words)]


def derive_seed(seed: int, *words: int, bits: int = 63) -> int:
    """A ``bits``-bit integer seed for the stream ``seed_words(seed, *words)``."""
    ss = np.random.SeedSequence(seed_words(seed, *words))
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(64 - bits))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A distinct 63-bit seed per (seed, epoch, rank): the epoch's permutation and FFCV's streams."""
    return derive_seed(seed, epoch, rank)


def shard_indices(n: int, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """This rank's sample indices for one epoch: a disjoint 1/world_size of one global permutation
    (same on every rank). The global remainder n % world_size is dropped so ranks stay equal."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if shuffle:
        order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(n)
    else:
        order = np.arange(n)
    per_rank = n // world_size
    return order[rank * per_rank:(rank + 1) * per_rank]


def steps_per_epoch(n: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    per_rank = n // world_size
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def check_batch_fits(n: int, world_size: int, batch_size: int, where: str) -> None:
    if n // world_size < batch_size:
        raise ValueError(f"{where}: {n} images over {world_size} rank(s) is fewer than one batch of {batch_size}; "
                         f"lower data.batch_size")


