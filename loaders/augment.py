"""Batched SimCLR augmentation: uint8 geometry on the host, colour ops on whole batches on any device.

Two stages, shared by every backend:

* **geometry** (per decoded image, uint8, numpy + OpenCV): ``sample_crop_boxes`` -> ``crop_resize``
  (+ horizontal flips). One decode, K crops (DESIGN.md "two views, one decode").
* **photometry** (per batch, float tensors on the training device): ``photometric`` applies colour
  jitter in a random order per sample, grayscale, gaussian blur and (opt-in) normalization to
  ``[N, 3, H, W]`` with per-sample parameters, masks and ``torch.where`` / index_copy - never a
  Python loop over samples. ``finish_views`` is the last stage every backend calls. On CUDA the
  default is the compiled fused path (``loaders/fused_photometry.py``: four passes over the pixels).

The semantic reference is google-research/simclr ``tf2/data_util.py`` and the TF kernels it calls
(``sample_distorted_bounding_box``, ``adjust_hue``, ``adjust_saturation``, ``adjust_contrast``,
``rgb_to_grayscale``). Every place this file deviates from TF is marked ``# TF deviation:``.
Summary:
  * crop-resize uses OpenCV bicubic (Keys a=-0.75, no antialias) on uint8; TF resizes float
    [0, 1] images with Keys a=-0.5 (``tf.image.resize(BICUBIC)``, no antialias). Crops are
    rounded to uint8 before the colour ops (<= 0.5/255 quantization).
  * the blur sigma is drawn per sample; TF's ``batch_random_blur`` draws one sigma per batch.
  * lower jitter bounds are clamped at 0 for strength > 1.25 (TF raises for contrast/saturation).
  * the random-crop fallback after ``attempts`` failures is torchvision's (centre crop clamped to
    the aspect range); TF falls back to the whole image. Both agree when the image aspect is in range.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from .spec import AugmentSpec, CropSpec

try:  # OpenCV is ~1.5x faster than PIL for decode and resize; PIL is the fallback.
    import cv2
except Exception:  # noqa: BLE001  # pragma: no cover - a broken OpenCV fails in many ways; PIL covers all
    cv2 = None

# tf.image.rgb_to_grayscale (ITU-R 601-2 luma, TF's rounding of the constants).
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
# TF's crop_and_resize passes min_object_covered=0.1 with the whole image as the only box: a crop
# must cover >= 10 % of the image, so the effective area range is (max(0.08, 0.1), 1) in TF.
TF_MIN_OBJECT_COVERED = 0.1
# Op codes of the colour jitter, in TF's non-random order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
NO_OP = -1


# ----------------------------------------------------------------------------------------------
# Geometry (host, uint8)
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Colour ops on [N, 3, H, W] float tensors in [0, 1], per-sample factors of shape [N]
# ----------------------------------------------------------------------------------------------

def _per_sample(v, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [N] factor as an [N, 1, 1, 1] tensor on x's device/dtype."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, 1, 1, 1) if v.ndim else v


def adjust_brightness(x: torch.Tensor, factor) -> torch.Tensor:
    """SimCLRv2 brightness: ``x * factor`` (multiplicative; TF impl='simclrv2'). Not clipped."""
    return x * _per_sample(factor, x)


def adjust_contrast(x: torch.Tensor, factor) -> torch.Tensor:
    """tf.image.adjust_contrast: ``(x - mean) * factor + mean``, mean per sample and channel over
    H, W. Not clipped."""
    m = x.mean(dim=(2, 3), keepdim=True)
    return torch.lerp(m, x, _per_sample(factor, x))


def _value_chroma(x: torch.Tensor):
    """(r, g, b, V, C) of [N, 3, H, W]: channels [N, H, W], value V = max, chroma C = max - min."""
    r, g, b = x.unbind(1)
    v = torch.maximum(r, g)
    torch.maximum(v, b, out=v)
    c = torch.minimum(r, g)
    torch.minimum(c, b, out=c)
    torch.sub(v, c, out=c)
    return r, g, b, v, c


def adjust_saturation(x: torch.Tensor, factor) -> torch.Tensor:
    """tf.image.adjust_saturation: HSV saturation ``s -> clip(s * factor, 0, 1)``, H and V kept.

    Evaluated in closed form without the HSV round trip: with V = max and C = max - min, every
    channel is ``V - C * w(hue)``, so scaling S (= C / V) scales ``V - x`` by
    ``clip(S * f, 0, 1) / S = min(f, V / C)`` (f >= 0). Exact in real arithmetic.
    """
    f = _per_sample(factor, x).clamp_min(0)
    _, _, _, v, c = _value_chroma(x)
    # C == 0 (gray pixel): V - x == 0, so any finite ratio leaves it unchanged.
    ratio = torch.minimum(torch.div(v, c.clamp_min_(1e-12), out=c), f.view(-1, 1, 1)).unsqueeze(1)
    v = v.unsqueeze(1)
    return torch.addcmul(v, v - x, ratio, value=-1.0)


def _is_max(v: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
    """Float mask, 1 where ``ch`` equals the channel max ``v`` (v - ch >= 0). ``sign`` + ``lerp``
    instead of ``==`` + ``torch.where``: the bool ops are 5-20x slower on CPU (not vectorized)."""
    return torch.sign(v - ch).neg_().add_(1.0)


def _hue_value_chroma(x: torch.Tensor):
    """Hue in TF's six sectors as h6 in [-1, 5] (mod 6 gives [0, 6)), value V = max and chroma
    C = max - min, each [N, H, W]. Where C == 0 the hue is 0 (TF); it does not matter there."""
    r, g, b, v, c = _value_chroma(x)
    # Same sector choice as TF's rgb_to_hsv kernel: r is max, else g is max, else b. The numerators
    # carry the sector offsets (0, 2C, 4C) so that one division finishes all three.
    h = torch.lerp((r - g).add_(c, alpha=4), (b - r).add_(c, alpha=2), _is_max(v, g))
    h = torch.lerp(h, g - b, _is_max(v, r))
    return h.div_(c.clamp_min(1e-12)), v, c


def _mod6(k: torch.Tensor) -> torch.Tensor:
    """k mod 6 in [0, 6), in place (floor form: ~5x faster than torch.remainder on CPU)."""
    return k.sub_(torch.floor_(k * (1.0 / 6.0)).mul_(6.0))


def _from_hue_value_chroma(h: torch.Tensor, v: torch.Tensor, c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of _hue_value_chroma: channel n in (r, g, b) = V - C * clamp(min(k, 4 - k), 0, 1),
    k = (h + (5, 3, 1)[n]) mod 6 - the piecewise-linear sectors of TF's hv_to_rgb."""
    out = torch.empty_like(like)
    for i, n in enumerate((5.0, 3.0, 1.0)):
        k = _mod6(h + n)
        t = torch.minimum(k, torch.rsub(k, 4.0)).clamp_(0.0, 1.0)
        torch.addcmul(v, c, t, value=-1.0, out=out[:, i])
    return out


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB in [0, 1] -> HSV with h, s, v in [0, 1] (tf.image.rgb_to_hsv)."""
    h, v, c = _hue_value_chroma(x)
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    out = torch.empty_like(x)
    out[:, 0], out[:, 1], out[:, 2] = _mod6(h) / 6.0, s, v
    return out


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] HSV (h in [0, 1), s, v in [0, 1]) -> RGB (tf.image.hsv_to_rgb)."""
    h, s, v = x[:, 0], x[:, 1], x[:, 2]
    return _from_hue_value_chroma(h * 6.0, v, s * v, x)


def adjust_hue(x: torch.Tensor, delta) -> torch.Tensor:
    """tf.image.adjust_hue: rotate the HSV hue by ``delta`` (fraction of a turn, per sample),
    keeping S and V: RGB -> (hue, V, chroma) -> hue + delta mod 1 -> RGB."""
    d = torch.as_tensor(delta, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    h, v, c = _hue_value_chroma(x)
    return _from_hue_value_chroma(h + 6.0 * d, v, c, x)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """tf.image.rgb_to_grayscale with the channels kept: luma (0.2989, 0.5870, 0.1140) in all 3."""
    wr, wg, wb = GRAY_WEIGHTS
    g = x[:, 0:1] * wr + x[:, 1:2] * wg + x[:, 2:3] * wb
    out = torch.empty_like(x)  # keeps x's memory format
    return out.copy_(g.expand_as(x))


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """[N, kernel_size] normalized 1-D gaussians (TF's gaussian_blur: radius = kernel_size // 2,
    taps exp(-t^2 / (2 sigma^2)) for t in [-radius, radius], divided by their sum)."""
    r = int(kernel_size) // 2
    t = torch.arange(-r, r + 1, dtype=sigma.dtype, device=sigma.device)
    w = torch.exp(-(t * t) / (2.0 * sigma.reshape(-1, 1) ** 2))
    return w / w.sum(dim=1, keepdim=True)


def _blur_taps(x: torch.Tensor, w: torch.Tensor, skip_below: float) -> torch.Tensor:
    """Separable blur as a sum of shifted slices (one addcmul per tap and direction) over a
    zero-padded copy. Taps whose weight is below ``skip_below`` for every sample are skipped: with
    skip_below=1e-9 the dropped mass changes no output by more than ~2e-8 (fp32 rounding level),
    and a small sigma needs far fewer than 23 taps."""
    N, _, H, W = x.shape
    K = w.shape[1]
    r = K // 2
    taps = [t for t in range(K) if t == r or float(w[:, t].max()) >= skip_below]
    ws = w.reshape(N, K, 1, 1, 1)
    xp = F.pad(x, (r, r))
    y = xp[..., r:r + W] * ws[:, r]
    for t in taps:
        if t != r:
            y.addcmul_(xp[..., t:t + W], ws[:, t])
    yp = F.pad(y, (0, 0, r, r))
    z = yp[..., r:r + H, :] * ws[:, r]
    for t in taps:
        if t != r:
            z.addcmul_(yp[..., t:t + H, :], ws[:, t])
    return z


def gaussian_blur(x: torch.Tensor, sigma, kernel_size: int, method: str = "auto") -> torch.Tensor:
    """Separable gaussian blur with a per-sample ``sigma`` [N] and ``kernel_size`` taps (an even
    size becomes size + 1, like TF), **zero padding** ('SAME': TF's depthwise_conv2d pads with
    zeros, which darkens a border of up to kernel_size // 2 pixels; we follow TF).

    method: "conv" (grouped depthwise conv2d 1xK then Kx1, one group per sample and channel: the
    GPU path), "taps" (a shifted multiply-add per tap, skipping taps < 1e-9: ~2x faster than
    conv on CPU), "auto" = taps on CPU, conv elsewhere. Returns NCHW-contiguous or x's format.
    """
    N, C, H, W = x.shape
    fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last)
                                  and not x.is_contiguous()) else torch.contiguous_format
    wdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    sig = torch.as_tensor(sigma, dtype=wdt, device=x.device).reshape(-1).expand(N)
    w = gaussian_kernels(sig, kernel_size).to(x.dtype)
    K = w.shape[1]
    if method == "auto":
        method = "taps" if x.device.type == "cpu" else "conv"
    if method == "taps":
        y = _blur_taps(x.contiguous(), w, 1e-9)
    elif method == "conv":
        r = K // 2
        wc = w.repeat_interleave(C, dim=0)  # one kernel per (sample, channel) group
        y = x.contiguous().view(1, N * C, H, W)
        y = F.conv2d(y, wc.view(N * C, 1, 1, K), padding=(0, r), groups=N * C)
        y = F.conv2d(y, wc.view(N * C, 1, K, 1), padding=(r, 0), groups=N * C)
        y = y.view(N, C, H, W)
    else:
        raise ValueError(f"method must be auto, conv or taps, got {method!r}")
    return y.contiguous(memory_format=fmt)


# ----------------------------------------------------------------------------------------------
# Random parameters and the batched photometric pipeline
# ----------------------------------------------------------------------------------------------

def sample_photometric_params(n: int, spec: AugmentSpec, generator: torch.Generator | None = None,
                              device=None) -> dict[str, torch.Tensor]:
    """Per-sample random parameters of ``photometric`` for a batch of ``n``, drawn from
    ``generator`` on ``device`` with one ``torch.rand(n, 12)`` (columns: jitter?, brightness,
    contrast, saturation, hue, 4 order keys, grayscale?, blur?, sigma). Returned keys:

      jitter bool[n]  - colour jitter applied (p = spec.jitter.p)
      order int64[n, 4] - op code at each of the 4 positions (argsort of 4 uniforms: a uniform
                          random permutation; BRIGHTNESS..HUE; NO_OP where jitter is off or the
                          op's strength is 0)
      brightness, contrast, saturation float[n] - factors; hue float[n] - delta (turns)
      gray bool[n]; blur bool[n]; sigma float[n]
    Backends that realize the spec natively (DALI) can use this to share the exact recipe.
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    u = torch.rand(n, 12, generator=generator, device=device, dtype=torch.float32)
    p: dict[str, torch.Tensor] = {}
    j = spec.jitter
    if j is not None:
        b, c, s, h = j.factors
        p["jitter"] = u[:, 0] < j.p
        # TF deviation: lower bounds clamped at 0 (TF clamps brightness only; raises otherwise).
        p["brightness"] = max(1 - b, 0.0) + u[:, 1] * (1 + b - max(1 - b, 0.0))
        p["contrast"] = max(1 - c, 0.0) + u[:, 2] * (1 + c - max(1 - c, 0.0))
        p["saturation"] = max(1 - s, 0.0) + u[:, 3] * (1 + s - max(1 - s, 0.0))
        p["hue"] = (u[:, 4] * 2 - 1) * h
        if j.random_order:
            order = torch.argsort(u[:, 5:9], dim=1)
        else:
            order = torch.arange(4, device=device).expand(n, 4).clone()
        off = (~p["jitter"])[:, None].expand(n, 4)
        for o, strength in enumerate((b, c, s, h)):  # TF skips ops of strength 0
            if strength == 0:  # (a host-side test: a device tensor of strengths would be a blocking copy)
                off = off | (order == o)
        p["order"] = torch.where(off, torch.full_like(order, NO_OP), order)
    else:
        p["jitter"] = torch.zeros(n, dtype=torch.bool, device=device)
        p["order"] = torch.full((n, 4), NO_OP, dtype=torch.int64, device=device)
    p["gray"] = u[:, 9] < spec.grayscale_p
    if spec.blur is not None:
        p["blur"] = u[:, 10] < spec.blur.p
        lo, hi = spec.blur.sigma
        # TF deviation: one sigma per sample; TF's batch_random_blur draws one sigma per batch.
        p["sigma"] = lo + u[:, 11] * (hi - lo)
    else:
        p["blur"] = torch.zeros(n, dtype=torch.bool, device=device)
        p["sigma"] = torch.ones(n, device=device)
    return p


_JITTER_OPS = {
    BRIGHTNESS: ("brightness", adjust_brightness),
    CONTRAST: ("contrast", adjust_contrast),
    SATURATION: ("saturation", adjust_saturation),
    HUE: ("hue", adjust_hue),
}

# CPU: photometric works on chunks of this many images so that the ~30 temporaries of an op stay
# in cache (measured ~2-4x faster per image than whole-batch ops on a 2-core machine).
CPU_CHUNK = 8
MODES = ("auto", "subset", "where", "fused")


def resolve_mode(mode: str, device) -> str:
    """``mode`` with "auto" made concrete for ``device``: fused on CUDA (compiled, no host sync),
    subset on the CPU (eager exact work: no compile cost on first use), where elsewhere."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    kind = torch.device(device).type
    return "fused" if kind == "cuda" else "subset" if kind == "cpu" else "where"


def _apply_where(y: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), out, y)


def _apply_subset(y: torch.Tensor, idx: torch.Tensor, fn) -> None:
    """y[idx] = fn(y[idx], idx), in place, for a 1-D index tensor (may be empty)."""
    if idx.numel() == 0:
        return
    if idx.numel() == y.shape[0]:
        y.copy_(fn(y, None))
        return
    y.index_copy_(0, idx, fn(y.index_select(0, idx), idx).to(y.dtype))


def _take(v: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return v if idx is None else v.index_select(0, idx)


def _jitter_subset(y: torch.Tensor, p: dict[str, torch.Tensor]) -> None:
    """Colour jitter on a (chunk) view y, in place: each op on exactly the samples that have it at
    position j. nonzero() syncs with the host: CPU only."""
    order = p["order"]
    for j in range(4):
        for o, (key, fn) in _JITTER_OPS.items():
            f = p[key]
            _apply_subset(y, (order[:, j] == o).nonzero().squeeze(1),
                          lambda t, idx, fn=fn, f=f: fn(t, _take(f, idx)).clamp_(0.0, 1.0))


def _jitter_where(y: torch.Tensor, p: dict[str, torch.Tensor], factors) -> torch.Tensor:
    """Colour jitter with no host sync: at each position every op runs on the whole batch and
    torch.where keeps it for the samples that have it there (4 positions x 4 ops)."""
    order = p["order"]
    for j in range(4):
        for o, (key, fn) in _JITTER_OPS.items():
            if not factors[o]:
                continue  # strength 0: never in `order`; skip the dead evaluation
            y = _apply_where(y, order[:, j] == o, fn(y, p[key]))
        y = y.clamp_(0.0, 1.0)  # unselected samples are already in [0, 1]
    return y


def photometric(x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None,
                params: dict[str, torch.Tensor] | None = None, return_params: bool = False,
                inplace: bool = False, mode: str = "auto"):
    """SimCLR colour augmentation of a batch: ``x`` [N, 3, H, W] float in [0, 1] -> same shape,
    dtype, device and memory format (channels_last stays channels_last).

    Per sample, in TF's order: with p=jitter.p brightness/contrast/saturation/hue in a random
    order, clipped to [0, 1] after each op; grayscale with p=grayscale_p; gaussian blur with
    p=blur.p, sigma ~ U(blur.sigma), ``blur.kernel_size(H)`` taps, then clipped; (opt-in)
    (x - mean) / std.

    Random op order, exact and without a loop over samples: ``order[n, j]`` is the op at position j
    of sample n (a uniform random permutation). ``mode`` picks the kernels; all give the same result:
      * "subset": for each position j and op o, op o runs on exactly the samples with
        ``order[:, j] == o`` (exact work; nonzero() syncs the host, fine on CPU; chunks of CPU_CHUNK
        images for cache locality). The reference the others are tested against.
      * "where": every op on the whole batch at every position, selected with torch.where (~4x the
        arithmetic, ~230 unfused passes, no host sync).
      * "fused": ``fused_photometry`` - the whole recipe as four compiled passes (torch.compile:
        Triton on CUDA, C++ on CPU; no host sync). The first call per image size / dtype compiles
        (seconds to a minute on a CPU, cached on disk); without a working compiler the same graphs
        run eagerly (slow, logged). float64 inputs use "subset" on CPU and "where" elsewhere.
      * "auto": fused on CUDA, subset on the CPU (no compile cost on first use), where elsewhere.
    bf16/fp16 inputs are computed in fp32 and returned in their dtype.

    ``generator`` must live on x's device. ``params`` (``sample_photometric_params``) replaces the
    random draw; ``return_params=True`` returns ``(out, params)``. ``inplace=True`` lets a float32
    input be overwritten (finish_views owns its buffer).
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W], got {tuple(x.shape)}")
    N, _, H, _ = x.shape
    if params is None:
        params = sample_photometric_params(N, spec, generator, device=x.device)
    mode = resolve_mode(mode, x.device)
    if mode == "fused" and x.dtype == torch.float64:  # the graphs compute in fp32
        mode = "subset" if x.device.type == "cpu" else "where"
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    in_dtype = x.dtype
    if mode == "fused":
        from .fused_photometry import fused_photometric
        # The graphs take float32 NCHW (one graph for every input dtype / layout: a conversion pass
        # here, none for float32 NCHW; finish_views feeds uint8 crops straight in).
        src = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        dst = src if (inplace or src is not x) else torch.empty_like(src)
        out = fused_photometric(src, spec, params, dst)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = out.to(dtype=in_dtype, memory_format=fmt)
        return (out, params) if return_params else out
    work = torch.float64 if in_dtype == torch.float64 else torch.float32
    if mode == "subset":  # plain NCHW: the per-channel ops are ~2x faster on it than channels_last
        y = x.to(dtype=work, memory_format=torch.contiguous_format)
    else:
        y = x.to(dtype=work)
    if y is x and not inplace:
        y = x.clone()

    if mode == "subset":
        if spec.jitter is not None:
            for s in range(0, N, CPU_CHUNK):
                e = min(s + CPU_CHUNK, N)
                _jitter_subset(y[s:e], {k: v[s:e] for k, v in params.items()})
        if spec.grayscale_p > 0:
            _apply_subset(y, params["gray"].nonzero().squeeze(1), lambda t, idx: to_grayscale(t))
        if spec.blur is not None:
            ks = spec.blur.kernel_size(H)
            idx = params["blur"].nonzero().squeeze(1)
            idx = idx[torch.argsort(params["sigma"][idx])]  # similar sigmas share a chunk: fewer taps
            for s in range(0, idx.numel(), CPU_CHUNK):
                _apply_subset(y, idx[s:s + CPU_CHUNK],
                              lambda t, i: gaussian_blur(t, _take(params["sigma"], i), ks).clamp_(0.0, 1.0))
    else:
        if spec.jitter is not None:
            y = _jitter_where(y, params, spec.jitter.factors)
        if spec.grayscale_p > 0:
            y = _apply_where(y, params["gray"], to_grayscale(y))
        if spec.blur is not None:
            blurred = gaussian_blur(y, params["sigma"], spec.blur.kernel_size(H)).clamp_(0.0, 1.0)
            y = _apply_where(y, params["blur"], blurred)
    if spec.normalize:
        mean = torch.tensor(spec.mean, dtype=work, device=y.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=work, device=y.device).view(1, 3, 1, 1)
        y = y.sub_(mean).div_(std)
    out = y.to(dtype=in_dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return (out, params) if return_params else out


class _HostBuffers(threading.local):
    """Per-thread cache of large CPU buffers, one per role (work / out), for finish_views. A fresh
    38.5 MB buffer (64 views of 224 px in float32) costs ~30 ms of page faults on every call; a
    reused one costs none. Reuse rule (the ``out`` role's buffer is what finish_views returns):

      a cached buffer is handed out again only when nothing outside this cache references its
      storage (the views returned last time, and every view or numpy array made from them, are
      gone) and it was never moved to shared memory (a DataLoader worker's result is: the other
      process still reads it). Otherwise it is dropped from the cache and a fresh one allocated.

    So a view you hold is never overwritten; its memory is recycled only after you let go of it.
    The price: the last work and out buffers stay allocated (2 x 38.5 MB for 64 views of 224 px in
    float32); ``release_buffers()`` frees them.
    """

    def __init__(self):
        self.bufs: dict[str, tuple] = {}

    def get(self, role: str, shape, dtype, memory_format) -> torch.Tensor:
        key = (tuple(shape), dtype, memory_format)
        entry = self.bufs.get(role)
        if entry is not None:
            ekey, buf, base = entry
            if ekey == key and base is not None and not buf.is_shared() and _storage_uses(buf) == base:
                return buf
            del self.bufs[role]
        buf = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        self.bufs[role] = (key, buf, _storage_uses(buf))
        return buf


def _storage_uses(t: torch.Tensor) -> int | None:
    """References to t's storage (tensors, views, this call's own handle); None where the torch
    build has no such counter (then nothing is ever reused)."""
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - private API changed or missing
        return None


_host_buffers = _HostBuffers()


def release_buffers() -> None:
    """Free this thread's cached finish_views buffers and fused-photometry scratch buffers."""
    from .fused_photometry import clear_buffers
    _host_buffers.bufs.clear()
    clear_buffers()


def finish_views(crops: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None, dtype,
                 device=None, mode: str = "auto", out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The last stage of every backend: uint8 crops ``[B, K, S, S, 3]`` (NHWC, any device) ->
    K views ``[B, 3, S, S]`` in ``dtype``, channels_last, on ``device`` (default: crops' device),
    values in [0, 1] (or normalized when spec.normalize).

    All B*K images go through ``photometric`` at once, view-major (images k*B..(k+1)*B-1 are view
    k), so each returned view is a contiguous channels_last slice of one buffer. ``generator`` must
    live on the target device. The host-to-device copy is non_blocking: pin ``crops`` for overlap.
    ``mode``: ``photometric``'s (data.photometry_mode); auto = fused on CUDA, subset on the CPU.
    "fused" reads the uint8 crops directly and writes the views in ``dtype``, channels_last: four
    passes in all (see fused_photometry).

    ``out``: optional ``[K*B, 3, S, S]`` tensor in ``dtype``, channels_last, on the target device,
    that receives the views (they are its slices): e.g. a shared-memory tensor allocated by a
    DataLoader worker, so the batch crosses to the main process without another copy.
    Otherwise, on the CPU, the float32 work buffer and the output are reused across calls under the
    rule of ``_HostBuffers``: the returned views are never overwritten while anything references them.
    """
    if crops.ndim != 5 or crops.shape[-1] != 3 or crops.dtype != torch.uint8:
        raise ValueError(f"expected uint8 [B, K, S, S, 3], got {crops.dtype} {tuple(crops.shape)}")
    if device is not None:
        crops = crops.to(device, non_blocking=True)
    B, K, S1, S2, _ = crops.shape
    cpu = crops.device.type == "cpu"
    mode = resolve_mode(mode, crops.device)
    shape = (K * B, 3, S1, S2)
    cl = torch.channels_last

    if out is not None and (tuple(out.shape) != shape or out.dtype != dtype or out.device != crops.device
                            or not out.is_contiguous(memory_format=cl)):
        raise ValueError(f"out must be {dtype} {shape} channels_last on {crops.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")

    def buffer(role, dt, fmt):
        if role == "out" and out is not None:
            return out
        return _host_buffers.get(role, shape, dt, fmt) if cpu else torch.empty(
            shape, dtype=dt, device=crops.device, memory_format=fmt)

    if spec.has_photometry and mode == "fused":
        from .fused_photometry import fused_photometric
        params = sample_photometric_params(K * B, spec, generator, device=crops.device)
        out = fused_photometric(crops, spec, params, buffer("out", dtype, cl))
        return list(out.split(B, dim=0))
    # CPU: photometric runs on plain NCHW (faster there); one final pass makes it channels_last.
    # GPU: channels_last from the start; the uint8 -> float copy is the only layout pass.
    fmt = torch.contiguous_format if (cpu and spec.has_photometry) else cl
    if spec.has_photometry or dtype != torch.float32:
        work = x = buffer("work", torch.float32, fmt)
    else:
        work, x = None, buffer("out", torch.float32, fmt)  # x is the result: the out role's rule applies
    # One fused pass: uint8 -> float, [B, K] -> view-major [K, B], NHWC -> x's layout.
    # TF deviation: the crops were resized and rounded in uint8 (TF resizes the float image), so
    # the colour ops see values quantized to 1/255 (<= 0.5/255 from TF's, before the ops).
    x.view(K, B, 3, S1, S2).copy_(crops.permute(1, 0, 4, 2, 3))
    x.mul_(1.0 / 255.0)  # TF convert_image_dtype: cast, then * (1 / 255)
    if spec.has_photometry:
        x = photometric(x, spec, generator, inplace=True, mode=mode)
    if x is work or not (x.dtype == dtype and x.is_contiguous(memory_format=cl)):
        x = buffer("out", dtype, cl).copy_(x)  # the work buffer never leaves
    return list(x.split(B, dim=0))
