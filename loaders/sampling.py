"""The one seeding and sharding policy of every backend, the preview and the cached-feature loader.

Every random stream is a function of (``seed``, the words that name it) only, never of the worker
count or of where it runs, so batches are reproducible and a resumed run replays them:

* the epoch's permutation: ``epoch_seed(seed, epoch)`` (the same on every rank; ``shard_indices``);
* the geometry (crop boxes, flips) of the sample at position ``pos`` of a rank's shard:
  ``geometry_rng(seed, epoch, rank, pos)`` (FFCV, whose per-sample code runs in numba, derives the
  same kind of per-sample stream from ``epoch_seed(seed, epoch)`` and the sample id);
* the colour ops of batch ``b``: ``colour_generator(seed, epoch, rank, b, device)``, in every backend.
"""
from __future__ import annotations

import functools
from typing import List

import numpy as np
import torch

def seed_words(seed: int, *words: int) -> List[int]:
    """The entropy of one random stream: the run's seed (``run.seed``, 32 bits) and the words that
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


@functools.lru_cache(maxsize=4)
def shard_indices(n: int, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """This rank's sample indices for one epoch: a disjoint 1/world_size of one global permutation
    (same on every rank). The global remainder n % world_size is dropped so ranks stay equal. Cached
    (a worker asks once per batch; 1.28M indices take milliseconds to permute); read-only."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if shuffle:
        order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(n)
    else:
        order = np.arange(n)
    per_rank = n // world_size
    out = order[rank * per_rank:(rank + 1) * per_rank]
    out.flags.writeable = False  # shared by every caller through the cache
    return out


def steps_per_epoch(n: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    per_rank = n // world_size
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def check_batch_fits(n: int, world_size: int, batch_size: int, where: str) -> None:
    if n // world_size < batch_size:
        raise ValueError(f"{where}: {n} images over {world_size} rank(s) is fewer than one batch of {batch_size}; "
                         f"lower optim.global_batch_size")


def geometry_rng(seed: int, epoch: int, rank: int, pos: int) -> np.random.Generator:
    """The crop boxes and flips of the sample at position ``pos`` of ``rank``'s shard of ``epoch``
    (a replacement for an unreadable file uses its slot's stream)."""
    return np.random.default_rng(seed_words(seed, epoch, rank, pos))


COLOUR_STREAM = 0x5EED


def colour_generator(seed: int, epoch: int, rank: int, batch: int, device) -> torch.Generator:
    """The colour ops' random stream of one batch, on the device that runs them (the CPU and CUDA
    generators give different streams for the same seed)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, epoch, rank, batch, COLOUR_STREAM))
    return g
