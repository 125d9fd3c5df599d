"""Procedural, real-looking JPEG data for tests and the benchmark: textured colour images with
ImageNet-like sizes (mean about 400x350, some portrait, some tiny, some large) and JPEG quality ~90,
plus one of each kind of bad file a real crawl contains. Deterministic for a given seed."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image


def textured_image(rng: np.random.Generator, width: int, height: int, base_color=None) -> np.ndarray:
    """An HxWx3 uint8 image: coloured gratings + soft blobs + fine noise, so crops, blur and colour ops
    all have something to act on (flat colours would hide bugs)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx /= max(width, 1)
    yy /= max(height, 1)
    img = np.zeros((height, width, 3), np.float32)
    base = rng.uniform(0.15, 0.85, 3) if base_color is None else np.asarray(base_color, np.float32)
    img += base
    for _ in range(3):  # gratings of random orientation/frequency/colour
        theta, freq = rng.uniform(0, np.pi), rng.uniform(2, 25)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
        img += 0.12 * wave[..., None] * rng.uniform(-1, 1, 3)
    for _ in range(4):  # soft blobs
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += 0.35 * blob[..., None] * rng.uniform(-1, 1, 3)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def imagenet_like_size(rng: np.random.Generator) -> Tuple[int, int]:
    """(w, h) drawn around ImageNet train's distribution: mostly ~500x375 landscape, some portrait."""
    w = int(np.clip(rng.normal(440, 90), 120, 900))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4], p=[0.55, 0.2, 0.1, 0.15])
    return w, max(32, int(w / aspect))


def save_jpeg(arr: np.ndarray, path: str | os.PathLike, quality: int = 90) -> None:
    Image.fromarray(arr).save(path, format="JPEG", quality=quality)


def make_image_folder(root: str | os.PathLike, num_classes: int = 4, per_class: int = 6, seed: int = 0,
                      sizes: List[Tuple[int, int]] | None = None, quality: int = 90,
                      ext: str = ".JPEG") -> List[Tuple[str, int]]:
    """Write root/<class>/<class>_<i>.JPEG (classes n00000000, n00000001, ... like ImageNet synsets).
    ``sizes`` (w, h) are cycled when given, otherwise drawn ImageNet-like. Returns (path, label)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    out = []
    k = 0
    for c in range(num_classes):
        cls = f"n{c:08d}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[k % len(sizes)] if sizes else imagenet_like_size(rng)
            k += 1
            p = root / cls / f"{cls}_{i}{ext}"
            save_jpeg(textured_image(rng, w, h), p, quality=quality)
            out.append((str(p), c))
    return out


def make_bad_files(root: str | os.PathLike, seed: int = 0) -> Dict[str, str]:
    """One of each bad or unusual file, all named .JPEG. Returns kind -> path. Kinds:
    truncated, empty, text (unreadable); cmyk, png, gray, tiny (1x1), huge (6000x4000) (readable)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}

    def p(kind):
        paths[kind] = str(root / f"bad_{kind}.JPEG")
        return paths[kind]

    good = textured_image(rng, 320, 240)
    buf = io.BytesIO()
    Image.fromarray(good).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    Path(p("truncated")).write_bytes(data[: len(data) // 2])
    Path(p("empty")).write_bytes(b"")
    Path(p("text")).write_text("this is not an image\n" * 20)
    Image.fromarray(good).convert("CMYK").save(p("cmyk"), format="JPEG", quality=90)
    Image.fromarray(good).save(p("png"), format="PNG")
    Image.fromarray(good).convert("L").save(p("gray"), format="JPEG", quality=90)
    Image.fromarray(good[:1, :1]).save(p("tiny"), format="JPEG", quality=90)
    # A smooth large image: cheap to generate, still 6000x4000 pixels to decode.
    yy, xx = np.mgrid[0:4000:8, 0:6000:8]
    small = np.stack([(xx * 255 // 6000), (yy * 255 // 4000), ((xx + yy) * 255 // 10000)], -1).astype(np.uint8)
    Image.fromarray(small).resize((6000, 4000), Image.NEAREST).save(p("huge"), format="JPEG", quality=90)
    return paths


UNREADABLE = ("truncated", "empty", "text")
READABLE = ("cmyk", "png", "gray", "tiny", "huge")
