"""fastclr's data backends as the stages build and time them: which loader variants a run measures,
how each is built (or why it is skipped), and how a loader's batches are timed (peers' too)."""
from __future__ import annotations

import contextlib
import time

import torch

import loaders
from benchmarks.data import Data
from benchmarks.plan import K, Plan
from benchmarks.rows import err
from benchmarks.timing import sync
from loaders.config import LoaderConfig


def batches(loader, device=None):
    """Endless batches as lists of views on ``device``, across epochs (set_epoch when the loader has it)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for b in loader:
            views = list(b.views) if hasattr(b, "views") else [b[0], b[1]]
            if device is not None and views[0].device != torch.device(device):
                views = [v.to(device, non_blocking=True) for v in views]
            yield views
        epoch += 1


def time_loader(loader, device, warmup: int, timed_batches: int, batch: int) -> dict:
    it = batches(loader, device)
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            next(it)
        sync(device)
        t1 = time.perf_counter()
        for _ in range(timed_batches):
            views = next(it)
        sync(device)
        dt = time.perf_counter() - t1
    finally:
        it.close()
    n = timed_batches * batch
    return {"images_per_s": n / dt, "views_per_s": K * n / dt, "seconds": dt, "images": n, "warmup_s": t1 - t0,
            "out_shape": list(views[0].shape), "out_dtype": str(views[0].dtype).replace("torch.", "")}


def loader_variants(args, device) -> list[tuple]:
    """(row name, backend, extra LoaderConfig fields) for every requested backend."""
    out = []
    for b in args.backends:
        if b == "dali":  # pinned, so that a change of the default does not change what a row measures
            out.append(("fastclr dali", b, {"dali_photometry": "dali", "dali_roi_decode": False}))
        else:
            out.append((f"fastclr {b}", b, {}))
        if b == "torch" and torch.device(device).type == "cuda":
            out.append(("fastclr torch (nvJPEG decode)", b, {"decode_device": "cuda"}))
            if getattr(args, "variants", True):
                # The colour ops against the default fused graphs (auto on a GPU): each op on its own
                # samples (host syncs), and every op on the whole batch, masked (4x the arithmetic).
                out.append(("fastclr torch (colour ops on exact subsets)", b, {"photometry_mode": "subset"}))
                out.append(("fastclr torch (masked whole-batch colour ops)", b, {"photometry_mode": "where"}))
        if b == "dali" and torch.device(device).type == "cuda" and getattr(args, "variants", True):
            # DALI's two design choices, each against the default row above in the same run: the TF-exact
            # augment.py colour ops (fused on a GPU) instead of DALI's, and ROI decode per view.
            out.append(("fastclr dali (augment.py colour ops)", b,
                        {"dali_photometry": "torch", "dali_roi_decode": False}))
            out.append(("fastclr dali (ROI decode per view)", b,
                        {"dali_photometry": "dali", "dali_roi_decode": True}))
    return out


def build_fastclr_loader(backend: str, data: Data, plan: Plan, device, batch: int, dtype: str, extra: dict):
    """(loader, None) or (None, why it is skipped)."""
    ok, why = loaders.available(backend)
    if not ok:
        return None, why
    if backend == "ffcv":
        path = data.ensure_beton()
        if path is None:
            return None, data.beton_why
    else:
        path = data.folder
        if path is None:
            return None, data.folder_why
    cfg = LoaderConfig(backend=backend, path=path, image_size=plan.size, batch_size=batch,
                       num_workers=plan.workers, train=True, seed=0, dtype=dtype,
                       hw_decoder_load=plan.hw_decoder_load, **extra)
    try:
        return loaders.build(cfg, rank=0, world_size=1, device=device), None
    except Exception as e:
        return None, f"failed to build: {err(e)}"


def close_loader(loader) -> None:
    close = getattr(loader, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()
