"""The ``torch`` backend: a torch DataLoader over an ImageFolder (or a file list) -> loaders.augment.

Two paths, one recipe (augment.py), same crops for the same seed:

* **CPU decode** (``cfg.decode_device == "cpu"``): each DataLoader worker reads, decodes (OpenCV,
  PIL fallback) and cuts the K views of a whole batch in uint8 with ``augment.geometry`` into one
  ``[B, K, S, S, 3]`` array (no collate copy). Colour ops (``augment.finish_views``): on a CUDA
  training device the main process pins the uint8 batch, copies it on a side stream one batch ahead
  and runs them on the GPU; on the CPU (training device cpu, or photometry_device=cpu) the workers
  run them single-threaded next to the decode (num_workers=0: the main process does everything).
* **GPU decode** (``cfg.decode_device == "cuda"``): workers only read the bytes and parse the
  header to sample the crop boxes; the main process decodes the batch with nvJPEG
  (``torchvision.io.decode_jpeg(list, device="cuda")``), crops and resizes each image on the GPU
  (bicubic, no antialias, like the CPU path) and runs ``finish_views``. Files that are not plain
  JPEGs (PNG named .JPEG, CMYK, ...) are decoded on the CPU by the worker instead.

Randomness: loaders.sampling's policy (the geometry of shard position ``pos``: ``geometry_rng``; the
colour ops of batch ``b``: ``colour_generator``, on the device that runs them). So batches are
reproducible from ``cfg.seed`` whatever the worker count (CPU and CUDA generators differ).

Bad files: a file that cannot be read or decoded (truncated, empty, not an image) is replaced by the
next readable sample of the shard (deterministic), so every batch stays full. The first few per
epoch are logged by name; ``loader.bad_files`` ([(path, reason)]) and ``loader.num_skipped`` report
the last epoch, and one summary line is logged at its end. Readable odd files (CMYK, PNG named
.JPEG, grayscale, 1x1, 6000x4000) are converted to RGB and used.

Debug hook shared with the other backends' contract test: ``loader.last_indices`` is the int64 array
of dataset indices (into ``loader.samples``) of the batch last yielded (before bad-file
replacement); ``loader.epoch_indices(e)`` the ordered indices epoch ``e`` visits on this rank.
``loader.last_used_indices`` are the indices of the images actually in that batch (after
replacement): what per-sample caches keyed by image (distill's teacher logits) must use.
"""
from __future__ import annotations

import io
import os
import signal
import warnings
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import augment
from ..augment.spec import AugmentSpec
from ..base import Batch, BaseLoader, resolve_samples
from ..config import LoaderConfig
from ..errors import DataError
from ..sampling import colour_generator, geometry_rng, shard_indices
from ..sources.decode import cv2, decode_rgb, exif_turned

# ----------------------------------------------------------------------------------------------
# Decoding (worker side)
# ----------------------------------------------------------------------------------------------

def _is_plain_jpeg(data: bytes) -> Tuple[bool, Optional[Tuple[int, int]]]:
    """(nvJPEG can take it, (height, width)) from the header alone: a JPEG (SOI ... EOI) in RGB or
    grayscale. Anything else - PNG, CMYK, truncated (no EOI) - goes to the CPU decoder."""
    if len(data) < 4 or data[:2] != b"\xff\xd8" or b"\xff\xd9" not in data[-64:] or exif_turned(data):
        return False, None  # (an EXIF-turned JPEG too: the CPU decoder turns it, as every backend does)
    try:
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return False, None
            w, h = im.size
            return True, (h, w)
    except Exception:
        return False, None


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:200]


class _PathTable:
    """Paths as one bytes buffer + offsets: forked workers read it without touching Python object
    refcounts, so copy-on-write does not duplicate a 1.28M-entry list of str in every worker."""

    def __init__(self, paths):
        enc = [os.fsencode(p) for p in paths]
        self.buf = np.frombuffer(b"".join(enc), np.uint8)
        self.off = np.zeros(len(enc) + 1, np.int64)
        np.cumsum([len(e) for e in enc], out=self.off[1:])

    def __len__(self) -> int:
        return len(self.off) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.buf[self.off[i]:self.off[i + 1]].tobytes())


@dataclass
class WorkerBatch:
    """What a worker hands the main process for one batch: the labels, the dataset indices of the
    batch (``index``) and of the images actually in it (``used``, after bad-file replacement), the
    files that failed, and one of: ``crops`` (uint8 [B, K, S, S, 3], colour ops still to run),
    ``views`` (finished, the colour ops ran in the worker) or ``data`` + ``boxes`` + ``flips`` (encoded
    bytes for the main process's GPU decode)."""
    labels: torch.Tensor
    index: torch.Tensor
    used: torch.Tensor
    failed: List[Tuple[str, str]]
    crops: Optional[torch.Tensor] = None
    views: Optional[List[torch.Tensor]] = None
    data: Optional[List[torch.Tensor]] = None
    boxes: Optional[torch.Tensor] = None
    flips: Optional[torch.Tensor] = None


class _BatchDataset(torch.utils.data.Dataset):
    """Item ``(epoch, batch_no)`` -> one whole batch (the sampler yields batch keys, so a worker
    builds the batch array in place and returns it without a collate copy)."""

    def __init__(self, samples, spec: AugmentSpec, seed: int, rank: int, world_size: int, batch_size: int,
                 shuffle: bool, bytes_only: bool, photometry_dtype: Optional[torch.dtype] = None,
                 photometry_mode: str = "auto"):
        self.photometry_dtype = photometry_dtype   # set: run finish_views here (CPU photometry)
        self.photometry_mode = photometry_mode
        self.paths = _PathTable([p for p, _ in samples])
        self.labels = np.asarray([label for _, label in samples], np.int64)
        self.spec, self.seed, self.rank, self.world_size = spec, seed, rank, world_size
        self.batch_size, self.shuffle, self.bytes_only = batch_size, shuffle, bytes_only
        self._known_bad: Dict[int, str] = {}   # per worker: index -> reason (skip re-decoding)

    def shard(self, epoch: int) -> np.ndarray:
        return shard_indices(len(self.paths), self.rank, self.world_size, epoch, self.seed, self.shuffle)

    def rng(self, epoch: int, pos: int) -> np.random.Generator:
        return geometry_rng(self.seed, epoch, self.rank, pos)

    def _load(self, idx: int):
        """Decoded RGB image (CPU path) or (bytes or decoded image, (h, w)) (bytes path); raises."""
        if idx in self._known_bad:
            raise OSError(self._known_bad[idx])
        try:
            with open(self.paths[idx], "rb") as f:
                data = f.read()
            if not self.bytes_only:
                return decode_rgb(data)
            ok, hw = _is_plain_jpeg(data)
            if ok:
                return np.frombuffer(data, np.uint8), hw
            img = decode_rgb(data)  # not for nvJPEG: decode here, ship the pixels
            return img, img.shape[:2]
        except Exception as e:
            self._known_bad[idx] = _reason(e)
            raise

    def __getitem__(self, key):
        epoch, b = key
        shard = self.shard(epoch)
        B, spec, K, S = self.batch_size, self.spec, self.spec.num_views, self.spec.size
        positions = range(b * B, min((b + 1) * B, len(shard)))
        n = len(positions)
        index = shard[b * B: b * B + n].astype(np.int64)
        used = np.empty(n, np.int64)
        failed: List[Tuple[str, str]] = []
        if self.bytes_only:
            data, boxes, flips = [], np.zeros((n, K, 4), np.int64), np.zeros((n, K), bool)
        else:
            crops = np.empty((n, K, S, S, 3), np.uint8)
        for i, pos in enumerate(positions):
            item = None
            for attempt in range(len(shard)):
                idx = int(shard[(pos + attempt) % len(shard)])
                try:
                    item = self._load(idx)
                    used[i] = idx
                    break
                except Exception as e:
                    if attempt == 0:
                        failed.append((self.paths[idx], self._known_bad.get(idx, _reason(e))))
            if item is None:
                path, why = failed[-1] if failed else (self.paths[int(shard[pos % len(shard)])], "unreadable")
                raise DataError(f"none of the {len(shard)} images of rank {self.rank}'s shard is readable "
                                f"(e.g. {path}: {why}); check data.path, or list the bad files with "
                                f"python -m loaders.validate")
            rng = self.rng(epoch, pos)  # the slot's stream, also for a replacement
            if self.bytes_only:
                payload, (h, w) = item
                boxes[i] = augment.sample_crop_boxes(h, w, K, spec.crop, rng)
                flips[i] = rng.random(K) < 0.5 if spec.flip else False
                data.append(torch.from_numpy(payload if payload.flags.writeable else payload.copy()))
            else:
                crops[i] = augment.geometry(item, spec, rng)
        out = WorkerBatch(labels=torch.from_numpy(self.labels[used]), index=torch.from_numpy(index),
                          used=torch.from_numpy(used), failed=failed)
        if self.bytes_only:
            out.data, out.boxes, out.flips = data, torch.from_numpy(boxes), torch.from_numpy(flips)
        elif self.photometry_dtype is not None:
            # In a worker the views go straight into shared memory: the batch then crosses to the main
            # process without the copy the DataLoader's pickler would make.
            shared = _shared_views(n * K, S, self.photometry_dtype) if _in_worker() else None
            out.views = augment.finish_views(torch.from_numpy(crops), spec, colour_generator(
                self.seed, epoch, self.rank, b, "cpu"), self.photometry_dtype, mode=self.photometry_mode,
                out=shared)
        else:
            out.crops = torch.from_numpy(crops)
        return out


class _EpochBatches(torch.utils.data.Sampler):
    """Yields (epoch, batch_no) keys from batch ``start`` of epoch ``epoch``. Iterating never changes
    that state: torch's multi-worker DataLoader iterates its sampler once when its iterator is built
    and again when it resets it, so a position consumed by the first iteration would be lost to the
    second (a resumed run would then replay the epoch from batch 0). TorchLoader.__iter__ moves the
    state on once the DataLoader's iterator exists. Holds its own state, not the loader: a loader <->
    DataLoader reference cycle would leave worker shutdown to the cycle collector, which may close
    the worker queues first and then wait 5 s per worker for a goodbye that cannot arrive."""

    def __init__(self, steps: int):
        self.epoch, self.steps, self.start = 0, steps, 0

    def __iter__(self):
        return iter([(self.epoch, b) for b in range(self.start, self.steps)])

    def __len__(self):
        return self.steps


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


def _shared_views(n: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized ``[n, 3, size, size]`` channels_last tensor in shared memory."""
    storage = torch.UntypedStorage._new_shared(n * 3 * size * size * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, (n, 3, size, size), (3 * size * size, 1, 3 * size, 3))


# Loaders whose DataLoader may hold persistent workers: close_all() ends them when a run is over.
_OPEN: "weakref.WeakSet[TorchLoader]" = weakref.WeakSet()


def close_all() -> None:
    for loader in list(_OPEN):
        loader.close()


def _worker_init(_):
    # A signal to the process group (Ctrl-C, a scheduler's SIGTERM) reaches the workers too: the main
    # process decides what it means (fastclr.stopping: finish the step, checkpoint, stop), so a worker
    # must not die of it and leave the main process a broken DataLoader.
    for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    # One thread per worker: the parallelism is the worker count (2 cores -> 2 workers).
    torch.set_num_threads(1)
    if cv2 is not None:
        cv2.setNumThreads(1)


# ----------------------------------------------------------------------------------------------
# The loader (main process)
# ----------------------------------------------------------------------------------------------

class TorchLoader(BaseLoader):
    """See the module docstring and loaders.base (the contract)."""

    def __init__(self, cfg: LoaderConfig, spec: AugmentSpec, rank: int = 0, world_size: int = 1, device="cpu",
                 main_decode_device: Optional[str] = None):
        """``main_decode_device``: where the main process decodes the bytes in the GPU-decode path;
        default "cuda" when cfg.decode_device == "cuda", else None (workers decode). Tests pass
        "cpu" to run the same bytes path without a GPU."""
        if cfg.decode_device not in ("cpu", "cuda"):
            raise ValueError(f"data.decode_device must be cpu or cuda, got {cfg.decode_device!r}")
        super().__init__(cfg, spec, rank, world_size, device)
        if main_decode_device is None and cfg.decode_device == "cuda":
            main_decode_device = "cuda"
        if main_decode_device is not None and torch.device(main_decode_device).type == "cuda" \
                and not torch.cuda.is_available():
            raise RuntimeError("data.decode_device=cuda needs a CUDA GPU; use data.decode_device=cpu")
        self.main_decode_device = None if main_decode_device is None else torch.device(main_decode_device)
        self.samples, self.classes, _, self.listing_note = resolve_samples(cfg)
        self.num_samples = len(self.samples)
        self._check_size("torch loader")
        # The bytes path's pixels are already on the decode device: its colour ops run there.
        if self.main_decode_device is not None:
            self.photometry_device = self.main_decode_device
            self.photometry_mode = augment.resolve_mode(cfg.photometry_mode, self.photometry_device)
        # CPU colour ops run in the workers (one thread each, next to the decode) when there are
        # workers: on a small or busy CPU, multi-threaded ops in the main process stall on their
        # OpenMP barriers (3-10x slower on 2 shared cores); workers scale with their count.
        self.photometry_in_workers = (self.photometry_device.type == "cpu" and self.main_decode_device is None
                                      and cfg.num_workers > 0)
        self.dataset = _BatchDataset(self.samples, spec, cfg.seed, rank, world_size, cfg.batch_size,
                                     shuffle=cfg.train, bytes_only=self.main_decode_device is not None,
                                     photometry_dtype=self.dtype if self.photometry_in_workers else None,
                                     photometry_mode=self.photometry_mode)
        if self.photometry_in_workers and self.photometry_mode == "fused":
            # Compiled CPU graphs: built here, single-threaded like the workers, before they fork
            # (each worker would otherwise compile its own, slowly and with every core).
            from ..augment import warmup
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                warmup(spec, cfg.batch_size, self.dtype, "cpu")
            finally:
                torch.set_num_threads(threads)
        self._sampler = _EpochBatches(len(self))
        self._dl = None

    def close(self) -> None:
        """Stop the persistent workers the way the DataLoader does (a None to each, then a join), so a
        pass left unfinished (max_steps, a stop signal) ends without killing them mid-write."""
        dl, self._dl = self._dl, None
        it = getattr(dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
            dl._iterator = None

    def _dataloader(self):
        if self._dl is None:
            _OPEN.add(self)
            w = int(self.cfg.num_workers)
            pin = self.device.type == "cuda" and self.main_decode_device is None  # H2D source
            self._dl = torch.utils.data.DataLoader(
                self.dataset, batch_size=None, sampler=self._sampler, num_workers=w,
                pin_memory=pin, worker_init_fn=_worker_init if w > 0 else None,
                persistent_workers=w > 0, prefetch_factor=2 if w > 0 else None,
                timeout=float(self.cfg.timeout) if w > 0 else 0)  # a stalled worker: an error, not a hang
        return self._dl

    # -- iteration ---------------------------------------------------------------------------

    def _prefetched(self, it):
        """Yield worker items with their tensors already on the device. On CUDA the copy of the
        next batch runs on a side stream while the current one is consumed (timm's PrefetchLoader)."""
        dev = self.device
        if not (dev.type == "cuda" and self.main_decode_device is None
                and (self.photometry_device.type == "cuda" or self.photometry_in_workers)):
            yield from it  # nothing to copy ahead (CPU training, nvJPEG path, or CPU ops in-process)
            return
        stream = torch.cuda.Stream(device=dev)
        prev = None
        for item in it:
            with torch.cuda.stream(stream):
                item.labels = item.labels.to(dev, non_blocking=True)
                if item.crops is not None:
                    item.crops = item.crops.to(dev, non_blocking=True)
                if item.views is not None:  # photometry_device=cpu: finished views
                    item.views = [v.to(dev, non_blocking=True) for v in item.views]
                moved = [t for t in (item.labels, item.crops, *(item.views or ())) if t is not None]
            if prev is not None:
                yield prev
            torch.cuda.current_stream(dev).wait_stream(stream)
            for t in moved:  # allocated on the side stream, used on the main one
                t.record_stream(torch.cuda.current_stream(dev))
            prev = item
        if prev is not None:
            yield prev

    def _batches(self, epoch: int, start: int):
        # The sampler is set here, from the arguments, before the DataLoader's iterator reads it
        # (once or twice): batch b of an epoch is the same whatever the start, since its crops and
        # colours depend on (seed, epoch, rank, b) only.
        self._sampler.epoch, self._sampler.start = epoch, start
        for b, item in enumerate(self._prefetched(iter(self._dataloader())), start=start):
            self.record_failures(item.failed)
            self.last_indices = item.index.numpy()
            used = item.used
            labels = item.labels
            if item.views is not None:  # colour ops done in the worker
                views = item.views
            else:
                if self.main_decode_device is not None:
                    crops, src = self._decode_and_crop(item)
                    labels, used = labels[src], used[src]
                else:
                    crops = item.crops
                gen = colour_generator(self.cfg.seed, epoch, self.rank, b, self.photometry_device)
                views = augment.finish_views(crops, self.spec, gen, self.dtype, device=self.photometry_device,
                                             mode=self.photometry_mode)
            self.last_used_indices = used.numpy()
            views = [v.to(self.device, non_blocking=True) for v in views]
            yield Batch(views, labels.to(self.device, non_blocking=True))
            views = item = None  # let finish_views reuse its buffers for the next batch
        self.report_skipped(epoch)

    # -- GPU decode path -----------------------------------------------------------------------

    def _decode_and_crop(self, item) -> Tuple[torch.Tensor, List[int]]:
        """Decode the batch on ``main_decode_device`` and cut the views: (uint8 [B, K, S, S, 3],
        source slot of each row). A file neither nvJPEG nor the CPU can decode (the worker's header
        check let it through) is counted as bad and its row repeats the next decodable image."""
        from torchvision.io import ImageReadMode, decode_jpeg
        dev = self.main_decode_device
        data, boxes, flips = item.data, item.boxes, item.flips
        is_bytes = [d.ndim == 1 for d in data]
        jpegs = [d for d, b in zip(data, is_bytes) if b]
        decoded: List[Optional[torch.Tensor]] = [None] * len(data)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated.*")  # torchvision 0.29+: use TorchCodec
            try:
                out = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=dev) if jpegs else []
            except RuntimeError:  # one bad apple fails the whole batched call: go one by one
                out = []
                for d in jpegs:
                    try:
                        out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=dev))
                    except RuntimeError:
                        out.append(None)
        it = iter(out)
        for i, b in enumerate(is_bytes):
            if b:
                decoded[i] = next(it)
            else:  # decoded by the worker (HWC uint8)
                decoded[i] = data[i].to(dev, non_blocking=True).permute(2, 0, 1)
        for i, img in enumerate(decoded):
            if img is None:  # nvJPEG refused a file the header check let through: CPU decode
                try:
                    decoded[i] = torch.from_numpy(decode_rgb(data[i].numpy().tobytes())).to(dev).permute(2, 0, 1)
                except Exception as e:
                    self.record_failures([(self.samples[int(item.used[i])][0], _reason(e))])
        good = [i for i, d in enumerate(decoded) if d is not None]
        if not good:
            raise RuntimeError("no decodable image in the batch")
        B, K, S = len(data), self.spec.num_views, self.spec.size
        crops = torch.empty((B, K, S, S, 3), dtype=torch.uint8, device=dev)
        sources = []
        for i in range(B):
            src = i if decoded[i] is not None else good[int(np.searchsorted(good, i)) % len(good)]
            crops[i] = augment.crop_resize_tensor(decoded[src], boxes[src], S, self.spec.crop.interpolation,
                                                  flips[src])
            sources.append(src)
        return crops, sources


def build_torch_loader(cfg: LoaderConfig, spec: AugmentSpec, rank: int = 0, world_size: int = 1,
                       device="cpu") -> TorchLoader:
    return TorchLoader(cfg, spec, rank=rank, world_size=world_size, device=device)
