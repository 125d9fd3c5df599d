"""The loader contract, in code: what every backend (torch, DALI, FFCV) shares. A backend only
produces the batches of one (epoch, first batch); everything a training loop relies on is here, once.

    loader = loaders.build(cfg, rank, world_size, device)
    len(loader)                          # batches per epoch on this rank, exact
    loader.set_epoch(e, start_step=k)    # the next pass: epoch e from batch k (a resumed run)
    for batch in loader: ...             # Batch(views=[B,3,S,S] x K, labels=int64[B])
    for batch in loader: ...             # no set_epoch: the next epoch (e + 1), from batch 0

Rules:
* **Sharding.** Each epoch, every rank takes a disjoint 1/world_size slice of one global permutation
  (``sampling.shard_indices``; the same on every rank and in every backend). In training the last
  partial batch is dropped: an epoch visits ``epoch_indices(e)``, the first ``len() * batch_size``
  indices of the shard. In evaluation (``cfg.train`` False) nothing is dropped and nothing shuffled.
* **Position.** ``set_epoch(e, start_step=k)`` sets the next pass; starting a pass takes the position
  and moves it on to (e + 1, 0), so any number of ``iter()`` calls (torch's DataLoader iterates its
  sampler twice per pass) and a resume at any batch give exactly the batches of an uninterrupted run.
* **Views** are on the training device, channels_last, in ``cfg.dtype``; labels int64.
* **Bad files.** A backend that can skip an unreadable image replaces it by the next readable one of
  the shard (the batch stays full) and records it with ``record_failures``: ``bad_files`` and
  ``num_skipped`` describe the current pass. ``last_indices``: the dataset indices of the batch last
  yielded, before replacement; ``last_used_indices``: the images actually in it.
"""
from __future__ import annotations

import logging
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .augment.photometry import resolve_mode
from .augment.spec import AugmentSpec
from .config import LoaderConfig, parse_dtype
from .sampling import check_batch_fits, shard_indices, steps_per_epoch
from .sources.folders import list_image_folder, list_images, read_file_list, shown_name

log = logging.getLogger(__name__)

class Batch(NamedTuple):
    """One training batch. ``views``: list of [B, 3, H, W] tensors on the training device,
    channels_last, in the training dtype. ``labels``: int64 [B] or None."""
    views: list
    labels: Optional[object]


MAX_WARNINGS_PER_EPOCH = 5   # bad files named in the log per pass; the rest only counted


class Listing(NamedTuple):
    samples: List[Tuple[str, int]]   # (absolute path, label; -1 = no label)
    classes: List[str]               # sorted class folder names; [] without labels
    root: str
    note: str                        # without labels: one line on what was found and left out


def resolve_samples(cfg: LoaderConfig) -> Listing:
    """The images of ``cfg.path`` (empty = the embedded demo set, its train or val half by
    ``cfg.train``), restricted to ``cfg.file_list`` if given. With ``cfg.labels`` the path is an
    ImageFolder (labels: the sorted class folder names); without, a folder in any layout whose images
    are all listed with label -1 (``sources.folders.scan_images``), and no classes."""
    from .demo_data import resolve
    root = resolve(cfg.path, "train" if cfg.train else "val")
    note = ""
    if cfg.file_list:
        samples, classes = read_file_list(cfg.file_list, root, labels=cfg.labels)
        if not cfg.labels:
            note = f"{len(samples)} images listed in {cfg.file_list} (no labels)"
    elif cfg.labels:
        samples, classes = list_image_folder(root)
    else:
        (samples, note), classes = list_images(root), []
    return Listing(samples, classes, root, note)


class BaseLoader:
    """See the module docstring. A backend sets ``num_samples`` (then calls ``_check_size``) and
    implements ``_batches(epoch, start)``, a generator of the batches ``start..len()-1`` of ``epoch``
    that sets ``last_indices`` (and ``last_used_indices`` if it replaces bad files) per batch."""

    num_samples: int = 0
    listing_note: str = ""   # data without labels: what was found and left out (one line for the user)

    def __init__(self, cfg: LoaderConfig, spec: AugmentSpec, rank: int = 0, world_size: int = 1, device="cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if cfg.photometry_device not in ("auto", "cpu"):
            raise ValueError(f"data.photometry_device must be auto or cpu, got {cfg.photometry_device!r}")
        self.cfg, self.spec, self.rank, self.world_size = cfg, spec, rank, world_size
        self.device = torch.device(device)
        self.dtype = parse_dtype(cfg.dtype)
        # Colour ops run on the training device unless data.photometry_device=cpu.
        self.photometry_device = self.device if cfg.photometry_device == "auto" else torch.device("cpu")
        # data.photometry_mode made concrete once, for where the colour ops run (augment.resolve_mode).
        self.photometry_mode = resolve_mode(cfg.photometry_mode, self.photometry_device)
        self.epoch, self._start = 0, 0
        self.bad_files: List[Tuple[str, str]] = []
        self.num_skipped = 0
        self.last_indices: Optional[np.ndarray] = None
        self._last_used: Optional[np.ndarray] = None

    def _check_size(self, where: str) -> None:
        if self.cfg.train:
            check_batch_fits(self.num_samples, self.world_size, self.cfg.batch_size, where)

    # -- the contract ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return steps_per_epoch(self.num_samples, self.world_size, self.cfg.batch_size, drop_last=self.cfg.train)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next pass runs epoch ``epoch`` from batch ``start_step`` (a resume position)."""
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step {start_step} outside 0..{len(self)}")
        self.epoch, self._start = int(epoch), int(start_step)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's whole shard of ``epoch`` (before the tail rule)."""
        return shard_indices(self.num_samples, self.rank, self.world_size, epoch, self.cfg.seed,
                             shuffle=self.cfg.train)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The dataset indices epoch ``epoch`` visits on this rank, in order (before bad-file
        replacement): in training the shard without its last partial batch, else the whole shard."""
        shard = self.shard(epoch)
        return shard[: len(self) * self.cfg.batch_size] if self.cfg.train else shard

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self.epoch, self._start
        self.epoch, self._start = epoch + 1, 0
        self.bad_files, self.num_skipped = [], 0
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        raise NotImplementedError

    @property
    def last_used_indices(self) -> Optional[np.ndarray]:
        """The images actually in the last batch (what per-image caches must key on)."""
        return self.last_indices if self._last_used is None else self._last_used

    @last_used_indices.setter
    def last_used_indices(self, value) -> None:
        self._last_used = value

    # -- skipped files ---------------------------------------------------------------------------
    def record_failures(self, failed: Sequence[Tuple[str, str]]) -> None:
        """Count and (the first few per pass) name the unreadable files a batch replaced."""
        for path, reason in failed:
            self.bad_files.append((path, reason))
            self.num_skipped += 1
            if self.num_skipped <= MAX_WARNINGS_PER_EPOCH:
                log.warning("skipping unreadable image %s (%s); replaced by the next readable sample",
                            shown_name(path), reason)
            elif self.num_skipped == MAX_WARNINGS_PER_EPOCH + 1:
                log.warning("more unreadable images this epoch: counting them silently (loader.bad_files)")

    def report_skipped(self, epoch: int) -> None:
        if self.num_skipped:
            log.warning("epoch %d (rank %d): skipped %d unreadable image(s) of %d; see loader.bad_files",
                        epoch, self.rank, self.num_skipped, len(self) * self.cfg.batch_size)
