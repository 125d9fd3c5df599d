"""DALI backend: an AugmentSpec realized as a DALI graph, on the GPU (decode "mixed") or on the CPU
(``device_id=None``, used by the tests and CI). The only module that imports DALI.

    encoded bytes (external_source, this rank's shard in shard order)
      -> decode once (mixed | cpu)                       [or, cfg.dali_roi_decode: ROI decode per view]
      -> K x (random-resized-crop bicubic + flip)        [eval: centre crop, resize]
      -> photometry: cfg.dali_photometry == "torch": uint8 crops -> loaders.augment.finish_views
                     (the same function as the torch backend: same semantics, same code)
                     cfg.dali_photometry == "dali":  DALI ops with per-sample conditionals
      -> torch: [B, 3, S, S] channels_last views in the training dtype, int64 labels

Epochs and sharding. fn.readers.file has its own epoch logic: random_shuffle draws from a buffer of
initial_fill samples (not a permutation of the epoch), without stick_to_shard each rank's shard moves
every epoch, pad_last_batch repeats samples to fill the last batch, and its state cannot be set to
"epoch e" on a fresh pipeline. That makes "len() == batches yielded, every epoch, every rank" and
"set_epoch(e) on a fresh loader gives epoch e's order" hard to guarantee. So the order is ours: each
epoch, ``common.shard_indices`` (the function the other backends use) gives this rank's disjoint slice
of one global permutation, and an
``external_source`` callable feeds the encoded bytes of consecutive ``batch_size`` slices of it, then
raises StopIteration after ``len()`` batches (the remainder is dropped in training). The pipeline is
built once; the source is re-armed per epoch (no per-epoch rebuild, which would cost nvJPEG and pool
set-up on the GPU). Files are read by a small thread pool in the main process: reading encoded bytes is
cheap next to decoding, and decoding stays in DALI's threads / on the GPU. Each batch carries its global
sample indices and labels through the pipeline, so ``last_indices`` and the labels come from the batch
itself, not from a guess about how far DALI prefetched. Epochs, positions and the tail rule are the
contract's (loaders.base).

Randomness: the order depends on (cfg.seed, epoch) only; the torch photometry generator on (cfg.seed,
epoch, rank). DALI's own random ops (crop, flip, "dali" photometry) are seeded once per (cfg.seed,
rank) when the pipeline is built, so a run resumed with set_epoch(e) sees epoch e's exact order but
other random crops than the uninterrupted run (DALI's RNG state is not reseeded per epoch).

Buffers. With DALI's default (dynamic) executor, outputs are handed to torch through DLPack without a
copy and DALI keeps each buffer alive as long as the torch tensor lives (what DALIGenericIterator does),
so a yielded batch stays valid after the next ``next()``. With the legacy executor the outputs are
copied, so that holds too.

Bad files: DALI cannot skip an undecodable image; the run stops with a one-line RuntimeError naming the
file and the command that writes a clean list (``python -m loaders.validate``).
"""
from __future__ import annotations

import collections
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Dict, List, Sequence

import numpy as np
import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.tensors import TensorGPU

from . import augment
from .base import BaseLoader, resolve_samples
from .common import Batch, DataError, LoaderConfig, derive_seed
from .spec import AugmentSpec

log = logging.getLogger(__name__)

PHOTOMETRY_MODES = ("torch", "dali")
_INTERP = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}
# Largest ImageNet image sides: lets the A100/H100 hardware JPEG decoder preallocate once
# (the values NVIDIA's DALI ResNet-50 example uses).
_HW_PREALLOC = dict(preallocate_width_hint=5980, preallocate_height_hint=6430)
# Seed streams: distinct SeedSequence words, so the DALI pipeline, the torch photometry generator and
# common.shard_indices' permutation (which uses [seed, epoch, 0]) never share a stream.
_DALI_STREAM, _TORCH_STREAM = 1, 2
# "dali" photometry: False = fn.hsv's fast linear hue approximation (documented deviation), True =
# TF's exact HSV hue shift from ~40 arithmetic ops (see _hue_exact). The GPU benchmark decides.
EXACT_HUE = False


def _seed(seed: int, epoch: int, rank: int, stream: int, bits: int = 63) -> int:
    return derive_seed(seed, epoch, rank, stream, 0x5A11, bits=bits)


# ------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------

def _coin(p: float):
    """A per-sample boolean, True with probability p: the predicate of DALI's conditionals."""
    return fn.random.coin_flip(probability=float(p), dtype=types.BOOL)


def _uniform(lo: float, hi: float):
    """A per-sample U[lo, hi) scalar (a constant when lo == hi: DALI rejects an empty range)."""
    return fn.random.uniform(range=(float(lo), float(hi))) if hi > lo else float(lo)


def _hwc(x):
    """Re-attach the HWC layout: arithmetic drops it, and fn.hsv / fn.gaussian_blur need it (without
    it the blur would also run across the channel axis)."""
    return fn.reshape(x, layout="HWC")


def _clip01(x):
    return _hwc(dmath.clamp(x, 0.0, 1.0))


def _rint(x):
    """Round half to even (TF's tf.math.rint, numpy's rint) on a float node: 262.5 -> 262."""
    low = dmath.floor(x)
    frac = x - low
    odd = low - 2 * dmath.floor(low / 2)
    return low + _float(frac > 0.5) + _float(frac == 0.5) * odd


def _float(node):
    return fn.cast(node, dtype=types.FLOAT)


def _random_crop_area(spec: AugmentSpec):
    # Same effective area range as TF and the torch backend: TF's crop passes min_object_covered=0.1,
    # so crops cover at least 10 % of the image even though the spec's scale starts at 0.08.
    lo, hi = spec.crop.scale
    return (max(lo, augment.TF_MIN_OBJECT_COVERED), hi)


def _views_geometry(encoded, spec: AugmentSpec, decoder: str, decoder_kw: dict, roi_decode: bool) -> list:
    """K uint8 HWC views of size S x S from the encoded images."""
    crop, S, K = spec.crop, spec.crop.size, spec.num_views
    interp = _INTERP[crop.interpolation]
    # antialias=False everywhere: TF's tf.image.resize(BICUBIC) and the torch backend's OpenCV resize
    # do not antialias either. The cubic kernels of the three libraries need not share a coefficient
    # (TF a=-0.5, OpenCV a=-0.75: see augment.py); the eval test bounds the difference.
    if crop.random and roi_decode:
        # Decode only each view's region (libjpeg-turbo / nvJPEG ROI decode). Trades "decode once,
        # crop twice" for K partial decodes; which is faster is measured by benchmarks/throughput.py.
        views = [fn.resize(fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                                         random_area=_random_crop_area(spec),
                                                         random_aspect_ratio=crop.ratio,
                                                         num_attempts=crop.attempts, **decoder_kw),
                           size=(S, S), interp_type=interp, antialias=False)
                 for _ in range(K)]
    else:
        image = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, **decoder_kw)
        if crop.random:
            # TF deviation: DALI draws the area fraction uniformly and the aspect ratio log-uniformly
            # (like torchvision); TF and the torch backend draw the aspect uniformly on crop.ratio and
            # then the crop height uniformly. After crop.attempts failures (rare with 100) DALI uses
            # its own fallback crop; TF takes the whole image.
            views = [fn.random_resized_crop(image, size=(S, S), random_area=_random_crop_area(spec),
                                            random_aspect_ratio=crop.ratio, num_attempts=crop.attempts,
                                            interp_type=interp, antialias=False)
                     for _ in range(K)]
        else:
            # Eval, like TF's center_crop and the torch backend: a centred square of
            # round(center_fraction * shorter side), then resized to S (crop first, then resize).
            shape = fn.peek_image_shape(encoded)  # [H, W, C] from the header, on the CPU
            side = dmath.max(_rint(dmath.min(shape[0], shape[1]) * crop.center_fraction), 1.0)
            square = fn.crop(image, crop_h=side, crop_w=side)  # centred: crop_pos_x = crop_pos_y = 0.5
            view = fn.resize(square, size=(S, S), interp_type=interp, antialias=False)
            views = [view] * K if K > 1 else [view]
    if spec.flip:
        views = [fn.flip(v, horizontal=fn.random.coin_flip(probability=0.5)) for v in views]
    return views


# The colour ops on float HWC in [0, 1]; ``factor`` is a per-sample scalar node or a Python float.
# Each is followed by a clip to [0, 1], as after every op of TF's color_jitter.

def _brightness(x, factor):
    """TF impl simclrv2: ``x * factor`` (multiplicative), exactly."""
    return _clip01(x * factor)


def _contrast(x, factor):
    """Exactly tf.image.adjust_contrast: ``(x - mean) * factor + mean`` with the per-image,
    per-channel mean. (fn.brightness_contrast would pivot around a fixed grey, 0.5 for float, not the
    image mean; a reduction plus arithmetic avoids that deviation.)"""
    mean = fn.reductions.mean(x, axes=[0, 1])  # [3] per sample, broadcast over H, W
    return _clip01((x - mean) * factor + mean)


def _saturation(x, factor):
    """Exactly tf.image.adjust_saturation (HSV: s -> min(s * f, 1), hue and value kept) in closed
    form, as augment.adjust_saturation: each channel is V - C * w(hue), so scaling S scales V - x by
    min(f, V / C)."""
    v = fn.reductions.max(x, axes=[2], keep_dims=True)
    chroma = v - fn.reductions.min(x, axes=[2], keep_dims=True)
    ratio = dmath.min(factor, v / dmath.max(chroma, 1e-12))  # gray pixels: V - x == 0, ratio is moot
    return _clip01(v - (v - x) * ratio)


def _hue(x, degrees):
    """TF deviation: fn.hsv rotates colours around the grey axis by one linear (YIQ-like) transform,
    an approximation of tf.image.adjust_hue's exact shift of the HSV hue. Same delta as TF (U[-h, h]
    turns, here in degrees). Measured against augment.adjust_hue on textured images: mean abs
    difference 0.065 per channel at 18 degrees, 0.10 at 30. ``EXACT_HUE`` selects ``_hue_exact``."""
    if EXACT_HUE:
        return _clip01(_hue_exact(x, degrees / 360.0))
    return _clip01(fn.hsv(x, hue=degrees, dtype=types.FLOAT))


def _hue_exact(x, delta):
    """tf.image.adjust_hue exactly (as augment.adjust_hue): RGB -> (hue in [0, 6), value V, chroma C)
    -> hue + 6 * delta -> RGB, channel n = V - C * clamp(min(k, 4 - k), 0, 1), k = (hue + n) mod 6
    for n = 5, 3, 1. ~40 elementwise ops: ~15x fn.hsv's time on the CPU (7 ms vs 0.5 ms per 224 px
    image on one core), cheap on a GPU."""
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    v = dmath.max(dmath.max(r, g), b)
    c = v - dmath.min(dmath.min(r, g), b)
    safe = c + _float(c <= 0)  # grey pixels (C == 0) come out as V whatever the hue
    is_r = _float(v == r)  # TF's sector choice: r is the max, else g, else b
    is_g = _float(v == g) * (1 - is_r)
    h = is_r * ((g - b) / safe) + is_g * ((b - r) / safe + 2) + (1 - is_r - is_g) * ((r - g) / safe + 4)
    h = h + 6 * delta
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = h + n
        k = k - 6 * dmath.floor(k / 6)
        channels.append(v - c * dmath.clamp(dmath.min(k, 4 - k), 0.0, 1.0))
    return _hwc(fn.stack(*channels, axis=2))


def _grayscale(x):
    """tf.image.rgb_to_grayscale with 3 channels kept: luma with TF's weights (0.2989, 0.5870,
    0.1140) in all three, exactly. (fn.hsv(saturation=0) would use 0.299/0.587/0.114 and leave the
    channels unequal by ~1e-3.)"""
    wr, wg, wb = augment.GRAY_WEIGHTS
    y = x[:, :, 0] * wr + x[:, :, 1] * wg + x[:, :, 2] * wb
    return _hwc(fn.stack(y, y, y, axis=2))


def _color_jitter(x, spec: AugmentSpec):
    """TF color_jitter (impl simclrv2) with the spec's strengths; factors drawn per sample, lower
    bounds clamped at 0 (as augment.sample_photometric_params); ops of strength 0 skipped (as TF).

    TF deviation: TF applies the four ops in a random order per image; DALI cannot permute ops per
    sample cheaply (it would take 16 conditional branches), so the order is fixed: brightness,
    contrast, saturation, hue (TF's order when random_order=False).
    """
    b, c, s, h = spec.jitter.factors
    if b > 0:
        x = _brightness(x, _uniform(max(1 - b, 0), 1 + b))
    if c > 0:
        x = _contrast(x, _uniform(max(1 - c, 0), 1 + c))
    if s > 0:
        x = _saturation(x, _uniform(max(1 - s, 0), 1 + s))
    if h > 0:
        x = _hue(x, _uniform(-360.0 * h, 360.0 * h))
    return x


def _dali_photometry(view, spec: AugmentSpec):
    """uint8 HWC crop -> float HWC in [0, 1] (or normalized), SimCLR colour ops with per-sample
    conditionals (enable_conditionals=True): ``if coin:`` runs the branch on that sample only."""
    x = _hwc(fn.cast(view, dtype=types.FLOAT) * (1.0 / 255.0))  # TF convert_image_dtype
    if spec.jitter is not None and spec.jitter.p > 0:
        if _coin(spec.jitter.p):
            x = _color_jitter(x, spec)
    if spec.grayscale_p > 0:
        if _coin(spec.grayscale_p):
            x = _grayscale(x)
    if spec.blur is not None and spec.blur.p > 0:
        if _coin(spec.blur.p):
            # sigma ~ U(0.1, 2) per sample, window = 10 % of the side made odd (23 taps at 224).
            # TF deviation: DALI pads the border by reflection (reflect-101); TF (and the torch backend)
            # zero-pad ('SAME' depthwise conv), which darkens a ~11 px frame slightly.
            x = fn.gaussian_blur(x, window_size=spec.blur.kernel_size(spec.crop.size),
                                 sigma=_uniform(*spec.blur.sigma))
    if spec.normalize:
        x = _hwc((x - types.Constant(np.float32(spec.mean))) / types.Constant(np.float32(spec.std)))
    return x


@pipeline_def(enable_conditionals=True)
def simclr_pipeline(source, spec: AugmentSpec, gpu: bool, photometry: str, roi_decode: bool,
                    decoder_kw: dict):
    """Outputs: global sample indices (int64 [B], CPU), labels (int64 [B]), then spec.num_views views
    (HWC; uint8 when photometry == "torch", float32 when "dali"). Labels and views are on the GPU
    when ``gpu`` (DALI copies the labels in its own stream: no pageable host-to-device copy, which
    would sync the host, in the training loop)."""
    encoded, indices, labels = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                                  dtype=[types.UINT8, types.INT64, types.INT64],
                                                  ndim=[1, 0, 0])
    decoder = "mixed" if gpu else "cpu"  # chosen here, at build time: "mixed" needs a CUDA driver
    views = _views_geometry(encoded, spec, decoder, decoder_kw, roi_decode)
    if photometry == "dali":
        views = [_dali_photometry(v, spec) for v in views]
    return (indices, labels.gpu() if gpu else labels, *views)


# ------------------------------------------------------------------------------------------------
# The source: this rank's shard, batch by batch, as encoded bytes
# ------------------------------------------------------------------------------------------------

def _read(path: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:  # a list file naming a file that is not there (any more)
        raise DataError(f"cannot read {path} ({e.strerror or e}); DALI reads exactly the files of its list: "
                        f"write a fresh one with python -m loaders.validate") from None


class _ShardSource:
    """external_source callable. ``arm(indices, steps)`` sets an epoch; DALI then calls it with
    BatchInfo(iteration=0, 1, ...) (ahead of consumption, up to the prefetch depth) and it raises
    StopIteration after ``steps`` batches, or as soon as ``stop`` is set (an abandoned epoch)."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, batch_size: int, threads: int,
                 remember: int):
        self.paths, self.labels, self.batch_size = paths, labels, batch_size
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dali-read")
        self.indices = np.zeros(0, np.int64)
        self.steps, self.stop = 0, False
        self.recent = collections.deque(maxlen=remember)  # index arrays in flight: for error messages

    def arm(self, indices: np.ndarray, steps: int) -> None:
        self.indices, self.steps, self.stop = np.asarray(indices, np.int64), steps, False
        self.recent.clear()

    def __call__(self, info):
        i = info.iteration
        if self.stop or i >= self.steps:
            raise StopIteration
        idx = self.indices[i * self.batch_size:(i + 1) * self.batch_size]
        self.recent.append(idx)
        return list(self.pool.map(_read, [self.paths[j] for j in idx])), idx, self.labels[idx]


# ------------------------------------------------------------------------------------------------
# The loader
# ------------------------------------------------------------------------------------------------

def _host_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS is the best available
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gpu_used(device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return total - free


class DaliLoader(BaseLoader):
    """The loader contract (loaders.base) as a DALI pipeline; ``memory_report()`` = the pipeline's
    memory use. See the module docstring."""

    def __init__(self, cfg: LoaderConfig, spec: AugmentSpec, rank: int = 0, world_size: int = 1,
                 device="cpu"):
        if cfg.dali_photometry not in PHOTOMETRY_MODES:
            raise ValueError(f"data.dali_photometry must be one of {PHOTOMETRY_MODES}, "
                             f"got {cfg.dali_photometry!r}")
        if spec.crop.interpolation not in _INTERP:
            raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, "
                             f"got {spec.crop.interpolation!r}")
        super().__init__(cfg, spec, rank, world_size, device)
        self.gpu = self.device.type == "cuda"
        if self.gpu and not torch.cuda.is_available():
            raise RuntimeError(f"DALI backend: device {self.device} requested but CUDA is not available; "
                               f"use device='cpu' (the CPU pipeline)")
        if self.gpu and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
            if cfg.photometry_device == "auto":
                self.photometry_device = self.device

        samples, self.classes, self.root = resolve_samples(cfg)
        self.paths = [p for p, _ in samples]
        self.labels = np.asarray([label for _, label in samples], np.int64)
        self.num_samples = len(samples)
        self._check_size("dali loader")
        # DALI cannot skip files (a bad one stops the run): nothing is ever skipped.
        self._open = False         # an epoch was started and its end not yet consumed
        self._batches_seen = 0     # batches yielded since build (for the memory report)
        self._mem_logged = False
        self._source = _ShardSource(self.paths, self.labels, cfg.batch_size,
                                    threads=min(8, max(2, cfg.num_workers)), remember=cfg.dali_prefetch + 2)
        self._mem0 = self._memory_snapshot()
        self.pipe = None
        self._build()

    # -- pipeline ---------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        decoder_kw = {}
        if self.gpu:
            decoder_kw = dict(hw_decoder_load=cfg.hw_decoder_load,
                              device_memory_padding=cfg.device_memory_padding,
                              host_memory_padding=cfg.host_memory_padding, **_HW_PREALLOC)
        self.pipe = simclr_pipeline(
            source=self._source, spec=self.spec, gpu=self.gpu, photometry=cfg.dali_photometry,
            roi_decode=cfg.dali_roi_decode, decoder_kw=decoder_kw,
            batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers),
            device_id=self.device.index if self.gpu else None,  # None: CPU-only pipeline, no CUDA needed
            seed=_seed(cfg.seed, 0, self.rank, _DALI_STREAM, bits=31),
            prefetch_queue_depth=max(1, cfg.dali_prefetch))
        self.pipe.build()
        self._open = False

    def _end_epoch(self) -> None:
        """Consume the rest of a started epoch so the next one starts clean: stop the source, drain the
        batches DALI already prefetched (at most the prefetch depth), reset."""
        if not self._open:
            return
        self._source.stop = True
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            self.pipe.reset()
        except Exception:  # a failed prefetched batch: the pipeline is unusable, start a new one
            self._build()
        self._open = False

    # -- the batches of one pass -------------------------------------------------------------------
    def _batches(self, epoch: int, start: int):
        self._end_epoch()
        if self.pipe is None:
            self._build()
        steps = len(self) - start
        self._source.arm(self.epoch_indices(epoch)[start * self.cfg.batch_size:], steps)
        self._open = True
        gen = None
        if self.cfg.dali_photometry == "torch":
            gen = torch.Generator(device=self.photometry_device)
            gen.manual_seed(_seed(self.cfg.seed, epoch, self.rank, _TORCH_STREAM))
        for _ in range(steps):
            outs = self._run()
            indices = np.asarray(outs[0].as_array(), dtype=np.int64).reshape(-1)
            labels = self._to_torch(outs[1])
            views = self._views(outs[2:], gen)
            self.last_indices = indices
            self._batches_seen += 1
            if self._batches_seen == 2 and not self._mem_logged:
                self._mem_logged = True
                log.info("DALI pipeline memory after 2 batches: %s", self._memory_line())
            yield Batch(views=views, labels=labels)
        self._end_epoch()  # the source has raised StopIteration: consume it and reset

    def _views(self, outs, gen) -> List[torch.Tensor]:
        tensors = [self._to_torch(o) for o in outs]  # [B, S, S, 3] each
        if self.cfg.dali_photometry == "torch":
            # The shared last stage of every backend (float, photometry, dtype, channels_last).
            # Looked up on the module at call time, so tests can spy on it.
            crops = torch.stack(tensors, dim=1)  # [B, K, S, S, 3] uint8
            views = augment.finish_views(crops, self.spec, gen, self.dtype, device=self.photometry_device,
                                         mode=self.cfg.photometry_mode)
            if self.photometry_device != self.device:
                views = [v.to(self.device, non_blocking=True) for v in views]
            return views
        # "dali": float32 NHWC -> NCHW view with channels_last strides (no copy), then the dtype cast
        # (in torch: DALI has no bf16), which keeps the memory format.
        return [t.permute(0, 3, 1, 2).to(self.dtype) for t in tensors]

    def _to_torch(self, tl) -> torch.Tensor:
        """A DALI output batch (every sample the same shape) as one torch tensor on its device."""
        t = tl.as_tensor()
        on_gpu = isinstance(t, TensorGPU)
        if self.pipe.exec_dynamic:
            # Zero-copy, as DALIGenericIterator does with the dynamic executor: the DLPack capsule keeps
            # DALI's buffer alive, and DLPack orders the consumer (torch's current stream) after DALI.
            with self.device if on_gpu else nullcontext():
                return torch.from_dlpack(t)
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device if on_gpu else "cpu")
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device) if on_gpu else None)
        return out

    def _run(self):
        try:
            return self.pipe.run()
        except StopIteration:
            self._open = False
            self.pipe.reset()
            raise RuntimeError(f"DALI pipeline ended before {len(self)} batches (internal error)") from None
        except DataError:  # raised by the source (an unreadable listed file): already one line
            self.pipe, self._open = None, False
            raise
        except RuntimeError as e:
            self.pipe, self._open = None, False  # "Current pipeline object is no longer valid"
            raise self._decode_error(e) from None

    def _decode_error(self, err: Exception) -> DataError:
        """A one-line error naming the undecodable file (found by re-checking the batches in flight,
        since DALI's message names neither the file nor the batch) and the fix."""
        from .validate import DaliChecker, check_file, dali_reason

        log.debug("DALI pipeline error: %s", err)
        candidates = [self.paths[j] for idx in self._source.recent for j in idx]
        bad = next(((p, r) for p in candidates for r in [check_file(p)[0]] if r), None)
        if bad is None:
            try:
                found = DaliChecker(threads=max(1, self.cfg.num_workers)).failures(candidates)
                bad = next(iter(found.items()), None)
            except Exception:
                bad = None
        fix = (f"write a clean list with `python -m loaders.validate {self.root} --out clean.txt` "
               f"and set data.file_list=clean.txt")
        if bad is None:
            return DataError(f"DALI pipeline failed: {dali_reason(err)}; if a file is bad, {fix}")
        return DataError(f"DALI cannot decode {bad[0]} ({bad[1]}); DALI cannot skip bad images: {fix}")

    # -- memory -----------------------------------------------------------------------------------
    def _memory_snapshot(self) -> Dict[str, int]:
        snap = {"host_rss": _host_rss()}
        if self.gpu:
            snap["gpu_used"] = _gpu_used(self.device)
            snap["torch_reserved"] = torch.cuda.memory_reserved(self.device)
        return snap

    def memory_report(self) -> Dict[str, object]:
        """Memory taken since just before the pipeline was built: host RSS of the process and, on the
        GPU, device memory in use minus torch's own reserved pool (= DALI's pools, nvJPEG buffers,
        the CUDA context's growth). Deltas of process-wide counters: meaningful right after the first
        batches, before training allocates more. ``dali_executor_statistics`` holds DALI's per-operator
        numbers when the pipeline runs the legacy executor with memory stats (empty otherwise)."""
        now = self._memory_snapshot()
        rep: Dict[str, object] = {"device": str(self.device), "batches_seen": self._batches_seen,
                                  "host_rss_bytes": now["host_rss"] - self._mem0["host_rss"],
                                  "gpu_bytes": None}
        if self.gpu:
            torch_delta = now["torch_reserved"] - self._mem0["torch_reserved"]
            rep["gpu_bytes"] = now["gpu_used"] - self._mem0["gpu_used"] - torch_delta
            rep["torch_reserved_bytes"] = torch_delta
        try:
            stats = self.pipe.executor_statistics() if self.pipe is not None else {}
        except Exception:  # only the legacy executor keeps them
            stats = {}
        rep["dali_executor_statistics"] = stats
        if stats:
            rep["dali_reserved_bytes"] = sum(sum(op.get("reserved_memory_size", [])) for op in stats.values())
        return rep

    def _memory_line(self) -> str:
        r = self.memory_report()
        gpu = "" if r["gpu_bytes"] is None else f", GPU {r['gpu_bytes'] / 2**20:.0f} MiB"
        return f"host {r['host_rss_bytes'] / 2**20:.0f} MiB{gpu} ({r['device']})"

    def close(self) -> None:
        self._source.pool.shutdown(wait=False)
        self.pipe = None

    def __repr__(self) -> str:
        return (f"DaliLoader({self.num_samples} images, {len(self.classes)} classes, rank {self.rank}/"
                f"{self.world_size}, {len(self)} batches of {self.cfg.batch_size}, {self.device}, "
                f"photometry={self.cfg.dali_photometry}, roi_decode={self.cfg.dali_roi_decode})")


def build_dali_loader(cfg: LoaderConfig, spec: AugmentSpec, rank: int = 0, world_size: int = 1,
                      device="cpu") -> DaliLoader:
    """The DALI loader for this rank (see the module docstring). ``device`` "cpu" builds the CPU
    pipeline (``device_id=None``); a CUDA device builds the GPU one (mixed decode)."""
    return DaliLoader(cfg, spec, rank=rank, world_size=world_size, device=device)
