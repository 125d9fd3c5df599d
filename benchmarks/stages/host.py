"""The host stages, one image at a time: ``read`` (bytes from disk), ``decode`` (JPEG -> RGB) and
``geometry`` (decode + two random crops), the last two on one CPU thread."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from benchmarks.data import beton_images, read_all
from benchmarks.plan import K
from benchmarks.rows import err, ok_stage, row, skip_stage, skipped_row
from benchmarks.stages.bench import Bench
from benchmarks.timing import timed, torch_threads
from loaders import augment
from loaders.augment.spec import simclr


def stage_read(b: Bench):
    rows = []
    paths = b.data.subset(b.plan.stage_images)
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
        rows.append(skipped_row("ImageFolder files (open+read)", b.data.folder_why))
    if "ffcv" in b.args.backends:
        beton = b.data.ensure_beton()
        if beton is None:
            rows.append(skipped_row(".beton (sequential read)", b.data.beton_why))
        else:
            n = beton_images(beton)
            size = os.path.getsize(beton)
            read_all(beton)
            t0 = time.perf_counter()
            read_all(beton)
            dt = time.perf_counter() - t0
            rows.append(row(".beton (sequential read)", impl="python", images_per_s=n / dt,
                            mb_per_s=size / dt / 1e6, images=n, mean_kb=size / max(n, 1) / 1e3))
    return ok_stage(rows, notes="page cache warm: measures the read path, not the disk")


def stage_decode(b: Bench):
    if b.need_folder():
        return skip_stage(b.need_folder())
    enc = b.encoded()
    n = len(enc)
    rows = []

    def pil():
        import io

        from PIL import Image
        for x in enc:
            with Image.open(io.BytesIO(x)) as im:
                np.asarray(im.convert("RGB"))

    def cv():
        import cv2
        for x in enc:
            cv2.cvtColor(cv2.imdecode(np.frombuffer(x, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    from torchvision.io import ImageReadMode, decode_jpeg
    datas = [torch.frombuffer(bytearray(x), dtype=torch.uint8) for x in enc]

    def tv():
        for d in datas:
            decode_jpeg(d, mode=ImageReadMode.RGB)

    impls = [("PIL", pil), ("OpenCV imdecode", cv), ("torchvision decode_jpeg (CPU)", tv)]
    with torch_threads(1):
        for name, fn in impls:
            try:
                dt = timed(fn, "cpu", 1, 1)
                rows.append(row(name, impl=name.split()[0], images_per_s=n / dt, images=n, threads=1))
            except Exception as e:
                rows.append(skipped_row(name, err(e)))
    if b.cuda:
        chunk = 64

        def nv():
            for i in range(0, n, chunk):
                decode_jpeg(datas[i:i + chunk], mode=ImageReadMode.RGB, device=b.device)
        try:
            dt = timed(nv, b.device, 1, 3)
            rows.append(row("torchvision decode_jpeg (nvJPEG, batched)", impl="nvjpeg", images_per_s=n / dt,
                            images=n, batch=chunk))
        except Exception as e:
            rows.append(skipped_row("torchvision decode_jpeg (nvJPEG, batched)", err(e)))
    return ok_stage(rows, notes="one CPU thread, images already in memory")


def stage_geometry(b: Bench):
    if b.need_folder():
        return skip_stage(b.need_folder())
    enc = b.encoded()
    n = len(enc)
    spec = simclr(size=b.plan.size)
    rows = []

    def ours():
        import cv2
        rng = np.random.default_rng(0)
        for x in enc:
            img = cv2.cvtColor(cv2.imdecode(np.frombuffer(x, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            augment.geometry(img, spec, rng)

    def tv():
        import io

        import torchvision.transforms as T
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        crop = T.Compose([T.RandomResizedCrop(b.plan.size, scale=(0.08, 1.0),
                                              interpolation=InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip()])
        for x in enc:
            with Image.open(io.BytesIO(x)) as im:
                img = im.convert("RGB")
            crop(img), crop(img)

    with torch_threads(1):
        for name, impl, fn in [("fastclr (OpenCV decode + augment.geometry)", "fastclr", ours),
                               ("torchvision/PIL (RandomResizedCrop x2 + flip)", "torchvision", tv)]:
            if impl == "torchvision" and not b.args.peers:
                continue
            try:
                dt = timed(fn, "cpu", 0, 1)
                rows.append(row(name, impl=impl, images_per_s=n / dt, views_per_s=K * n / dt, images=n,
                                threads=1))
            except Exception as e:
                rows.append(skipped_row(name, err(e)))
    return ok_stage(rows, notes="decode + 2 crops resized to the view size, one thread")
