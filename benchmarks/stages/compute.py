"""The compute stages on synthetic inputs: ``model`` (backbone + head fwd+bwd per architecture and
dtype, eager and compiled), ``loss`` (NT-Xent, dense and chunked, with peak memory) and ``optim``
(one LARS step, fused against the peers' ways)."""
from __future__ import annotations

import time

import torch

from benchmarks.peers import LIGHTLY_MISSING, NaiveLARS, importable
from benchmarks.plan import K
from benchmarks.rows import err, ok_stage, row, skipped_row
from benchmarks.stages.bench import Bench
from benchmarks.timing import free, peak_memory, sync, timed
from fastclr.runtime import autocast
from loaders.config import parse_dtype


def stage_model(b: Bench):
    from fastclr.models import build_model, parse_model_name
    p = b.plan
    rows = []
    B = p.model_batch
    for arch in p.archs:
        for dname in p.dtypes:
            dtype = parse_dtype(dname)
            for compiled in (False, True):
                name = f"{arch} {dname}" + (" compiled" if compiled else "")
                if compiled and (dname != p.dtypes[0] or (p.compile and arch != p.archs[0])):
                    continue  # compile one model (first arch, training dtype): compile time is the cost
                if compiled and not p.compile:
                    why = ("--no-compile given" if b.cuda else
                           "torch.compile off by default on CPU (compile time dominates a short run); pass --compile")
                    rows.append(skipped_row(name, why, arch=arch, dtype=dname))
                    continue
                if dtype == torch.float16 and not b.cuda:
                    rows.append(skipped_row(name, "fp16 needs a GPU", arch=arch, dtype=dname))
                    continue
                try:
                    r = _time_model(b, build_model, parse_model_name(arch), B, dtype, compiled)
                    rows.append(row(name, impl="fastclr", arch=arch, dtype=dname, compiled=compiled, batch=B,
                                    size=p.size, **r))
                except Exception as e:
                    rows.append(skipped_row(name, f"failed: {err(e)}", arch=arch, dtype=dname))
                finally:
                    free(b.device)
    return ok_stage(rows, notes=f"fwd+bwd of backbone+head on {K}x{B} views of {p.size} px, channels_last")


def _time_model(b: Bench, build_model, kw, B, dtype, compiled):
    p = b.plan
    torch.manual_seed(0)
    model = build_model(**kw).to(b.device).to(memory_format=torch.channels_last).train()
    x = torch.rand(K * B, 3, p.size, p.size, device=b.device).contiguous(memory_format=torch.channels_last)
    fwd = torch.compile(model) if compiled else model

    def run():
        with autocast(b.device, dtype):
            _, z = fwd(x)
        z.float().square().mean().backward()
        for q in model.parameters():
            q.grad = None

    t0 = time.perf_counter()
    run()  # first call: compile / cudnn autotune
    sync(b.device)
    first = time.perf_counter() - t0
    dt = timed(run, b.device, max(p.model_warmup - 1, 0), p.model_iters)
    out = {"images_per_s": B / dt, "views_per_s": K * B / dt, "seconds_per_step": dt}
    if compiled:
        out["compile_seconds"] = first
    return out


def stage_teacher(b: Bench):
    """The distillation teacher's forward rate: a released model's classifier in eval mode, without
    gradients, channels_last, in the training dtype, eager and (where the plan compiles) compiled."""
    from fastclr.classifier import build_classifier
    from fastclr.models import parse_model_name
    p = b.plan
    dname = p.dtypes[0]
    dtype = parse_dtype(dname)
    arch = {**parse_model_name(p.teacher_arch), "cifar_stem": False, "num_proj_layers": 3, "proj_out_dim": 128,
            "tf_maxpool": True, "ft_proj_selector": 1, "num_classes": 1000}
    rows = []
    torch.manual_seed(0)
    try:
        net = build_classifier(arch, 1000, zero_init=False).to(b.device).eval().requires_grad_(False)
        net = net.to(memory_format=torch.channels_last)
    except Exception as e:
        return ok_stage([skipped_row(p.teacher_arch, f"failed: {err(e)}")])
    x = torch.rand(p.teacher_batch, 3, p.size, p.size, device=b.device).contiguous(memory_format=torch.channels_last)
    for compiled in (False, True):
        name = f"{p.teacher_arch} teacher {dname}" + (" compiled" if compiled else "")
        if compiled and not p.compile:
            rows.append(skipped_row(name, "--no-compile given" if b.cuda else "torch.compile off by default on CPU; "
                                    "pass --compile", arch=p.teacher_arch, dtype=dname))
            continue
        fwd = torch.compile(net) if compiled else net

        def run(fwd=fwd):
            with torch.no_grad(), autocast(b.device, dtype):
                fwd(x)
        try:
            t0 = time.perf_counter()
            run()
            sync(b.device)
            first = time.perf_counter() - t0
            dt = timed(run, b.device, 1, p.teacher_iters)
            extra = {"compile_seconds": first} if compiled else {}
            rows.append(row(name, impl="fastclr", arch=p.teacher_arch, dtype=dname, compiled=compiled,
                            batch=p.teacher_batch, size=p.size, images_per_s=p.teacher_batch / dt,
                            seconds_per_step=dt, **extra))
        except Exception as e:
            rows.append(skipped_row(name, f"failed: {err(e)}", arch=p.teacher_arch, dtype=dname))
    del net
    free(b.device)
    return ok_stage(rows, notes=f"eval-mode forward of a released model's classifier ({p.teacher_arch}, TF max-pool, "
                                f"head layer 1, 1000 classes), {p.teacher_batch} images of {p.size} px")


def stage_loss(b: Bench):
    from fastclr.losses import nt_xent
    p = b.plan
    rows = []
    lightly_loss = None
    if b.args.peers:
        if importable("lightly"):
            from lightly.loss import NTXentLoss
            lightly_loss = NTXentLoss(temperature=0.1, gather_distributed=False)
        else:
            rows.append(skipped_row("lightly NTXentLoss", LIGHTLY_MISSING, impl="lightly"))
    impls = [("fastclr nt_xent dense", "fastclr-dense", lambda a, c: nt_xent(a, c, 0.1, chunk_size=0)),
             (f"fastclr nt_xent chunked ({p.loss_chunk})", "fastclr-chunked",
              lambda a, c: nt_xent(a, c, 0.1, chunk_size=p.loss_chunk))]
    if lightly_loss is not None:
        impls.append(("lightly NTXentLoss", "lightly", lightly_loss))
    for B in p.loss_batches:
        g = torch.Generator(device="cpu").manual_seed(B)
        z1 = torch.randn(B, p.loss_dim, generator=g).to(b.device).requires_grad_()
        z2 = torch.randn(B, p.loss_dim, generator=g).to(b.device).requires_grad_()
        for name, impl, fn in impls:
            def run(fn=fn, z1=z1, z2=z2):
                fn(z1, z2).backward()
                z1.grad = z2.grad = None
            try:
                iters = p.loss_iters if B < 2048 or b.cuda else max(1, p.loss_iters // 2)
                dt = timed(run, b.device, 1, iters, min_time=p.min_time)
                mem, how = peak_memory(run, b.device)
                rows.append(row(f"{name} B={B}", impl=impl, batch=B, dim=p.loss_dim, seconds=dt,
                                images_per_s=B / dt, peak_mem_bytes=mem, peak_mem_mib=mem / 2**20,
                                peak_mem_per_image=mem / B, mem_method=how))
            except Exception as e:
                rows.append(skipped_row(f"{name} B={B}", f"failed: {err(e)}", impl=impl, batch=B))
        z1 = z2 = None  # free this B's tensors before the next
        free(b.device)
    return ok_stage(rows, notes=f"fwd+bwd on [B, {p.loss_dim}] embeddings, temperature 0.1; peak memory above "
                                "the inputs")


class _graphed:
    """An optimizer whose step() replays its step captured as a CUDA graph (as the trainer's step runs it)."""

    def __init__(self, opt):
        from fastclr.trainer import cuda_capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warmup: compiles, creates the momentum and scratch buffers
            for _ in range(3):
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        self.step = cuda_capture(opt.step)


def stage_optim(b: Bench):
    from fastclr.lars import LARS
    from fastclr.models import build_model, parse_model_name
    p = b.plan
    torch.manual_seed(0)
    model = build_model(**parse_model_name(p.optim_arch)).to(b.device)
    params = list(model.parameters())
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    numel = sum(q.numel() for q in params)
    lr, mom, wd, eta = 0.1, 0.9, 1e-6, 1e-3
    impls = [("fastclr LARS (fused, no sync)", "fastclr",
              lambda: LARS(params, lr=lr, momentum=mom, weight_decay=wd, eta=eta, mode="tf")),
             ("fastclr LARS compiled", "fastclr-compiled",
              (lambda: LARS(params, lr=torch.tensor(lr, device=b.device), momentum=mom, weight_decay=wd, eta=eta,
                            mode="tf", capturable=True, compiled=True)) if p.compile else None),
             ("fastclr LARS compiled, in a CUDA graph", "fastclr-graph",
              (lambda: _graphed(LARS(params, lr=torch.tensor(lr, device=b.device), momentum=mom, weight_decay=wd,
                                     eta=eta, mode="tf", capturable=True, compiled=True)))
              if p.compile and b.cuda else None),
             ("per-parameter loop with .item()", "loop", lambda: NaiveLARS(params, lr, mom, wd, eta)),
             ("torch SGD foreach (no trust ratio; floor)", "sgd-foreach",
              lambda: torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd, foreach=True))]
    if b.args.peers:
        if importable("lightly"):
            from lightly.utils.lars import LARS as LightlyLARS
            impls.insert(2, ("lightly LARS", "lightly",
                             lambda: LightlyLARS(params, lr=lr, momentum=mom, weight_decay=wd,
                                                 trust_coefficient=eta)))
        else:
            impls.insert(2, ("lightly LARS", "lightly", None))
    rows = []
    for name, impl, make in impls:
        if make is None:
            why = (LIGHTLY_MISSING if impl == "lightly" else "a CUDA graph needs a GPU" if impl == "fastclr-graph"
                   and p.compile else "torch.compile off (CPU default, or --no-compile): pass --compile")
            rows.append(skipped_row(name, why, impl=impl))
            continue
        try:
            opt = make()
            dt = timed(opt.step, b.device, 1, p.optim_iters, min_time=p.min_time)
            rows.append(row(name, impl=impl, arch=p.optim_arch, params=numel, tensors=len(params),
                            seconds_per_step=dt, steps_per_s=1 / dt, ms_per_step=dt * 1e3))
            del opt
        except Exception as e:
            rows.append(skipped_row(name, f"failed: {err(e)}", impl=impl))
    return ok_stage(rows, notes=f"one optimizer step over {p.optim_arch}'s {len(params)} parameter tensors "
                                f"({numel / 1e6:.1f} M values)")
