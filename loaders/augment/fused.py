"""Fused photometry: ``augment.photometric`` (and ``finish_views``) as a few compiled passes.

Same AugmentSpec, same random draw (``augment.sample_photometric_params``), same TF semantics as the
exact-subset oracle ``photometric(mode="subset")``; no host sync and no Python loop over samples.

Why it fuses: every jitter op is one per-pixel formula with per-sample parameters. With V = max,
C = max - min, h = TF's hue sector coordinate (``colour._hue_value_chroma``) and
t_c(h) = clamp(min(k, 4 - k), 0, 1), k = (h + n_c) mod 6, n = (5, 3, 1) (``colour._from_hue_value_chroma``):

    out_c = clamp(alpha * (V - kappa * t_c(h + delta)) + beta_c, 0, 1),  kappa = min(s * C, V)

    brightness  alpha = f, s = 1, delta = 0,          beta = 0
    saturation  alpha = 1, s = f, delta = 0,          beta = 0       (min(f C, V): TF's clip(S f, 0, 1))
    hue         alpha = 1, s = 1, delta = 6 * delta,  beta = 0
    contrast    alpha = f, s = 1, delta = 0,          beta_c = (1 - f) * mean_c

(s = 1 reproduces the pixel: kappa = C.) Only contrast needs more than the pixel: the per-image
channel means of the image *as it is when contrast runs*. Each sample runs contrast at most once,
so the jitter is two passes over the pixels:

  pass 1  recompute the ops before each sample's contrast position (at most 3), reduce to 3 means
          (accumulated in float64: an fp32 sum over a whole image drifts, and contrast amplifies the
          drift past the tolerance the tests hold the graphs to);
  pass 2  all 4 positions + grayscale, written into a zero-bordered scratch buffer;

then the blur (separable, per-sample sigma, TF zero padding) as two more passes over pre-padded
buffers (masked border loads would stop the CPU code from vectorizing), clip, normalize, and the
final store in the output dtype, channels_last, straight into the caller's buffer. Per-position
parameters are gathered from ``params["order"]`` into a small [N, 4, 6] table with torch ops
(``jitter_table``); samples without blur get the identity kernel, so nothing depends on the data.

Two compiled graphs (``torch.compile``, inductor: Triton on CUDA, C++/OpenMP on CPU):
``_jitter_graph`` (uint8 crops or float images -> scratch) and ``_blur_graph`` (scratch -> output).
Inductor does not emit exactly that on a CPU: the three means reduce in three loops and the jitter
output and the horizontal blur go through a temporary before their padded buffer. On a CPU it is
no faster than the eager subset path (docs/benchmarks.md) and its first call compiles (slowly; from
inductor's disk cache, ``TORCHINDUCTOR_CACHE_DIR``, faster), so ``augment`` uses this path by default
only on CUDA; on the CPU it is opt-in (``mode="fused"``).

Graphs are specialized on image size, kernel size, input kind and output dtype/layout, not on the
batch size: the batch dim is dynamic (size-oblivious) and a batch of 1 runs as 2 images, so one
graph serves batches 1, 7 and 512. When ``torch.compile`` is unusable (no Triton / no C++ compiler,
or ``FASTCLR_FUSED_EAGER=1``) the same functions run eagerly: identical numbers, but every op is a
full pass (slow; logged once).
"""
from __future__ import annotations

import logging
import os
import threading

import torch
import torch.fx.experimental._config as _fx_config

from .colour import BRIGHTNESS, CONTRAST, GRAY_WEIGHTS, HUE, SATURATION, gaussian_kernels
from .spec import AugmentSpec

log = logging.getLogger(__name__)

# Columns of the per-position jitter table [N, 4, TABLE_COLS].
ON, ON_BEFORE_CONTRAST, ALPHA, SAT, DELTA, BETA = range(6)
TABLE_COLS = 6


# ----------------------------------------------------------------------------------------------
# Per-sample parameters -> dense tensors (torch ops on the params' device, no host sync)
# ----------------------------------------------------------------------------------------------

def jitter_table(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 [N, 4, 6]: for each sample and position j, (on, on_before_contrast, alpha, s, delta,
    beta_coef) of the op ``params["order"][:, j]`` in the unified formula (module docstring);
    beta_coef = 1 - f for contrast (beta_c = beta_coef * mean_c), else 0. NO_OP positions have on = 0."""
    order = params["order"]
    n = order.shape[0]
    dev = order.device
    f32 = {"dtype": torch.float32, "device": dev}
    pos = torch.arange(4, device=dev)
    is_c = order == CONTRAST
    # Position of contrast (4 = none): the ops before it are what pass 1 recomputes.
    pos_c = torch.where(is_c.any(1), (is_c * pos).sum(1), 4)
    one = torch.ones((n, 4), **f32)
    fb, fc, fs, fh = (params[k].to(**f32).reshape(n, 1).expand(n, 4) if k in params else one  # no jitter spec
                      for k in ("brightness", "contrast", "saturation", "hue"))
    zero = torch.zeros((n, 4), **f32)
    on = order >= 0
    cols = [None] * TABLE_COLS
    cols[ON] = on.to(torch.float32)
    cols[ON_BEFORE_CONTRAST] = (on & (pos < pos_c[:, None])).to(torch.float32)
    cols[ALPHA] = torch.where(order == BRIGHTNESS, fb, torch.where(is_c, fc, one))
    cols[SAT] = torch.where(order == SATURATION, fs.clamp_min(0.0), one)  # adjust_saturation clamps f at 0
    cols[DELTA] = torch.where(order == HUE, 6.0 * fh, zero)
    cols[BETA] = torch.where(is_c, 1.0 - fc, zero)
    return torch.stack(cols, 2).contiguous()


def kernel_size(spec: AugmentSpec, height: int) -> int:
    """Blur taps of the graphs: spec.blur.kernel_size(H), or 1 (no blur pass) when blur is off."""
    return spec.blur.kernel_size(height) if spec.blur is not None else 1


def blur_weights(params: dict[str, torch.Tensor], ksize: int) -> torch.Tensor:
    """float32 [N, ksize]: ``augment.gaussian_kernels(sigma)`` for samples with ``params["blur"]``,
    the identity kernel (1 at the centre, exact zeros elsewhere) for the others."""
    sigma = params["sigma"].to(torch.float32)
    n = sigma.shape[0]
    if ksize == 1:
        return torch.ones((n, 1), dtype=torch.float32, device=sigma.device)
    w = gaussian_kernels(sigma, ksize)
    ident = torch.zeros(ksize, dtype=torch.float32, device=sigma.device)
    ident[ksize // 2] = 1.0
    return torch.where(params["blur"].reshape(n, 1), w, ident)


# ----------------------------------------------------------------------------------------------
# The graphs (plain torch; compiled below)
# ----------------------------------------------------------------------------------------------

def _op(r, g, b, alpha, s, delta, beta):
    """One jitter op, the unified formula, on channel planes [N, H, W] (params broadcast [N, 1, 1])."""
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    # colour._hue_value_chroma with the same sector priority (r is max, else g, else b).
    h = torch.where(r == v, g - b, torch.where(g == v, (b - r) + 2.0 * c, (r - g) + 4.0 * c))
    h = h / c.clamp_min(1e-12)
    kappa = torch.minimum(s * c, v)
    out = []
    for i, n in enumerate((5.0, 3.0, 1.0)):
        k = h + (delta + n)
        k = k - torch.floor(k * (1.0 / 6.0)) * 6.0  # mod 6, colour._mod6's floor form
        t = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
        out.append((alpha * (v - kappa * t) + beta[i]).clamp(0.0, 1.0))
    return out


def _jitter_graph(src: torch.Tensor, table: torch.Tensor, gray: torch.Tensor, dst: torch.Tensor,
                  jitter: bool) -> None:
    """Colour jitter (random order, clip after each op) and grayscale: ``src`` -> interior of the
    zero-bordered ``dst`` float32 [N, 3, H, W + 2R] (columns R..R+W-1; the borders are not written).

    ``src``: uint8 crops [B, K, H, W, 3] (NHWC; image k*B + b is crops[b, k], view-major; x / 255 as
    TF's convert_image_dtype, * (1 / 255)) or float32 NCHW [N, 3, H, W] in [0, 1]. ``table``
    [N, 4, 6] (``jitter_table``), ``gray`` bool [N]."""
    if src.dtype == torch.uint8:
        B, K, H, W, _ = src.shape
        x = src.permute(1, 0, 4, 2, 3).reshape(K * B, 3, H, W).to(torch.float32) * (1.0 / 255.0)
    else:
        x = src.to(torch.float32)
    H, W = x.shape[2], x.shape[3]
    R = (dst.shape[3] - W) // 2
    r, g, b = x.unbind(1)
    if jitter:
        col = [[table[:, j, q, None, None] for q in range(TABLE_COLS)] for j in range(4)]
        zero = (0.0, 0.0, 0.0)
        # Pass 1: the image as it is when contrast runs (later positions are off here), its means.
        pr, pg, pb = r, g, b
        for j in range(3):
            nr, ng, nb = _op(pr, pg, pb, col[j][ALPHA], col[j][SAT], col[j][DELTA], zero)
            on = col[j][ON_BEFORE_CONTRAST] > 0.5
            pr, pg, pb = torch.where(on, nr, pr), torch.where(on, ng, pg), torch.where(on, nb, pb)
        inv = 1.0 / (H * W)
        mean = [(p.to(torch.float64).sum(dim=(1, 2)) * inv).to(torch.float32)[:, None, None]
                for p in (pr, pg, pb)]
        # Pass 2: all four positions.
        for j in range(4):
            beta = [col[j][BETA] * m for m in mean]
            nr, ng, nb = _op(r, g, b, col[j][ALPHA], col[j][SAT], col[j][DELTA], beta)
            on = col[j][ON] > 0.5
            r, g, b = torch.where(on, nr, r), torch.where(on, ng, g), torch.where(on, nb, b)
    wr, wg, wb = GRAY_WEIGHTS
    gy = r * wr + g * wg + b * wb
    gm = gray[:, None, None]
    y = torch.stack([torch.where(gm, gy, r), torch.where(gm, gy, g), torch.where(gm, gy, b)], 1)
    if R:
        dst[..., R:R + W].copy_(y)
    else:
        dst.copy_(y)


def _blur_graph(src: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                tmp: torch.Tensor, out: torch.Tensor) -> None:
    """Separable blur with per-sample taps ``w`` [N, K] (identity rows: no blur), clip, (y - mean) /
    std, store into ``out`` [N, 3, H, W] (any dtype / layout). ``src`` = [N, 3, H, W + 2R] with zero
    borders; ``tmp`` = [N, 3, H + 2R, W] with zero borders (R = K // 2; both unused when K == 1).
    Tap order as colour._blur_taps: centre first, then left to right."""
    H, W = out.shape[2], out.shape[3]
    K = w.shape[1]
    R = K // 2
    if K > 1:
        wt = w.reshape(-1, 1, 1, 1, K)
        acc = src[..., R:R + W] * wt[..., R]
        for t in range(K):
            if t != R:
                acc = acc + src[..., t:t + W] * wt[..., t]
        tmp[:, :, R:R + H, :].copy_(acc)
        acc = tmp[:, :, R:R + H, :] * wt[..., R]
        for t in range(K):
            if t != R:
                acc = acc + tmp[:, :, t:t + H, :] * wt[..., t]
        y = acc.clamp(0.0, 1.0)
    else:
        y = src
    out.copy_((y - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1))


# ----------------------------------------------------------------------------------------------
# Compilation, scratch buffers
# ----------------------------------------------------------------------------------------------

_GRAPHS = {"jitter": _jitter_graph, "blur": _blur_graph}
_BATCH_ARGS = {"jitter": (0, 1, 2, 3), "blur": (0, 1, 4, 5)}  # positions of the [N, ...] tensors
_compiled: dict[tuple[str, str], object] = {}
_compile_lock = threading.Lock()
_compile_failed = False


def _use_eager() -> bool:
    return _compile_failed or os.environ.get("FASTCLR_FUSED_EAGER", "") not in ("", "0")


def _graph(name: str):
    """The compiled graph ``name`` (created once per process; inductor caches the code on disk)."""
    # FASTCLR_FUSED_BACKEND: torch.compile's backend (inductor; "eager" or "aot_eager" trace the same
    # graphs without generating code: how the CPU tests check them quickly, and how to isolate a codegen bug)
    backend = os.environ.get("FASTCLR_FUSED_BACKEND", "inductor")
    with _compile_lock:
        if (name, backend) not in _compiled:
            _compiled[name, backend] = torch.compile(_GRAPHS[name], fullgraph=True, dynamic=False, backend=backend)
        return _compiled[name, backend]


def _run(name: str, args: tuple, kwargs: dict | None = None):
    """Run graph ``name`` compiled; where compiling is impossible, eagerly (same numbers), logged once."""
    global _compile_failed
    kwargs = kwargs or {}
    if _use_eager():
        return _GRAPHS[name](*args, **kwargs)
    # One graph for every batch size: dim 0 of the batch tensors is dynamic, and size-oblivious so
    # that a batch of 1 does not get a specialized graph of its own (all batch dims are equal, so
    # nothing broadcasts over them).
    for i in _BATCH_ARGS[name]:
        torch._dynamo.maybe_mark_dynamic(args[i], 0)
    try:
        with _fx_config.patch(backed_size_oblivious=True):
            return _graph(name)(*args, **kwargs)
    except Exception as e:  # no Triton / no C++ toolchain / inductor bug: stay correct
        if not _is_compile_error(e):
            raise
        log.warning("fused photometry: torch.compile failed (%s: %s); running the same graphs eagerly "
                    "(correct but slow; data.photometry_mode=subset or where avoids this)",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        _compile_failed = True
        return _GRAPHS[name](*args, **kwargs)


def _is_compile_error(e: Exception) -> bool:
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "Compile" in type(e).__name__


_const_cache: dict[tuple, tuple] = {}


def _constants(mean_std: tuple, device: torch.device) -> tuple:
    """(mean, std) float32 [3] tensors on ``device``, made once: a fresh torch.tensor(list) on a GPU
    is a blocking host-to-device copy (a host sync in every call)."""
    key = (mean_std, str(device))
    if key not in _const_cache:
        _const_cache[key] = tuple(torch.tensor(v, dtype=torch.float32).to(device) for v in mean_std)
    return _const_cache[key]


class _Scratch(threading.local):
    """Zero-bordered float32 scratch buffers, per thread (and, on CUDA, per stream), reused across
    calls of the same shape: they never leave this module, and on the CPU a fresh buffer costs its
    page faults on every call. The graphs only write interiors, so borders zeroed once stay zero."""

    def __init__(self):
        self.bufs: dict[tuple, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], device: torch.device, pad_dim: int, R: int) -> torch.Tensor:
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (tuple(shape), str(device), stream, pad_dim, R)
        buf = self.bufs.get(key)
        if buf is None:
            for k in [k for k in self.bufs if k[1:] == key[1:]]:  # one batch size per key: drop old
                del self.bufs[k]
            buf = torch.empty(shape, dtype=torch.float32, device=device)
            if R:
                buf.narrow(pad_dim, 0, R).zero_()
                buf.narrow(pad_dim, shape[pad_dim] - R, R).zero_()
            self.bufs[key] = buf
        return buf


_scratch = _Scratch()


def clear_buffers() -> None:
    """Release this thread's scratch buffers (they are reused across calls of the same shape)."""
    _scratch.bufs.clear()


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def fused_photometric(src: torch.Tensor, spec: AugmentSpec, params: dict[str, torch.Tensor],
                      out: torch.Tensor) -> torch.Tensor:
    """Write the photometry of ``src`` into ``out`` [N, 3, H, W] (any float dtype and layout) and
    return it. ``src``: uint8 crops [B, K, H, W, 3] (view-major output, as finish_views) or float32
    NCHW-contiguous [N, 3, H, W] in [0, 1]. ``params``: ``augment.sample_photometric_params`` for the
    N = B*K images, on src's device. No host sync."""
    crops = src.dtype == torch.uint8
    if src.shape[0] == 1:
        # A batch of 1 runs as 2 (the image twice): dynamo would give size 1 a graph of its own.
        k = src.shape[1] if crops else 1
        two = torch.empty((2 * k, *out.shape[1:]), dtype=out.dtype, device=out.device)
        two = two.contiguous(memory_format=_memory_format(out))
        # crops: view-major rows k*2 + b, so image k (row k of out) goes to rows 2k and 2k + 1.
        params = {key: v.repeat_interleave(2, dim=0) for key, v in params.items()}
        fused_photometric(torch.cat([src, src]), spec, params, two)
        return out.copy_(two[0::2])
    N, _, H, W = out.shape
    dev = src.device
    ks = kernel_size(spec, H)
    R = ks // 2
    table = jitter_table(params)
    gray = params["gray"].to(torch.bool)
    pad_w = _scratch.get((N, 3, H, W + 2 * R), dev, 3, R)
    _run("jitter", (src, table, gray, pad_w), {"jitter": spec.jitter is not None})
    w = blur_weights(params, ks)
    # (y - 0) / 1 is exact: one graph with or without normalization.
    mean, std = _constants((spec.mean, spec.std) if spec.normalize else ((0.0,) * 3, (1.0,) * 3), dev)
    pad_h = _scratch.get((N, 3, H + 2 * R, W), dev, 2, R) if R else pad_w
    _run("blur", (pad_w, w, mean, std, pad_h, out))
    return out


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format
