"""loaders.augment.fused (photometric / finish_views mode="fused") against the exact oracle.

The oracle is ``photometric(mode="subset")`` (tested against TF's kernels in test_augment.py). With
the same parameters the fused path must match it within 1e-5 in fp32 and 2e-2 in bf16, for every
value of each axis: seeds, fp32 / bf16, NCHW / channels_last input, batch 1 / 7 / 64, image size 32 /
224 (blur kernels 3 / 23); plus the edge cases the formula branches on.

The graphs are plain torch functions that ``torch.compile`` turns into kernels (inductor: Triton on
a GPU, C++ on a CPU). Compiling them with inductor on a CPU costs about a minute per graph when its
cache is cold (a fresh CI machine), so:
* most tests run the very same graph functions eagerly (``FASTCLR_FUSED_EAGER=1``): the formulas;
* ``COMPILED`` tests trace the production graph (uint8 crops -> fp32 views, 32 px) through
  torch.compile with the ``eager`` backend (dynamo only): one graph per configuration (fullgraph), a
  dynamic batch (no recompile for batch 1, 2, 7, 64), the oracle's numbers;
* the ``slow`` test compiles it with inductor's C++ backend (``-m slow``; the GPU suite runs it), and
  the ``gpu`` tests check the Triton kernels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from loaders import augment as A
from loaders.augment import fused as FP
from loaders.augment.spec import JitterSpec, simclr

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Tests that compile (inductor C++ on this machine); the others run the same graphs eagerly.
COMPILED = {"test_finish_views_fused_matches_subset[torch.float32]", "test_no_recompile_across_batch_sizes"}


@pytest.fixture(autouse=True)
def _eager_unless_compiled(request, monkeypatch):
    marks = {m.name for m in request.node.iter_markers()}
    if "gpu" in marks or "slow" in marks:
        return  # the real thing: Triton on a GPU, inductor's C++ on the CPU
    if request.node.name in COMPILED:
        monkeypatch.setenv("FASTCLR_FUSED_BACKEND", "eager")
    else:
        monkeypatch.setenv("FASTCLR_FUSED_EAGER", "1")

# Pixels the formula branches on: gray (C == 0), black, white, primaries, two-channel ties, and hues
# either side of the sector wrap at h = 0 / 6 (r max, b just above or below g).
SPECIAL = torch.tensor([[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                        [1, 1, 0], [0, 1, 1], [1, 0, 1], [0.6, 0.6, 0.2], [0.2, 0.6, 0.6],
                        [1, 0, 1 / 255], [1, 1 / 255, 0], [200 / 255, 10 / 255, 11 / 255],
                        [200 / 255, 11 / 255, 10 / 255], [254 / 255, 1, 1]])


def images(n: int, size: int, seed: int) -> torch.Tensor:
    """float32 [n, 3, size, size], values k / 255 (as crops are), SPECIAL pixels in row 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g).float() * (1 / 255)
    k = min(size, len(SPECIAL))
    x[:, :, 0, :k] = SPECIAL[:k].T[None]
    return x


def params_for(n: int, spec, seed: int) -> dict:
    return A.sample_photometric_params(n, spec, torch.Generator().manual_seed(seed))


def check(x: torch.Tensor, spec, p: dict) -> float:
    """fused == subset for ``x`` and params ``p``; returns the max error (fp32 view)."""
    want = A.photometric(x, spec, params=p, mode="subset")
    got = A.photometric(x, spec, params=p, mode="fused")
    assert got.dtype == x.dtype and got.shape == x.shape
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    err = float((got.float() - want.float()).abs().max())
    assert err <= TOL[x.dtype], err
    return err


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if name == "channels_last" else x


# ---------------------------------------------------------------------------------------------
# Parameters -> table (no compile)
# ---------------------------------------------------------------------------------------------

def test_jitter_table_gathers_each_positions_op():
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2], [-1, -1, -1, -1]])
    p = {"order": order, "brightness": torch.tensor([0.5, 0.6, 0.7, 0.8]),
         "contrast": torch.tensor([1.5, 1.6, 1.7, 1.8]), "saturation": torch.tensor([0.1, 0.2, 0.3, 0.4]),
         "hue": torch.tensor([0.01, 0.02, 0.03, 0.04])}
    t = FP.jitter_table(p)
    assert t.shape == (4, 4, FP.TABLE_COLS) and t.dtype == torch.float32
    assert t[:, :, FP.ON].tolist() == [[1] * 4] * 3 + [[0] * 4]
    # ops before contrast's position run in pass 1 (contrast at 1, 2, 0, none)
    assert t[:, :, FP.ON_BEFORE_CONTRAST].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0] * 4]
    assert t[0, :, FP.ALPHA].tolist() == pytest.approx([0.5, 1.5, 1, 1])
    assert t[1, :, FP.SAT].tolist() == pytest.approx([1, 0.2, 1, 1])
    assert t[2, :, FP.DELTA].tolist() == pytest.approx([0, 0, 0.18, 0])
    assert t[2, :, FP.BETA].tolist() == pytest.approx([-0.7, 0, 0, 0])


def test_blur_weights_identity_rows_for_unblurred_samples():
    p = {"sigma": torch.tensor([0.5, 2.0, 1.0]), "blur": torch.tensor([True, False, True])}
    w = FP.blur_weights(p, 5)
    np.testing.assert_array_equal(w[1].numpy(), [0, 0, 1, 0, 0])
    np.testing.assert_allclose(w[[0, 2]].numpy(), A.gaussian_kernels(p["sigma"][[0, 2]], 5).numpy())


def test_modes_resolve_per_device():
    assert A.resolve_mode("auto", "cpu") == "subset"
    assert A.resolve_mode("auto", "cuda") == "fused"
    assert A.resolve_mode("auto", "meta") == "where"
    assert A.resolve_mode("fused", "cpu") == "fused"
    with pytest.raises(ValueError):
        A.resolve_mode("fast", "cpu")


# ---------------------------------------------------------------------------------------------
# fused == subset (compiled, CPU)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout_name", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 64])
def test_fused_matches_subset_32px(n, dtype, layout_name):
    spec = simclr(32)  # blur kernel 3
    seeds = range(4) if n < 64 else range(2)
    for seed in seeds:
        x = layout(images(n, 32, seed).to(dtype), layout_name)
        check(x, spec, params_for(n, spec, 100 + seed))


@pytest.mark.parametrize("dtype,layout_name", [(torch.float32, "nchw"), (torch.bfloat16, "channels_last")],
                         ids=["fp32-nchw", "bf16-channels_last"])
def test_fused_matches_subset_224px(dtype, layout_name):
    spec = simclr(224)
    assert spec.blur.kernel_size(224) == 23
    for seed in range(2):
        x = layout(images(7, 224, seed).to(dtype), layout_name)
        p = params_for(7, spec, 200 + seed)
        p["blur"][:3] = True  # the large kernel is exercised whatever the draw
        check(x, spec, p)


def test_every_permutation_and_mask_combination():
    """24 samples, one per op order, with gray / blur on and off across them, strong factors."""
    import itertools
    spec = simclr(32)
    x = images(24, 32, 5)
    p = params_for(24, spec, 5)
    p["order"] = torch.tensor(list(itertools.permutations(range(4))))
    p["contrast"] = torch.linspace(0.2, 1.8, 24)
    p["gray"] = torch.arange(24) % 5 == 0
    p["blur"] = torch.arange(24) % 2 == 0
    check(x, spec, p)


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------

def test_gray_and_saturated_images():
    spec = simclr(32).replace(jitter=JitterSpec(p=1.0))
    n = 8
    x = images(n, 32, 7)
    x[0] = 0.0
    x[1] = 1.0
    x[2] = x[2, :1].expand(3, 32, 32)  # gray: C == 0 everywhere
    x[3] = (x[3] > 0.5).float()        # every channel saturated at 0 or 1
    x[4, :, :16] = 1.0
    x[4, :, 16:] = 0.0
    for seed in range(3):
        check(x, spec, params_for(n, spec, 300 + seed))


def test_hue_across_the_sector_wrap():
    spec = simclr(32)
    n = 6
    x = images(n, 32, 8)
    # Every pixel near h = 0: r max, g and b within a few levels (both orders).
    x[:, 0] = 0.8
    x[:, 1] = 0.2 + torch.randint(-3, 4, (n, 32, 32)).float() / 255
    x[:, 2] = 0.2 + torch.randint(-3, 4, (n, 32, 32)).float() / 255
    p = params_for(n, spec, 9)
    p["order"] = torch.tensor([[A.HUE, -1, -1, -1]] * n)
    p["hue"] = torch.tensor([-0.5, -0.2, -1e-3, 1e-3, 0.2, 0.5])
    p["blur"][:] = False
    check(x, spec, p)


def test_factors_exactly_zero_and_one():
    spec = simclr(32)
    ops = [A.BRIGHTNESS, A.CONTRAST, A.SATURATION, A.HUE]
    n = 8
    x = images(n, 32, 10)
    p = params_for(n, spec, 10)
    p["order"] = torch.tensor([ops, ops[::-1]] * 4)
    zero, one = torch.zeros(n), torch.ones(n)
    for f in (zero, one):
        q = dict(p, brightness=f, contrast=f, saturation=f, hue=zero)
        check(x, spec, q)
    # each op alone at factor 0 / 1 (brightness 0: black; contrast 0: the mean; saturation 0: V)
    for o in ops[:3]:
        for f in (zero, one):
            q = dict(p, order=torch.tensor([[o, -1, -1, -1]] * n), brightness=f, contrast=f, saturation=f,
                     hue=zero, gray=torch.zeros(n, dtype=torch.bool), blur=torch.zeros(n, dtype=torch.bool))
            check(x, spec, q)
            if o == A.BRIGHTNESS and f is zero:
                got = A.photometric(x, spec, params=q, mode="fused")
                assert float(got.abs().max()) == 0.0


def test_jitter_and_blur_off_by_params_and_zero_strength():
    spec = simclr(32)
    n = 7
    x = images(n, 32, 11)
    p = params_for(n, spec, 11)
    off = dict(p, order=torch.full((n, 4), A.NO_OP), gray=torch.zeros(n, dtype=torch.bool),
               blur=torch.zeros(n, dtype=torch.bool))
    check(x, spec, off)
    assert torch.equal(A.photometric(x, spec, params=off, mode="fused"), x)  # untouched samples are exact
    zero_ops = spec.replace(jitter=JitterSpec(p=1.0, hue=0.0, saturation=0.0))
    check(x, zero_ops, params_for(n, zero_ops, 12))


def test_grayscale_always_and_normalize():
    spec = simclr(32).replace(grayscale_p=1.0, normalize=True)
    x = images(7, 32, 13)
    check(x, spec, params_for(7, spec, 13))


def test_spec_without_jitter_and_blur():
    spec = simclr(32).replace(jitter=None, blur=None, grayscale_p=0.5, normalize=True)
    x = images(7, 32, 14)
    check(x, spec, params_for(7, spec, 14))


# ---------------------------------------------------------------------------------------------
# finish_views: uint8 crops in, views out
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_finish_views_fused_matches_subset(dtype):
    spec = simclr(32)
    for B in (5, 1):
        g = torch.Generator().manual_seed(B)
        crops = torch.randint(0, 256, (B, 2, 32, 32, 3), dtype=torch.uint8, generator=g)
        want = A.finish_views(crops, spec, torch.Generator().manual_seed(3), dtype, mode="subset")
        want = [v.clone() for v in want]
        got = A.finish_views(crops, spec, torch.Generator().manual_seed(3), dtype, mode="fused")
        assert len(got) == 2
        for w, v in zip(want, got):
            assert v.shape == (B, 3, 32, 32) and v.dtype == dtype
            assert v.is_contiguous(memory_format=torch.channels_last)
            assert float((v.float() - w.float()).abs().max()) <= TOL[dtype]


def test_no_recompile_across_batch_sizes():
    """After one call per configuration, other batch sizes (1 included) reuse the graphs."""
    from torch._dynamo.utils import counters
    spec = simclr(32)
    crops = torch.randint(0, 256, (3, 2, 32, 32, 3), dtype=torch.uint8)
    A.finish_views(crops, spec, torch.Generator().manual_seed(0), torch.float32, mode="fused")
    before = counters["stats"]["unique_graphs"]
    assert before > 0, "the fused path did not compile"
    for n in (1, 2, 7, 64):
        crops = torch.randint(0, 256, (n, 2, 32, 32, 3), dtype=torch.uint8)
        A.finish_views(crops, spec, torch.Generator().manual_seed(n), torch.float32, mode="fused")
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.slow
def test_inductor_cpu_code_matches_subset():
    """The production graph compiled by inductor's C++ backend (what --data.photometry_mode=fused runs
    on a CPU), for fp32 and bf16 views, batches 5 and 1: the oracle's numbers."""
    spec = simclr(32)
    for dtype in (torch.float32, torch.bfloat16):
        for B in (5, 1):
            crops = torch.randint(0, 256, (B, 2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(B))
            want = [v.clone() for v in A.finish_views(crops, spec, torch.Generator().manual_seed(3), dtype, mode="subset")]
            got = A.finish_views(crops, spec, torch.Generator().manual_seed(3), dtype, mode="fused")
            for w, v in zip(want, got):
                assert float((v.float() - w.float()).abs().max()) <= TOL[dtype]


def test_eager_fallback_runs_the_same_graphs(monkeypatch):
    """Without a compiler the graphs run as plain torch code: same numbers."""
    monkeypatch.setenv("FASTCLR_FUSED_EAGER", "1")
    spec = simclr(32).replace(normalize=True)
    x = images(5, 32, 15)
    check(x, spec, params_for(5, spec, 15))


# ---------------------------------------------------------------------------------------------
# CPU buffer reuse (finish_views)
# ---------------------------------------------------------------------------------------------

def test_host_buffers_never_overwrite_held_views():
    spec = simclr(16)
    crops = torch.randint(0, 256, (4, 2, 16, 16, 3), dtype=torch.uint8)
    a = A.finish_views(crops, spec, torch.Generator().manual_seed(0), torch.float32)
    a0 = [v.clone() for v in a]
    b = A.finish_views(crops, spec, torch.Generator().manual_seed(1), torch.float32)
    assert a[0].data_ptr() != b[0].data_ptr()  # a is held: b got a fresh buffer
    assert all(torch.equal(u, v) for u, v in zip(a, a0))
    ptr = b[0].data_ptr()
    row = b[1][0]  # a view of a view keeps the buffer too
    del b
    c = A.finish_views(crops, spec, torch.Generator().manual_seed(2), torch.float32)
    assert c[0].data_ptr() != ptr
    del row, c
    d = A.finish_views(crops, spec, torch.Generator().manual_seed(3), torch.float32)
    e_ptr = d[0].data_ptr()
    del d
    e = A.finish_views(crops, spec, torch.Generator().manual_seed(4), torch.float32)
    assert e[0].data_ptr() == e_ptr  # nothing held: reused
    e[0].share_memory_()  # as a DataLoader worker's result: another process reads it
    e_ptr = e[0].data_ptr()
    del e
    f = A.finish_views(crops, spec, torch.Generator().manual_seed(5), torch.float32)
    assert f[0].data_ptr() != e_ptr


@pytest.mark.parametrize("mode", ["subset", "fused"])
def test_finish_views_writes_into_out(mode):
    spec = simclr(32)
    crops = torch.randint(0, 256, (3, 2, 32, 32, 3), dtype=torch.uint8)
    want = A.finish_views(crops, spec, torch.Generator().manual_seed(0), torch.bfloat16, mode=mode)
    out = torch.empty(6, 3, 32, 32, dtype=torch.bfloat16, memory_format=torch.channels_last).share_memory_()
    got = A.finish_views(crops, spec, torch.Generator().manual_seed(0), torch.bfloat16, mode=mode, out=out)
    assert [v.data_ptr() for v in got] == [out[0].data_ptr(), out[3].data_ptr()]
    assert all(torch.equal(u, v) for u, v in zip(got, want))
    with pytest.raises(ValueError):
        A.finish_views(crops, spec, None, torch.float32, out=out)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("size,n", [(32, 64), (224, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_fused_matches_cpu_oracle(size, n, dtype):
    spec = simclr(size)
    for seed in range(3):
        x = images(n, size, seed).to(dtype)
        if seed % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        p = params_for(n, spec, seed)
        want = A.photometric(x, spec, params=p, mode="subset")
        got = A.photometric(x.cuda(), spec, params={k: v.cuda() for k, v in p.items()}, mode="fused")
        assert got.is_cuda and got.dtype == dtype
        err = float((got.float().cpu() - want.float()).abs().max())
        assert err <= TOL[dtype], err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_finish_views_fused_matches_cpu_oracle(dtype):
    spec = simclr(64)
    B, K = 9, 2
    crops = torch.randint(0, 256, (B, K, 64, 64, 3), dtype=torch.uint8)
    g = torch.Generator(device="cuda").manual_seed(0)
    p = A.sample_photometric_params(B * K, spec, torch.Generator(device="cuda").manual_seed(0))
    views = A.finish_views(crops, spec, g, dtype, device="cuda", mode="fused")
    assert all(v.is_cuda and v.dtype == dtype and v.is_contiguous(memory_format=torch.channels_last)
               for v in views)
    x = crops.permute(1, 0, 4, 2, 3).reshape(K * B, 3, 64, 64).float() * (1 / 255)
    want = A.photometric(x, spec, params={k: v.cpu() for k, v in p.items()}, mode="subset")
    got = torch.cat(views).float().cpu()
    err = float((got - want.to(dtype).float()).abs().max())
    assert err <= TOL[dtype], err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_path_has_no_host_sync():
    spec = simclr(64).replace(normalize=True)
    crops = torch.randint(0, 256, (8, 2, 64, 64, 3), dtype=torch.uint8, device="cuda")
    x = torch.rand(16, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(2):  # warm-up: compile, allocate scratch and constants
        A.finish_views(crops, spec, g, torch.bfloat16, mode="fused")
        A.photometric(x, spec, g, mode="fused")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            views = A.finish_views(crops, spec, g, torch.bfloat16)  # auto = fused on CUDA
            y = A.photometric(x, spec, g, mode="fused")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert views[0].shape == (8, 3, 64, 64) and y.shape == x.shape
