"""Geometry of the SimCLR recipe (per decoded image, uint8, numpy + OpenCV): TF's random crop boxes,
the crop-resize of K views cut from ONE decode (docs/design.md: two views, one decode), flips, and the
same crop-resize for a decoded image on the GPU. ``loaders.augment`` is the recipe's front door and
re-exports these names.

TF deviations (marked ``# TF deviation:`` where they happen): crops are resized with OpenCV's bicubic
on uint8 (Keys a=-0.75; TF: float image, a=-0.5); the fallback after ``attempts`` failed draws is
torchvision's centre crop clamped to the aspect range (TF: the whole image; the same when the image's
aspect is in range).
"""
from __future__ import annotations

import numpy as np
import torch

from .spec import AugmentSpec, CropSpec

try:  # OpenCV decodes and resizes faster than PIL (throughput.py's decode and geometry stages); PIL: fallback
    import cv2
except Exception:  # noqa: BLE001  # pragma: no cover - a broken OpenCV fails in many ways; PIL covers all
    cv2 = None

# TF's crop_and_resize passes min_object_covered=0.1 with the whole image as the only box: a crop
# must cover >= 10 % of the image, so the effective area range is (max(0.08, 0.1), 1) in TF.
TF_MIN_OBJECT_COVERED = 0.1



def sample_crop_boxes(height: int, width: int, k: int, crop: CropSpec, rng: np.random.Generator,
                      min_object_covered: float = TF_MIN_OBJECT_COVERED) -> np.ndarray:
    """``k`` crop boxes for one ``height x width`` image: int64 ``[k, 4]`` rows ``(y0, x0, h, w)``.

    ``crop.random``: TF ``sample_distorted_bounding_box`` (the kernel's GenerateRandomCrop),
    vectorized over ``k x crop.attempts`` attempts:
      * aspect w/h ~ **uniform** on ``crop.ratio`` (TF; torchvision samples it log-uniform);
      * height ~ uniform integer in [round(sqrt(min_area/aspect)), round(sqrt(max_area/aspect))],
        clamped so the width round(h*aspect) fits (TF samples the *side*, not the area, uniformly);
      * the kernel's +-1 rounding fix-ups, then accept if the area fraction is in ``crop.scale``
        and >= ``min_object_covered`` (TF passes 0.1: see TF_MIN_OBJECT_COVERED; pass 0 to use
        ``crop.scale`` alone);
      * offsets uniform in [0, H - h) and [0, W - w) (TF's Uniform(n) excludes n, so a smaller
        crop never touches the bottom/right edge; a full-side crop has offset 0);
      * first accepted attempt wins; none accepted -> fallback below.
    ``not crop.random``: TF ``center_crop`` for a square output: a centred square of
    ``round(center_fraction * shorter side)``, offsets ((H - h) + 1) // 2 (TF's rounding).
    """
    H, W = int(height), int(width)
    if H <= 0 or W <= 0:
        raise ValueError(f"empty image {H}x{W}")
    if not crop.random:
        p = crop.center_fraction
        aspect = 1.0  # output width / height (square views)
        if aspect > W / H:   # requested aspect wider than the image: width is the limiting side
            ch, cw = np.rint(p / aspect * W), np.rint(p * W)
        else:
            ch, cw = np.rint(p * H), np.rint(p * aspect * H)
        ch, cw = int(min(max(ch, 1), H)), int(min(max(cw, 1), W))
        box = [((H - ch) + 1) // 2, ((W - cw) + 1) // 2, ch, cw]
        return np.tile(np.asarray(box, np.int64), (k, 1))

    A = int(crop.attempts)
    lo_r, hi_r = crop.ratio
    total = float(H * W)
    min_area = crop.scale[0] * total
    max_area = crop.scale[1] * total
    u = rng.random((4, k, A))  # aspect, height, y, x: one draw per attempt and quantity
    ar = u[0] * (hi_r - lo_r) + lo_r
    h_lo = np.rint(np.sqrt(min_area / ar))
    h_hi = np.rint(np.sqrt(max_area / ar))
    # The largest height whose rounded width still fits (TF's kEps dance).
    too_wide = np.rint(h_hi * ar) > W
    h_hi = np.where(too_wide, np.floor((W + 0.5 - 1e-7) / ar), h_hi)
    h_hi = np.where(np.rint(h_hi * ar) > W, h_hi - 1, h_hi)
    h_hi = np.minimum(h_hi, H)
    h_lo = np.minimum(h_lo, h_hi)
    h = h_lo + np.floor(u[1] * (h_hi - h_lo + 1))
    h = np.minimum(h, h_hi)  # guards u == 1 - eps rounding
    w = np.rint(h * ar)
    area = w * h
    small = area < min_area  # TF: "try first with a slightly bigger rectangle"
    h = np.where(small, h + 1, h)
    w = np.where(small, np.rint(h * ar), w)
    area = w * h
    big = area > max_area
    h = np.where(big, h - 1, h)
    w = np.where(big, np.rint(h * ar), w)
    area = w * h
    ok = ((area >= min_area) & (area <= max_area) & (w <= W) & (h <= H) & (w > 0) & (h > 0)
          & (area >= min_object_covered * total))
    y = np.where(h < H, np.floor(u[2] * (H - h)), 0)
    x = np.where(w < W, np.floor(u[3] * (W - w)), 0)

    first = ok.argmax(axis=1)
    rows = np.arange(k)
    boxes = np.stack([y[rows, first], x[rows, first], h[rows, first], w[rows, first]], 1).astype(np.int64)
    failed = ~ok[rows, first]
    if failed.any():
        # TF deviation: TF returns the whole image; this is torchvision's fallback (centre crop with
        # the aspect clamped to the range), identical to TF when the image aspect is in range.
        in_ratio = W / H
        if in_ratio < lo_r:
            fw, fh = W, round(W / lo_r)
        elif in_ratio > hi_r:
            fh, fw = H, round(H * hi_r)
        else:
            fw, fh = W, H
        fh, fw = min(max(fh, 1), H), min(max(fw, 1), W)
        boxes[failed] = [(H - fh) // 2, (W - fw) // 2, fh, fw]
    return boxes


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 -> HxWx3 (gray stacked to 3 channels, alpha dropped)."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {img.shape}")
    c = img.shape[2]
    if c == 1:
        return np.repeat(img, 3, axis=2)
    if c == 4:
        return np.ascontiguousarray(img[:, :, :3])
    if c == 3:
        return img
    raise ValueError(f"expected 1, 3 or 4 channels, got {c}")


_CV2_INTERP = {"bicubic": "INTER_CUBIC", "bilinear": "INTER_LINEAR"}


def crop_resize(img: np.ndarray, boxes: np.ndarray, size: int, interpolation: str = "bicubic",
                flips: np.ndarray | None = None) -> np.ndarray:
    """Cut ``boxes`` ((y0, x0, h, w) rows) out of ONE decoded uint8 image and resize each to
    ``size x size``: uint8 ``[k, size, size, 3]``. ``flips[i]`` mirrors crop i horizontally.

    TF deviation: OpenCV's bicubic (a=-0.75) on uint8 instead of TF's float bicubic (a=-0.5); both
    without antialiasing. The PIL fallback (no OpenCV) antialiases when downscaling.
    """
    if interpolation not in _CV2_INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_CV2_INTERP)}, got {interpolation!r}")
    # TF deviation: OpenCV resizes uint8 with Keys a=-0.75 (TF: float image, a=-0.5); see docstring.
    img = to_rgb_uint8(img)
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for i, (y0, x0, h, w) in enumerate(boxes):  # k is 1-2 per image; the pixels are in C
        src = img[y0:y0 + h, x0:x0 + w]
        flip = flips is not None and bool(flips[i])
        if cv2 is not None:
            interp = getattr(cv2, _CV2_INTERP[interpolation])
            if h == size and w == size:
                out[i] = src
            else:
                cv2.resize(src, (size, size), dst=out[i], interpolation=interp)
            if flip:
                cv2.flip(out[i], 1, dst=out[i])
        else:  # pragma: no cover - OpenCV missing
            from PIL import Image
            resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
            res = np.asarray(Image.fromarray(np.ascontiguousarray(src)).resize((size, size), resample))
            out[i] = res[:, ::-1] if flip else res
    return out


def _resize_weights(n_in: int, n_out: int, interpolation: str) -> tuple:
    """1-D resampling as a matrix, restricted to the source pixels it reads: (src index int64 [m],
    weights float32 [n_out, m]), in numpy (tiny; no device round trips). Same kernel and conventions
    as torch's upsample (and OpenCV's resize): half-pixel centres, bicubic = Keys a=-0.75 with
    clamped borders, bilinear with the source coordinate clamped at 0; no antialiasing."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    if interpolation == "bilinear":
        src = np.maximum(src, 0)
        i0 = np.floor(src)
        t = src - i0
        offs, w = (0, 1), [1 - t, t]
    else:
        a = -0.75
        i0 = np.floor(src)
        t = src - i0

        def near(d):  # |d| <= 1
            return ((a + 2) * d - (a + 3)) * d * d + 1

        def far(d):   # 1 < |d| < 2
            return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        offs, w = (-1, 0, 1, 2), [far(t + 1), near(t), near(1 - t), far(2 - t)]
    cols = np.clip(i0.astype(np.int64)[:, None] + np.asarray(offs), 0, n_in - 1)  # [n_out, taps]
    used, inv = np.unique(cols, return_inverse=True)
    dense = np.zeros((n_out, len(used)))
    np.add.at(dense, (np.repeat(np.arange(n_out), len(offs)), inv.reshape(-1)), np.stack(w, 1).reshape(-1))
    return used, dense.astype(np.float32)


def crop_resize_tensor(img: torch.Tensor, boxes, size: int, interpolation: str = "bicubic",
                       flips=None) -> torch.Tensor:
    """``crop_resize`` for a decoded ``[3, H, W]`` uint8 tensor on any device (the GPU-decode
    path): uint8 ``[k, size, size, 3]``. Each crop is resized as ``Wy @ crop @ Wx^T`` with the same
    kernel as torch's / OpenCV's resize (see _resize_weights), reading only the <= 4*size rows and
    columns the kernel touches, so a 6000x4000 crop costs no more than a small one. Matches the
    OpenCV CPU path to +-1-3 levels (OpenCV rounds its weights to fixed point)."""
    if interpolation not in _CV2_INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_CV2_INTERP)}, got {interpolation!r}")
    boxes = torch.as_tensor(boxes).reshape(-1, 4).tolist()
    flips = [False] * len(boxes) if flips is None else [bool(f) for f in torch.as_tensor(flips).reshape(-1).tolist()]
    out = torch.empty((len(boxes), size, size, 3), dtype=torch.uint8, device=img.device)
    for i, (y0, x0, h, w) in enumerate(boxes):  # k = 1-2 per image; per-image sizes differ
        ry, wy = _resize_weights(h, size, interpolation)
        rx, wx = _resize_weights(w, size, interpolation)
        if flips[i]:
            wx = wx[::-1]
        # Only the rows / columns the kernel reads (a slice when they are contiguous, as usual).
        rows = slice(y0 + ry[0], y0 + ry[-1] + 1) if ry[-1] - ry[0] + 1 == len(ry) else torch.from_numpy(y0 + ry)
        cols = slice(x0 + rx[0], x0 + rx[-1] + 1) if rx[-1] - rx[0] + 1 == len(rx) else torch.from_numpy(x0 + rx)
        src = img[:, rows] if isinstance(rows, slice) else img.index_select(1, rows.to(img.device))
        src = src[:, :, cols] if isinstance(cols, slice) else src.index_select(2, cols.to(img.device))
        wy_t = torch.from_numpy(wy).to(img.device, non_blocking=True)
        wxt_t = torch.from_numpy(np.ascontiguousarray(wx.T)).to(img.device, non_blocking=True)
        res = torch.matmul(torch.matmul(wy_t, src.float()), wxt_t)       # [3, size, size]
        out[i] = res.clamp_(0, 255).round_().permute(1, 2, 0)
    return out


def geometry(img: np.ndarray, spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """One decoded image -> uint8 ``[K, S, S, 3]``: K = spec.num_views crops, each flipped with p=0.5
    when spec.flip. Draws the boxes, then the flips, from ``rng``."""
    img = to_rgb_uint8(img)
    K = spec.num_views
    boxes = sample_crop_boxes(img.shape[0], img.shape[1], K, spec.crop, rng)
    flips = rng.random(K) < 0.5 if spec.flip else None
    return crop_resize(img, boxes, spec.crop.size, spec.crop.interpolation, flips)


# ----------------------------------------------------------------------------- TF1's eval view, exactly
_TF_TABLE = 1024  # TF's legacy bicubic reads its weights from a 1024-step table


def _tf1_bicubic_table() -> np.ndarray:
    """TF ``InitCoeffsTable(-0.75)``: float32 [(1024 + 1), 2], (near, far) weights at x = i / 1024,
    computed in double and stored in float, as TF does."""
    a = -0.75
    x = np.arange(_TF_TABLE + 1, dtype=np.float64) / _TF_TABLE
    x = x.astype(np.float32).astype(np.float64)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    x1 = x + 1.0
    far = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
    return np.stack([near, far], 1).astype(np.float32)


_TF_COEFFS = _tf1_bicubic_table()


def tf1_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """float32 [n_out, n_in]: TF1 ``tf.image.resize_bicubic`` (align_corners=False, half_pixel_centers=
    False) along one axis. The source coordinate is ``out * (n_in / n_out)`` in float32 (no half-pixel
    shift), the fraction is rounded to 1/1024 to index TF's weight table (Keys a=-0.75), the four taps
    are clamped to the edge and the weights are not renormalized: TF's legacy kernel, step for step."""
    scale = np.float32(n_in) / np.float32(n_out)
    loc = np.arange(n_out, dtype=np.float32) * scale
    i0 = np.floor(loc).astype(np.int64)
    off = np.rint((loc - i0.astype(np.float32)) * np.float32(_TF_TABLE)).astype(np.int64)
    t = _TF_COEFFS
    w = np.stack([t[off, 1], t[off, 0], t[_TF_TABLE - off, 0], t[_TF_TABLE - off, 1]], 1)   # [n_out, 4]
    cols = np.clip(i0[:, None] + np.arange(-1, 3), 0, n_in - 1)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.repeat(np.arange(n_out), 4), cols.reshape(-1)), w.reshape(-1))
    return m


def tf_eval_view(img: np.ndarray, size: int = 224, center_fraction: float = 0.875) -> np.ndarray:
    """google-research/simclr's TF1 eval preprocessing of one decoded image (HxWx3 uint8): float32
    ``[3, size, size]`` in [0, 1]. ``convert_image_dtype`` (x * (1/255) in float32), the centred crop of
    ``center_fraction`` of the shorter side (TF's rounding), ``resize_bicubic`` in float (see
    :func:`tf1_bicubic_matrix`; no uint8 rounding between the steps), clipped to [0, 1]. No mean/std."""
    img = to_rgb_uint8(img)
    y0, x0, h, w = sample_crop_boxes(img.shape[0], img.shape[1], 1,
                                     CropSpec(size=size, random=False, center_fraction=center_fraction), None)[0]
    crop = img[y0:y0 + h, x0:x0 + w].astype(np.float32) * np.float32(1.0 / 255.0)
    wy, wx = tf1_bicubic_matrix(int(h), size), tf1_bicubic_matrix(int(w), size)
    out = np.einsum("yh,hwc->ywc", wy, crop)        # TF interpolates the rows first,
    out = np.einsum("xw,ywc->cyx", wx, out)         # then along each row
    return np.clip(out, 0.0, 1.0).astype(np.float32)
