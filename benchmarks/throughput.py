"""Where does the time go, is training data-bound, and how much faster is fastclr than the usual peers?

    python benchmarks/throughput.py                        # CPU, <= ~3 min on 2 cores
    python benchmarks/throughput.py --quick                # smoke configuration, well under a minute
    python benchmarks/throughput.py --device cuda          # GPU: R50, 224 px, bf16, channels_last, 256/GPU
    python benchmarks/throughput.py --stages augment,loss --backends torch,dali --no-peers
    python benchmarks/throughput.py --sweep num_threads=2,4,8 --sweep batch_size=16,32
    python benchmarks/throughput.py --data /imagenet/train --beton /data/train_256.beton

Stages (images/s; views/s where a stage makes two views per image):
  read      bytes from disk (ImageFolder files) and from the .beton, page cache warm
  decode    JPEG -> RGB uint8 (PIL, OpenCV, torchvision; + nvJPEG on GPU), one thread
  geometry  decode + 2 random crops resized (fastclr augment.geometry vs torchvision/PIL), one thread
  augment   the full two-view SimCLR recipe through each data backend and the peers' DataLoaders,
            same worker count, views on the target device
  h2d       host -> device copy of a batch of crops (GPU only)
  model     backbone + head fwd+bwd on synthetic channels-last inputs, per architecture / dtype,
            eager and torch.compile
  loss      NT-Xent fwd+bwd, dense and chunked, with peak memory, vs lightly's NTXentLoss
  optim     fused LARS step vs lightly's LARS and a per-parameter loop with .item() (R50 params)
  step      full training step on synthetic data: fwd + loss + bwd + LARS
  e2e       full training step on real data through each backend, with the data-wait fraction

Headline ratios are measured side by side in the same run (never against numbers from elsewhere).
Results: an aligned table on stdout, a JSON file (benchmarks/results/<date>-<device>-<sha>.json or
--out) with every number, the machine and the versions, and a PNG bar chart per stage next to it.
See benchmarks/README.md for how to read them.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/throughput.py` puts benchmarks/ first, not the repo root
    sys.path.insert(0, ROOT)

import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata as md
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

import loaders
from loaders import augment, synthetic
from loaders.common import LoaderConfig, list_image_folder
from loaders.spec import simclr

STAGES = ("read", "decode", "geometry", "augment", "h2d", "model", "loss", "optim", "step", "e2e")
BACKENDS = ("torch", "dali", "ffcv")
SWEEPABLE = {  # parameter -> stages it affects
    "num_threads": ("augment", "e2e"),
    "hw_decoder_load": ("augment", "e2e"),
    "batch_size": ("augment", "model", "step", "e2e"),
}
DATA_VERSION = 1  # bump when the generated benchmark data changes: part of the cache key
K = 2  # views per image (SimCLR)


# ------------------------------------------------------------------------------------------------
# Configuration: one plan per (device, quick); command-line flags override single fields
# ------------------------------------------------------------------------------------------------

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
    loss_batches: list[int] = field(default_factory=lambda: [256, 1024, 2048])
    loss_dim: int = 128
    loss_chunk: int = 256           # chunked path: columns per chunk
    loss_ratio_batch: int = 1024    # the NT-Xent vs lightly headline batch
    loss_iters: int = 3
    optim_arch: str = "r50_1x_sk0"
    optim_iters: int = 3
    step_arch: str = "r18_1x_sk0"
    step_batch: int = 8
    step_iters: int = 2
    e2e_arch: str = "r18_1x_sk0"
    e2e_batch: int = 8
    e2e_warmup: int = 1
    e2e_iters: int = 2
    hw_decoder_load: float = 0.65
    min_time: float = 0.4           # loss / optim: keep timing short calls until this many seconds


def make_plan(device: str, quick: bool) -> Plan:
    cores = _cpu_count()
    if device == "cuda":
        # Sized for the GPU suite's time budget (the whole suite <= 8 min on an H100).
        p = Plan(size=224, classes=20, per_class=128, batch=256, workers=min(cores, 8), stage_images=512,
                 loader_warmup=2, loader_batches=6, archs=["r50_1x_sk0", "r18_1x_sk0"], dtypes=["bf16", "fp32"],
                 model_batch=256, model_warmup=2, model_iters=5, compile=True,
                 loss_batches=[256, 1024, 4096, 8192], loss_chunk=1024, loss_iters=10,
                 optim_iters=20, step_arch="r50_1x_sk0", step_batch=256, step_iters=6,
                 e2e_arch="r50_1x_sk0", e2e_batch=256, e2e_warmup=2, e2e_iters=6, min_time=0.2)
        if quick:
            p = replace(p, classes=4, per_class=64, batch=64, stage_images=64, loader_batches=3,
                        archs=["r18_1x_sk0"], dtypes=["bf16"], model_batch=64, model_iters=3, compile=False,
                        loss_batches=[256, 1024], loss_iters=3, optim_arch="r18_1x_sk0", optim_iters=3,
                        step_arch="r18_1x_sk0", step_batch=64, step_iters=3, e2e_arch="r18_1x_sk0",
                        e2e_batch=64, e2e_warmup=1, e2e_iters=3)
        return p
    p = Plan(workers=min(cores, 8))
    if quick:
        p = replace(p, size=64, classes=4, per_class=8, batch=8, workers=min(cores, 2), stage_images=32,
                    loader_warmup=1, loader_batches=2, archs=["r18_1x_sk0"], model_batch=4, model_iters=1,
                    loss_batches=[64, 256], loss_chunk=64, loss_ratio_batch=256, loss_iters=2,
                    optim_arch="r18_1x_sk0", optim_iters=2, step_batch=4, step_iters=1, e2e_batch=8,
                    e2e_iters=1, min_time=0.05)
    return p


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="throughput.py", description=__doc__.split("\n\n")[0],
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
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<date>-<device>-<sha>.json)")
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
    args.stages = _split(args.stages)
    args.backends = _split(args.backends)
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
            sweeps.append((name, [cast(v) for v in _split(values)]))
        except ValueError:
            ap.error(f"--sweep {s!r}: values must be numbers")
    args.sweep = sweeps
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device")
    return args


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAME = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ------------------------------------------------------------------------------------------------
# Timing and memory helpers
# ------------------------------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device, warmup: int, iters: int, min_time: float = 0.0) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls; each call is timed on its own with the
    device synchronized (so asynchronous GPU work is counted). Runs at least ``iters`` calls and, for
    short calls, keeps going until ``min_time`` seconds are measured (at most 20x ``iters`` calls):
    the median of several calls resists the noise of a shared machine."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < iters or (sum(times) < min_time and len(times) < 20 * max(iters, 1)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device) -> tuple[int | None, str]:
    """(peak bytes allocated while ``fn`` runs, above what was live before, method).

    CUDA: torch.cuda.max_memory_allocated. CPU: torch has no public CPU allocator statistics and
    tracemalloc does not see torch's allocations, so the peak comes from torch.profiler's memory
    events: each op's allocations minus its frees, accumulated in time order (a temporary that an op
    allocates and frees internally is not seen, so this is a slight underestimate)."""
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile
    with _quiet_fds(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return int(peak), "torch.profiler profile_memory (CPU)"


@contextlib.contextmanager
def _quiet_fds():
    """Silence the profiler's native log lines (written straight to fd 1/2)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved + [null]:
            os.close(f)


def autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def row(name: str, **kw) -> dict:
    r = {"name": name}
    r.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in kw.items()})
    return r


def skipped_row(name: str, reason: str, **kw) -> dict:
    return row(name, status="skipped", reason=reason, **kw)


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


# ------------------------------------------------------------------------------------------------
# Data: a generated ImageNet-like folder and its .beton, cached on the generator's parameters
# ------------------------------------------------------------------------------------------------

def _make_class(job):
    """One class folder of generated JPEGs (a process-pool job): seeded per class, so the data set
    does not depend on the number of processes."""
    root, c, per_class, seed, quality = job
    tmp = os.path.join(root, f".tmp{c}")
    synthetic.make_image_folder(tmp, num_classes=1, per_class=per_class, seed=seed * 100003 + c, quality=quality)
    dst = os.path.join(root, f"n{c:08d}")
    os.rename(os.path.join(tmp, "n00000000"), dst)
    for f in os.listdir(dst):  # file names carry the class like ImageNet's synsets
        os.rename(os.path.join(dst, f), os.path.join(dst, f.replace("n00000000", f"n{c:08d}")))
    os.rmdir(tmp)


def generated_folder(cache: str, plan: Plan, seed: int) -> str:
    """cache/<key>/images: plan.classes x plan.per_class ImageNet-like JPEGs (quality 90). Made once
    (in a temporary folder, then renamed: concurrent runs never see half a data set)."""
    params = dict(v=DATA_VERSION, classes=plan.classes, per_class=plan.per_class, seed=seed, quality=90,
                  sizes="imagenet_like_size")
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = os.path.join(cache, f"imagenet_like-c{plan.classes}-p{plan.per_class}-s{seed}-{key}")
    images = os.path.join(root, "images")
    if os.path.isdir(images):
        return images
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".images-", dir=root)
    jobs = [(tmp, c, plan.per_class, seed, 90) for c in range(plan.classes)]
    t0 = time.perf_counter()
    workers = min(_cpu_count(), plan.classes)
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_make_class, jobs))
    else:
        for j in jobs:
            _make_class(j)
    with open(os.path.join(tmp, "..", "params.json"), "w") as f:
        json.dump(params, f)
    try:
        os.rename(tmp, images)
    except OSError:  # another run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"generated {plan.classes * plan.per_class} images in {time.perf_counter() - t0:.1f} s -> {images}")
    return images


def generated_beton(folder: str) -> str:
    """folder/../data.beton, written once with loaders.write_ffcv.convert at full resolution (so the
    ffcv backend decodes the same pixels as the others)."""
    out = os.path.join(os.path.dirname(folder), "data.beton")
    if os.path.isfile(out):
        return out
    from loaders import write_ffcv
    t0 = time.perf_counter()
    with _quiet_stdout():
        write_ffcv.convert(folder, out, max_resolution=0, jpeg_quality=90, progress=False,
                           workers=min(_cpu_count(), 8))
    log(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return out


@contextlib.contextmanager
def _quiet_stdout():
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


class Data:
    """Where the images are: ``folder`` (ImageFolder) and ``beton``, each with a reason when absent."""

    def __init__(self, args, plan: Plan):
        self.folder = self.beton = None
        self.folder_why = self.beton_why = ""
        self.generated = not args.data and not args.beton
        if args.data:
            self.folder = args.data
        elif not args.beton:
            self.folder = generated_folder(args.cache, plan, args.seed)
        else:
            self.folder_why = "no ImageFolder: --beton given without --data"
        if args.beton:
            self.beton = args.beton
        elif args.data:
            self.beton_why = ("no .beton for --data: give --beton FILE "
                              "(python -m loaders.write_ffcv DIR FILE.beton)")
        self.samples = list_image_folder(self.folder)[0] if self.folder else []

    def ensure_beton(self) -> str | None:
        if self.beton is None and self.generated and not self.beton_why:
            try:
                self.beton = generated_beton(self.folder)
            except Exception as e:
                self.beton_why = f"writing the .beton failed: {_err(e)}"
        return self.beton

    def subset(self, n: int) -> list[str]:
        """``n`` image paths spread evenly over the (class-sorted) listing."""
        if not self.samples:
            return []
        idx = np.linspace(0, len(self.samples) - 1, min(n, len(self.samples))).round().astype(int)
        return [self.samples[i][0] for i in idx]


# ------------------------------------------------------------------------------------------------
# Peers: torchvision/PIL (the usual SimCLR DataLoader) and lightly's SimCLRTransform
# ------------------------------------------------------------------------------------------------

def torchvision_simclr_transform(size: int):
    """The SimCLR recipe as users write it with torchvision on PIL images (one view)."""
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode
    kernel = simclr(size=size).blur.kernel_size(size)  # 23 at 224 px
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        T.ToTensor(),
    ])


class TwoViewFolder(torch.utils.data.Dataset):
    """PIL ImageFolder yielding (view1, view2, label): ``transform`` makes one view (torchvision
    recipe), ``multi`` makes the list of views (lightly's SimCLRTransform)."""

    def __init__(self, samples, transform=None, multi=None):
        self.samples, self.transform, self.multi = samples, transform, multi

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        views = self.multi(img) if self.multi is not None else [self.transform(img), self.transform(img)]
        return views[0], views[1], label


def peer_loader(kind: str, samples, plan: Plan, device):
    if kind == "torchvision":
        ds = TwoViewFolder(samples, transform=torchvision_simclr_transform(plan.size))
    else:
        from lightly.transforms import SimCLRTransform
        # The same recipe: blur on (p 0.5, sigma 0.1-2), no mean/std normalization (fastclr's default).
        ds = TwoViewFolder(samples, multi=SimCLRTransform(input_size=plan.size, gaussian_blur=0.5, normalize=None))
    return torch.utils.data.DataLoader(ds, batch_size=plan.batch, shuffle=True, drop_last=True,
                                       num_workers=plan.workers, persistent_workers=plan.workers > 0,
                                       pin_memory=torch.device(device).type == "cuda")


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
    return dict(images_per_s=n / dt, views_per_s=K * n / dt, seconds=dt, images=n, warmup_s=t1 - t0,
                out_shape=list(views[0].shape), out_dtype=str(views[0].dtype).replace("torch.", ""))


# ------------------------------------------------------------------------------------------------
# fastclr loaders
# ------------------------------------------------------------------------------------------------

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
                # The colour ops are the GPU's largest data cost (README): each op on its own samples
                # (host syncs) against the default masked whole-batch ops (4x the arithmetic, no sync).
                out.append(("fastclr torch (colour ops on exact subsets)", b, {"photometry_mode": "subset"}))
        if b == "dali" and torch.device(device).type == "cuda" and getattr(args, "variants", True):
            # Issue 6's two choices, against the default row above in the same run: the TF-exact
            # augment.py colour ops instead of DALI's, and ROI decode per view instead of decode once.
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
        return None, f"failed to build: {_err(e)}"


def close_loader(loader) -> None:
    close = getattr(loader, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()


# ------------------------------------------------------------------------------------------------
# Stages. Each returns {"status", "rows", ["reason"], ["notes"]}; a row may itself be skipped.
# ------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, plan: Plan, data: Data):
        self.args, self.plan, self.data = args, plan, data
        self.device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self._bytes = None

    # -- helpers ----------------------------------------------------------------------------------
    def encoded(self) -> list[bytes]:
        if self._bytes is None:
            self._bytes = []
            for p in self.data.subset(self.plan.stage_images):
                with open(p, "rb") as f:
                    self._bytes.append(f.read())
        return self._bytes

    def need_folder(self):
        return None if self.data.folder else self.data.folder_why

    # -- read -------------------------------------------------------------------------------------
    def stage_read(self):
        rows = []
        paths = self.data.subset(self.plan.stage_images)
        if paths:
            for p in paths:  # warm the page cache: this stage measures the read path, not the disk
                with open(p, "rb") as f:
                    f.read()
            t0 = time.perf_counter()
            nbytes = 0
            for p in paths:
                with open(p, "rb") as f:
                    nbytes += len(f.read())
            dt = time.perf_counter() - t0
            rows.append(row("ImageFolder files (open+read)", impl="python", images_per_s=len(paths) / dt,
                            mb_per_s=nbytes / dt / 1e6, images=len(paths), mean_kb=nbytes / len(paths) / 1e3))
        else:
            rows.append(skipped_row("ImageFolder files (open+read)", self.data.folder_why))
        if "ffcv" in self.args.backends:
            beton = self.data.ensure_beton()
            if beton is None:
                rows.append(skipped_row(".beton (sequential read)", self.data.beton_why))
            else:
                n = _beton_images(beton)
                size = os.path.getsize(beton)
                _read_all(beton)
                t0 = time.perf_counter()
                _read_all(beton)
                dt = time.perf_counter() - t0
                rows.append(row(".beton (sequential read)", impl="python", images_per_s=n / dt,
                                mb_per_s=size / dt / 1e6, images=n, mean_kb=size / max(n, 1) / 1e3))
        return ok_stage(rows, notes="page cache warm: measures the read path, not the disk")

    # -- decode -----------------------------------------------------------------------------------
    def stage_decode(self):
        if self.need_folder():
            return skip_stage(self.need_folder())
        enc = self.encoded()
        n = len(enc)
        rows = []

        def pil():
            import io

            from PIL import Image
            for b in enc:
                with Image.open(io.BytesIO(b)) as im:
                    np.asarray(im.convert("RGB"))

        def cv():
            import cv2
            for b in enc:
                cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

        from torchvision.io import ImageReadMode, decode_jpeg
        datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in enc]

        def tv():
            for d in datas:
                decode_jpeg(d, mode=ImageReadMode.RGB)

        impls = [("PIL", pil), ("OpenCV imdecode", cv), ("torchvision decode_jpeg (CPU)", tv)]
        with _torch_threads(1):
            for name, fn in impls:
                try:
                    dt = timed(fn, "cpu", 1, 1)
                    rows.append(row(name, impl=name.split()[0], images_per_s=n / dt, images=n, threads=1))
                except Exception as e:
                    rows.append(skipped_row(name, _err(e)))
        if self.cuda:
            chunk = 64

            def nv():
                for i in range(0, n, chunk):
                    decode_jpeg(datas[i:i + chunk], mode=ImageReadMode.RGB, device=self.device)
            try:
                dt = timed(nv, self.device, 1, 3)
                rows.append(row("torchvision decode_jpeg (nvJPEG, batched)", impl="nvjpeg", images_per_s=n / dt,
                                images=n, batch=chunk))
            except Exception as e:
                rows.append(skipped_row("torchvision decode_jpeg (nvJPEG, batched)", _err(e)))
        return ok_stage(rows, notes="one CPU thread, images already in memory")

    # -- geometry ---------------------------------------------------------------------------------
    def stage_geometry(self):
        if self.need_folder():
            return skip_stage(self.need_folder())
        enc = self.encoded()
        n = len(enc)
        spec = simclr(size=self.plan.size)
        rows = []

        def ours():
            import cv2
            rng = np.random.default_rng(0)
            for b in enc:
                img = cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                augment.geometry(img, spec, rng)

        def tv():
            import io

            import torchvision.transforms as T
            from PIL import Image
            from torchvision.transforms import InterpolationMode
            crop = T.Compose([T.RandomResizedCrop(self.plan.size, scale=(0.08, 1.0),
                                                  interpolation=InterpolationMode.BICUBIC),
                              T.RandomHorizontalFlip()])
            for b in enc:
                with Image.open(io.BytesIO(b)) as im:
                    img = im.convert("RGB")
                crop(img), crop(img)

        with _torch_threads(1):
            for name, impl, fn in [("fastclr (OpenCV decode + augment.geometry)", "fastclr", ours),
                                   ("torchvision/PIL (RandomResizedCrop x2 + flip)", "torchvision", tv)]:
                if impl == "torchvision" and not self.args.peers:
                    continue
                try:
                    dt = timed(fn, "cpu", 0, 1)
                    rows.append(row(name, impl=impl, images_per_s=n / dt, views_per_s=K * n / dt, images=n,
                                    threads=1))
                except Exception as e:
                    rows.append(skipped_row(name, _err(e)))
        return ok_stage(rows, notes="decode + 2 crops resized to the view size, one thread")

    # -- augment ----------------------------------------------------------------------------------
    def stage_augment(self):
        p = self.plan
        dtype = "bfloat16" if self.cuda else "float32"
        jobs = [(name, lambda b=backend, x=extra: self._fastclr_augment(b, x, dtype), backend != "torch")
                for name, backend, extra in loader_variants(self.args, self.device)]
        if self.args.peers:
            jobs += [(name, lambda k=kind, n=name: self._peer_augment(k, n), False)
                     for kind, name in (("torchvision", "torchvision/PIL DataLoader"),
                                        ("lightly", "lightly SimCLRTransform"))]
        # Loaders that fork workers (torch backend, peers) run before DALI/FFCV start their thread
        # pools in this process (forking after those is unsafe); rows keep the table's order.
        results = {}
        for name, job, late in sorted(jobs, key=lambda j: j[2]):
            results[name] = job()
        return ok_stage([results[name] for name, _, _ in jobs],
                        notes=f"two views per image, {p.workers} workers each, views on {self.device}")

    def _fastclr_augment(self, backend: str, extra: dict, dtype: str) -> dict:
        p = self.plan
        name = next(n for n, b, x in loader_variants(self.args, self.device) if b == backend and x == extra)
        loader, why = build_fastclr_loader(backend, self.data, p, self.device, p.batch, dtype, extra)
        if loader is None:
            return skipped_row(name, why, backend=backend)
        try:
            r = time_loader(loader, self.device, p.loader_warmup, p.loader_batches, p.batch)
            jit = getattr(loader, "jit_seconds", None)
            return row(name, backend=backend, impl="fastclr", workers=p.workers, batch=p.batch,
                       **r, **({"jit_seconds": jit} if jit is not None else {}))
        except Exception as e:
            return skipped_row(name, f"failed: {_err(e)}", backend=backend)
        finally:
            close_loader(loader)
            del loader

    def _peer_augment(self, kind: str, name: str) -> dict:
        p = self.plan
        if self.need_folder():
            return skipped_row(name, self.need_folder(), impl=kind)
        if kind == "lightly" and not _importable("lightly"):
            return skipped_row(name, "lightly not installed (pip install 'fastclr[peers]')", impl=kind)
        try:
            dl = peer_loader(kind, self.data.samples, p, self.device)
            return row(name, impl=kind, workers=p.workers, batch=p.batch,
                       **time_loader(dl, self.device, p.loader_warmup, p.loader_batches, p.batch))
        except Exception as e:
            return skipped_row(name, f"failed: {_err(e)}", impl=kind)

    # -- h2d --------------------------------------------------------------------------------------
    def stage_h2d(self):
        if not self.cuda:
            return skip_stage("no GPU: host-to-device copies exist only with --device cuda")
        B, S = self.plan.batch, self.plan.size
        rows = []
        crops = torch.randint(0, 255, (B, K, S, S, 3), dtype=torch.uint8)
        for name, src in (("uint8 crops, pinned", crops.pin_memory()), ("uint8 crops, pageable", crops),
                          ("float32 views, pinned", torch.rand(K * B, 3, S, S).pin_memory())):
            dt = timed(lambda src=src: src.to(self.device, non_blocking=True), self.device, 3, 20)
            rows.append(row(name, images_per_s=B / dt, views_per_s=K * B / dt,
                            gb_per_s=src.numel() * src.element_size() / dt / 1e9, batch=B))
        return ok_stage(rows, notes="one batch of two views; uint8 is what fastclr ships, float32 what peers ship")

    # -- model ------------------------------------------------------------------------------------
    def stage_model(self):
        from fastclr.models import build_model, parse_model_name
        p = self.plan
        rows = []
        B = p.model_batch
        for arch in p.archs:
            for dname in p.dtypes:
                dtype = DTYPES[dname]
                for compiled in (False, True):
                    name = f"{arch} {dname}" + (" compiled" if compiled else "")
                    if compiled and (dname != p.dtypes[0] or (p.compile and arch != p.archs[0])):
                        continue  # compile one model (first arch, training dtype): compile time is the cost
                    if compiled and not p.compile:
                        why = ("--no-compile given" if self.cuda else
                               "torch.compile off by default on CPU (compile time dominates a short run); pass --compile")
                        rows.append(skipped_row(name, why, arch=arch, dtype=dname))
                        continue
                    if dtype == torch.float16 and not self.cuda:
                        rows.append(skipped_row(name, "fp16 needs a GPU", arch=arch, dtype=dname))
                        continue
                    try:
                        r = self._time_model(build_model, parse_model_name(arch), B, dtype, compiled)
                        rows.append(row(name, impl="fastclr", arch=arch, dtype=dname, compiled=compiled, batch=B,
                                        size=p.size, **r))
                    except Exception as e:
                        rows.append(skipped_row(name, f"failed: {_err(e)}", arch=arch, dtype=dname))
                    finally:
                        _free(self.device)
        return ok_stage(rows, notes=f"fwd+bwd of backbone+head on {K}x{B} views of {p.size} px, channels_last")

    def _time_model(self, build_model, kw, B, dtype, compiled):
        p = self.plan
        torch.manual_seed(0)
        model = build_model(**kw).to(self.device).to(memory_format=torch.channels_last).train()
        x = torch.rand(K * B, 3, p.size, p.size, device=self.device).contiguous(memory_format=torch.channels_last)
        fwd = torch.compile(model) if compiled else model

        def run():
            with autocast(self.device, dtype):
                _, z = fwd(x)
            z.float().square().mean().backward()
            for q in model.parameters():
                q.grad = None

        t0 = time.perf_counter()
        run()  # first call: compile / cudnn autotune
        sync(self.device)
        first = time.perf_counter() - t0
        dt = timed(run, self.device, max(p.model_warmup - 1, 0), p.model_iters)
        out = dict(images_per_s=B / dt, views_per_s=K * B / dt, seconds_per_step=dt)
        if compiled:
            out["compile_seconds"] = first
        return out

    # -- loss -------------------------------------------------------------------------------------
    def stage_loss(self):
        from fastclr.losses import nt_xent
        p = self.plan
        rows = []
        lightly_loss = None
        if self.args.peers:
            if _importable("lightly"):
                from lightly.loss import NTXentLoss
                lightly_loss = NTXentLoss(temperature=0.1, gather_distributed=False)
            else:
                rows.append(skipped_row("lightly NTXentLoss", "lightly not installed (pip install 'fastclr[peers]')",
                                        impl="lightly"))
        impls = [("fastclr nt_xent dense", "fastclr-dense", lambda a, b: nt_xent(a, b, 0.1, chunk_size=0)),
                 (f"fastclr nt_xent chunked ({p.loss_chunk})", "fastclr-chunked",
                  lambda a, b: nt_xent(a, b, 0.1, chunk_size=p.loss_chunk))]
        if lightly_loss is not None:
            impls.append(("lightly NTXentLoss", "lightly", lightly_loss))
        for B in p.loss_batches:
            g = torch.Generator(device="cpu").manual_seed(B)
            z1 = torch.randn(B, p.loss_dim, generator=g).to(self.device).requires_grad_()
            z2 = torch.randn(B, p.loss_dim, generator=g).to(self.device).requires_grad_()
            for name, impl, fn in impls:
                def run(fn=fn, z1=z1, z2=z2):
                    fn(z1, z2).backward()
                    z1.grad = z2.grad = None
                try:
                    iters = p.loss_iters if B < 2048 or self.cuda else max(1, p.loss_iters // 2)
                    dt = timed(run, self.device, 1, iters, min_time=p.min_time)
                    mem, how = peak_memory(run, self.device)
                    rows.append(row(f"{name} B={B}", impl=impl, batch=B, dim=p.loss_dim, seconds=dt,
                                    images_per_s=B / dt, peak_mem_bytes=mem, peak_mem_mib=mem / 2**20,
                                    peak_mem_per_image=mem / B, mem_method=how))
                except Exception as e:
                    rows.append(skipped_row(f"{name} B={B}", f"failed: {_err(e)}", impl=impl, batch=B))
            z1 = z2 = None  # free this B's tensors before the next
            _free(self.device)
        return ok_stage(rows, notes=f"fwd+bwd on [B, {p.loss_dim}] embeddings, temperature 0.1; peak memory above "
                                    "the inputs")

    # -- optim ------------------------------------------------------------------------------------
    def stage_optim(self):
        from fastclr.lars import LARS
        from fastclr.models import build_model, parse_model_name
        p = self.plan
        torch.manual_seed(0)
        model = build_model(**parse_model_name(p.optim_arch)).to(self.device)
        params = list(model.parameters())
        for q in params:
            q.grad = torch.randn_like(q) * 1e-3
        numel = sum(q.numel() for q in params)
        lr, mom, wd, eta = 0.1, 0.9, 1e-6, 1e-3
        impls = [("fastclr LARS (fused, no sync)", "fastclr",
                  lambda: LARS(params, lr=lr, momentum=mom, weight_decay=wd, eta=eta, mode="tf")),
                 ("per-parameter loop with .item()", "loop", lambda: NaiveLARS(params, lr, mom, wd, eta)),
                 ("torch SGD foreach (no trust ratio; floor)", "sgd-foreach",
                  lambda: torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd, foreach=True))]
        if self.args.peers:
            if _importable("lightly"):
                from lightly.utils.lars import LARS as LightlyLARS
                impls.insert(2, ("lightly LARS", "lightly",
                                 lambda: LightlyLARS(params, lr=lr, momentum=mom, weight_decay=wd,
                                                     trust_coefficient=eta)))
            else:
                impls.insert(2, ("lightly LARS", "lightly", None))
        rows = []
        for name, impl, make in impls:
            if make is None:
                rows.append(skipped_row(name, "lightly not installed (pip install 'fastclr[peers]')", impl=impl))
                continue
            try:
                opt = make()
                dt = timed(opt.step, self.device, 1, p.optim_iters, min_time=p.min_time)
                rows.append(row(name, impl=impl, arch=p.optim_arch, params=numel, tensors=len(params),
                                seconds_per_step=dt, steps_per_s=1 / dt, ms_per_step=dt * 1e3))
                del opt
            except Exception as e:
                rows.append(skipped_row(name, f"failed: {_err(e)}", impl=impl))
        return ok_stage(rows, notes=f"one optimizer step over {p.optim_arch}'s {len(params)} parameter tensors "
                                    f"({numel / 1e6:.1f} M values)")

    # -- step -------------------------------------------------------------------------------------
    def stage_step(self):
        p = self.plan
        B = p.step_batch
        dname = p.dtypes[0]
        step, _ = make_train_step(p.step_arch, self.device, DTYPES[dname])
        views = [torch.rand(B, 3, p.size, p.size, device=self.device).contiguous(memory_format=torch.channels_last)
                 for _ in range(K)]
        dt = timed(lambda: step(views), self.device, 1, p.step_iters)
        step = views = None
        _free(self.device)
        return ok_stage([row(f"{p.step_arch} {dname} B={B}", impl="fastclr", arch=p.step_arch, dtype=dname, batch=B,
                             size=p.size, images_per_s=B / dt, views_per_s=K * B / dt, seconds_per_step=dt)],
                        notes="fwd + NT-Xent + bwd + LARS on synthetic views (no data loading): the ceiling for e2e")

    # -- e2e --------------------------------------------------------------------------------------
    def stage_e2e(self):
        p = self.plan
        B = p.e2e_batch
        dname = p.dtypes[0]
        rows = []
        step, _ = make_train_step(p.e2e_arch, self.device, DTYPES[dname])
        for name, backend, extra in loader_variants(self.args, self.device):
            loader, why = build_fastclr_loader(backend, self.data, p, self.device, B, DTYPE_NAME[dname], extra)
            if loader is None:
                rows.append(skipped_row(name, why, backend=backend))
                continue
            it = batches(loader, self.device)
            try:
                for _ in range(p.e2e_warmup):
                    step(next(it))
                sync(self.device)
                wait = 0.0
                t0 = time.perf_counter()
                for _ in range(p.e2e_iters):
                    tw = time.perf_counter()
                    views = next(it)  # time blocked here = data wait (as pretrain.py logs it)
                    wait += time.perf_counter() - tw
                    step(views)
                sync(self.device)
                dt = time.perf_counter() - t0
                rows.append(row(name, backend=backend, impl="fastclr", arch=p.e2e_arch, dtype=dname, batch=B,
                                workers=p.workers, images_per_s=p.e2e_iters * B / dt,
                                views_per_s=K * p.e2e_iters * B / dt, seconds_per_step=dt / p.e2e_iters,
                                data_wait=min(wait / dt, 1.0)))
            except Exception as e:
                rows.append(skipped_row(name, f"failed: {_err(e)}", backend=backend))
            finally:
                it.close()
                close_loader(loader)
                del loader
        del step
        _free(self.device)
        return ok_stage(rows, notes="data_wait = share of the step time spent blocked on the loader")


class NaiveLARS:
    """LARS as peers write it: a readable Python loop over parameters with a ``.item()`` per norm
    (each one a host sync on the GPU). TF semantics, like fastclr's mode="tf"; the reference the
    fused step is measured against."""

    def __init__(self, params, lr, momentum, weight_decay, eta):
        self.params, self.lr, self.m, self.wd, self.eta = list(params), lr, momentum, weight_decay, eta
        self.bufs = [torch.zeros_like(q) for q in self.params]

    @torch.no_grad()
    def step(self):
        for q, buf in zip(self.params, self.bufs):
            g = q.grad
            trust = 1.0
            if q.ndim > 1:  # BN and bias excluded from decay and adaptation
                g = g.add(q, alpha=self.wd)
                w_norm = q.norm().item()
                g_norm = g.norm().item()
                if w_norm > 0 and g_norm > 0:
                    trust = self.eta * w_norm / g_norm
            buf.mul_(self.m).add_(g, alpha=self.lr * trust)
            q.sub_(buf)


def make_train_step(arch: str, device, dtype):
    """fwd + NT-Xent + bwd + LARS, as fastclr/pretrain.py's loop body does it (single process)."""
    from fastclr.lars import LARS
    from fastclr.losses import nt_xent
    from fastclr.models import build_model, parse_model_name
    torch.manual_seed(0)
    model = build_model(**parse_model_name(arch)).to(device).to(memory_format=torch.channels_last).train()
    opt = LARS(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-6, eta=1e-3, mode="tf")

    def step(views):
        with autocast(device, dtype):
            _, z = model(views)
        z1, z2 = z.float().chunk(2)
        nt_xent(z1, z2, 0.1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def ok_stage(rows, notes=None) -> dict:
    out = {"status": "ok", "rows": rows}
    if notes:
        out["notes"] = notes
    return out


def skip_stage(reason: str) -> dict:
    return {"status": "skipped", "reason": reason, "rows": []}


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _free(device) -> None:
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _read_all(path: str, chunk: int = 8 << 20) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(chunk)
            if not b:
                return n
            n += len(b)


def _beton_images(path: str) -> int:
    """Images in a .beton: from the manifest write_ffcv puts beside it, else from FFCV's header."""
    manifest = path[:-len(".beton")] + ".manifest.json" if path.endswith(".beton") else None
    if manifest and os.path.isfile(manifest):
        with open(manifest) as f:
            return int(json.load(f)["num_images"])
    from loaders.ffcv_loader import num_samples  # imports ffcv (numba): seconds
    return num_samples(path)


# ------------------------------------------------------------------------------------------------
# Ratios: the headline claims, each measured side by side in this run
# ------------------------------------------------------------------------------------------------

def _ok_rows(stages, stage, **match):
    rows = stages.get(stage, {}).get("rows", [])
    return [r for r in rows if r.get("status", "ok") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _ratio(value, target, baseline, ours, direction=">=", reason=None, **extra):
    met = value is not None and (value >= target if direction == ">=" else value <= target)
    out = {"value": None if value is None else round(value, 3), "target": target, "direction": direction,
           "met": bool(met), "baseline": baseline, "ours": ours}
    if value is None:
        out["reason"] = reason or "not measured"
    out.update(extra)
    return out


def compute_ratios(stages: dict, plan: Plan, device_type: str = "cpu") -> dict:
    ratios = {}
    # Augment: fastclr's torch backend reads the same JPEG files as the peers (fairest); another backend
    # stands in only when the torch one did not run.
    aug = [r for r in _ok_rows(stages, "augment", impl="fastclr")]
    ours = next((r for r in aug if r.get("backend") == "torch"), None) or max(aug, key=lambda r: r["images_per_s"],
                                                                               default=None)
    for key, impl, target in (("augment_vs_torchvision", "torchvision", 6.0), ("augment_vs_lightly", "lightly", 3.0)):
        base = next(iter(_ok_rows(stages, "augment", impl=impl)), None)
        if ours and base:
            ratios[key] = _ratio(ours["images_per_s"] / base["images_per_s"], target,
                                 {"name": base["name"], "images_per_s": base["images_per_s"]},
                                 {"name": ours["name"], "images_per_s": ours["images_per_s"]}, unit="x images/s")
        else:
            why = "augment stage not run" if "augment" not in stages else \
                f"missing row: {'fastclr' if not ours else impl}"
            ratios[key] = _ratio(None, target, impl, "fastclr", reason=why)
    # LARS: fused step vs the per-parameter loop, same parameters.
    fused = next(iter(_ok_rows(stages, "optim", impl="fastclr")), None)
    loop = next(iter(_ok_rows(stages, "optim", impl="loop")), None)
    if fused and loop:
        ratios["lars_fused_vs_loop"] = _ratio(loop["seconds_per_step"] / fused["seconds_per_step"], 5.0,
                                              {"name": loop["name"], "ms_per_step": loop["ms_per_step"]},
                                              {"name": fused["name"], "ms_per_step": fused["ms_per_step"]},
                                              unit="x steps/s", arch=fused.get("arch"))
    else:
        ratios["lars_fused_vs_loop"] = _ratio(None, 5.0, "loop", "fastclr", reason="optim stage not run or failed")
    lt = next(iter(_ok_rows(stages, "optim", impl="lightly")), None)
    if fused and lt:
        ratios["lars_fused_vs_lightly"] = _ratio(lt["seconds_per_step"] / fused["seconds_per_step"], 1.0,
                                                 {"name": lt["name"], "ms_per_step": lt["ms_per_step"]},
                                                 {"name": fused["name"], "ms_per_step": fused["ms_per_step"]},
                                                 unit="x steps/s", arch=fused.get("arch"))
    # NT-Xent fwd+bwd vs lightly at the headline batch (or the largest measured one below it).
    Bs = [b for b in plan.loss_batches if b <= plan.loss_ratio_batch] or plan.loss_batches
    B = max(Bs)
    dense = next(iter(_ok_rows(stages, "loss", impl="fastclr-dense", batch=B)), None)
    light = next(iter(_ok_rows(stages, "loss", impl="lightly", batch=B)), None)
    if dense and light:
        ratios["ntxent_vs_lightly"] = _ratio(light["seconds"] / dense["seconds"], 2.0,
                                             {"name": light["name"], "seconds": light["seconds"]},
                                             {"name": dense["name"], "seconds": dense["seconds"]},
                                             unit="x fwd+bwd speed", batch=B)
    else:
        ratios["ntxent_vs_lightly"] = _ratio(None, 2.0, "lightly", "fastclr-dense", batch=B,
                                             reason="loss stage not run, or lightly missing")
    # Chunked loss: memory per image must not grow with B (total memory linear, not quadratic).
    ch = sorted(_ok_rows(stages, "loss", impl="fastclr-chunked"), key=lambda r: r["batch"])
    # Compare only batches where chunking is active (B >= the chunk): below it one chunk holds the whole
    # similarity matrix, and the per-image cost is that of the dense loss (the GPU plan's B=256 < 1024).
    dn = sorted(_ok_rows(stages, "loss", impl="fastclr-dense"), key=lambda r: r["batch"])
    active = [r for r in ch if r["batch"] >= plan.loss_chunk]
    if len(active) >= 2:
        ch = active
        dn = [r for r in dn if r["batch"] >= plan.loss_chunk]  # the same batches for the dense reference
    if len(ch) >= 2 and ch[0]["peak_mem_bytes"]:
        growth = ch[-1]["peak_mem_per_image"] / ch[0]["peak_mem_per_image"]
        dense_growth = (dn[-1]["peak_mem_per_image"] / dn[0]["peak_mem_per_image"]
                        if len(dn) >= 2 and dn[0]["peak_mem_bytes"] else None)
        ratios["loss_chunked_memory_flat"] = _ratio(
            growth, 1.25, {"name": "dense", "per_image_growth": dense_growth and round(dense_growth, 3)},
            {"name": "chunked", "per_image_growth": round(growth, 3)}, direction="<=",
            unit=f"peak memory per image at B={ch[-1]['batch']} / at B={ch[0]['batch']}",
            batches=[r["batch"] for r in ch], peak_mib=[round(r["peak_mem_mib"], 2) for r in ch])
    else:
        ratios["loss_chunked_memory_flat"] = _ratio(None, 1.25, "dense", "chunked", direction="<=",
                                                    reason="loss stage not run, or fewer than two batch sizes")
    # The data path behind the model: the best end-to-end rate over the synthetic-data step rate (same
    # network, batch and dtype, this run). 1.0 = loading and augmenting cost the step nothing.
    step = next(iter(_ok_rows(stages, "step", impl="fastclr")), None)
    e2e = _ok_rows(stages, "e2e", impl="fastclr")
    if step and e2e:
        best = max(e2e, key=lambda r: r["images_per_s"])
        ratios["e2e_vs_synthetic_step"] = _ratio(
            best["images_per_s"] / step["images_per_s"], 0.95,
            {"name": step["name"], "images_per_s": step["images_per_s"]},
            {"name": best["name"], "images_per_s": best["images_per_s"]}, unit="x images/s (real / synthetic data)")
    else:
        ratios["e2e_vs_synthetic_step"] = _ratio(None, 0.95, "step", "e2e", reason="step or e2e stage not run")
    # The loader alone, two views at 224 px: an absolute goal for one H100 (issue 6), so GPU runs only.
    target = 10000.0
    if device_type != "cuda":
        ratios["loader_two_view_images_per_s"] = _ratio(None, target, None, "fastclr",
                                                        reason="a goal for one H100: GPU runs only")
    elif aug:
        best = max(aug, key=lambda r: r["images_per_s"])
        ratios["loader_two_view_images_per_s"] = _ratio(best["images_per_s"], target, None,
                                                        {"name": best["name"], "images_per_s": best["images_per_s"]},
                                                        unit="images/s (absolute)", size=plan.size)
    else:
        ratios["loader_two_view_images_per_s"] = _ratio(None, target, None, "fastclr", reason="augment stage not run")
    return ratios


# ------------------------------------------------------------------------------------------------
# Output: table, JSON, charts
# ------------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[throughput] {msg}", file=sys.stderr, flush=True)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v)


def stage_table(name: str, st: dict) -> str:
    head = f"== {name} ({st.get('seconds', 0):.1f} s)"
    if st["status"] != "ok":
        return f"{head}: skipped: {st.get('reason', '')}"
    lines = [head + (f"  [{st['notes']}]" if st.get("notes") else "")]
    extras = ("data_wait", "peak_mem_mib", "ms_per_step", "mb_per_s", "gb_per_s", "compile_seconds", "jit_seconds")
    table = [("name", "images/s", "views/s", "other")]
    for r in st["rows"]:
        if r.get("status") == "skipped":
            table.append((r["name"], "skipped", "", r.get("reason", "")))
            continue
        other = "  ".join(f"{k}={_fmt(r[k])}" for k in extras if r.get(k) is not None)
        table.append((r["name"], _fmt(r.get("images_per_s")), _fmt(r.get("views_per_s")), other))
    w = [max(len(t[i]) for t in table) for i in range(3)]
    for t in table:
        lines.append(f"  {t[0]:<{w[0]}}  {t[1]:>{w[1]}}  {t[2]:>{w[2]}}  {t[3]}".rstrip())
    return "\n".join(lines)


def ratio_table(ratios: dict) -> str:
    lines = ["== headline ratios (measured side by side in this run)"]
    w = max((len(k) for k in ratios), default=10)
    for k, r in ratios.items():
        if r["value"] is None:
            lines.append(f"  {k:<{w}}  -        target {r['direction']} {r['target']}  ({r.get('reason')})")
        else:
            mark = "met" if r["met"] else "NOT met"
            lines.append(f"  {k:<{w}}  {r['value']:<7.3g}  target {r['direction']} {r['target']:<5}  {mark}"
                         f"  ({r.get('unit', '')})")
    return "\n".join(lines)


def charts(stages: dict, json_path: str) -> dict:
    """One horizontal bar chart per stage next to the JSON; {stage: png path} or {"_skipped": why}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return {"_skipped": f"matplotlib not available ({_err(e)}): no charts"}
    out = {}
    stem = json_path.removesuffix(".json")
    for name, st in stages.items():
        rows = [r for r in st.get("rows", []) if r.get("status", "ok") == "ok"]
        key = "images_per_s" if any(r.get("images_per_s") for r in rows) else "steps_per_s"
        rows = [r for r in rows if r.get(key)]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
        labels = [r["name"] for r in rows]
        vals = [r[key] for r in rows]
        colors = ["tab:blue" if r.get("impl", "fastclr").startswith("fastclr") else "tab:gray" for r in rows]
        ax.barh(range(len(rows)), vals, color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(key.replace("_per_s", "/s"))
        ax.set_title(f"{name} ({os.path.basename(stem)})", fontsize=9)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:,.3g}", va="center", fontsize=7)
        fig.tight_layout()
        path = f"{stem}-{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out[name] = path
    return out


# ------------------------------------------------------------------------------------------------
# Metadata
# ------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    def v(*names):
        for n in names:
            try:
                return md.version(n)
            except md.PackageNotFoundError:
                continue
        return None
    dali = next((f"{d.metadata['Name']}=={d.version}" for d in md.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")), None)
    return {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
            "torchvision": v("torchvision"), "numpy": np.__version__, "dali": dali, "ffcv": v("ffcv"),
            "lightly": v("lightly"), "pillow": v("pillow", "Pillow"),
            "opencv": v("opencv-python-headless", "opencv-python"), "numba": v("numba"),
            "fastclr": v("fastclr")}


def git_info() -> tuple[str | None, bool]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10, check=False).stdout.strip())
        return sha, dirty
    except Exception:
        return None, False


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else cpu_model()


def default_out(device: str, sha: str | None) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")
    slug = "-".join(filter(None, slug.split("-")))[:40]
    return os.path.join(ROOT, "benchmarks", "results",
                        f"{time.strftime('%Y%m%d-%H%M%S')}-{device}-{slug}-{(sha or 'nogit')[:8]}.json")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

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
        kw["archs"] = _split(args.archs)
    if args.dtypes:
        kw["dtypes"] = _split(args.dtypes)
        bad = [d for d in kw["dtypes"] if d not in DTYPES]
        if bad:
            raise SystemExit(f"throughput.py: error: unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")
    if args.compile is not None:
        kw["compile"] = args.compile
    return replace(plan, **kw)


def run_stages(bench: Bench, names, on_stage=None) -> dict:
    """Run the named stages in order; ``on_stage(out)`` after each (the partial results so far)."""
    out = {}
    for name in names:
        log(f"stage {name} ...")
        t0 = time.perf_counter()
        try:
            st = getattr(bench, f"stage_{name}")()
        except Exception as e:  # a stage that crashes is reported, the run goes on
            traceback.print_exc()
            st = skip_stage(f"failed: {_err(e)}")
        st["seconds"] = round(time.perf_counter() - t0, 2)
        out[name] = st
        print(stage_table(name, st), flush=True)
        if on_stage is not None:
            on_stage(out)
    return out


def sweep_plan(plan: Plan, param: str, value) -> Plan:
    if param == "num_threads":
        return replace(plan, workers=int(value))
    if param == "hw_decoder_load":
        return replace(plan, hw_decoder_load=float(value))
    return replace(plan, batch=int(value), step_batch=int(value), e2e_batch=int(value), model_batch=int(value))


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    try:
        import cv2
        # Before any cv2 call: OpenCV's thread pool does not survive fork, and DataLoader workers forked
        # from a process that ran multi-threaded cv2 ops hang in their first cv2 call. The decode and
        # geometry stages measure one thread anyway.
        cv2.setNumThreads(1)
    except ImportError:
        pass
    plan = apply_overrides(make_plan(args.device, args.quick), args)
    torch.manual_seed(args.seed)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sha, dirty = git_info()
    out_path = os.path.abspath(args.out or default_out(args.device, sha))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    log(f"device {args.device} ({device_name(args.device)}), {_cpu_count()} CPUs, stages {','.join(args.stages)}, "
        f"backends {','.join(args.backends)}, peers {'on' if args.peers else 'off'}")
    data = Data(args, plan)
    bench = Bench(args, plan, data)
    stages: dict = {}
    sweeps: list = []
    ratios: dict = {}

    def save(complete: bool) -> dict:
        """Write the JSON. Also called after every stage and sweep point with complete=false, so a run
        killed by a time limit (the GPU suite's) still leaves what it measured."""
        meta = {
            "device": device_name(args.device), "device_type": args.device, "cpu_model": cpu_model(),
            "cpu_count": _cpu_count(), "gpu_count": torch.cuda.device_count() if args.device == "cuda" else 0,
            "versions": versions(), "git_sha": sha, "git_dirty": dirty, "tf32": args.device == "cuda",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "platform": platform.platform(),
            "args": {k: (v if not isinstance(v, tuple) else list(v)) for k, v in vars(args).items()},
            "config": asdict(plan),
            "data": {"folder": data.folder, "beton": data.beton, "generated": data.generated,
                     "images": len(data.samples), "jpeg_quality": 90 if data.generated else None,
                     "beton_max_resolution": "original" if data.generated else None},
            "complete": complete, "seconds": None,
        }
        result = {"meta": meta, "stages": stages, "ratios": ratios or compute_ratios(stages, plan, args.device),
                  "sweeps": sweeps}
        if complete and not args.no_chart:
            meta["charts"] = charts(stages, out_path)
            if "_skipped" in meta["charts"]:
                log(meta["charts"]["_skipped"])
        meta["seconds"] = round(time.perf_counter() - t_start, 1)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, out_path)
        return meta

    stages.update(run_stages(bench, args.stages, on_stage=lambda done: (stages.update(done), save(False))))
    ratios.update(compute_ratios(stages, plan, args.device))
    print(ratio_table(ratios), flush=True)

    for param, values in args.sweep:
        names = [s for s in args.stages if s in SWEEPABLE[param]]
        if not names:
            sweeps.append({"param": param, "status": "skipped",
                           "reason": f"none of its stages ({', '.join(SWEEPABLE[param])}) was requested"})
            continue
        sub_args = args
        note = None
        if param == "hw_decoder_load":
            sub_args = argparse.Namespace(**{**vars(args), "backends": [b for b in args.backends if b == "dali"],
                                             "peers": False, "variants": False})
            if not sub_args.backends:
                sweeps.append({"param": param, "status": "skipped", "reason": "needs the dali backend"})
                continue
            if args.device != "cuda":
                note = "the DALI CPU pipeline has no hardware decoder: the value has no effect on CPU"
        for v in values:
            log(f"sweep {param}={v}")
            sp = sweep_plan(plan, param, v)
            pt = run_stages(Bench(sub_args, sp, data), names)
            point = {"param": param, "value": v, "stages": pt}
            if note:
                point["note"] = note
            sweeps.append(point)
            save(False)

    meta = save(True)
    print(f"wrote {out_path} ({meta['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
