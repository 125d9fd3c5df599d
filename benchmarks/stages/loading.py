"""The loader stages: ``augment`` (the two-view recipe through each backend's loader and the peers'
DataLoaders, same worker count) and ``h2d`` (one batch copied to the GPU)."""
from __future__ import annotations

import torch

from benchmarks.backends import build_fastclr_loader, close_loader, loader_variants, time_loader
from benchmarks.peers import LIGHTLY_MISSING, importable, peer_loader
from benchmarks.plan import K
from benchmarks.rows import err, ok_stage, row, skip_stage, skipped_row
from benchmarks.stages.bench import Bench
from benchmarks.timing import timed


def stage_augment(b: Bench):
    p = b.plan
    dtype = "bfloat16" if b.cuda else "float32"
    jobs = [(name, lambda be=backend, x=extra: _fastclr_augment(b, be, x, dtype), backend != "torch")
            for name, backend, extra in loader_variants(b.args, b.device)]
    if b.args.peers:
        jobs += [(name, lambda k=kind, n=name: _peer_augment(b, k, n), False)
                 for kind, name in (("torchvision", "torchvision/PIL DataLoader"),
                                    ("lightly", "lightly SimCLRTransform"))]
    # Loaders that fork workers (torch backend, peers) run before DALI/FFCV start their thread
    # pools in this process (forking after those is unsafe); rows keep the table's order.
    results = {}
    for name, job, late in sorted(jobs, key=lambda j: j[2]):
        results[name] = job()
    return ok_stage([results[name] for name, _, _ in jobs],
                    notes=f"two views per image, {p.workers} workers each, views on {b.device}")


def _fastclr_augment(b: Bench, backend: str, extra: dict, dtype: str) -> dict:
    p = b.plan
    name = next(n for n, be, x in loader_variants(b.args, b.device) if be == backend and x == extra)
    loader, why = build_fastclr_loader(backend, b.data, p, b.device, p.batch, dtype, extra)
    if loader is None:
        return skipped_row(name, why, backend=backend)
    try:
        r = time_loader(loader, b.device, p.loader_warmup, p.loader_batches, p.batch)
        jit = getattr(loader, "jit_seconds", None)
        return row(name, backend=backend, impl="fastclr", workers=p.workers, batch=p.batch,
                   **r, **({"jit_seconds": jit} if jit is not None else {}))
    except Exception as e:
        return skipped_row(name, f"failed: {err(e)}", backend=backend)
    finally:
        close_loader(loader)
        del loader


def _peer_augment(b: Bench, kind: str, name: str) -> dict:
    p = b.plan
    if b.need_folder():
        return skipped_row(name, b.need_folder(), impl=kind)
    if kind == "lightly" and not importable("lightly"):
        return skipped_row(name, LIGHTLY_MISSING, impl=kind)
    try:
        dl = peer_loader(kind, b.data.samples, p, b.device)
        return row(name, impl=kind, workers=p.workers, batch=p.batch,
                   **time_loader(dl, b.device, p.loader_warmup, p.loader_batches, p.batch))
    except Exception as e:
        return skipped_row(name, f"failed: {err(e)}", impl=kind)


def stage_h2d(b: Bench):
    if not b.cuda:
        return skip_stage("no GPU: host-to-device copies exist only with --device cuda")
    B, S = b.plan.batch, b.plan.size
    rows = []
    crops = torch.randint(0, 255, (B, K, S, S, 3), dtype=torch.uint8)
    for name, src in (("uint8 crops, pinned", crops.pin_memory()), ("uint8 crops, pageable", crops),
                      ("float32 views, pinned", torch.rand(K * B, 3, S, S).pin_memory())):
        dt = timed(lambda src=src: src.to(b.device, non_blocking=True), b.device, 3, 20)
        rows.append(row(name, images_per_s=B / dt, views_per_s=K * B / dt,
                        gb_per_s=src.numel() * src.element_size() / dt / 1e9, batch=B))
    return ok_stage(rows, notes="one batch of two views; uint8 is what fastclr ships, float32 what peers ship")
