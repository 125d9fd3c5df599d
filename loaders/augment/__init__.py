"""Batched SimCLR augmentation (the recipe: ``spec``): uint8 geometry on the host, colour ops on whole batches on any device.

Two stages, shared by every backend:

* **geometry** (per decoded image, uint8, numpy + OpenCV; ``geometry``): ``sample_crop_boxes``
  -> ``crop_resize`` (+ horizontal flips). One decode, K crops (docs/design.md "two views, one decode").
* **photometry** (per batch, float tensors on the training device): ``photometric`` applies colour
  jitter in a random order per sample, grayscale, gaussian blur and (opt-in) normalization to
  ``[N, 3, H, W]`` with per-sample parameters, masks and ``torch.where`` / index_copy - never a
  Python loop over samples (the ops themselves: ``colour``). ``finish_views`` is the last
  stage every backend calls. On CUDA the
  default is the compiled fused path (``fused``: four passes over the pixels).

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

Modules: ``spec`` (AugmentSpec, the recipes), ``geometry`` (crop boxes, crop-resize, TF's eval view),
``colour`` (the TF colour ops), ``photometry`` (random parameters, the batched recipe, finish_views),
``fused`` (the compiled fused recipe). Their public names are re-exported here: ``augment.X`` is the
one place a backend or a test looks for them.
"""
from __future__ import annotations

from .colour import (BRIGHTNESS, CONTRAST, GRAY_WEIGHTS, HUE, NO_OP, SATURATION,  # noqa: F401
                     adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, gaussian_blur,
                     gaussian_kernels, hsv_to_rgb, rgb_to_hsv, to_grayscale)
from .geometry import (TF_MIN_OBJECT_COVERED, crop_resize, crop_resize_tensor, geometry,  # noqa: F401
                       sample_crop_boxes, tf_eval_view, to_rgb_uint8)
from .photometry import (CPU_CHUNK, MODES, apply, finish_views, photometric, release_buffers,  # noqa: F401
                         resolve_mode, sample_photometric_params, warmup)
from .spec import AugmentSpec, preset  # noqa: F401
