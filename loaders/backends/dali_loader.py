"""DALI backend: an AugmentSpec realized as a DALI graph, on the GPU (decode "mixed") or on the CPU
(``device_id=None``, used by the tests and CI). With loaders.backends.dali_pipeline (the graph) the only modules
that import DALI.

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

Randomness: the order depends on (cfg.seed, epoch) only; the torch colour ops of batch b draw from
loaders.sampling.colour_generator(cfg.seed, epoch, rank, b), as in every backend. DALI's own random ops (crop, flip, "dali" photometry) are seeded once per (cfg.seed,
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
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Dict, List, Sequence

import numpy as np
import torch
from nvidia.dali.tensors import TensorGPU

from .. import augment
from ..augment.spec import AugmentSpec
from ..base import Batch, BaseLoader, resolve_samples
from ..config import LoaderConfig
from ..errors import DataError
from ..sampling import colour_generator, derive_seed
from .dali_pipeline import HW_PREALLOC, INTERP, simclr_pipeline

log = logging.getLogger(__name__)

PHOTOMETRY_MODES = ("torch", "dali")
# The DALI pipeline's seed: a stream of its own (loaders.sampling's other streams never use this word).
_DALI_STREAM = 0x5A11


def _seed(seed: int, epoch: int, rank: int, stream: int, bits: int = 63) -> int:
    return derive_seed(seed, epoch, rank, stream, bits=bits)


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
        self.steps, self.stop, self.base = 0, False, None
        self.recent = collections.deque(maxlen=remember)  # index arrays in flight: for error messages

    def arm(self, indices: np.ndarray, steps: int) -> None:
        self.indices, self.steps, self.stop = np.asarray(indices, np.int64), steps, False
        self.base = None
        self.recent.clear()

    def __call__(self, info):
        # DALI's iteration counter: 0 at an epoch's start, or where a restored checkpoint left it (a
        # resumed epoch). The first call after arm() is the first batch armed, whatever the count.
        if self.base is None:
            self.base = info.iteration
        i = info.iteration - self.base
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
        if spec.crop.interpolation not in INTERP:
            raise ValueError(f"interpolation must be one of {sorted(INTERP)}, "
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

        samples, self.classes, self.root, self.listing_note = resolve_samples(cfg)
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

    # -- exact resume --------------------------------------------------------------------------------
    def state(self) -> bytes | str | None:
        """(bytes) The pipeline's random state after the batches yielded so far (DALI's checkpoint; the sample
        order is the loader contract's, positioned by set_epoch)."""
        return None if self.pipe is None else self.pipe.checkpoint()

    def restore(self, state) -> None:
        """Continue from a ``state()``: the next pass positioned by set_epoch draws what the run that
        saved it drew next."""
        self._open = False
        self._build(checkpoint=state)

    # -- pipeline ---------------------------------------------------------------------------------
    def _build(self, checkpoint: str | None = None) -> None:
        """(Re)build the pipeline; ``checkpoint``: a ``state()`` of this loader to continue from."""
        cfg = self.cfg
        decoder_kw = {}
        if self.gpu:
            decoder_kw = dict(hw_decoder_load=cfg.hw_decoder_load,
                              device_memory_padding=cfg.device_memory_padding,
                              host_memory_padding=cfg.host_memory_padding, **HW_PREALLOC)
        self.pipe = simclr_pipeline(
            source=self._source, spec=self.spec, gpu=self.gpu, photometry=cfg.dali_photometry,
            roi_decode=cfg.dali_roi_decode, decoder_kw=decoder_kw,
            batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers),
            device_id=self.device.index if self.gpu else None,  # None: CPU-only pipeline, no CUDA needed
            seed=_seed(cfg.seed, 0, self.rank, _DALI_STREAM, bits=31),
            prefetch_queue_depth=max(1, cfg.dali_prefetch),
            # DALI's random ops keep their RNG inside the pipeline: its checkpoint carries it, so a
            # resumed run draws the crops, flips and colours of the uninterrupted one.
            enable_checkpointing=True, checkpoint=checkpoint)
        with warnings.catch_warnings():  # our source is re-armed by position on resume (state/restore)
            warnings.filterwarnings("ignore", message="Checkpointing enabled in a pipeline with external source")
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
        for b in range(start, start + steps):
            outs = self._run()
            indices = np.asarray(outs[0].as_array(), dtype=np.int64).reshape(-1)
            labels = self._to_torch(outs[1])
            gen = None
            if self.cfg.dali_photometry == "torch":
                gen = colour_generator(self.cfg.seed, epoch, self.rank, b, self.photometry_device)
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
                                         mode=self.photometry_mode)
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
        from ..sources.checks import DaliChecker, check_file, dali_reason

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
