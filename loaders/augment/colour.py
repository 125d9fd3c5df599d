"""The colour ops of the SimCLR recipe on ``[N, 3, H, W]`` float tensors in [0, 1] (any device), with
per-sample factors of shape [N]: TF's adjust_brightness (SimCLRv2's multiplicative form),
adjust_contrast, adjust_saturation and adjust_hue in closed forms, rgb_to_grayscale, and the separable
gaussian blur with zero padding. Each matches TF's kernels (tests/test_augment.py). ``loaders.augment``
applies them with per-sample random order and masks, and re-exports these names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# tf.image.rgb_to_grayscale (ITU-R 601-2 luma, TF's rounding of the constants).
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
# Op codes of the colour jitter, in TF's non-random order (a sample's ``order`` row holds them; NO_OP
# where jitter is off or an op's strength is 0).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
NO_OP = -1



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
    """k mod 6 in [0, 6), in place (the floor form: cheaper than torch.remainder on CPU)."""
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
    GPU path), "taps" (a shifted multiply-add per tap, skipping taps < 1e-9: faster than
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
