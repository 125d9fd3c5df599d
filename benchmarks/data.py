"""The images a run reads: a generated ImageNet-like folder and its .beton, cached on the generator's
parameters, or the user's --data / --beton."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from benchmarks.plan import Plan, cpu_count
from benchmarks.report import log
from benchmarks.rows import err
from benchmarks.timing import quiet_stdout
from loaders.sources import synthetic
from loaders.sources.folders import list_image_folder

DATA_VERSION = 1  # bump when the generated benchmark data changes: part of the cache key


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
    params = {"v": DATA_VERSION, "classes": plan.classes, "per_class": plan.per_class, "seed": seed,
              "quality": 90, "sizes": "imagenet_like_size"}
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = os.path.join(cache, f"imagenet_like-c{plan.classes}-p{plan.per_class}-s{seed}-{key}")
    images = os.path.join(root, "images")
    if os.path.isdir(images):
        return images
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".images-", dir=root)
    jobs = [(tmp, c, plan.per_class, seed, 90) for c in range(plan.classes)]
    t0 = time.perf_counter()
    workers = min(cpu_count(), plan.classes)
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
    with quiet_stdout():
        write_ffcv.convert(folder, out, max_resolution=0, jpeg_quality=90, progress=False,
                           workers=min(cpu_count(), 8))
    log(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return out


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
                self.beton_why = f"writing the .beton failed: {err(e)}"
        return self.beton

    def subset(self, n: int) -> list[str]:
        """``n`` image paths spread evenly over the (class-sorted) listing."""
        if not self.samples:
            return []
        idx = np.linspace(0, len(self.samples) - 1, min(n, len(self.samples))).round().astype(int)
        return [self.samples[i][0] for i in idx]


def read_all(path: str, chunk: int = 8 << 20) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(chunk)
            if not b:
                return n
            n += len(b)


def beton_images(path: str) -> int:
    """Images in a .beton: from the manifest write_ffcv puts beside it, else from FFCV's header."""
    manifest = path[:-len(".beton")] + ".manifest.json" if path.endswith(".beton") else None
    if manifest and os.path.isfile(manifest):
        with open(manifest) as f:
            return int(json.load(f)["num_images"])
    from loaders.backends.ffcv_loader import num_samples  # imports ffcv (numba): seconds
    return num_samples(path)
