"""What a run measures: the stages and backends, the configuration (one ``Plan`` per device and
``--quick``), and the command line that picks and overrides them."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace

import torch

from benchmarks import ROOT

STAGES = ("read", "decode", "geometry", "photometry", "augment", "h2d", "model", "teacher", "loss", "optim", "step",
          "e2e")
BACKENDS = ("torch", "dali", "ffcv")
SWEEPABLE = {  # parameter -> stages it affects
    "num_threads": ("augment", "e2e"),
    "hw_decoder_load": ("augment", "e2e"),
    "batch_size": ("augment", "model", "step", "e2e"),
    "photometry_views": ("photometry",),
}
K = 2  # views per image (SimCLR)
DTYPE_CHOICES = ("fp32", "bf16", "fp16")  # --dtypes, in loaders.config.parse_dtype's names


@dataclass
class Plan:
    size: int = 224                 # view side (data stages, model, step, e2e)
    classes: int = 10               # generated data: classes x per_class JPEGs
    per_class: int = 32
    batch: int = 32                 # images per batch in augment / h2d
    workers: int = 2                # loader workers / threads, same for fastclr and the peers
    stage_images: int = 200         # images read / decoded / cropped in read, decode, geometry
    loader_warmup: int = 2          # batches before timing (worker start, JIT, first decode)
    loader_batches: int = 4         # timed batches
    archs: list[str] = field(default_factory=lambda: ["r18_1x_sk0", "r50_1x_sk0"])
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    model_batch: int = 4            # images per model step (2x views)
    model_warmup: int = 1
    model_iters: int = 2
    compile: bool = False
    # The distillation teacher's forward (eval mode, no grad, channels_last): a released model's layout
    # (TF max-pool padding, classifier on head layer 1, 1000 classes).
    teacher_arch: str = "r50_1x_sk1"
    teacher_batch: int = 4
    teacher_iters: int = 2
    loss_batches: list[int] = field(default_factory=lambda: [256, 1024, 2048])
    loss_dim: int = 128
    loss_chunk: int = 256           # chunked path: columns per chunk
    loss_ratio_batch: int = 1024    # the NT-Xent vs lightly headline batch
    loss_iters: int = 3
    optim_arch: str = "r50_1x_sk0"
    optim_iters: int = 3
    photometry_views: int = 64      # views per finish_views call (the GPU goal is ms per 512 views)
    photometry_iters: int = 3
    step_arch: str = "r18_1x_sk0"
    step_batch: int = 8
    step_iters: int = 2
    # The step's variants (TrainStep eager / torch.compile'd model / one CUDA graph / both) at step_batch,
    # then the fastest one at each of step_batches (images per GPU, 2 views each).
    step_variants: list[str] = field(default_factory=lambda: ["eager"])
    step_batches: list[int] = field(default_factory=list)
    # CPU precision rows: the fastest step variant at each of these dtypes, at the plan's size and at
    # these other view sides (the step stage), and the default backend's e2e at each dtype; empty dtypes =
    # none (GPU runs: dtypes covers it).
    precision_dtypes: list[str] = field(default_factory=list)
    precision_sizes: list[int] = field(default_factory=list)
    e2e_arch: str = "r18_1x_sk0"
    e2e_batch: int = 8
    e2e_warmup: int = 1
    e2e_iters: int = 2
    hw_decoder_load: float = 0.65
    min_time: float = 0.4           # loss / optim: keep timing short calls until this many seconds


def make_plan(device: str, quick: bool) -> Plan:
    cores = cpu_count()
    if device == "cuda":
        # Sized for the GPU suite's time budget (the whole suite <= 8 min on an H100).
        p = Plan(size=224, classes=20, per_class=128, batch=256, workers=min(cores, 8), stage_images=512,
                 loader_warmup=2, loader_batches=6, archs=["r50_1x_sk0", "r18_1x_sk0"], dtypes=["bf16", "fp32"],
                 model_batch=256, model_warmup=2, model_iters=5, compile=True,
                 teacher_arch="r152_3x_sk1", teacher_batch=128, teacher_iters=5,
                 loss_batches=[256, 1024, 4096, 8192], loss_chunk=1024, loss_iters=10,
                 optim_iters=20, photometry_views=512, photometry_iters=20, step_arch="r50_1x_sk0",
                 step_batch=256, step_iters=6, step_variants=["eager", "compiled", "graph", "compiled+graph"],
                 step_batches=[384, 512], e2e_arch="r50_1x_sk0", e2e_batch=256, e2e_warmup=4, e2e_iters=6,
                 min_time=0.2)
        if quick:
            p = replace(p, classes=4, per_class=64, batch=64, stage_images=64, loader_batches=3,
                        archs=["r18_1x_sk0"], dtypes=["bf16"], model_batch=64, model_iters=3, compile=False,
                        teacher_arch="r50_1x_sk0", teacher_batch=64, teacher_iters=2,
                        loss_batches=[256, 1024], loss_iters=3, optim_arch="r18_1x_sk0", optim_iters=3,
                        photometry_views=128, photometry_iters=3, step_arch="r18_1x_sk0", step_batch=64,
                        step_iters=3, step_variants=["eager", "graph"], step_batches=[], e2e_arch="r18_1x_sk0",
                        e2e_batch=64, e2e_warmup=4, e2e_iters=3)
        return p
    # fp32 and bf16 side by side: at the plan's size and at 32 px (8x8 maps after the ImageNet stem),
    # the two sides of run.precision=auto's rule (fastclr.runtime.auto_precision).
    p = Plan(workers=min(cores, 8), precision_dtypes=["fp32", "bf16"], precision_sizes=[32])
    if quick:
        p = replace(p, size=64, classes=4, per_class=8, batch=8, workers=min(cores, 2), stage_images=32,
                    loader_warmup=1, loader_batches=2, archs=["r18_1x_sk0"], model_batch=4, model_iters=1,
                    teacher_arch="r50_1x_sk0", teacher_batch=2, teacher_iters=1,
                    loss_batches=[64, 256], loss_chunk=64, loss_ratio_batch=256, loss_iters=2,
                    optim_arch="r18_1x_sk0", optim_iters=2, photometry_views=8, photometry_iters=1, step_batch=4,
                    step_iters=1, e2e_batch=8, e2e_iters=1, min_time=0.05)
    return p


def parse_args(argv=None, description: str | None = None):
    ap = argparse.ArgumentParser(prog="throughput.py", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Stages: " + ", ".join(STAGES) + ". See benchmarks/README.md.")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (default) or cuda: the GPU configuration (R50, 224 px, bf16, batch 256/GPU)")
    ap.add_argument("--quick", action="store_true", help="smoke configuration (tiny data and models)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list of stages (default: all)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma list of data backends (default: all)")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                    help="measure torchvision/PIL and lightly in the same run (default on)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time torch.compile'd models (default: on for cuda, off for cpu)")
    ap.add_argument("--data", help="ImageFolder to use instead of the generated one")
    ap.add_argument("--beton", help=".beton for the ffcv backend (default: converted from the generated data)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<date>-<device>-<sha>.json; with "
                                  "--quick, the same name in a new temporary folder)")
    ap.add_argument("--sweep", action="append", default=[], metavar="PARAM=V1,V2,...",
                    help="re-run the relevant stages per value; PARAM in " + ", ".join(SWEEPABLE))
    ap.add_argument("--size", type=int, help="view side in pixels")
    ap.add_argument("--batch-size", type=int, help="images per batch in the data stages, step and e2e")
    ap.add_argument("--workers", type=int, help="loader workers / threads (fastclr and peers alike)")
    ap.add_argument("--archs", help="comma list of model names for the model stage, e.g. r18_1x_sk0,r50_1x_sk0")
    ap.add_argument("--dtypes", help="comma list of fp32, bf16, fp16 for the model stage")
    ap.add_argument("--cache", default=os.path.join(ROOT, ".bench_cache"), help="generated data cache")
    ap.add_argument("--no-chart", action="store_true", help="skip the PNG charts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.stages = split(args.stages)
    args.backends = split(args.backends)
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad:
        ap.error(f"unknown backend(s) {bad}; choose from {', '.join(BACKENDS)}")
    sweeps = []
    for s in args.sweep:
        name, _, values = s.partition("=")
        if name not in SWEEPABLE or not values:
            ap.error(f"--sweep {s!r}: expected PARAM=V1,V2 with PARAM in {', '.join(SWEEPABLE)}")
        try:
            cast = float if name == "hw_decoder_load" else int
            sweeps.append((name, [cast(v) for v in split(values)]))
        except ValueError:
            ap.error(f"--sweep {s!r}: values must be numbers")
    args.sweep = sweeps
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device")
    return args


def apply_overrides(plan: Plan, args) -> Plan:
    kw = {}
    if args.size:
        kw["size"] = args.size
    if args.batch_size:
        kw.update(batch=args.batch_size, step_batch=args.batch_size, e2e_batch=args.batch_size,
                  model_batch=args.batch_size)
    if args.workers is not None:
        kw["workers"] = args.workers
    if args.archs:
        kw["archs"] = split(args.archs)
    if args.dtypes:
        kw["dtypes"] = split(args.dtypes)
        bad = [d for d in kw["dtypes"] if d not in DTYPE_CHOICES]
        if bad:
            raise SystemExit(f"throughput.py: error: unknown dtype(s) {bad}; choose from {', '.join(DTYPE_CHOICES)}")
    if args.compile is not None:
        kw["compile"] = args.compile
        variants = [v for v in plan.step_variants if "compiled" not in v]
        if args.compile:
            variants += [v for v in ("compiled", "compiled+graph") if "graph" not in v or "graph" in variants]
        kw["step_variants"] = variants
    return replace(plan, **kw)


def sweep_plan(plan: Plan, param: str, value) -> Plan:
    if param == "num_threads":
        return replace(plan, workers=int(value))
    if param == "hw_decoder_load":
        return replace(plan, hw_decoder_load=float(value))
    if param == "photometry_views":
        return replace(plan, photometry_views=int(value))
    return replace(plan, batch=int(value), step_batch=int(value), e2e_batch=int(value), model_batch=int(value))


def split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
