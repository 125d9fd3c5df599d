"""The one image decoder of fastclr's CPU paths: the torch backend's workers, ``loaders.validate`` and the
``loaders.write_ffcv`` converter all turn encoded bytes into ``HxWx3 uint8 RGB`` here, so that a file is
good, bad or converted the same way everywhere.

OpenCV first (faster than PIL on JPEG: benchmarks/throughput.py's decode stage), PIL for what
OpenCV refuses; PIL's error (e.g. "image file is truncated") is the reason reported for a bad file.
Images with more than 8 bits per channel (16-bit PNG and TIFF) are scaled to 8 bits by keeping the
high byte, as OpenCV does, in both paths: PIL's own ``convert("RGB")`` clips 16-bit grayscale at 255,
which turned such images white.

EXIF orientation is applied: an image comes out the way a viewer shows it, in every backend (DALI's
decoder applies it too, and the FFCV converter stores what this decoder returns). ``exif=False``
ignores it, as TensorFlow's decode_jpeg does (fastclr.zoo's TF-exact evaluation).
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

import numpy as np

try:
    import cv2
    # OpenCV's thread pool does not survive fork(): a DataLoader worker forked after the main process
    # ran a multi-threaded cv2 call can hang in its first cv2 call. The parallelism is the worker
    # count, so OpenCV runs single-threaded everywhere this module is used.
    cv2.setNumThreads(1)
except Exception:  # pragma: no cover - OpenCV missing: PIL decodes
    cv2 = None

_REDUCED = {}  # JPEG scale denominator -> OpenCV flag that decodes at that scale (libjpeg DCT scaling)
if cv2 is not None:
    _REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def pil_to_rgb(im) -> np.ndarray:
    """A loaded PIL image -> HxWx3 uint8 RGB. 16-bit and 32-bit integer modes keep their high byte
    (OpenCV's rule); palette, CMYK, LA, ... go through PIL's conversion."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        shift = 8 if mode.startswith("I;16") or a.max(initial=0) <= 0xFFFF else 24
        a = (a.astype(np.uint32) >> shift).clip(0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode == "F":  # float images: values taken as 0..255, as PIL's own 8-bit conversion does
        a = np.asarray(im).clip(0, 255).round().astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    return np.asarray(im if mode == "RGB" else im.convert("RGB"))


def header_size(data: bytes) -> Optional[Tuple[str, int, int]]:
    """(format, height, width) from the header alone (PIL reads no pixels), or None if unknown."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format, im.size[1], im.size[0]
    except Exception:  # noqa: BLE001  (not an image, or a format PIL does not know)
        return None


def _reduction(data: bytes, min_side: int) -> int:
    """The largest JPEG scale denominator (2, 4, 8) that keeps both sides >= min_side, else 1."""
    head = header_size(data)
    if head is None or head[0] != "JPEG":
        return 1
    _, h, w = head
    for k in (8, 4, 2):
        if -(-h // k) >= min_side and -(-w // k) >= min_side:
            return k
    return 1


def decode_rgb(data: bytes, min_side: Optional[int] = None, exif: bool = True) -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 RGB, turned as its EXIF orientation says (``exif``). ``min_side``:
    a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, what PIL's draft mode does)
    as long as both sides stay >= min_side: the converter's cheap way to shrink huge photos it stores
    at --max-resolution."""
    if not data:
        raise ValueError("empty file")
    if cv2 is not None:
        buf = np.frombuffer(data, np.uint8)
        k = _reduction(data, min_side) if min_side else 1
        flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
        ignore = 0 if exif else cv2.IMREAD_IGNORE_ORIENTATION
        if k > 1 or flag is None:  # reduced decoding exists in BGR only (as does OpenCV < 4.10)
            img = cv2.imdecode(buf, _REDUCED.get(k, cv2.IMREAD_COLOR) | ignore)
            img = None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        else:
            img = cv2.imdecode(buf, flag | ignore)
        if img is not None and img.size:
            return img
    from PIL import Image, ImageOps
    with Image.open(io.BytesIO(data)) as im:
        if min_side and im.format == "JPEG":
            im.draft("RGB", (min_side, min_side))
        im.load()
        return pil_to_rgb(ImageOps.exif_transpose(im) if exif else im)


def exif_turned(data: bytes) -> bool:
    """Whether the image's EXIF orientation turns or mirrors it (the header alone)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.getexif().get(0x0112, 1) not in (0, 1)
    except Exception:  # noqa: BLE001
        return False


def read_rgb(path: str, min_side: Optional[int] = None, exif: bool = True) -> np.ndarray:
    """``decode_rgb`` of a file's bytes."""
    with open(path, "rb") as f:
        return decode_rgb(f.read(), min_side, exif)
