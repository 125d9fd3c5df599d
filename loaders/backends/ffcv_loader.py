"""FFCV backend: .beton -> one JPEG decode per image -> K crops (uint8, in FFCV's compiled pipeline)
-> [device] -> the shared photometry (``augment.finish_views``).

    loader = build_ffcv_loader(cfg, spec, rank, world_size, device)   # cfg.path: the .beton file
    loader.set_epoch(e); for batch in loader: ...                      # Batch(views, labels)

``cfg.file_list`` (optional) restricts the .beton to a subset, matched through the manifest that
``loaders.write_ffcv`` writes beside it (``loaders.subsets.beton_indices``): fine-tune on 1 %/10 %
of the labels from the full train .beton without converting again.

The decoder ``DecodeViews`` is an FFCV Operation: for every image it decodes the JPEG (or reads the
raw pixels) once with FFCV's libjpeg-turbo ``imdecode`` and cuts ``spec.num_views`` crops from it
with FFCV's ``resize_crop``, writing a ``[B, K, S, S, 3]`` uint8 batch (docs/design.md: two views, one
decode). Crop boxes follow ``augment.sample_crop_boxes`` exactly (TF sample_distorted_bounding_box,
then torchvision's fallback; TF centre crop for eval), re-implemented in numba because compiled
code cannot call Python.

Determinism: crops and flips come from a splitmix64 stream seeded per *sample* from
``(cfg.seed, epoch, global sample index)``, so they do not depend on the batch, the rank, the
worker thread or the number of workers; the order is ``common.shard_indices(..., epoch, cfg.seed)``
(the torch backend's permutation); photometry uses a torch generator seeded per
``(cfg.seed, epoch, rank)``. ``set_epoch(e)`` on a fresh loader reproduces epoch e of an
uninterrupted run bit for bit on the same machine (not with quasi_random order, see below).

Deviations (FFCV 1.0.2):
  * the crop resize is OpenCV INTER_AREA whatever ``spec.crop.interpolation`` says: FFCV's C
    ``resize`` hard-codes it (area averaging when shrinking, bilinear-like when enlarging).
  * ``ffcv_order="quasi_random"`` (FFCV's page-local order, for ``os_cache=False`` on data larger
    than RAM) shuffles within a fixed per-rank shard drawn once at epoch 0: ranks do not trade
    samples between epochs. "random" (default) reshuffles the whole set every epoch.
  * the epoch reaches the compiled decoder through an 8-byte cell read with FFCV's memcpy
    (numba freezes captured arrays as constants; recompiling per epoch would cost the JIT again).
  * FFCV's C functions are called through ctypes directly rather than through its numba wrappers
    ``imdecode`` / ``resize_crop`` (same calls; see DecodeViews.generate_code for why).
"""
from __future__ import annotations

import logging
import os
import queue
import time
from dataclasses import replace
from typing import Iterator, Optional

import numba
import numpy as np
import torch

# Importing ffcv costs seconds (its typed numba Dict compiles on import): only this backend does.
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import ctypes_imdecode, ctypes_memcopy, ctypes_resize
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import IS_CUDA
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State
from ffcv.transforms import ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder
from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

# TF_MIN_OBJECT_COVERED: TF's crop_and_resize passes min_object_covered=0.1 (see augment.py).
from ..augment import TF_MIN_OBJECT_COVERED, finish_views
from ..augment.spec import AugmentSpec
from ..base import Batch, BaseLoader
from ..config import LoaderConfig
from ..sampling import colour_generator, epoch_seed
from ..sources import manifest

log = logging.getLogger(__name__)
_U64 = np.uint64


# ----------------------------------------------------------------------------------------------
# numba helpers (cached on disk: they contain no ctypes calls)
# ----------------------------------------------------------------------------------------------

@numba.njit(cache=True)
def _mix64(z):
    """splitmix64's finalizer: a bijective, well-mixed uint64 -> uint64."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


@numba.njit(cache=True)
def sample_state(seed, index):
    """Initial PRNG state of one sample from the epoch seed and its global index (uint64)."""
    return _mix64(_U64(seed) ^ _mix64(_U64(index) + _U64(0x9E3779B97F4A7C15)))


@numba.njit(cache=True)
def next_uniform(state):
    """(new state, uniform float64 in [0, 1)): one splitmix64 step."""
    state = _U64(state) + _U64(0x9E3779B97F4A7C15)  # (int64 + uint64 would promote to float64)
    return state, np.float64(_mix64(state) >> _U64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True)
def random_box(H, W, u, scale_lo, scale_hi, ratio_lo, ratio_hi, min_covered):
    """augment.sample_crop_boxes for one box, attempts given as uniforms ``u`` [4, attempts]
    (aspect, height, y, x): the first accepted attempt, else torchvision's fallback.
    Returns (y0, x0, h, w). Same arithmetic, line for line, as the vectorized numpy version."""
    total = float(H * W)
    min_area = scale_lo * total
    max_area = scale_hi * total
    for a in range(u.shape[1]):
        ar = u[0, a] * (ratio_hi - ratio_lo) + ratio_lo
        h_lo = np.rint(np.sqrt(min_area / ar))
        h_hi = np.rint(np.sqrt(max_area / ar))
        if np.rint(h_hi * ar) > W:  # the largest height whose rounded width still fits (TF)
            h_hi = np.floor((W + 0.5 - 1e-7) / ar)
        if np.rint(h_hi * ar) > W:
            h_hi = h_hi - 1
        h_hi = min(h_hi, float(H))
        h_lo = min(h_lo, h_hi)
        h = min(h_lo + np.floor(u[1, a] * (h_hi - h_lo + 1)), h_hi)
        w = np.rint(h * ar)
        if w * h < min_area:  # TF: "try first with a slightly bigger rectangle"
            h += 1
            w = np.rint(h * ar)
        if w * h > max_area:
            h -= 1
            w = np.rint(h * ar)
        area = w * h
        if (min_area <= area <= max_area and w <= W and h <= H and w > 0 and h > 0
                and area >= min_covered * total):
            y = np.floor(u[2, a] * (H - h)) if h < H else 0.0
            x = np.floor(u[3, a] * (W - w)) if w < W else 0.0
            return int(y), int(x), int(h), int(w)
    in_ratio = W / H  # fallback: centre crop with the aspect clamped to the range (torchvision)
    if in_ratio < ratio_lo:
        fw, fh = W, int(round(W / ratio_lo))
    elif in_ratio > ratio_hi:
        fh, fw = H, int(round(H * ratio_hi))
    else:
        fw, fh = W, H
    fh, fw = min(max(fh, 1), H), min(max(fw, 1), W)
    return (H - fh) // 2, (W - fw) // 2, fh, fw


@numba.njit(cache=True)
def center_box(H, W, fraction):
    """augment.sample_crop_boxes with crop.random=False: TF's centred square of
    round(fraction * shorter side), offsets ((H - h) + 1) // 2."""
    if W < H:
        ch, cw = np.rint(fraction * W), np.rint(fraction * W)
    else:
        ch, cw = np.rint(fraction * H), np.rint(fraction * H)
    ch, cw = int(min(max(ch, 1), H)), int(min(max(cw, 1), W))
    return ((H - ch) + 1) // 2, ((W - cw) + 1) // 2, ch, cw


@numba.njit(cache=True)
def hflip_inplace(img):
    """Mirror an [S, S, 3] uint8 image left-right in place (pixel triplets swapped on flat rows: cheaper
    than indexing [r, c, ch] in numba)."""
    S1, S2 = img.shape[0], img.shape[1]
    flat = img.reshape(S1, S2 * 3)
    for r in range(S1):
        row = flat[r]
        for c in range(S2 // 2):
            a, b = 3 * c, 3 * (S2 - 1 - c)
            t0, t1, t2 = row[a], row[a + 1], row[a + 2]
            row[a], row[a + 1], row[a + 2] = row[b], row[b + 1], row[b + 2]
            row[b], row[b + 1], row[b + 2] = t0, t1, t2


def sample_geometry(spec: AugmentSpec, seed: int, index: int, height: int, width: int):
    """(boxes int64 [K, 4] of (y0, x0, h, w), flips bool [K]): what ``DecodeViews`` draws for .beton
    sample ``index`` (``height`` x ``width`` as stored) in the epoch whose crop seed is ``seed``
    (``epoch_seed(cfg.seed, epoch)``): the same per-sample stream and the same functions, called from
    Python, so loaders.preview can say which crops FFCV cut."""
    crop, K = spec.crop, spec.num_views
    state = sample_state(np.uint64(seed), np.int64(index))
    u = np.empty((4, crop.attempts), np.float64)
    boxes, flips = np.zeros((K, 4), np.int64), np.zeros(K, bool)
    for k in range(K):
        if crop.random:
            for a in range(crop.attempts):
                for q in range(4):
                    state, u[q, a] = next_uniform(np.uint64(state))  # (numba hands a uint64 back as an int)
            boxes[k] = random_box(height, width, u, crop.scale[0], crop.scale[1], crop.ratio[0], crop.ratio[1],
                                  TF_MIN_OBJECT_COVERED)
        else:
            boxes[k] = center_box(height, width, crop.center_fraction)
        if spec.flip:
            state, r = next_uniform(np.uint64(state))
            flips[k] = r < 0.5
    return boxes, flips


# ----------------------------------------------------------------------------------------------
# The decoder: one decode, K crops
# ----------------------------------------------------------------------------------------------

class DecodeViews(SimpleRGBImageDecoder):
    """FFCV decoder for an RGBImageField: ``[B, K, S, S, 3]`` uint8, K = spec.num_views random
    resized crops (+ flips) of each image, or K copies of the eval centre crop.

    Subclasses SimpleRGBImageDecoder only so FFCV accepts it as the field's decoder.
    ``seed_cell`` (uint64 [1], owned by the loader) holds the current epoch's seed; it must stay
    alive as long as the compiled code (the loader keeps it)."""

    def __init__(self, spec: AugmentSpec, seed_cell: np.ndarray):
        super().__init__()
        if seed_cell.dtype != np.uint64 or seed_cell.shape != (1,):
            raise ValueError("seed_cell must be a uint64 array of shape (1,)")
        self.spec, self.seed_cell = spec, seed_cell

    def declare_state_and_memory(self, previous_state: State):
        K, S = self.spec.num_views, self.spec.crop.size
        max_pixels = np.uint64(self.metadata["height"].max()) * np.uint64(self.metadata["width"].max())
        out_shape = (K, S, S, 3)
        return (replace(previous_state, jit_mode=True, shape=out_shape, dtype=np.dtype("<u1")),
                (AllocationQuery(out_shape, np.dtype("<u1")),                           # the crops
                 AllocationQuery((max_pixels * np.uint64(3),), np.dtype("<u1"))))      # one decoded image

    def generate_code(self):
        crop, K, S = self.spec.crop, self.spec.num_views, self.spec.crop.size
        is_random, do_flip = bool(crop.random), bool(self.spec.flip)
        scale_lo, scale_hi = float(crop.scale[0]), float(crop.scale[1])
        ratio_lo, ratio_hi = float(crop.ratio[0]), float(crop.ratio[1])
        attempts, center = int(crop.attempts), float(crop.center_fraction)
        min_covered = float(TF_MIN_OBJECT_COVERED)
        seed_addr = self.seed_cell.ctypes.data  # an int: baked into the compiled code
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()      # prange when FFCV runs > 1 thread
        # FFCV's C functions called through ctypes directly (what ffcv.libffcv.imdecode/resize_crop
        # do): fresh numba wrappers per loader make numba print "Exception ignored in finalizer ...
        # KeyError" when a loader is collected while another one compiles.
        imdecode_c, resize_c, memcpy_c = ctypes_imdecode, ctypes_resize, ctypes_memcopy

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            cell = np.zeros(1, np.uint64)
            memcpy_c(seed_addr, cell.ctypes.data, 8)  # this epoch's seed (see module docstring)
            seed = cell[0]
            for i in my_range(len(batch_indices)):
                source_ix = batch_indices[i]
                field = metadata[source_ix]
                data = mem_read(field["data_ptr"], storage_state)
                H, W = np.int64(field["height"]), np.int64(field["width"])
                if field["mode"] == jpg:  # the one decode of this image
                    buf = temp_storage[i]
                    # (src, size, H, W, dst, crop H, crop W, x, y, scale num, denom, crop?, flip?)
                    imdecode_c(data.ctypes.data, data.size, H, W, buf.ctypes.data, H, W, 0, 0, 1, 1,
                               False, False)
                    img = buf.reshape(-1)[:H * W * 3].reshape(H, W, 3)
                else:                     # raw pixels
                    img = data.reshape(H, W, 3)
                state = sample_state(seed, source_ix)
                u = np.empty((4, attempts), np.float64)
                for k in range(K):
                    if is_random:
                        for a in range(attempts):
                            for q in range(4):
                                state, v = next_uniform(state)
                                u[q, a] = v
                        y0, x0, h, w = random_box(H, W, u, scale_lo, scale_hi, ratio_lo, ratio_hi,
                                                  min_covered)
                    else:
                        y0, x0, h, w = center_box(H, W, center)
                    out = destination[i, k]  # cv::resize(img[y0:y0+h, x0:x0+w], out, INTER_AREA)
                    resize_c(0, img.ctypes.data, H, W, y0, y0 + h, x0, x0 + w, out.ctypes.data, S, S)
                    if do_flip:
                        state, r = next_uniform(state)
                        if r < 0.5:
                            hflip_inplace(out)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------

class _EpochOrder(TraversalOrder):
    """Replaces FFCV's traversal order with the owner's order for the epoch being started
    (FFCV passes its own epoch counter, which knows nothing of set_epoch)."""

    def __init__(self, owner: "FFCVLoader"):
        self.owner = owner

    def sample_order(self, ffcv_epoch: int):
        return self.owner.indices[self.owner.epoch_indices(self.owner._running_epoch)]


def num_samples(path: str) -> int:
    """Samples in a .beton, after checking that the file is whole (ValueError naming it if not)."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype=HeaderType, count=1)
    ptr = int(header[0]["alloc_table_ptr"]) if len(header) else -1
    # The allocation table is the file's tail: a truncated copy cuts it (FFCV would then fail with
    # "negative dimensions are not allowed").
    if not 0 < ptr <= size or (size - ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise ValueError(f"{path} is truncated or not a .beton ({size} bytes; its header places the allocation "
                         f"table at byte {ptr}): copy it again, or convert with python -m loaders.write_ffcv")
    return int(header[0]["num_samples"])


class FFCVLoader(BaseLoader):
    """The loader contract (loaders.base) over an FFCV .beton with fields ``image`` and ``label``.

    The samples are the whole .beton, or those of ``cfg.file_list`` (a ``loaders.subsets`` list
    of the converted folder, or official 1 %/10 % file names, matched through the manifest):
    ``indices[p]`` is the .beton index of sample p. ``last_indices`` are the samples p of the last
    yielded batch; ``jit_seconds`` the first batch's latency (the numba JIT: once per loader, not per
    epoch)."""

    def __init__(self, cfg: LoaderConfig, spec: AugmentSpec, rank: int = 0, world_size: int = 1,
                 device="cpu"):
        if not cfg.path or not str(cfg.path).endswith(".beton"):
            raise ValueError(f"ffcv backend: data.path must be a .beton file (python -m loaders.write_ffcv), "
                             f"got {cfg.path!r}")
        if cfg.ffcv_order not in ("random", "quasi_random"):
            raise ValueError(f"data.ffcv_order must be random or quasi_random, got {cfg.ffcv_order!r}")
        super().__init__(cfg, spec, rank, world_size, device)
        if manifest.manifest_path(cfg.path).is_file():  # a manifest of another conversion: refuse, by name
            try:
                labeled = manifest.read(cfg.path).get("labeled", True)
            except manifest.ManifestError as e:
                raise ValueError(str(e)) from None
            if cfg.labels and not labeled:
                raise ValueError(f"{cfg.path} was converted with --unlabeled, and this needs labels: convert a "
                                 f"folder of class folders (SRC/<class>/<image>) without --unlabeled")
        total = num_samples(cfg.path)
        if cfg.file_list:
            from ..subsets import beton_indices
            self.indices = beton_indices(cfg.path, cfg.file_list)
        else:
            self.indices = np.arange(total, dtype=np.int64)
        self._position = np.full(total, -1, np.int64)  # .beton index -> sample p
        self._position[self.indices] = np.arange(len(self.indices))
        self.num_samples = len(self.indices)
        self._check_size("ffcv loader")
        self._running_epoch = 0       # the epoch whose order FFCV asks for
        self._quasi: Optional[TraversalOrder] = None
        self.jit_seconds: Optional[float] = None
        self._seed_cell = np.zeros(1, np.uint64)

        quasi = cfg.train and cfg.ffcv_order == "quasi_random"
        t0 = time.perf_counter()
        on_gpu = self.photometry_device.type == "cuda"
        to_device = [ToDevice(self.device, non_blocking=True)] if on_gpu else []
        decoder = DecodeViews(spec, self._seed_cell)
        # numba refuses more threads than NUMBA_NUM_THREADS (= cores); < 1 means all cores (FFCV).
        workers = min(cfg.num_workers, numba.config.NUMBA_NUM_THREADS) if cfg.num_workers >= 1 else -1
        self._ffcv = Loader(
            cfg.path, batch_size=cfg.batch_size, num_workers=workers, os_cache=cfg.os_cache,
            order=OrderOption.QUASI_RANDOM if quasi else OrderOption.SEQUENTIAL,
            seed=cfg.seed, indices=self.indices[self.epoch_indices(0)], drop_last=cfg.train,
            batches_ahead=cfg.batches_ahead,
            pipelines={"image": [decoder, ToTensor(), *to_device],
                       "label": [IntDecoder(), ToTensor(), *to_device]})
        missing = {"image", "label"} - set(self._ffcv.reader.handlers)
        if missing:
            raise ValueError(f"{cfg.path} lacks field(s) {sorted(missing)}: "
                             f"write it with python -m loaders.write_ffcv")
        if quasi:
            self._quasi = self._ffcv.traversal_order  # FFCV's QuasiRandom over this rank's fixed shard
        self._ffcv.traversal_order = _EpochOrder(self)
        self.build_seconds = time.perf_counter() - t0

    def shard(self, epoch: int) -> np.ndarray:
        """The samples p (not .beton indices: see ``indices``) of this rank's shard of ``epoch``."""
        if self._quasi is not None:
            return self._position[np.asarray(self._quasi.sample_order(epoch))]
        return super().shard(epoch)

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        """The batches before ``start`` are decoded by FFCV and dropped (its crops are per sample, its
        colour streams per batch), so those that follow are exactly those of the uninterrupted epoch."""
        self._seed_cell[0] = np.uint64(epoch_seed(self.cfg.seed, epoch))  # crops: per sample, rank-free
        self._running_epoch = epoch
        it = iter(self._ffcv)           # asks _EpochOrder for this epoch's order, starts decoding
        order = self._position[np.asarray(it.order)]  # what FFCV will decode, as samples p
        B, t0 = self.cfg.batch_size, time.perf_counter()
        for i, (crops, labels) in enumerate(_ffcv_batches(it)):
            if self.jit_seconds is None:
                self.jit_seconds = time.perf_counter() - t0
                log.info("ffcv loader: first batch after %.1f s (numba JIT)", self.jit_seconds)
            self.last_indices = order[i * B:(i + 1) * B]
            if i < start:  # before the resume position: decoded by FFCV's pipeline, not yielded
                continue
            gen = colour_generator(self.cfg.seed, epoch, self.rank, i, self.photometry_device)
            # new tensors: FFCV reuses its buffers
            views = finish_views(crops, self.spec, gen, self.dtype, mode=self.photometry_mode)
            if self.photometry_device != self.device:
                views = [v.to(self.device, non_blocking=True) for v in views]
            # FFCV's label buffer is reused batches_ahead + 2 batches later: copy it.
            yield Batch(views, labels.reshape(-1).to(self.device, torch.int64, copy=True))


def _ffcv_batches(it):
    """FFCV's ``EpochIterator.__next__``, except that it raises instead of waiting forever when
    FFCV's pipeline thread dies (an error in compiled code, or in compiling it, is only printed by
    that thread), and that it stops the thread when the consumer leaves the loop early."""
    try:
        while True:
            try:
                item = it.output_queue.get(timeout=1.0)
            except queue.Empty:
                if not it.is_alive():
                    raise RuntimeError("FFCV's pipeline thread died (traceback printed above)") from None
                continue
            if item is None:  # end of epoch
                return
            slot, result = item
            if IS_CUDA:  # the batch was copied on FFCV's stream for this slot
                it.current_stream.wait_stream(it.cuda_streams[slot])
            yield result
    finally:  # stop the producer before FFCV releases the memory it may still be reading
        it.terminate_event.set()
        it.join(timeout=30)
        it.close()


def build_ffcv_loader(cfg: LoaderConfig, spec: AugmentSpec, rank: int = 0, world_size: int = 1,
                      device="cpu") -> FFCVLoader:
    return FFCVLoader(cfg, spec, rank=rank, world_size=world_size, device=device)
