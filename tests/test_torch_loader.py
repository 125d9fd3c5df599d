"""The torch backend beyond the shared contract (tests/test_loader_contract.py): determinism across
worker counts, bad and odd files, file lists, eval mode, the bytes (GPU-decode) path run on the CPU,
and on a GPU the nvJPEG path and device prefetch."""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, PER_CLASS

from loaders.sources import synthetic
from loaders import augment
from loaders.config import LoaderConfig
from loaders.sources.folders import list_image_folder
from loaders.augment.spec import finetune, simclr
from loaders.backends.torch_loader import TorchLoader, build_torch_loader, decode_rgb

S = 32


def cfg_for(path, **kw) -> LoaderConfig:
    base = dict(path=path, image_size=S, batch_size=4, num_workers=0, seed=0)
    base.update(kw)
    return LoaderConfig(**base)


def epoch(loader, e=0):
    loader.set_epoch(e)
    out = []
    for b in loader:
        out.append((b, loader.last_indices.copy()))
    return out


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_decode_rgb_each_kind(bad_files):
    for kind in synthetic.READABLE:
        img = decode_rgb(read(bad_files[kind]))
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8, kind
    assert decode_rgb(read(bad_files["huge"])).shape == (4000, 6000, 3)
    assert decode_rgb(read(bad_files["tiny"])).shape == (1, 1, 3)
    for kind in synthetic.UNREADABLE:
        with pytest.raises((ValueError, OSError)):  # PIL's UnidentifiedImageError is an OSError
            decode_rgb(read(bad_files[kind]))


def test_same_seed_same_batches_for_any_worker_count(image_folder):
    """0 workers: everything in the main process; 2 workers: decode, crops and colour ops in the
    workers. Same seed, same batches."""
    spec = simclr(S)
    a = epoch(build_torch_loader(cfg_for(image_folder, num_workers=0), spec))
    b = epoch(build_torch_loader(cfg_for(image_folder, num_workers=2), spec))
    assert len(a) == len(b) == NUM_CLASSES * PER_CLASS // 4
    for (ba, ia), (bb, ib) in zip(a, b):
        assert np.array_equal(ia, ib)
        assert torch.equal(ba.labels, bb.labels)
        for va, vb in zip(ba.views, bb.views):
            assert torch.equal(va, vb)
            assert vb.is_contiguous(memory_format=torch.channels_last)  # colour ops ran in a worker
    c = epoch(build_torch_loader(cfg_for(image_folder, seed=1), spec))
    assert not torch.equal(c[0][0].views[0], a[0][0].views[0])


def test_resume_position_with_workers_is_exact_and_passes_advance(image_folder):
    """With DataLoader workers (the presets' default), set_epoch(e, start_step=k) yields batch k of
    epoch e first, pixel for pixel the batch an uninterrupted epoch yields there; a pass started
    without set_epoch runs the next epoch from its first batch (the rule of every backend)."""
    full = epoch(build_torch_loader(cfg_for(image_folder, num_workers=2), simclr(S)), 1)
    loader = build_torch_loader(cfg_for(image_folder, num_workers=2), simclr(S))
    loader.set_epoch(1, start_step=3)
    tail = [(b, loader.last_indices.copy()) for b in loader]
    assert len(tail) == len(full) - 3
    for (bf, i_f), (bt, i_t) in zip(full[3:], tail):
        np.testing.assert_array_equal(i_f, i_t)
        for vf, vt in zip(bf.views, bt.views):
            assert torch.equal(vf, vt)
    first = next(iter(loader))  # no set_epoch: epoch 2, batch 0
    np.testing.assert_array_equal(loader.last_indices, loader.epoch_indices(2)[:4])
    assert first.views[0].shape[0] == 4


def test_labels_follow_indices_and_new_epoch_new_crops(image_folder):
    loader = build_torch_loader(cfg_for(image_folder, train=False), finetune(S).replace(num_views=2))
    labels = np.array([lab for _, lab in list_image_folder(image_folder)[0]])
    e0, e1 = epoch(loader, 0), epoch(loader, 1)
    for (b, idx) in e0:
        assert b.labels.tolist() == labels[idx].tolist()
    # eval mode: no shuffle, so the same images in the same order, but fresh crops each epoch
    assert [i.tolist() for _, i in e0] == [i.tolist() for _, i in e1]
    assert not torch.equal(e0[0][0].views[0], e1[0][0].views[0])


def test_eval_mode_keeps_the_last_partial_batch(image_folder):
    n = NUM_CLASSES * PER_CLASS
    loader = build_torch_loader(cfg_for(image_folder, batch_size=5, train=False), simclr(S))
    assert len(loader) == -(-n // 5)
    batches = epoch(loader)
    assert [b.views[0].shape[0] for b, _ in batches] == [5] * (n // 5) + [n % 5]
    assert np.concatenate([i for _, i in batches]).tolist() == list(range(n))
    train = build_torch_loader(cfg_for(image_folder, batch_size=5, train=True), simclr(S))
    assert len(train) == n // 5


def test_bad_files_are_replaced_logged_and_counted(mixed_folder, caplog):
    samples, _ = list_image_folder(mixed_folder)
    n = len(samples)
    caplog.set_level(logging.WARNING, logger="loaders.backends.torch_loader")
    loader = build_torch_loader(cfg_for(mixed_folder, batch_size=n, num_workers=1), simclr(S))
    (batch, _), = epoch(loader)
    assert batch.views[0].shape[0] == n
    assert loader.num_skipped == len(synthetic.UNREADABLE)
    bad_names = sorted(os.path.basename(p) for p, _ in loader.bad_files)
    assert bad_names == sorted(f"bad_{k}.JPEG" for k in synthetic.UNREADABLE)
    assert all(reason for _, reason in loader.bad_files)
    text = caplog.text
    for name in bad_names:
        assert name in text
    assert "skipped 3 unreadable" in text  # the epoch-end summary line
    # stats are per epoch: a second epoch counts again from zero
    epoch(loader, 1)
    assert loader.num_skipped == len(synthetic.UNREADABLE)


def test_odd_but_readable_files_are_used(tmp_path, bad_files):
    root = tmp_path / "odd" / "n00000000"
    root.mkdir(parents=True)
    for kind in synthetic.READABLE:
        shutil.copy(bad_files[kind], root)
    k = len(synthetic.READABLE)
    loader = build_torch_loader(cfg_for(str(tmp_path / "odd"), batch_size=k, train=False), simclr(S))
    (batch, idx), = epoch(loader)
    assert loader.num_skipped == 0 and sorted(idx.tolist()) == list(range(k))
    assert batch.views[0].shape == (k, 3, S, S)


def test_file_list_selects_samples(image_folder, tmp_path):
    samples, _ = list_image_folder(image_folder)
    chosen = samples[::3]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(os.path.relpath(p, image_folder) for p, _ in chosen) + "\n")
    loader = build_torch_loader(cfg_for(image_folder, file_list=str(lst), batch_size=2, train=False), simclr(S))
    assert len(loader) == len(chosen) // 2
    got = epoch(loader)
    labels = torch.cat([b.labels for b, _ in got]).tolist()
    assert labels == [lab for _, lab in chosen]


def test_bytes_path_matches_worker_decode(mixed_folder, tmp_path):
    """The GPU-decode path (header parse + boxes in the worker, decode + crop in the main process)
    run with a CPU decoder: same samples, same boxes, pixels within resize rounding of the worker
    path; bad and odd files handled the same way. A 15-file list keeps it quick."""
    samples, _ = list_image_folder(mixed_folder)
    good = [p for p, _ in samples if "bad_" not in os.path.basename(p)][:8]
    odd = [p for p, _ in samples if os.path.basename(p) in
           {f"bad_{k}.JPEG" for k in (*synthetic.UNREADABLE, "png", "cmyk", "gray", "tiny")}]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(os.path.relpath(p, mixed_folder) for p in good + odd) + "\n")
    n = len(good) + len(odd)
    assert n == 15
    spec = finetune(S).replace(num_views=2)  # geometry only: compare the crops themselves
    cfg = cfg_for(mixed_folder, file_list=str(lst), batch_size=5)
    a = epoch(TorchLoader(cfg, spec))
    b = epoch(TorchLoader(cfg, spec, main_decode_device="cpu"))
    assert len(a) == len(b) == 3
    for (ba, ia), (bb, ib) in zip(a, b):
        assert np.array_equal(ia, ib) and torch.equal(ba.labels, bb.labels)
        for va, vb in zip(ba.views, bb.views):
            d = (va - vb).abs()
            assert float(d.mean()) < 1.5 / 255 and float(d.max()) <= 12 / 255
    whole = TorchLoader(cfg_for(mixed_folder, file_list=str(lst), batch_size=n), simclr(S), main_decode_device="cpu")
    (batch, _), = epoch(whole)
    assert whole.num_skipped == len(synthetic.UNREADABLE) and batch.views[0].shape[0] == n


def test_bytes_path_survives_a_jpeg_no_decoder_can_read(image_folder, monkeypatch):
    """A file that passes the worker's header check but fails nvJPEG and the CPU decoder in the main
    process: counted as bad, its row repeats the next decodable image (with that image's label)."""
    import torchvision.io

    from loaders.backends import torch_loader
    samples, _ = list_image_folder(image_folder)
    victim = read(samples[1][0])
    real_decode, real_rgb = torchvision.io.decode_jpeg, torch_loader.decode_rgb

    def decode_jpeg(data, *a, **kw):
        if isinstance(data, list):
            if any(d.numpy().tobytes() == victim for d in data):
                raise RuntimeError("batched decode failed")
            return real_decode(data, *a, **kw)
        if data.numpy().tobytes() == victim:
            raise RuntimeError("corrupt")
        return real_decode(data, *a, **kw)

    def decode_rgb(data):
        if data == victim:
            raise OSError("corrupt")
        return real_rgb(data)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    monkeypatch.setattr(torch_loader, "decode_rgb", decode_rgb)
    loader = TorchLoader(cfg_for(image_folder, batch_size=4, train=False), simclr(S), main_decode_device="cpu")
    (batch, idx), = epoch(loader)[:1]
    assert idx.tolist() == [0, 1, 2, 3]
    assert loader.num_skipped == 1 and loader.bad_files[0][0] == samples[1][0]
    assert batch.labels.tolist() == [samples[i][1] for i in (0, 2, 2, 3)]
    assert batch.views[0].shape == (4, 3, S, S)


def test_crop_resize_tensor_matches_opencv():
    rng = np.random.default_rng(0)
    img = synthetic.textured_image(rng, 300, 200)
    boxes = augment.sample_crop_boxes(200, 300, 6, simclr(64).crop, rng)
    flips = np.array([0, 1, 0, 1, 0, 1], bool)
    ref = augment.crop_resize(img, boxes, 64, "bicubic", flips).astype(int)
    got = augment.crop_resize_tensor(torch.from_numpy(img).permute(2, 0, 1), boxes, 64, "bicubic", flips)
    assert got.shape == (6, 64, 64, 3) and got.dtype == torch.uint8
    diff = np.abs(got.numpy().astype(int) - ref)
    assert diff.mean() < 0.5 and diff.max() <= 3


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_crop_resize_tensor_equals_torch_interpolate(interp):
    """The row/column-gathering resize is torch's own resize (antialias=False), exactly."""
    rng = np.random.default_rng(1)
    for h, w, size in [(37, 53, 16), (10, 7, 32), (1, 1, 8), (64, 64, 64)]:
        img = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        ref = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode=interp,
                                              align_corners=False)[0].clamp(0, 255).round()
        got = augment.crop_resize_tensor(img, [[0, 0, h, w]], size, interp)[0].permute(2, 0, 1).float()
        assert torch.equal(got, ref), (h, w, size)


def test_rejects_bad_config(image_folder):
    with pytest.raises(ValueError, match="decode_device"):
        TorchLoader(cfg_for(image_folder, decode_device="tpu"), simclr(S))
    with pytest.raises(ValueError, match="fewer than one batch"):
        TorchLoader(cfg_for(image_folder, batch_size=1000), simclr(S))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            TorchLoader(cfg_for(image_folder, decode_device="cuda"), simclr(S))


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decode_device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_contract(mixed_folder, decode_device, dtype):
    """Both paths on a GPU: CPU decode + side-stream prefetch, and nvJPEG decode; the contract's
    checks (shapes, layout, dtype, range, labels, bad files, sharding)."""
    samples, _ = list_image_folder(mixed_folder)
    n = len(samples)
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    loader = build_torch_loader(cfg_for(mixed_folder, batch_size=n, decode_device=decode_device, dtype=dtype,
                                        num_workers=2), simclr(S), device="cuda")
    (batch, _), = epoch(loader)
    assert loader.num_skipped == len(synthetic.UNREADABLE)
    for v in batch.views:
        assert v.is_cuda and v.dtype == want and v.shape == (n, 3, S, S)
        assert v.is_contiguous(memory_format=torch.channels_last)
        assert float(v.min()) >= 0 and float(v.max()) <= 1
    assert batch.labels.is_cuda and batch.labels.dtype == torch.int64
    assert not torch.equal(batch.views[0], batch.views[1])
    seen = []
    for r in range(2):
        ld = build_torch_loader(cfg_for(mixed_folder, batch_size=4, decode_device=decode_device, dtype=dtype),
                                simclr(S), rank=r, world_size=2, device="cuda")
        got = epoch(ld)
        assert len(got) == len(ld) == (n // 2) // 4
        seen.append(set(np.concatenate([i for _, i in got]).tolist()))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == n


def test_photometry_mode_reaches_the_colour_ops_and_both_modes_agree(image_folder, monkeypatch):
    """data.photometry_mode is what the main process's colour ops run with; where (masked whole-batch
    ops) and subset (each op on its own samples) give the same views for the same seed."""
    spec = simclr(S)
    seen = []
    real = augment.photometric

    def spy(*a, **kw):
        seen.append(kw.get("mode"))
        return real(*a, **kw)

    monkeypatch.setattr(augment.photometry, "photometric", spy)  # what finish_views calls
    runs = {}
    for mode in ("where", "subset"):
        seen.clear()
        runs[mode] = epoch(build_torch_loader(cfg_for(image_folder, photometry_mode=mode), spec))
        assert seen and set(seen) == {mode}
    for (bw, _), (bs, _) in zip(runs["where"], runs["subset"]):
        for vw, vs in zip(bw.views, bs.views):
            torch.testing.assert_close(vw, vs, rtol=0, atol=2e-6)
