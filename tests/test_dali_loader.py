"""DALI backend on the CPU (device_id=None): output contract, exact epochs under sharding, resume,
both photometry modes, the DALI colour ops against augment.py (TF semantics), bad files.
GPU tests (mixed decode) are marked gpu and run in benchmarks/gpu_suite.sh."""
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI not installed: pip install 'fastclr[dali]'")

from conftest import NUM_CLASSES, PER_CLASS  # noqa: E402
from loaders.augment import spec as specs  # noqa: F401
from loaders import augment  # noqa: F401
from loaders.config import LoaderConfig  # noqa: F401
from loaders.sources.folders import list_image_folder  # noqa: F401
from loaders.sampling import shard_indices  # noqa: F401
from loaders.backends import dali_loader, dali_pipeline  # noqa: E402
from loaders.backends.dali_loader import build_dali_loader  # noqa: E402

N = NUM_CLASSES * PER_CLASS
SIZE = 32


def make(path, rank=0, world=1, spec=None, device="cpu", **kw):
    cfg = LoaderConfig(backend="dali", path=path, image_size=kw.pop("image_size", SIZE),
                       batch_size=kw.pop("batch_size", 4), num_workers=2, **kw)
    return build_dali_loader(cfg, spec or specs.simclr(size=SIZE), rank=rank, world_size=world, device=device)


def run_epoch(loader, epoch):
    loader.set_epoch(epoch)
    out = []
    for _ in loader:
        out.append(loader.last_indices.copy())
    return out


# ------------------------------------------------------------------------------------------------
# Output contract
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,dtype", [("torch", "float32"), ("dali", "bfloat16")])
def test_batches_on_image_folder(image_folder, mode, dtype):
    loader = make(image_folder, dali_photometry=mode, dtype=dtype, batch_size=5)
    samples, _ = list_image_folder(image_folder)
    folder_labels = np.array([label for _, label in samples])
    assert len(loader) == N // 5
    n = 0
    for batch in loader:
        n += 1
        assert len(batch.views) == 2
        for v in batch.views:
            assert v.shape == (5, 3, SIZE, SIZE) and v.dtype == getattr(torch, dtype)
            assert v.device.type == "cpu"
            assert v.is_contiguous(memory_format=torch.channels_last)
            assert 0.0 <= float(v.min()) and float(v.max()) <= 1.0
            assert float(v.float().std()) > 0.02  # real image content, not a constant
        assert not torch.equal(batch.views[0], batch.views[1])  # two different views
        assert batch.labels.dtype == torch.int64 and batch.labels.shape == (5,)
        assert batch.labels.tolist() == folder_labels[loader.last_indices].tolist()
    assert n == len(loader)


def test_eval_spec_in_order_with_last_partial_batch(image_folder):
    loader = make(image_folder, spec=specs.eval_(size=SIZE), train=False, batch_size=5)
    assert len(loader) == -(-N // 5)
    batches = list(loader)
    assert [b.views[0].shape[0] for b in batches] == [5, 5, 5, 5, 4]
    assert np.concatenate(run_epoch(loader, 0)).tolist() == list(range(N))  # no shuffle
    # deterministic: a centre crop without flip gives the same pixels every epoch
    again = list(loader)
    assert torch.equal(batches[0].views[0], again[0].views[0])


def test_eval_centre_crop_matches_the_torch_backend_geometry(image_folder):
    """Same crop box as augment.geometry (TF's center_crop, rint rounding) on the same images: only
    the decoders' and cubic kernels' rounding differ."""
    from PIL import Image
    spec = specs.eval_(size=SIZE)
    loader = make(image_folder, spec=spec, train=False, batch_size=N)
    views = next(iter(loader)).views[0]
    samples, _ = list_image_folder(image_folder)
    for i, (path, _) in enumerate(samples):
        ref = augment.geometry(np.asarray(Image.open(path).convert("RGB")), spec, np.random.default_rng(0))
        ref = torch.from_numpy(ref[0]).permute(2, 0, 1).float() / 255
        assert (views[i] - ref).abs().mean() < 0.01, path


def test_roi_decode_option(image_folder):
    loader = make(image_folder, dali_roi_decode=True, dali_photometry="dali")
    batch = next(iter(loader))
    assert [tuple(v.shape) for v in batch.views] == [(4, 3, SIZE, SIZE)] * 2


def test_memory_report_on_cpu(image_folder):
    loader = make(image_folder)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    rep = loader.memory_report()
    assert rep["gpu_bytes"] is None and isinstance(rep["host_rss_bytes"], int)
    assert rep["batches_seen"] == 3 and rep["device"] == "cpu"


# ------------------------------------------------------------------------------------------------
# Epochs, sharding, resume
# ------------------------------------------------------------------------------------------------

def test_two_shards_two_epochs_cover_each_file_once(image_folder):
    loaders = [make(image_folder, rank=r, world=2, batch_size=4) for r in range(2)]
    orders = []
    for epoch in range(2):
        per_rank = [run_epoch(ld, epoch) for ld in loaders]
        for ld, batches in zip(loaders, per_rank):
            assert len(batches) == len(ld) == N // 2 // 4
        seen = np.concatenate([np.concatenate(b) for b in per_rank])
        assert sorted(seen.tolist()) == list(range(N))  # each file exactly once, disjoint across ranks
        for r, batches in enumerate(per_rank):  # the torch backend's order: common.shard_indices
            assert np.concatenate(batches).tolist() == shard_indices(N, r, 2, epoch, 0, True).tolist()
        orders.append(seen)
    assert orders[0].tolist() != orders[1].tolist()  # reshuffled per epoch


@pytest.mark.parametrize("world,batch", [(1, 5), (3, 5), (2, 7)])
def test_len_equals_batches_yielded_every_epoch(image_folder, world, batch):
    for rank in range(world):
        loader = make(image_folder, rank=rank, world=world, batch_size=batch)
        assert len(loader) == (N // world) // batch
        for epoch in range(3):
            got = run_epoch(loader, epoch)
            assert len(got) == len(loader)
            flat = np.concatenate(got)
            assert len(set(flat.tolist())) == len(flat)  # dropped remainder, never a repeat


def test_resume_with_set_epoch_gives_the_same_order(image_folder):
    run = make(image_folder, rank=1, world=2)
    uninterrupted = [run_epoch(run, e) for e in range(2)]
    fresh = make(image_folder, rank=1, world=2)
    resumed = run_epoch(fresh, 1)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in uninterrupted[1]]
    assert np.concatenate(resumed).tolist() == fresh.epoch_indices(1)[:len(fresh) * 4].tolist()


def test_iterating_again_without_set_epoch_is_the_next_epoch(image_folder):
    """As the FFCV backend: each iteration advances the epoch unless set_epoch says otherwise."""
    loader = make(image_folder)
    first = [loader.last_indices.tolist() for _ in loader]
    second = [loader.last_indices.tolist() for _ in loader]
    assert np.concatenate(first).tolist() == loader.epoch_indices(0).tolist()
    assert np.concatenate(second).tolist() == loader.epoch_indices(1).tolist()


def test_abandoned_epoch_does_not_leak_into_the_next(image_folder):
    loader = make(image_folder, batch_size=4, dali_prefetch=2)
    loader.set_epoch(0)
    it = iter(loader)
    next(it)  # stop after one batch; DALI has prefetched more
    full = run_epoch(loader, 0)
    expected = np.split(shard_indices(N, 0, 1, 0, 0, True), N // 4)
    assert [b.tolist() for b in full] == [s.tolist() for s in expected]
    assert len(full) == len(loader)


# ------------------------------------------------------------------------------------------------
# Photometry: "torch" mode is the shared function; "dali" mode ops against augment.py
# ------------------------------------------------------------------------------------------------

def test_torch_mode_goes_through_shared_finish_views(image_folder, monkeypatch):
    calls = []
    real = augment.finish_views

    def spy(crops, spec, generator, dtype, device=None, mode="auto"):
        calls.append((crops.clone(), generator.get_state(), spec, dtype))
        out = real(crops, spec, generator, dtype, device=device, mode=mode)
        calls[-1] += ([v.clone() for v in out],)
        return out

    monkeypatch.setattr(augment, "finish_views", spy)
    loader = make(image_folder, dali_photometry="torch", seed=3)
    batches = [b for _, b in zip(range(2), loader)]
    assert len(calls) == 2
    for batch, (crops, state, spec, dtype, out) in zip(batches, calls):
        assert crops.dtype == torch.uint8 and crops.shape == (4, 2, SIZE, SIZE, 3)
        for v, o in zip(batch.views, out):
            assert torch.equal(v, o)
        gen = torch.Generator().set_state(state)  # same crops + same generator state -> same views
        again = real(crops, spec, gen, dtype)
        assert all(torch.equal(a, o) for a, o in zip(again, out))


def _run_op(images, op):
    """Apply a DALI graph function to float HWC images on the CPU; returns [N, 3, H, W] tensors."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: list(images), batch=True, dtype=types.FLOAT, ndim=3,
                               layout="HWC")
        return op(x)

    p = pipe()
    p.build()
    return torch.from_numpy(p.run()[0].as_array()).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def float_images():
    rng = np.random.default_rng(0)
    from loaders.sources.synthetic import textured_image
    return [textured_image(rng, 40, 30).astype(np.float32) / 255 for _ in range(3)]


def _nchw(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def test_dali_colour_ops_match_tf_semantics(float_images):
    x = _nchw(float_images)
    f, lo = 1.6, 0.3
    dl = dali_pipeline
    cases = {
        "brightness": (lambda d: dl.brightness(d, f), augment.adjust_brightness(x, f).clamp(0, 1), 1e-6),
        "contrast": (lambda d: dl.contrast(d, f), augment.adjust_contrast(x, f).clamp(0, 1), 1e-5),
        "low contrast": (lambda d: dl.contrast(d, lo), augment.adjust_contrast(x, lo).clamp(0, 1), 1e-5),
        "saturation": (lambda d: dl.saturation(d, f), augment.adjust_saturation(x, f).clamp(0, 1), 1e-5),
        "grayscale": (dali_pipeline.grayscale, augment.to_grayscale(x), 1e-6),
        "exact hue": (lambda d: dali_pipeline.hue_exact(d, 0.05), augment.adjust_hue(x, 0.05), 1e-5),
        "exact hue, negative": (lambda d: dali_pipeline.hue_exact(d, -0.2), augment.adjust_hue(x, -0.2), 1e-5),
    }
    for name, (op, expected, tol) in cases.items():
        got = _run_op(float_images, op)
        assert (got - expected).abs().max() < tol, name
    # Default hue (EXACT_HUE False) is fn.hsv's documented approximation: identity at 0, rotating the
    # same way as TF's HSV shift, within the documented distance of it.
    assert not dali_pipeline.EXACT_HUE
    assert (_run_op(float_images, lambda d: dali_pipeline.hue(d, 0.0)) - x).abs().max() < 1e-5
    approx = _run_op(float_images, lambda d: dali_pipeline.hue(d, 0.05 * 360))
    exact = augment.adjust_hue(x, 0.05)
    assert (approx - exact).abs().mean() < 0.08 < (approx - augment.adjust_hue(x, -0.05)).abs().mean()


def test_dali_mode_same_crops_as_torch_mode(image_folder):
    """With the same seed the DALI geometry is identical in both modes (view 0), so deterministic
    photometry can be compared end to end: none, grayscale p=1, blur p=1 with a fixed sigma."""
    base = specs.simclr(size=SIZE, num_views=1).replace(jitter=None, grayscale_p=0.0, blur=None)
    cases = {"none": (base, 0.0, None),
             "gray": (base.replace(grayscale_p=1.0), 1e-6, None),
             "blur": (base.replace(blur=specs.BlurSpec(p=1.0, sigma=(1.5, 1.5))), 1e-5, 2),
             "normalize": (base.replace(normalize=True), 1e-5, None)}
    for name, (spec, tol, border) in cases.items():
        a = next(iter(make(image_folder, spec=spec, dali_photometry="torch"))).views[0]
        b = next(iter(make(image_folder, spec=spec, dali_photometry="dali"))).views[0]
        if border:  # TF deviation: DALI blurs with reflect-101 borders, TF/torch zero-pad
            a, b = a[..., border:-border, border:-border], b[..., border:-border, border:-border]
        assert (a - b).abs().max() <= tol, name


def test_dali_mode_full_recipe_statistics(image_folder):
    loader = make(image_folder, dali_photometry="dali", batch_size=8)
    views = torch.cat([v for b in loader for v in b.views])
    assert views.shape == (48, 3, SIZE, SIZE)
    assert views.min() >= 0 and views.max() <= 1
    gray = ((views[:, 0] == views[:, 1]) & (views[:, 1] == views[:, 2])).flatten(1).all(1)
    assert 0 < int(gray.sum()) < len(views)  # grayscale applied to some views (p=0.2), not all


# ------------------------------------------------------------------------------------------------
# Bad files, GPU graph, imports
# ------------------------------------------------------------------------------------------------

def test_undecodable_file_stops_with_one_line_error(mixed_folder, bad_files):
    import os
    loader = make(mixed_folder, batch_size=4)
    with pytest.raises(RuntimeError) as e:
        for _ in range(2):
            for _ in loader:
                pass
    msg = str(e.value)
    assert "\n" not in msg
    assert f"python -m loaders.validate {mixed_folder} --out clean.txt" in msg
    named = [k for k in ("truncated", "empty", "text") if os.path.basename(bad_files[k]) in msg]
    assert len(named) == 1, msg


def test_gpu_graph_is_well_formed_without_a_gpu():
    """The GPU graph (mixed decode, GPU ops) is defined here without building it: device placement
    errors (a CPU op fed by GPU data) surface at definition time, so CI catches them."""
    cfg = LoaderConfig()
    kw = dict(hw_decoder_load=0.9, device_memory_padding=cfg.device_memory_padding,
              host_memory_padding=cfg.host_memory_padding, **dali_pipeline.HW_PREALLOC)
    for spec in (specs.simclr(size=SIZE), specs.eval_(size=SIZE)):
        for photometry in dali_loader.PHOTOMETRY_MODES:
            for roi in (False, True):
                pipe = dali_pipeline.simclr_pipeline(source=lambda info: None, spec=spec, gpu=True,
                                                   photometry=photometry, roi_decode=roi, decoder_kw=kw,
                                                   batch_size=2, num_threads=1, device_id=0, seed=1)
                if not hasattr(pipe, "_build_graph"):
                    pytest.skip("this DALI has no Pipeline._build_graph")
                pipe._build_graph()
                devices = [o.device for o in pipe._graph_outputs]
                assert devices == ["cpu"] + ["gpu"] * (1 + spec.num_views)


@pytest.mark.e2e
def test_import_loaders_does_not_import_dali():
    code = "import sys, loaders; loaders.build; assert 'nvidia.dali' not in sys.modules, 'DALI imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cuda_device_without_cuda_is_a_clear_error(image_folder):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        make(image_folder, device="cuda")


# ------------------------------------------------------------------------------------------------
# GPU (pytest -m gpu; benchmarks/gpu_suite.sh)
# ------------------------------------------------------------------------------------------------

def gpu(test):
    """GPU suite only (-m gpu); skipped, visibly, where -m gpu runs without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


def _check_gpu_batch(batch, size, dtype, k=2, bs=4):
    assert len(batch.views) == k
    for v in batch.views:
        assert v.shape == (bs, 3, size, size) and v.dtype == dtype and v.device.type == "cuda"
        assert v.is_contiguous(memory_format=torch.channels_last)
        assert 0.0 <= float(v.min()) and float(v.max()) <= 1.0
    assert batch.labels.device.type == "cuda" and batch.labels.dtype == torch.int64


@gpu
@pytest.mark.parametrize("mode", dali_loader.PHOTOMETRY_MODES)
@pytest.mark.parametrize("roi", [False, True])
def test_gpu_contract(image_folder, dali_contract_data, mode, roi):
    for path, file_list, n in ((image_folder, None, N),
                               (dali_contract_data["path"], dali_contract_data["file_list"],
                                dali_contract_data["expected_images"])):
        loaders = [make(path, rank=r, world=2, device="cuda", dali_photometry=mode, dali_roi_decode=roi,
                        dtype="bfloat16", file_list=file_list) for r in range(2)]
        for epoch in range(2):
            seen = []
            for ld in loaders:
                ld.set_epoch(epoch)
                count = 0
                for batch in ld:
                    _check_gpu_batch(batch, SIZE, torch.bfloat16)
                    seen.extend(ld.last_indices.tolist())
                    count += 1
                assert count == len(ld) == (n // 2) // 4
            assert len(seen) == len(set(seen)) == 2 * len(loaders[0]) * 4
        rep = loaders[0].memory_report()
        assert rep["gpu_bytes"] is not None
        print(f"\nDALI GPU memory ({mode}, roi={roi}): {rep['gpu_bytes'] / 2**20:.0f} MiB GPU, "
              f"{rep['host_rss_bytes'] / 2**20:.0f} MiB host")


@gpu
@pytest.mark.parametrize("load", [0.0, 0.9])
def test_gpu_hw_decoder_load(image_folder, load):
    loader = make(image_folder, device="cuda", hw_decoder_load=load)
    _check_gpu_batch(next(iter(loader)), SIZE, torch.float32)


@gpu
@pytest.mark.parametrize("mode", dali_loader.PHOTOMETRY_MODES)
def test_gpu_throughput_smoke(image_folder, mode):
    """Runs batches at 224 px and reports images/s; no timing assertion (benchmarks/ measures)."""
    loader = make(image_folder, device="cuda", dali_photometry=mode, batch_size=8,
                  spec=specs.simclr(size=224), image_size=224, dtype="bfloat16")
    batches = 0
    torch.cuda.synchronize()
    t = time.perf_counter()
    for epoch in range(5):
        loader.set_epoch(epoch)
        for batch in loader:
            batches += 1
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    assert batches == 5 * len(loader)
    print(f"\nDALI GPU {mode}: {batches * 8 / dt:.0f} images/s (2 views, 224 px, tiny folder, "
          f"incl. warm-up); memory {loader.memory_report()}")
