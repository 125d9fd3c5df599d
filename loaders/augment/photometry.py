"""The colour recipe on whole batches (``photometric``, ``apply``: subset / where / fused kernels) and
``finish_views``, the last stage of every backend (uint8 crops -> finished views). See the package
docstring (loaders.augment) for the two stages and the TF deviations."""
from __future__ import annotations

import threading

import torch

from .colour import (BRIGHTNESS, CONTRAST, HUE, NO_OP, SATURATION, adjust_brightness, adjust_contrast,
                     adjust_hue, adjust_saturation, gaussian_blur, to_grayscale)
from .spec import AugmentSpec


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
# in cache (docs/benchmarks.md has the measurement).
CPU_CHUNK = 8
MODES = ("auto", "subset", "where", "fused")


def resolve_mode(mode: str, device, dtype: torch.dtype = torch.float32) -> str:
    """The colour-op kernels ``mode`` means on ``device`` for inputs of ``dtype``: "auto" is fused on
    CUDA (compiled, no host sync), subset on the CPU (exact eager work, no compile cost), where
    elsewhere; the fused graphs compute in fp32, so float64 inputs take subset (CPU) or where. The one
    place a mode is made concrete: a loader resolves its ``data.photometry_mode`` once."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    kind = torch.device(device).type
    if mode == "auto":
        mode = "fused" if kind == "cuda" else "subset" if kind == "cpu" else "where"
    if mode == "fused" and dtype == torch.float64:
        mode = "subset" if kind == "cpu" else "where"
    return mode


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
      * "fused": ``loaders.augment.fused`` - the whole recipe as four compiled passes (torch.compile:
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
    if params is None:
        params = sample_photometric_params(x.shape[0], spec, generator, device=x.device)
    mode = resolve_mode(mode, x.device, x.dtype)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    in_dtype = x.dtype
    work = torch.float64 if in_dtype == torch.float64 else torch.float32
    # subset runs on plain NCHW (its per-channel ops are faster there), fused takes float32 NCHW
    # (one graph for every input dtype and layout); where keeps the input's layout.
    y = x.to(dtype=work, memory_format=torch.contiguous_format) if mode != "where" else x.to(dtype=work)
    if y is x and not inplace:
        y = x.clone()
    y = apply(mode, y, spec, params, y)
    out = y.to(dtype=in_dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return (out, params) if return_params else out


def apply(mode: str, src: torch.Tensor, spec: AugmentSpec, params: dict[str, torch.Tensor],
          out: torch.Tensor) -> torch.Tensor:
    """The one dispatch of the colour recipe: write the photometry of ``src`` into ``out`` with the
    kernels of ``mode`` (concrete: resolve_mode's) and return it. ``src``: float [N, 3, H, W] in [0, 1]
    (subset and where work in place: ``out`` is ``src``), or for "fused" also the uint8 crops
    [B, K, H, W, 3] that finish_views hands over (the graphs read them directly)."""
    if mode == "fused":
        from .fused import fused_photometric
        return fused_photometric(src, spec, params, out)
    if out is not src:
        raise ValueError(f"mode {mode!r} works in place: out must be src")
    y = src
    N, _, H, _ = y.shape
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
    elif mode == "where":
        if spec.jitter is not None:
            y = _jitter_where(y, params, spec.jitter.factors)
        if spec.grayscale_p > 0:
            y = _apply_where(y, params["gray"], to_grayscale(y))
        if spec.blur is not None:
            blurred = gaussian_blur(y, params["sigma"], spec.blur.kernel_size(H)).clamp_(0.0, 1.0)
            y = _apply_where(y, params["blur"], blurred)
    else:
        raise ValueError(f"mode must be subset, where or fused, got {mode!r}")
    if spec.normalize:
        mean = torch.tensor(spec.mean, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
        y = y.sub_(mean).div_(std)
    return y


class _HostBuffers(threading.local):
    """Per-thread cache of large CPU buffers, one per role (work / out), for finish_views. A fresh
    buffer (tens of MB for a batch of 224 px views) costs its page faults on every call; a reused one
    costs none. Reuse rule (the ``out`` role's buffer is what finish_views returns):

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
    from .fused import clear_buffers
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
    passes in all (see loaders.augment.fused).

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
    mode = resolve_mode(mode, crops.device)  # a loader passes its resolved mode: this changes nothing
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

    if spec.has_photometry and mode == "fused":  # the graphs read the uint8 crops and write the views
        params = sample_photometric_params(K * B, spec, generator, device=crops.device)
        return list(apply(mode, crops, spec, params, buffer("out", dtype, cl)).split(B, dim=0))
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


def warmup(spec: AugmentSpec, batch: int, dtype=torch.float32, device="cpu") -> None:
    """Compile (or load from inductor's disk cache) the graphs ``finish_views(mode="fused")`` needs
    for ``spec`` at this output dtype, so the cost is not paid by the first batch. On a CPU call it
    in the main process with the thread count the workers will use (torch.set_num_threads(1)) before
    DataLoader workers fork: forked workers inherit the compiled graphs."""
    S = spec.size
    crops = torch.zeros((batch, spec.num_views, S, S, 3), dtype=torch.uint8, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    finish_views(crops, spec, gen, dtype, mode="fused")
