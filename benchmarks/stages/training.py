"""The training stages: ``step`` (the training step on synthetic views, the ceiling: every variant,
then the fastest at larger batches) and ``e2e`` (the fastest step fed by each real backend, with the
share of time spent waiting for data). The step itself is benchmarks.train_step.make_train_step."""
from __future__ import annotations

import time

import torch

from benchmarks.backends import batches, build_fastclr_loader, close_loader, loader_variants
from benchmarks.plan import K
from benchmarks.rows import err, ok_stage, row, skip_stage, skipped_row
from benchmarks.stages.bench import Bench
from benchmarks.timing import free, sync, timed
from benchmarks.train_step import GRAPH_WARMUP, make_train_step
from loaders.config import dtype_name, parse_dtype


def stage_step(b: Bench):
    """Every step variant at step_batch; then the fastest at each of step_batches, with peak memory."""
    p = b.plan
    dname = p.dtypes[0]
    rows = [_time_step(b, variant, p.step_batch, dname) for variant in p.step_variants]
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    if ok:
        best = max(ok, key=lambda r: r["images_per_s"])
        b.best_step_variant = best["variant"]
        rows += [_time_step(b, best["variant"], B, dname) for B in p.step_batches]
        # fp32 vs bf16 on the CPU, at each precision size (the row at the plan's size and dtype is reused)
        for size in dict.fromkeys([p.size, *p.precision_sizes]):
            for d in p.precision_dtypes:
                if not (size == p.size and d == dname):
                    rows.append(_time_step(b, best["variant"], p.step_batch, d, size))
    return ok_stage(rows, notes="fwd + NT-Xent + bwd + LARS on synthetic views (no data loading): the ceiling "
                                "for e2e; variants: eager, torch.compile'd model and LARS, one CUDA graph")


def _time_step(b: Bench, variant: str, B: int, dname: str, size: int | None = None) -> dict:
    p = b.plan
    size = size or p.size
    name = f"{p.step_arch} {dname} B={B} {variant}" + ("" if size == p.size else f" {size}px")
    try:
        step, _ = make_train_step(p.step_arch, b.device, parse_dtype(dname), variant)
    except Exception as e:
        return skipped_row(name, f"failed: {err(e)}", variant=variant, batch=B)
    views = [torch.rand(B, 3, size, size, device=b.device).contiguous(memory_format=torch.channels_last)
             for _ in range(K)]
    try:
        if b.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step(views)  # compiles / autotunes
        sync(b.device)
        first = time.perf_counter() - t0
        warmup = GRAPH_WARMUP + 1 if "graph" in variant else 1
        dt = timed(lambda: step(views), b.device, warmup, p.step_iters)
        peak = torch.cuda.max_memory_allocated() / 2**30 if b.cuda else None
        return row(name, impl="fastclr", arch=p.step_arch, dtype=dname, batch=B, size=size, variant=variant,
                   images_per_s=B / dt, views_per_s=K * B / dt, seconds_per_step=dt, first_step_seconds=first,
                   **({"peak_mem_gib": peak} if peak is not None else {}))
    except Exception as e:
        return skipped_row(name, f"failed: {err(e)}", variant=variant, batch=B)
    finally:
        step = views = None
        free(b.device)


def stage_e2e(b: Bench):
    """The fastest step fed by each backend; on the CPU also the default backend at the other precision
    dtypes (fp32 vs bf16 with the data path included)."""
    p = b.plan
    dname = p.dtypes[0]
    # The fastest step of this run's step stage (else the plan's last, most optimized, variant).
    variant = getattr(b, "best_step_variant", None) or p.step_variants[-1]
    runs = [(dname, v) for v in loader_variants(b.args, b.device)]
    runs += [(d, runs[0][1]) for d in p.precision_dtypes if d != dname and runs]
    rows = []
    for d in dict.fromkeys(d for d, _ in runs):
        try:
            step, _ = make_train_step(p.e2e_arch, b.device, parse_dtype(d), variant)
        except Exception as e:
            if d == dname:
                return skip_stage(f"the {variant} step failed to build: {err(e)}")
            rows.append(skipped_row(f"e2e {d}", f"the {variant} step failed to build: {err(e)}"))
            continue
        for dd, lv in runs:
            if dd == d:
                rows.append(_time_e2e(b, step, variant, d, *lv, tagged=d != dname))
        del step
        free(b.device)
    return ok_stage(rows, notes="data_wait = share of the step time spent blocked on the loader")


def _time_e2e(b: Bench, step, variant: str, dname: str, name: str, backend: str, extra, tagged: bool) -> dict:
    p = b.plan
    B = p.e2e_batch
    name = f"{name} {dname}" if tagged else name
    loader, why = build_fastclr_loader(backend, b.data, p, b.device, B, dtype_name(parse_dtype(dname)), extra)
    if loader is None:
        return skipped_row(name, why, backend=backend)
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
        return row(name, backend=backend, impl="fastclr", arch=p.e2e_arch, dtype=dname, batch=B,
                   variant=variant, workers=p.workers, images_per_s=p.e2e_iters * B / dt,
                   views_per_s=K * p.e2e_iters * B / dt, seconds_per_step=dt / p.e2e_iters,
                   data_wait=min(wait / dt, 1.0))
    except Exception as e:
        return skipped_row(name, f"failed: {err(e)}", backend=backend)
    finally:
        it.close()
        close_loader(loader)
        del loader
