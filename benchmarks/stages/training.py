"""The training stages: ``step`` (the training step on synthetic views, the ceiling) and ``e2e``
(the same step fed by each real backend, with the share of time spent waiting for data). The step
itself is benchmarks.train_step.make_train_step."""
from __future__ import annotations

import time

import torch

from benchmarks.backends import batches, build_fastclr_loader, close_loader, loader_variants
from benchmarks.plan import K
from benchmarks.rows import err, ok_stage, row, skipped_row
from benchmarks.stages.bench import Bench
from benchmarks.timing import free, sync, timed
from benchmarks.train_step import make_train_step
from loaders.common import dtype_name, parse_dtype


def stage_step(b: Bench):
    p = b.plan
    B = p.step_batch
    dname = p.dtypes[0]
    step, _ = make_train_step(p.step_arch, b.device, parse_dtype(dname))
    views = [torch.rand(B, 3, p.size, p.size, device=b.device).contiguous(memory_format=torch.channels_last)
             for _ in range(K)]
    dt = timed(lambda: step(views), b.device, 1, p.step_iters)
    step = views = None
    free(b.device)
    return ok_stage([row(f"{p.step_arch} {dname} B={B}", impl="fastclr", arch=p.step_arch, dtype=dname, batch=B,
                         size=p.size, images_per_s=B / dt, views_per_s=K * B / dt, seconds_per_step=dt)],
                    notes="fwd + NT-Xent + bwd + LARS on synthetic views (no data loading): the ceiling for e2e")


def stage_e2e(b: Bench):
    p = b.plan
    B = p.e2e_batch
    dname = p.dtypes[0]
    rows = []
    step, _ = make_train_step(p.e2e_arch, b.device, parse_dtype(dname))
    for name, backend, extra in loader_variants(b.args, b.device):
        loader, why = build_fastclr_loader(backend, b.data, p, b.device, B, dtype_name(parse_dtype(dname)), extra)
        if loader is None:
            rows.append(skipped_row(name, why, backend=backend))
            continue
        it = batches(loader, b.device)
        try:
            for _ in range(p.e2e_warmup):
                step(next(it))
            sync(b.device)
            wait = 0.0
            t0 = time.perf_counter()
            for _ in range(p.e2e_iters):
                tw = time.perf_counter()
                views = next(it)  # time blocked here = data wait (as pretrain.py logs it)
                wait += time.perf_counter() - tw
                step(views)
            sync(b.device)
            dt = time.perf_counter() - t0
            rows.append(row(name, backend=backend, impl="fastclr", arch=p.e2e_arch, dtype=dname, batch=B,
                            workers=p.workers, images_per_s=p.e2e_iters * B / dt,
                            views_per_s=K * p.e2e_iters * B / dt, seconds_per_step=dt / p.e2e_iters,
                            data_wait=min(wait / dt, 1.0)))
        except Exception as e:
            rows.append(skipped_row(name, f"failed: {err(e)}", backend=backend))
        finally:
            it.close()
            close_loader(loader)
            del loader
    del step
    free(b.device)
    return ok_stage(rows, notes="data_wait = share of the step time spent blocked on the loader")
