"""AugmentSpec: one description of an augmentation recipe that every backend realizes.

The semantic reference is google-research/simclr tf2/data_util.py (SimCLRv2):
  * crop: distorted_bounding_box_crop with area (0.08, 1), aspect (3/4, 4/3), 100 attempts,
    then bicubic resize to size x size; flip p=0.5;
  * colour jitter (p=0.8, strength s): brightness x U[1-0.8s, 1+0.8s], contrast 0.8s,
    saturation 0.8s, hue 0.2s, applied in a random order per image, clipped to [0, 1] after each op;
  * grayscale p=0.2 (TF luma weights, 3 channels kept);
  * gaussian blur p=0.5, sigma U(0.1, 2.0), kernel side//10 rounded to odd (23 taps at 224px);
  * output in [0, 1], no mean/std normalization (``normalize=True`` is an opt-in deviation).
Eval: centre crop of 0.875 of the shorter side (keeping the aspect), then resize.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CropSpec:
    size: int = 224                                 # output side, square
    scale: Tuple[float, float] = (0.08, 1.0)        # area fraction range (random crop)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)     # aspect (w/h) range (random crop)
    attempts: int = 100                             # rejection-sampling attempts before fallback
    interpolation: str = "bicubic"                  # bicubic | bilinear
    random: bool = True                             # False: centre crop of `center_fraction`
    center_fraction: float = 0.875                  # eval centre crop (TF CROP_PROPORTION)


@dataclass(frozen=True)
class JitterSpec:
    p: float = 0.8
    strength: float = 1.0
    brightness: float = 0.8     # all four are multiplied by `strength`
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    random_order: bool = True

    @property
    def factors(self) -> Tuple[float, float, float, float]:
        s = self.strength
        return (self.brightness * s, self.contrast * s, self.saturation * s, self.hue * s)


@dataclass(frozen=True)
class BlurSpec:
    p: float = 0.5
    sigma: Tuple[float, float] = (0.1, 2.0)
    kernel_fraction: float = 0.1   # kernel side = int(size * fraction), made odd: 2*(k//2)+1

    def kernel_size(self, image_side: int) -> int:
        k = int(image_side * self.kernel_fraction)
        return 2 * (k // 2) + 1


@dataclass(frozen=True)
class AugmentSpec:
    name: str = "simclr"
    crop: CropSpec = field(default_factory=CropSpec)
    flip: bool = True
    jitter: Optional[JitterSpec] = field(default_factory=JitterSpec)
    grayscale_p: float = 0.2
    blur: Optional[BlurSpec] = field(default_factory=BlurSpec)
    num_views: int = 2
    normalize: bool = False
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    @property
    def size(self) -> int:
        return self.crop.size

    @property
    def has_photometry(self) -> bool:
        return self.jitter is not None or self.grayscale_p > 0 or self.blur is not None or self.normalize

    def replace(self, **kw) -> "AugmentSpec":
        return dataclasses.replace(self, **kw)


def simclr(size: int = 224, strength: float = 1.0, jitter_p: float = 0.8, grayscale_p: float = 0.2,
           blur_p: float = 0.5, num_views: int = 2, interpolation: str = "bicubic",
           normalize: bool = False, scale: Tuple[float, float] = (0.08, 1.0)) -> AugmentSpec:
    """SimCLRv2 pretraining recipe. For 32px (CIFAR-like) data TF turns the blur off: use blur_p=0."""
    return AugmentSpec(
        name="simclr",
        crop=CropSpec(size=size, scale=scale, interpolation=interpolation),
        flip=True,
        jitter=JitterSpec(p=jitter_p, strength=strength) if jitter_p > 0 else None,
        grayscale_p=grayscale_p,
        blur=BlurSpec(p=blur_p) if blur_p > 0 else None,
        num_views=num_views,
        normalize=normalize,
    )


def finetune(size: int = 224, interpolation: str = "bicubic", normalize: bool = False,
             scale: Tuple[float, float] = (0.08, 1.0)) -> AugmentSpec:
    """Fine-tuning recipe: random crop + flip only (TF preprocess_for_train, color_distort=False)."""
    return AugmentSpec(name="finetune", crop=CropSpec(size=size, scale=scale, interpolation=interpolation),
                       flip=True, jitter=None, grayscale_p=0.0, blur=None, num_views=1, normalize=normalize)


def eval_(size: int = 224, interpolation: str = "bicubic", normalize: bool = False,
          center_fraction: float = 0.875) -> AugmentSpec:
    """Eval recipe: centre crop of 0.875 (aspect kept), resize; no flip, no colour."""
    return AugmentSpec(name="eval", crop=CropSpec(size=size, random=False, interpolation=interpolation,
                                                  center_fraction=center_fraction),
                       flip=False, jitter=None, grayscale_p=0.0, blur=None, num_views=1, normalize=normalize)


PRESETS = {"simclr": simclr, "finetune": finetune, "eval": eval_}


def preset(name: str, size: int = 224, **kw) -> AugmentSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown augment preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](size=size, **kw)
