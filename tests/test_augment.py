"""loaders.augment against the TF reference.

* Parity: every colour op at fixed per-sample factors equals a float64 numpy transcription of the TF
  kernel (adjust_hue's rgb_to_hv / hv_to_rgb, adjust_saturation's rgb_to_hsv / hsv_to_rgb,
  adjust_contrast, rgb_to_grayscale, the simclrv2 brightness, gaussian_blur as a direct 2-D
  convolution) within 1e-5 in fp32 and 2e-2 in bf16, and reproduces TF's own published test values.
* Distribution: crop boxes, masks and factors follow the spec; random op order is exact.
* Plumbing: dtype, device, channels_last, determinism, view-major finish_views.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from loaders import augment as A
from loaders.augment.spec import CropSpec, JitterSpec, finetune, simclr

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# float64 numpy references, transcribed from the TF kernels (HWC images in [0, 1])
# ---------------------------------------------------------------------------------------------

def ref_adjust_hue(img: np.ndarray, delta: float) -> np.ndarray:
    """tensorflow/core/kernels/image/adjust_hue_op.cc: rgb_to_hv, h += 6 delta wrapped to [0, 6),
    hv_to_rgb. Sector categories by the kernel's strict comparisons."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    rg, bg, br = r < g, b < g, b > r
    b_lt_r, b_gt_g = b < r, b > g
    # (v_max, v_mid, v_min, category) per the kernel's branches
    conds = [rg & b_lt_r, rg & ~b_lt_r & b_gt_g, rg & ~b_lt_r & ~b_gt_g,
             ~rg & bg, ~rg & ~bg & br, ~rg & ~bg & ~br]
    vmax = np.select(conds, [g, b, g, r, b, r])
    vmid = np.select(conds, [r, g, b, g, r, b])
    vmin = np.select(conds, [b, r, r, b, g, g])
    cat = np.select(conds, [1, 3, 2, 0, 4, 5])
    rng = vmax - vmin
    ratio = np.where(rng > 0, (vmid - vmin) / np.where(rng > 0, rng, 1), 0)
    h = np.where(cat % 2 == 0, cat + ratio, cat + 1 - ratio)
    h = np.where(rng > 0, h, 0.0)
    h = h + delta * 6
    h = np.mod(h, 6.0)
    cat = np.floor(h).astype(int)
    ratio = h - cat
    ratio = np.where(cat % 2 == 0, ratio, 1 - ratio)
    vmid = vmin + ratio * (vmax - vmin)
    conds = [cat == k for k in range(6)]
    out_r = np.select(conds, [vmax, vmid, vmin, vmin, vmid, vmax])
    out_g = np.select(conds, [vmid, vmax, vmax, vmid, vmin, vmin])
    out_b = np.select(conds, [vmin, vmin, vmid, vmax, vmax, vmid])
    return np.stack([out_r, out_g, out_b], -1)


def ref_rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    """adjust_saturation_op.cc rgb_to_hsv (h in [0, 1))."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    rng = v - np.minimum(np.minimum(r, g), b)
    s = np.where(v > 0, rng / np.where(v > 0, v, 1), 0)
    norm = 1.0 / (6.0 * np.where(rng > 0, rng, 1))
    h = np.where(r == v, norm * (g - b), np.where(g == v, norm * (b - r) + 2.0 / 6.0, norm * (r - g) + 4.0 / 6.0))
    h = np.where(rng > 0, h, 0.0)
    h = np.where(h < 0, h + 1, h)
    return np.stack([h, s, v], -1)


def ref_hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """adjust_saturation_op.cc hsv_to_rgb."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    c = s * v
    m = v - c
    dh = h * 6
    cat = np.floor(dh).astype(int)  # static_cast<int> of a non-negative value
    fmodu = np.mod(dh, 2.0)
    x = c * (1 - np.abs(fmodu - 1))
    z = np.zeros_like(c)
    conds = [cat == k for k in range(6)]
    rr = np.select(conds, [c, x, z, z, x, c], 0)
    gg = np.select(conds, [x, c, c, x, z, z], 0)
    bb = np.select(conds, [z, z, x, c, c, x], 0)
    return np.stack([rr + m, gg + m, bb + m], -1)


def ref_adjust_saturation(img: np.ndarray, f: float) -> np.ndarray:
    hsv = ref_rgb_to_hsv(img)
    hsv[..., 1] = np.clip(hsv[..., 1] * f, 0, 1)
    return ref_hsv_to_rgb(hsv)


def ref_adjust_contrast(img: np.ndarray, f: float) -> np.ndarray:
    m = img.mean(axis=(0, 1), keepdims=True)
    return (img - m) * f + m


def ref_brightness(img: np.ndarray, f: float) -> np.ndarray:
    return img * f


def ref_grayscale(img: np.ndarray) -> np.ndarray:
    g = img @ np.array([0.2989, 0.5870, 0.1140])
    return np.repeat(g[..., None], 3, -1)


def ref_blur(img: np.ndarray, sigma: float, kernel_size: int) -> np.ndarray:
    """Direct 2-D convolution with the outer-product gaussian, zero padding (TF 'SAME')."""
    r = kernel_size // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    k1 = np.exp(-t ** 2 / (2 * sigma ** 2))
    k1 /= k1.sum()
    k2 = np.outer(k1, k1)
    H, W, _ = img.shape
    pad = np.zeros((H + 2 * r, W + 2 * r, 3))
    pad[r:r + H, r:r + W] = img
    out = np.zeros_like(img)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out += k2[dy, dx] * pad[dy:dy + H, dx:dx + W]
    return out


REF = {
    "brightness": (A.adjust_brightness, ref_brightness, [0.2, 0.77, 1.0, 1.8]),
    "contrast": (A.adjust_contrast, ref_adjust_contrast, [0.2, 0.5, 1.0, 1.8]),
    "saturation": (A.adjust_saturation, ref_adjust_saturation, [0.0, 0.4, 1.0, 1.8]),
    "hue": (A.adjust_hue, ref_adjust_hue, [-0.45, -0.2, 0.07, 0.5]),
}


def make_images(n=4, h=13, w=17, seed=0) -> torch.Tensor:
    """[n, 3, h, w] float32 in [0, 1] with the awkward pixels TF's kernels branch on: gray (C == 0),
    black, white, primaries, ties between two channels, and exact quantized uint8 values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255
    special = torch.tensor([[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                            [1, 1, 0], [0, 1, 1], [1, 0, 1], [0.6, 0.6, 0.2], [0.2, 0.6, 0.6], [0.6, 0.2, 0.6],
                            [0.3, 0.1, 0.1], [0.999, 0.0, 0.001]])
    x[:, :, 0, : len(special)] = special.T[None, :, : x.shape[3]] if x.shape[3] < len(special) else special.T[None]
    return x


def to_hwc(x: torch.Tensor) -> np.ndarray:
    return x.double().permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------
# Parity with the TF math
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(REF))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_colour_op_matches_tf_reference(op, dtype, layout):
    fn, ref, factors = REF[op]
    x = make_images(n=len(factors)).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    f = torch.tensor(factors)
    y = fn(x.float(), f) if dtype != torch.float32 else fn(x, f)  # bf16: ops run in fp32 (photometric)
    y = y.to(dtype)
    xin = to_hwc(x)  # the reference sees the same (quantized) input
    for i, fi in enumerate(factors):
        expect = ref(xin[i], fi)
        got = to_hwc(y)[i]
        np.testing.assert_allclose(got, expect, atol=TOL[dtype], rtol=0, err_msg=f"{op} factor {fi}")


def test_tf_published_values():
    """TF's own image_ops_test numbers (uint8 in, float op, TF's float -> uint8 conversion)."""
    x = np.array([0, 5, 13, 54, 135, 226, 37, 8, 234, 90, 255, 1], np.uint8).reshape(1, 2, 2, 3)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() * (1 / 255.0)

    def to_u8(y):  # convert_image_dtype(float -> uint8, saturate=True): trunc(clip(y * 255.5))
        return np.trunc(np.clip(to_hwc(y) * 255.5, 0, 255)).astype(np.uint8).ravel().tolist()

    assert to_u8(A.adjust_hue(xt, [0.25])) == [13, 0, 11, 226, 54, 221, 234, 8, 92, 1, 217, 255]
    assert to_u8(A.adjust_hue(xt, [-0.25])) == [0, 13, 1, 54, 226, 59, 8, 234, 150, 255, 39, 1]
    assert to_u8(A.adjust_saturation(xt, [0.5])) == [6, 9, 13, 140, 180, 226, 135, 121, 234, 172, 255, 128]
    assert to_u8(A.adjust_saturation(xt, [2.0])) == [0, 5, 13, 0, 106, 226, 30, 0, 234, 89, 255, 0]
    y = A.adjust_contrast(xt.double(), [2.0])
    expect = np.array([-45.25, -90.75, -92.5, 62.75, 169.25, 333.5, 28.75, -84.75, 349.5, 134.75, 409.25,
                       -116.5]) / 255
    np.testing.assert_allclose(to_hwc(y).ravel(), expect, atol=1e-6)


def test_hsv_roundtrip_and_reference():
    x = make_images(n=3, seed=1)
    hsv = A.rgb_to_hsv(x)
    np.testing.assert_allclose(to_hwc(hsv), ref_rgb_to_hsv(to_hwc(x)), atol=1e-6)
    np.testing.assert_allclose(to_hwc(A.hsv_to_rgb(hsv)), to_hwc(x), atol=1e-6)
    np.testing.assert_allclose(to_hwc(A.hsv_to_rgb(hsv)), ref_hsv_to_rgb(ref_rgb_to_hsv(to_hwc(x))), atol=1e-6)
    # hue through HSV: a full turn and no turn are identities; two half turns compose
    for d in (0.0, 1.0, -1.0):
        np.testing.assert_allclose(A.adjust_hue(x, [d] * 3).numpy(), x.numpy(), atol=1e-6)
    half = A.adjust_hue(A.adjust_hue(x, [0.5] * 3), [0.5] * 3)
    np.testing.assert_allclose(half.numpy(), x.numpy(), atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert A.rgb_to_hsv(red).flatten().tolist() == [0.0, 1.0, 1.0]
    # 1/3 turn: red -> green
    np.testing.assert_allclose(A.adjust_hue(red, [1 / 3]).flatten().numpy(), [0, 1, 0], atol=1e-6)


def test_grayscale_uses_tf_luma_weights():
    eye = torch.eye(3).view(3, 3, 1, 1)  # pure r, g, b
    g = A.to_grayscale(eye)
    assert g.shape == eye.shape
    np.testing.assert_allclose(g[:, :, 0, 0].numpy(), np.repeat(np.array([[0.2989], [0.5870], [0.1140]]), 3, 1),
                               atol=1e-7)
    x = make_images(n=2)
    np.testing.assert_allclose(to_hwc(A.to_grayscale(x)), ref_grayscale(to_hwc(x)), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["taps", "conv"])
@pytest.mark.parametrize("kernel_size", [23, 5])
def test_blur_matches_direct_2d_convolution(method, kernel_size, dtype):
    x = make_images(n=3, h=30, w=27, seed=2)
    sigmas = [0.1, 0.9, 2.0]
    y = A.gaussian_blur(x.to(dtype).float(), torch.tensor(sigmas), kernel_size, method=method).to(dtype)
    xin = to_hwc(x.to(dtype))
    for i, s in enumerate(sigmas):
        np.testing.assert_allclose(to_hwc(y)[i], ref_blur(xin[i], s, kernel_size), atol=TOL[dtype], rtol=0)


def test_blur_kernel_size_follows_tf():
    assert simclr(224).blur.kernel_size(224) == 23  # TF: radius int((224 // 10) / 2) = 11
    k = A.gaussian_kernels(torch.tensor([1.0]), 23)
    assert k.shape == (1, 23) and abs(float(k.sum()) - 1) < 1e-6 and int(k.argmax()) == 11


# ---------------------------------------------------------------------------------------------
# photometric: exact op order, masks, modes, dtype / layout, determinism
# ---------------------------------------------------------------------------------------------

def _sequential_reference(x: torch.Tensor, p: dict, spec) -> torch.Tensor:
    """One sample at a time, ops in the sampled order (the test may loop; the library may not)."""
    out = []
    fns = {A.BRIGHTNESS: A.adjust_brightness, A.CONTRAST: A.adjust_contrast,
           A.SATURATION: A.adjust_saturation, A.HUE: A.adjust_hue}
    keys = {A.BRIGHTNESS: "brightness", A.CONTRAST: "contrast", A.SATURATION: "saturation", A.HUE: "hue"}
    for i in range(x.shape[0]):
        xi = x[i:i + 1].double()
        for o in p["order"][i].tolist():
            if o != A.NO_OP:
                xi = fns[o](xi, p[keys[o]][i:i + 1].double()).clamp(0, 1)
        if p["gray"][i]:
            xi = A.to_grayscale(xi)
        if p["blur"][i]:
            xi = A.gaussian_blur(xi, p["sigma"][i:i + 1].double(), spec.blur.kernel_size(x.shape[2])).clamp(0, 1)
        out.append(xi)
    return torch.cat(out).float()


@pytest.mark.parametrize("mode", ["subset", "where"])
def test_photometric_applies_each_samples_ops_in_its_order(mode):
    spec = simclr(32)
    N = 24  # one sample per permutation
    x = make_images(n=N, h=32, w=32, seed=3)
    p = A.sample_photometric_params(N, spec, torch.Generator().manual_seed(0))
    p["jitter"][:] = True
    p["order"] = torch.tensor(list(itertools.permutations(range(4))))
    p["gray"][:] = False
    p["gray"][::5] = True
    y = A.photometric(x, spec, params=p, mode=mode)
    np.testing.assert_allclose(y.numpy(), _sequential_reference(x, p, spec).numpy(), atol=2e-5)
    # order matters: the same factors in TF's fixed order give a different result
    p2 = dict(p, order=torch.arange(4).expand(N, 4).clone())
    assert (A.photometric(x, spec, params=p2, mode=mode) - y).abs().amax() > 1e-2


def test_photometric_subset_and_where_modes_agree():
    spec = simclr(40)
    x = make_images(n=19, h=40, w=40, seed=4)
    y1, p = A.photometric(x, spec, torch.Generator().manual_seed(5), return_params=True, mode="subset")
    y2 = A.photometric(x, spec, params=p, mode="where")
    np.testing.assert_allclose(y1.numpy(), y2.numpy(), atol=1e-5)
    assert p["jitter"].any() and (~p["jitter"]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [True, False])
def test_photometric_keeps_dtype_layout_range(dtype, channels_last):
    spec = simclr(32)
    x = make_images(n=6, h=32, w=32).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x0 = x.clone()
    y = A.photometric(x, spec, torch.Generator().manual_seed(0))
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.equal(x, x0), "input modified without inplace=True"


def test_photometric_deterministic_given_generator():
    spec = simclr(32)
    x = make_images(n=8, h=32, w=32)
    a = A.photometric(x, spec, torch.Generator().manual_seed(7))
    b = A.photometric(x, spec, torch.Generator().manual_seed(7))
    c = A.photometric(x, spec, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_photometric_normalize_is_last():
    spec = finetune(16, normalize=True)
    x = make_images(n=2, h=16, w=16)
    y = A.photometric(x, spec)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    np.testing.assert_allclose(y.numpy(), ((x - mean) / std).numpy(), atol=1e-6)


def _binomial_ok(k: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(k - n * p) <= z * np.sqrt(n * p * (1 - p)) + 1


def test_photometric_probabilities_and_ranges():
    spec = simclr(224)
    n = 20000
    p = A.sample_photometric_params(n, spec, torch.Generator().manual_seed(0))
    assert _binomial_ok(int(p["jitter"].sum()), n, 0.8)
    assert _binomial_ok(int(p["gray"].sum()), n, 0.2)
    assert _binomial_ok(int(p["blur"].sum()), n, 0.5)
    # independent draws: jitter and gray co-occur at p = 0.16
    assert _binomial_ok(int((p["jitter"] & p["gray"]).sum()), n, 0.16)
    for key, lo, hi in [("brightness", 0.2, 1.8), ("contrast", 0.2, 1.8), ("saturation", 0.2, 1.8),
                        ("hue", -0.2, 0.2), ("sigma", 0.1, 2.0)]:
        v = p[key]
        assert float(v.min()) >= lo and float(v.max()) <= hi, key
        assert float(v.min()) < lo + 0.01 and float(v.max()) > hi - 0.01, key  # fills the range
    on = p["jitter"]
    orders = p["order"][on]
    assert (p["order"][~on] == A.NO_OP).all()
    assert (orders.sort(dim=1).values == torch.arange(4)).all(), "each jittered sample gets each op once"
    perms = {tuple(r) for r in orders[:2000].tolist()}
    assert len(perms) == 24
    m = int(on.sum())
    for j in range(4):
        for o in range(4):
            assert _binomial_ok(int((orders[:, j] == o).sum()), m, 0.25)


def test_photometric_masks_drive_the_output():
    """Samples whose masks are all off come out bit-identical; others change."""
    spec = simclr(32)
    x = make_images(n=64, h=32, w=32)
    y, p = A.photometric(x, spec, torch.Generator().manual_seed(1), return_params=True)
    untouched = ~p["jitter"] & ~p["gray"] & ~p["blur"]
    assert untouched.any() and (~untouched).any()
    assert torch.equal(y[untouched], x[untouched])
    assert ((y[~untouched] - x[~untouched]).abs().amax(dim=(1, 2, 3)) > 0).all()


def test_zero_strength_jitter_ops_are_skipped():
    spec = simclr(32).replace(jitter=JitterSpec(p=1.0, hue=0.0, saturation=0.0))
    p = A.sample_photometric_params(100, spec, torch.Generator().manual_seed(0))
    assert not ((p["order"] == A.HUE) | (p["order"] == A.SATURATION)).any()
    assert ((p["order"] == A.BRIGHTNESS).sum(1) == 1).all()


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (18, 24), (4000, 6000), (100, 1000)])
def test_random_crop_boxes_in_range(hw):
    H, W = hw
    crop = CropSpec(size=224)
    boxes = A.sample_crop_boxes(H, W, 4000, crop, np.random.default_rng(0))
    assert boxes.dtype == np.int64 and boxes.shape == (4000, 4)
    y, x, h, w = boxes.T
    assert (y >= 0).all() and (x >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (y + h <= H).all() and (x + w <= W).all()
    area = h * w / (H * W)
    aspect = w / h
    fallback = np.zeros(len(boxes), bool)
    if W / H > 4 / 3:  # image aspect out of range: some fallbacks are possible, with clamped aspect
        fb_h, fb_w = H, round(H * 4 / 3)
        fallback = (h == fb_h) & (w == fb_w) & (y == 0) & (x == (W - fb_w) // 2)
    ok = ~fallback
    # TF: area in [0.08, 1] and >= min_object_covered (0.1); aspect in [3/4, 4/3] up to width rounding
    assert (area[ok] >= 0.1 - 1e-9).all() and (area[ok] <= 1 + 1e-9).all()
    tol = 0.5 / h[ok] + 1e-9
    assert (aspect[ok] >= 3 / 4 - tol).all() and (aspect[ok] <= 4 / 3 + tol).all()
    if min(H, W) >= 300:
        assert fallback.mean() < 0.01
        assert area.min() < 0.12 and area.max() > 0.85  # 6000x4000: the 4/3 limit caps the area at 0.89
        # TF samples the aspect uniformly (not log-uniformly): mean ~ (3/4 + 4/3) / 2
        assert abs(np.mean(aspect) - (3 / 4 + 4 / 3) / 2) < 0.02
        # offsets spread over the whole free range
        assert (y[h < H] / (H - h[h < H])).mean() == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("recipe", ["simclr", "finetune"])
def test_data_crop_scale_reaches_both_recipes_and_bounds_the_crops(recipe):
    """--data.crop_scale (the demo presets' gentler crops) sets the crop of the simclr and the finetune
    recipe; every sampled box then covers at least that area fraction; an inverted range is refused."""
    import loaders
    from loaders.config import LoaderConfig
    spec = loaders.spec_from_config(LoaderConfig(augment=recipe, image_size=32, crop_scale=(0.35, 1.0)))
    assert spec.crop.scale == (0.35, 1.0)
    boxes = A.sample_crop_boxes(320, 320, 2000, spec.crop, np.random.default_rng(0))
    area = boxes[:, 2] * boxes[:, 3] / 320 ** 2
    assert area.min() >= 0.35 - 0.01 and area.min() < 0.40
    with pytest.raises(ValueError, match="crop_scale must satisfy"):
        loaders.spec_from_config(LoaderConfig(augment=recipe, crop_scale=(0.9, 0.5)))


@pytest.mark.parametrize("recipe", ["simclr", "finetune"])
def test_data_flip_false_never_mirrors_a_view(recipe):
    """--data.flip=false (digits and text, whose mirror image is another class) turns the flip of both
    random recipes off; by default (TF) about half the views are mirrored."""
    import loaders
    from loaders.config import LoaderConfig
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = 255                                   # bright left half: a mirrored view is bright right
    mirrored = {}
    for flip in (True, False):
        spec = loaders.spec_from_config(LoaderConfig(augment=recipe, image_size=32, crop_scale=(1.0, 1.0),
                                                     flip=flip, jitter_strength=0.0, blur=False))
        assert spec.flip is flip
        rng = np.random.default_rng(0)
        views = np.concatenate([A.geometry(img, spec, rng) for _ in range(200)])
        mirrored[flip] = float((views[:, :, :16].mean((1, 2, 3)) < views[:, :, 16:].mean((1, 2, 3))).mean())
    assert mirrored[False] == 0.0 and 0.4 < mirrored[True] < 0.6, mirrored


def test_random_crop_fallback_is_clamped_centre_crop():
    crop = CropSpec(size=8, scale=(0.999, 1.0), attempts=1)
    boxes = A.sample_crop_boxes(100, 1000, 5, crop, np.random.default_rng(0), min_object_covered=0)
    assert (boxes == [0, (1000 - 133) // 2, 100, 133]).all()  # aspect clamped to 4/3
    boxes = A.sample_crop_boxes(100, 120, 5, crop, np.random.default_rng(0), min_object_covered=0)
    assert (boxes[:, 2:] <= [100, 120]).all()


def test_centre_crop_follows_tf_center_crop():
    crop = CropSpec(size=224, random=False, center_fraction=0.875)
    rng = np.random.default_rng(0)
    # landscape 500x375: rint(0.875 * 375) = 328 square, offsets ((H - h) + 1) // 2
    assert A.sample_crop_boxes(375, 500, 2, crop, rng).tolist() == [[24, 86, 328, 328]] * 2
    assert A.sample_crop_boxes(500, 375, 1, crop, rng).tolist() == [[86, 24, 328, 328]]
    assert A.sample_crop_boxes(1, 1, 1, crop, rng).tolist() == [[0, 0, 1, 1]]


def test_crop_boxes_deterministic_given_rng():
    crop = CropSpec()
    a = A.sample_crop_boxes(375, 500, 8, crop, np.random.default_rng(3))
    b = A.sample_crop_boxes(375, 500, 8, crop, np.random.default_rng(3))
    assert (a == b).all() and len({tuple(r) for r in a.tolist()}) > 1


def test_crop_resize_shapes_flips_and_channels():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    full = np.array([[0, 0, 40, 50]])
    out = A.crop_resize(img[:, :40], np.array([[0, 0, 40, 40]] * 2), 40, flips=np.array([False, True]))
    assert out.shape == (2, 40, 40, 3) and out.dtype == np.uint8
    assert (out[0] == img[:, :40]).all() and (out[1] == img[:, :40][:, ::-1]).all()
    const = np.full((40, 50, 3), 77, np.uint8)
    for interp in ("bicubic", "bilinear"):
        assert (A.crop_resize(const, full, 16, interp) == 77).all()
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    for g in (gray, gray[:, :, None]):
        o = A.crop_resize(g, np.array([[0, 0, 20, 30]]), 8)
        assert o.shape == (1, 8, 8, 3) and (o[..., 0] == o[..., 1]).all() and (o[..., 1] == o[..., 2]).all()
    rgba = np.concatenate([img, np.zeros((40, 50, 1), np.uint8)], -1)
    assert (A.crop_resize(rgba, full, 20) == A.crop_resize(img, full, 20)).all()
    # a crop of the left half only sees the left half's colour
    halves = np.zeros((40, 50, 3), np.uint8)
    halves[:, 25:] = 255
    assert (A.crop_resize(halves, np.array([[0, 0, 40, 20]]), 12) == 0).all()


def test_geometry_two_views_differ():
    spec = simclr(64)
    img = (np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)
    v = A.geometry(img, spec, np.random.default_rng(1))
    assert v.shape == (2, 64, 64, 3) and v.dtype == np.uint8
    assert not (v[0] == v[1]).all()
    assert (A.geometry(img, spec, np.random.default_rng(1)) == v).all()


# ---------------------------------------------------------------------------------------------
# finish_views
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_finish_views_layout_dtype_and_view_major(dtype):
    B, K, S = 5, 2, 24
    crops = torch.randint(0, 256, (B, K, S, S, 3), dtype=torch.uint8)
    spec = finetune(S).replace(num_views=K)  # no photometry: output is exactly crops / 255
    views = A.finish_views(crops, spec, None, dtype)
    assert len(views) == K
    for k, v in enumerate(views):
        assert v.shape == (B, 3, S, S) and v.dtype == dtype
        assert v.is_contiguous(memory_format=torch.channels_last)
        expect = (crops[:, k].permute(0, 3, 1, 2).float() * (1 / 255)).to(dtype)
        assert torch.equal(v, expect)
    views = A.finish_views(crops, simclr(S), torch.Generator().manual_seed(0), dtype)
    assert all(v.is_contiguous(memory_format=torch.channels_last) and v.dtype == dtype for v in views)
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in views)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op", list(REF) + ["gray", "blur"])
def test_cuda_ops_match_cpu(op):
    x = make_images(n=4, h=48, w=40)
    if op == "gray":
        cpu, gpu = A.to_grayscale(x), A.to_grayscale(x.cuda())
    elif op == "blur":
        s = torch.tensor([0.1, 0.5, 1.2, 2.0])
        cpu, gpu = A.gaussian_blur(x, s, 23, method="taps"), A.gaussian_blur(x.cuda(), s.cuda(), 23)
    else:
        fn, _, factors = REF[op]
        f = torch.tensor(factors)
        cpu, gpu = fn(x, f), fn(x.cuda(), f.cuda())
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_photometric_matches_cpu(dtype):
    spec = simclr(64)
    x = make_images(n=32, h=64, w=64).to(dtype).contiguous(memory_format=torch.channels_last)
    ycpu, p = A.photometric(x, spec, torch.Generator().manual_seed(0), return_params=True)
    ygpu = A.photometric(x.cuda(), spec, params={k: v.cuda() for k, v in p.items()})
    assert ygpu.dtype == dtype and ygpu.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(ygpu.float().cpu().numpy(), ycpu.float().numpy(), atol=TOL[dtype])
    g = torch.Generator(device="cuda").manual_seed(0)
    crops = torch.randint(0, 256, (8, 2, 64, 64, 3), dtype=torch.uint8).pin_memory()
    views = A.finish_views(crops, spec, g, dtype, device="cuda")
    assert all(v.is_cuda and v.dtype == dtype and v.is_contiguous(memory_format=torch.channels_last) for v in views)
