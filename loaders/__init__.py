"""Data loading backends for fastclr. ``import loaders`` never imports DALI or FFCV: a backend's
module is imported only when that backend is built.

    loader = loaders.build(cfg, rank, world_size, device)   # cfg: loaders.LoaderConfig
    for epoch in range(E):
        loader.set_epoch(epoch)
        for batch in loader:          # Batch(views=[B,3,H,W] x K, labels=int64[B] | None)
            ...
"""
from __future__ import annotations

import importlib

from .base import Batch  # noqa: F401
from .config import LoaderConfig  # noqa: F401
from .sources.folders import find_classes, list_image_folder  # noqa: F401
from .augment.spec import AugmentSpec, preset  # noqa: F401

# backend name -> (module, builder function). Imported lazily.
BACKENDS = {
    "torch": ("loaders.backends.torch_loader", "build_torch_loader"),
    "dali": ("loaders.backends.dali_loader", "build_dali_loader"),
    "ffcv": ("loaders.backends.ffcv_loader", "build_ffcv_loader"),
}

INSTALL_HINT = {
    "dali": "pip install 'fastclr[dali]'  (nvidia-dali-cuda130; nvidia-dali-cuda120 for drivers < 580)",
    "ffcv": "apt-get install libturbojpeg0-dev libopencv-dev pkg-config && pip install 'fastclr[ffcv]'",
}


def available(name: str) -> tuple[bool, str]:
    """(usable, reason) for a backend, without building anything."""
    if name not in BACKENDS:
        return False, f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}"
    dep = {"dali": "nvidia.dali", "ffcv": "ffcv", "torch": "torchvision"}[name]
    try:
        importlib.import_module(dep)
    except Exception as e:  # ImportError, or a broken native library
        return False, f"{dep} not importable ({type(e).__name__}: {e}); install: {INSTALL_HINT.get(name, dep)}"
    return True, ""


def spec_from_config(cfg: LoaderConfig) -> AugmentSpec:
    """The AugmentSpec a LoaderConfig asks for (preset + size, crop range and flip, and for simclr its
    strength and blur)."""
    lo, hi = cfg.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {cfg.crop_scale}")
    if cfg.augment == "simclr":
        spec = preset("simclr", size=cfg.image_size, strength=cfg.jitter_strength,
                      blur_p=0.5 if cfg.blur else 0.0, scale=(lo, hi))
    elif cfg.augment == "finetune":
        spec = preset("finetune", size=cfg.image_size, scale=(lo, hi))
    else:
        return preset(cfg.augment, size=cfg.image_size)
    return spec if cfg.flip else spec.replace(flip=False)


def build(cfg: LoaderConfig, rank: int = 0, world_size: int = 1, device="cpu", spec: AugmentSpec | None = None):
    """Build the loader ``cfg.backend`` for this rank. ``spec`` defaults to ``spec_from_config(cfg)``."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown data.backend {cfg.backend!r}; choose one of {sorted(BACKENDS)}")
    ok, why = available(cfg.backend)
    if not ok:
        raise RuntimeError(f"backend {cfg.backend!r} unavailable: {why}")
    if spec is None:
        spec = spec_from_config(cfg)
    module, fn = BACKENDS[cfg.backend]
    return getattr(importlib.import_module(module), fn)(cfg, spec, rank=rank, world_size=world_size, device=device)
