"""The ``photometry`` stage: the colour recipe alone (loaders.augment.finish_views: uint8 crops ->
jitter in random order, grayscale, blur, -> views in the training dtype, channels_last), per
implementation on the run's device, reported per 512 views of 224 px (the GPU goal: <= 2 ms).

    subset  each op on its own samples (exact work, host syncs): the CPU default and the oracle
    where   every op on the whole batch, masked (no host sync, ~4x the arithmetic): the former GPU default
    fused   the whole recipe as two torch.compile'd graphs (no host sync): the GPU default; on the CPU
            it is opt-in (--compile): inductor's C++ is no faster there and costs a minute to compile
"""
from __future__ import annotations

import time

import torch

from benchmarks.plan import K
from benchmarks.rows import err, ok_stage, row, skipped_row
from benchmarks.stages.bench import Bench
from benchmarks.timing import free, sync, timed
from loaders import augment
from loaders.augment.spec import simclr


def stage_photometry(b: Bench):
    p = b.plan
    spec = simclr(p.size)
    n_img = max(1, p.photometry_views // K)
    dtype = torch.bfloat16 if b.cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (n_img, K, p.size, p.size, 3), dtype=torch.uint8, generator=g).to(b.device)
    rows = []
    for mode in ("subset", "where", "fused"):
        name = f"finish_views {mode}"
        if mode == "fused" and not b.cuda and not p.compile:
            rows.append(skipped_row(name, "compiled colour ops are opt-in on the CPU (no faster there, a minute to "
                                          "compile): pass --compile", mode=mode))
            continue
        gen = torch.Generator(device=b.device).manual_seed(1)

        def run(mode=mode, gen=gen):
            return augment.finish_views(crops, spec, gen, dtype, mode=mode)
        try:
            t0 = time.perf_counter()
            run()  # first call: compiles the fused graphs (or loads them from inductor's cache)
            sync(b.device)
            first = time.perf_counter() - t0
            dt = timed(run, b.device, 1, p.photometry_iters)
            views = n_img * K
            extra = {"compile_seconds": first} if mode == "fused" else {}
            rows.append(row(name, impl="fastclr", mode=mode, views=views, size=p.size, dtype=str(dtype)[6:],
                            ms_per_call=dt * 1e3, ms_per_512_views=dt * 1e3 * 512 / views,
                            views_per_s=views / dt, images_per_s=n_img / dt, **extra))
        except Exception as e:
            rows.append(skipped_row(name, f"failed: {err(e)}", mode=mode))
        finally:
            free(b.device)
    return ok_stage(rows, notes=f"uint8 [{n_img}, {K}, {p.size}, {p.size}, 3] crops -> {n_img * K} views in "
                                f"{str(dtype)[6:]}, channels_last, on {b.device}; full SimCLR colour recipe")
