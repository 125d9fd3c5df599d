"""The DALI graph of the DALI backend (loaders.backends.dali_loader): an AugmentSpec as DALI operators.

    encoded bytes -> decode once (mixed | cpu)  [or, roi_decode: ROI decode per view]
      -> K x (random-resized-crop bicubic + flip)  [eval: centre crop, resize]
      -> photometry "dali": the SimCLR colour ops as DALI ops with per-sample conditionals
         (photometry "torch": none here; loaders.augment runs on the uint8 crops afterwards)

Every op realizes TF's semantics where DALI allows and says so where it does not (``TF deviation``);
tests/test_dali_loader.py checks each colour op against loaders.augment. The only module besides
dali_loader that imports DALI.
"""
from __future__ import annotations

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from .. import augment
from ..augment.spec import AugmentSpec

INTERP = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}
# Largest ImageNet image sides: lets the A100/H100 hardware JPEG decoder preallocate once
# (the values NVIDIA's DALI ResNet-50 example uses).
HW_PREALLOC = dict(preallocate_width_hint=5980, preallocate_height_hint=6430)
# "dali" photometry: False = fn.hsv's fast linear hue approximation (documented deviation), True =
# TF's exact HSV hue shift from ~40 arithmetic ops (see hue_exact). The GPU benchmark decides.
EXACT_HUE = False



def _coin(p: float):
    """A per-sample boolean, True with probability p: the predicate of DALI's conditionals."""
    return fn.random.coin_flip(probability=float(p), dtype=types.BOOL)


def _uniform(lo: float, hi: float):
    """A per-sample U[lo, hi) scalar (a constant when lo == hi: DALI rejects an empty range)."""
    return fn.random.uniform(range=(float(lo), float(hi))) if hi > lo else float(lo)


def _hwc(x):
    """Re-attach the HWC layout: arithmetic drops it, and fn.hsv / fn.gaussian_blur need it (without
    it the blur would also run across the channel axis)."""
    return fn.reshape(x, layout="HWC")


def _clip01(x):
    return _hwc(dmath.clamp(x, 0.0, 1.0))


def _rint(x):
    """Round half to even (TF's tf.math.rint, numpy's rint) on a float node: 262.5 -> 262."""
    low = dmath.floor(x)
    frac = x - low
    odd = low - 2 * dmath.floor(low / 2)
    return low + _float(frac > 0.5) + _float(frac == 0.5) * odd


def _float(node):
    return fn.cast(node, dtype=types.FLOAT)


def _random_crop_area(spec: AugmentSpec):
    # Same effective area range as TF and the torch backend: TF's crop passes min_object_covered=0.1,
    # so crops cover at least 10 % of the image even though the spec's scale starts at 0.08.
    lo, hi = spec.crop.scale
    return (max(lo, augment.TF_MIN_OBJECT_COVERED), hi)


def views_geometry(encoded, spec: AugmentSpec, decoder: str, decoder_kw: dict, roi_decode: bool) -> list:
    """K uint8 HWC views of size S x S from the encoded images."""
    crop, S, K = spec.crop, spec.crop.size, spec.num_views
    interp = INTERP[crop.interpolation]
    # antialias=False everywhere: TF's tf.image.resize(BICUBIC) and the torch backend's OpenCV resize
    # do not antialias either. The cubic kernels of the three libraries need not share a coefficient
    # (TF a=-0.5, OpenCV a=-0.75: see augment.py); the eval test bounds the difference.
    if crop.random and roi_decode:
        # Decode only each view's region (libjpeg-turbo / nvJPEG ROI decode). Trades "decode once,
        # crop twice" for K partial decodes; which is faster is measured by benchmarks/throughput.py.
        views = [fn.resize(fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                                         random_area=_random_crop_area(spec),
                                                         random_aspect_ratio=crop.ratio,
                                                         num_attempts=crop.attempts, **decoder_kw),
                           size=(S, S), interp_type=interp, antialias=False)
                 for _ in range(K)]
    else:
        image = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, **decoder_kw)
        if crop.random:
            # TF deviation: DALI draws the area fraction uniformly and the aspect ratio log-uniformly
            # (like torchvision); TF and the torch backend draw the aspect uniformly on crop.ratio and
            # then the crop height uniformly. After crop.attempts failures (rare with 100) DALI uses
            # its own fallback crop; TF takes the whole image.
            views = [fn.random_resized_crop(image, size=(S, S), random_area=_random_crop_area(spec),
                                            random_aspect_ratio=crop.ratio, num_attempts=crop.attempts,
                                            interp_type=interp, antialias=False)
                     for _ in range(K)]
        else:
            # Eval, like TF's center_crop and the torch backend: a centred square of
            # round(center_fraction * shorter side), then resized to S (crop first, then resize).
            shape = fn.peek_image_shape(encoded)  # [H, W, C] from the header, on the CPU
            side = dmath.max(_rint(dmath.min(shape[0], shape[1]) * crop.center_fraction), 1.0)
            square = fn.crop(image, crop_h=side, crop_w=side)  # centred: crop_pos_x = crop_pos_y = 0.5
            view = fn.resize(square, size=(S, S), interp_type=interp, antialias=False)
            views = [view] * K if K > 1 else [view]
    if spec.flip:
        views = [fn.flip(v, horizontal=fn.random.coin_flip(probability=0.5)) for v in views]
    return views


# The colour ops on float HWC in [0, 1]; ``factor`` is a per-sample scalar node or a Python float.
# Each is followed by a clip to [0, 1], as after every op of TF's color_jitter.

def brightness(x, factor):
    """TF impl simclrv2: ``x * factor`` (multiplicative), exactly."""
    return _clip01(x * factor)


def contrast(x, factor):
    """Exactly tf.image.adjust_contrast: ``(x - mean) * factor + mean`` with the per-image,
    per-channel mean. (fn.brightness_contrast would pivot around a fixed grey, 0.5 for float, not the
    image mean; a reduction plus arithmetic avoids that deviation.)"""
    mean = fn.reductions.mean(x, axes=[0, 1])  # [3] per sample, broadcast over H, W
    return _clip01((x - mean) * factor + mean)


def saturation(x, factor):
    """Exactly tf.image.adjust_saturation (HSV: s -> min(s * f, 1), hue and value kept) in closed
    form, as augment.adjust_saturation: each channel is V - C * w(hue), so scaling S scales V - x by
    min(f, V / C)."""
    v = fn.reductions.max(x, axes=[2], keep_dims=True)
    chroma = v - fn.reductions.min(x, axes=[2], keep_dims=True)
    ratio = dmath.min(factor, v / dmath.max(chroma, 1e-12))  # gray pixels: V - x == 0, ratio is moot
    return _clip01(v - (v - x) * ratio)


def hue(x, degrees):
    """TF deviation: fn.hsv rotates colours around the grey axis by one linear (YIQ-like) transform,
    an approximation of tf.image.adjust_hue's exact shift of the HSV hue. Same delta as TF (U[-h, h]
    turns, here in degrees). Measured against augment.adjust_hue on textured images: mean abs
    difference 0.065 per channel at 18 degrees, 0.10 at 30. ``EXACT_HUE`` selects ``hue_exact``."""
    if EXACT_HUE:
        return _clip01(hue_exact(x, degrees / 360.0))
    return _clip01(fn.hsv(x, hue=degrees, dtype=types.FLOAT))


def hue_exact(x, delta):
    """tf.image.adjust_hue exactly (as augment.adjust_hue): RGB -> (hue in [0, 6), value V, chroma C)
    -> hue + 6 * delta -> RGB, channel n = V - C * clamp(min(k, 4 - k), 0, 1), k = (hue + n) mod 6
    for n = 5, 3, 1. About 40 elementwise ops: many times fn.hsv's time on the CPU, cheap on a GPU."""
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    v = dmath.max(dmath.max(r, g), b)
    c = v - dmath.min(dmath.min(r, g), b)
    safe = c + _float(c <= 0)  # grey pixels (C == 0) come out as V whatever the hue
    is_r = _float(v == r)  # TF's sector choice: r is the max, else g, else b
    is_g = _float(v == g) * (1 - is_r)
    h = is_r * ((g - b) / safe) + is_g * ((b - r) / safe + 2) + (1 - is_r - is_g) * ((r - g) / safe + 4)
    h = h + 6 * delta
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = h + n
        k = k - 6 * dmath.floor(k / 6)
        channels.append(v - c * dmath.clamp(dmath.min(k, 4 - k), 0.0, 1.0))
    return _hwc(fn.stack(*channels, axis=2))


def grayscale(x):
    """tf.image.rgb_to_grayscale with 3 channels kept: luma with TF's weights (0.2989, 0.5870,
    0.1140) in all three, exactly. (fn.hsv(saturation=0) would use 0.299/0.587/0.114 and leave the
    channels unequal by ~1e-3.)"""
    wr, wg, wb = augment.GRAY_WEIGHTS
    y = x[:, :, 0] * wr + x[:, :, 1] * wg + x[:, :, 2] * wb
    return _hwc(fn.stack(y, y, y, axis=2))


def color_jitter(x, spec: AugmentSpec):
    """TF color_jitter (impl simclrv2) with the spec's strengths; factors drawn per sample, lower
    bounds clamped at 0 (as augment.sample_photometric_params); ops of strength 0 skipped (as TF).

    TF deviation: TF applies the four ops in a random order per image; DALI cannot permute ops per
    sample cheaply (it would take 16 conditional branches), so the order is fixed: brightness,
    contrast, saturation, hue (TF's order when random_order=False).
    """
    b, c, s, h = spec.jitter.factors
    if b > 0:
        x = brightness(x, _uniform(max(1 - b, 0), 1 + b))
    if c > 0:
        x = contrast(x, _uniform(max(1 - c, 0), 1 + c))
    if s > 0:
        x = saturation(x, _uniform(max(1 - s, 0), 1 + s))
    if h > 0:
        x = hue(x, _uniform(-360.0 * h, 360.0 * h))
    return x


def dali_photometry(view, spec: AugmentSpec):
    """uint8 HWC crop -> float HWC in [0, 1] (or normalized), SimCLR colour ops with per-sample
    conditionals (enable_conditionals=True): ``if coin:`` runs the branch on that sample only."""
    x = _hwc(fn.cast(view, dtype=types.FLOAT) * (1.0 / 255.0))  # TF convert_image_dtype
    if spec.jitter is not None and spec.jitter.p > 0:
        if _coin(spec.jitter.p):
            x = color_jitter(x, spec)
    if spec.grayscale_p > 0:
        if _coin(spec.grayscale_p):
            x = grayscale(x)
    if spec.blur is not None and spec.blur.p > 0:
        if _coin(spec.blur.p):
            # sigma ~ U(0.1, 2) per sample, window = 10 % of the side made odd (23 taps at 224).
            # TF deviation: DALI pads the border by reflection (reflect-101); TF (and the torch backend)
            # zero-pad ('SAME' depthwise conv), which darkens a ~11 px frame slightly.
            x = fn.gaussian_blur(x, window_size=spec.blur.kernel_size(spec.crop.size),
                                 sigma=_uniform(*spec.blur.sigma))
    if spec.normalize:
        x = _hwc((x - types.Constant(np.float32(spec.mean))) / types.Constant(np.float32(spec.std)))
    return x


@pipeline_def(enable_conditionals=True)
def simclr_pipeline(source, spec: AugmentSpec, gpu: bool, photometry: str, roi_decode: bool,
                    decoder_kw: dict):
    """Outputs: global sample indices (int64 [B], CPU), labels (int64 [B]), then spec.num_views views
    (HWC; uint8 when photometry == "torch", float32 when "dali"). Labels and views are on the GPU
    when ``gpu`` (DALI copies the labels in its own stream: no pageable host-to-device copy, which
    would sync the host, in the training loop)."""
    encoded, indices, labels = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                                  dtype=[types.UINT8, types.INT64, types.INT64],
                                                  ndim=[1, 0, 0])
    decoder = "mixed" if gpu else "cpu"  # chosen here, at build time: "mixed" needs a CUDA driver
    views = views_geometry(encoded, spec, decoder, decoder_kw, roi_decode)
    if photometry == "dali":
        views = [dali_photometry(v, spec) for v in views]
    return (indices, labels.gpu() if gpu else labels, *views)
