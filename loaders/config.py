"""The ``data`` options and a backend's build arguments.

* ``DataConfig``: the user's ``data`` section (``--data.backend=dali``, ...), every field with its
  default, help, choices or range, and, for backend- or recipe-specific fields, the condition under
  which it applies (``loaders.options``: an option typed where it does not apply is refused).
* ``LoaderConfig``: what ``loaders.build`` takes: a DataConfig plus what the entry point derives and
  the user does not set in this section (images per rank from ``optim.global_batch_size``, shuffling,
  the seed from ``run.seed``, the views' dtype from ``run.precision``). ``loader_config(data, ...)``
  makes one; the user's fields are copied, never overridden.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from .options import option

# The conditions of the backend- and recipe-specific fields (loaders.options: option(applies=...)).
TORCH, DALI, FFCV = ("data.backend", ("torch",)), ("data.backend", ("dali",)), ("data.backend", ("ffcv",))
SIMCLR = ("data.augment", ("simclr",))


def _workers(cfg) -> Optional[str]:
    """data.timeout's condition: the torch backend with DataLoader workers."""
    if cfg.data.backend != "torch" or cfg.data.num_workers == 0:
        return (f"applies only with --data.backend=torch and --data.num_workers > 0 (here {cfg.data.backend}, "
                f"{cfg.data.num_workers} workers)")
    return None


def _random_views(cfg) -> Optional[str]:
    """data.flip's condition: a random recipe (simclr, finetune) that runs; linear_eval's fast path
    trains on centre crops whatever data.augment says."""
    if cfg.data.augment not in ("simclr", "finetune"):
        return f"applies only with --data.augment=simclr|finetune (here {cfg.data.augment})"
    if getattr(cfg, "fast", False):
        return "applies only with --fast=false (the fast path trains on centre crops)"
    return None


@dataclass
class DataConfig:
    """The ``data`` section every entry point shows in --help: what the user chooses. What the entry
    point derives (images per rank, shuffling, seed, dtype) is not here: see LoaderConfig."""
    backend: str = option("torch", "data backend", ("torch", "dali", "ffcv"))
    path: str = option("", "image folder (torch, dali): any layout to pretrain or distill on, class folders "
                       "root/<class>/<image> where labels are needed; or a .beton file (ffcv); empty = the "
                       "Fashion-MNIST demo set")
    file_list: Optional[str] = option(None, "optional list file of images to use ('relpath [label]' per line)")
    augment: str = option("simclr", "augment recipe preset", ("simclr", "finetune", "eval"))
    image_size: int = option(224, "output side of every view, pixels", ge=1, le=4096)
    num_workers: int = option(2, "torch: DataLoader workers; dali: CPU threads; ffcv: workers", ge=0)
    timeout: float = option(600.0, "torch backend: seconds to wait for a DataLoader worker's batch before the run "
                            "stops naming the stalled loader (0 = wait forever)", ge=0, applies=lambda cfg: _workers(cfg))
    decode_device: str = option("cpu", "torch backend: decode JPEGs on cpu workers or cuda (nvJPEG)", ("cpu", "cuda"),
                                applies=TORCH)
    photometry_device: str = option("auto", "where colour ops run: auto (the training device) or cpu", ("auto", "cpu"))
    photometry_mode: str = option("auto", "colour-op kernels: auto (GPU: fused, CPU: subset), fused (the whole recipe "
                                  "as two torch.compile'd graphs: no host sync; on a CPU it compiles once per "
                                  "image size, slowly), subset (each op on its own samples: exact work, host syncs) or "
                                  "where (every op on the whole batch, masked: no host sync)",
                                  ("auto", "fused", "subset", "where"))
    jitter_strength: float = option(1.0, "colour jitter strength s (brightness/contrast/saturation 0.8s, hue 0.2s)",
                                    ge=0, applies=SIMCLR)
    blur: bool = option(True, "gaussian blur p=0.5 (TF turns it off for 32px CIFAR-like data)", applies=SIMCLR)
    crop_scale: Tuple[float, float] = option((0.08, 1.0), "random crop of the simclr and finetune recipes: area "
                                             "fraction range (TF: 0.08,1; crops also cover >= 10 % of the "
                                             "image, as in TF)", gt=0, le=1)
    flip: bool = option(True, "random horizontal flip (p=0.5) in the simclr and finetune recipes, as TF; false "
                        "for images whose mirror image is another class or no image at all (digits, text)",
                        applies=_random_views)
    # DALI
    # The default is the faster of the two on a GPU (docs/benchmarks.md); "torch" keeps the exact TF colour
    # ops (README: deviations).
    dali_photometry: str = option("dali", "dali: colour ops as native DALI ops (faster) or in torch (exact TF ops, "
                                  "shared loaders.augment)", ("dali", "torch"), applies=DALI)
    dali_roi_decode: bool = option(False, "dali: ROI-decode each view (image_random_crop) instead of decode once",
                                   applies=DALI)
    hw_decoder_load: float = option(0.65, "dali: share of JPEG decoding on the A100/H100 hardware decoder",
                                    ge=0, le=1, applies=DALI)
    device_memory_padding: int = option(211025920, "dali: nvJPEG device buffer preallocation, bytes", ge=0,
                                        applies=DALI)
    host_memory_padding: int = option(140544512, "dali: nvJPEG pinned host buffer preallocation, bytes", ge=0,
                                      applies=DALI)
    dali_prefetch: int = option(2, "dali: prefetch queue depth", ge=1, applies=DALI)
    # FFCV
    ffcv_order: str = option("random", "ffcv: sample order", ("random", "quasi_random"), applies=FFCV)
    os_cache: bool = option(True, "ffcv: read the .beton through the OS page cache (False: FFCV's own cache)",
                            applies=FFCV)
    batches_ahead: int = option(3, "ffcv: batches prepared ahead", ge=1, applies=FFCV)


@dataclass
class LoaderConfig(DataConfig):
    """A backend's build arguments: the user's DataConfig plus the derived fields below."""
    batch_size: int = 256          # images per rank per step
    train: bool = True             # shuffle and drop the last partial batch (False: in order, all)
    seed: int = 0                  # base seed; per-rank, per-epoch and per-batch streams derive from it
    dtype: str = "float32"         # dtype of the views
    labels: bool = True            # path must be class folders (False: any layout, every label -1)


DERIVED = ("batch_size", "train", "seed", "dtype", "labels")


def loader_config(data: DataConfig, *, batch_size: int, train: bool = True, seed: int = 0,
                  dtype: str = "float32", labels: bool = True, **recipe) -> LoaderConfig:
    """The build arguments of ``data`` with the derived fields. ``recipe``: the fields an evaluation
    loader sets for itself (path, file_list, augment, backend: the val set, centre crops, the torch
    backend), never the training loader's."""
    bad = sorted(set(recipe) - {"path", "file_list", "augment", "backend"})
    if bad:
        raise TypeError(f"loader_config: {bad} are user options, not derived values")
    fields = {f.name: vars(data)[f.name] for f in dataclasses.fields(DataConfig)}  # a copy, not a use
    return LoaderConfig(**{**fields, **recipe}, batch_size=batch_size, train=train, seed=seed, dtype=dtype,
                        labels=labels)


# The names fastclr accepts for a tensor dtype (run.precision, a loader's dtype), and the canonical one.
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


def parse_dtype(name: str):
    """``"bf16"`` / ``"bfloat16"`` / ... -> the torch dtype."""
    import torch
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return getattr(torch, _DTYPE_NAMES[name])


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (what LoaderConfig.dtype takes)."""
    return str(dtype).removeprefix("torch.")
