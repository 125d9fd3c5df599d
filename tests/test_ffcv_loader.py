"""The FFCV backend (loaders/ffcv_loader.py) beyond the shared contract test.

Every loader here is a session fixture: each one costs a numba JIT of its pipeline (a few seconds on
2 cores; ``loader.jit_seconds`` records it), so a test never builds a loader it could share.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ffcv", reason="FFCV not installed: pip install 'fastclr[ffcv]'")
cv2 = pytest.importorskip("cv2")

from loaders.augment import spec as specs  # noqa: E402
from loaders import write_ffcv  # noqa: E402
from loaders.augment import sample_crop_boxes  # noqa: E402
from loaders.config import LoaderConfig  # noqa: F401
from loaders.sampling import steps_per_epoch  # noqa: F401
from loaders.backends.ffcv_loader import (build_ffcv_loader, center_box, next_uniform, random_box,  # noqa: E402
    sample_state)

FLAT_CLASSES, FLAT_PER_CLASS = 4, 5
# (w, h): landscape, portrait, tiny, large; with write_mode smart the small ones are stored raw.
FLAT_SIZES = [(320, 240), (160, 120), (20, 14), (900, 600), (240, 320)]


def flat_colour(k: int):
    """A colour unique to image k, channels >= 28 apart between images (JPEG keeps a flat colour
    within ~2)."""
    return (30 + 45 * (k % 5), 30 + 45 * (k // 5), 60 + 7 * k)


@pytest.fixture(scope="session")
def flat_beton(tmp_path_factory) -> dict:
    """20 flat-colour images (the colour identifies the image), converted once."""
    root = tmp_path_factory.mktemp("flat")
    for c in range(FLAT_CLASSES):
        os.makedirs(root / f"n{c:08d}")
        for i in range(FLAT_PER_CLASS):
            k = c * FLAT_PER_CLASS + i
            w, h = FLAT_SIZES[i]
            img = Image.new("RGB", (w, h), flat_colour(k))
            img.save(root / f"n{c:08d}" / f"img_{k:02d}.JPEG", quality=95)
    out = tmp_path_factory.mktemp("flat_beton") / "flat.beton"
    summary = write_ffcv.convert(root, out, workers=2, progress=False)
    files = write_ffcv.read_manifest(out)["files"]
    summary["colour"] = np.array([flat_colour(int(f[-7:-5])) for f in files], np.float32)
    summary["label"] = np.array([int(f.split("/")[0][1:]) for f in files])
    return summary


def pairwise_spec(size: int) -> specs.AugmentSpec:
    """Random crops + flips, no colour ops, two views (finetune recipe with num_views=2)."""
    return specs.finetune(size=size).replace(num_views=2)


def loader(path, spec, rank=0, world_size=1, **kw):
    cfg = LoaderConfig(backend="ffcv", path=str(path), image_size=spec.size, **kw)
    return build_ffcv_loader(cfg, spec, rank=rank, world_size=world_size, device="cpu")


def run_epoch(ld, epoch):
    """[(indices, labels, views)] of one epoch, copied out."""
    ld.set_epoch(epoch)
    return [(ld.last_indices.copy(), b.labels.clone(), [v.clone() for v in b.views]) for b in ld]


@pytest.fixture(scope="session")
def flat_loader(flat_beton):
    return loader(flat_beton["out"], pairwise_spec(16), batch_size=4, num_workers=2, seed=3)


@pytest.fixture(scope="session")
def textured_loader(ffcv_mixed_beton):
    return loader(ffcv_mixed_beton["out"], pairwise_spec(32), batch_size=8, num_workers=2, seed=5)


# ----------------------------------------------------------------------------------------------
# Crop boxes: the numba sampler is augment.sample_crop_boxes, line for line
# ----------------------------------------------------------------------------------------------

class ReplayRng:
    """Hands sample_crop_boxes a fixed array of uniforms."""

    def __init__(self, u):
        self.u = u

    def random(self, shape):
        assert shape == self.u.shape
        return self.u


def test_random_box_matches_augment():
    rng = np.random.default_rng(0)
    for t in range(3000):
        H, W = (int(x) for x in rng.integers(1, 500, 2))
        if t % 4 == 0:  # extreme aspects exercise the fallback
            H, W = int(rng.integers(1, 6)), int(rng.integers(1, 900))
        scale = (0.08, 1.0) if t % 3 else (float(rng.uniform(0, .5)), float(rng.uniform(.5, 1)))
        crop = specs.CropSpec(attempts=int(rng.integers(1, 5)), scale=scale)
        u = rng.random((4, 1, crop.attempts))
        want = tuple(sample_crop_boxes(H, W, 1, crop, ReplayRng(u))[0])
        got = random_box(H, W, u[:, 0], crop.scale[0], crop.scale[1], crop.ratio[0], crop.ratio[1], 0.1)
        assert got == want, (H, W, crop)
    for H in range(1, 50):
        for W in range(1, 50):
            want = tuple(sample_crop_boxes(H, W, 1, specs.CropSpec(random=False), None)[0])
            assert center_box(H, W, 0.875) == want, (H, W)


def test_per_sample_stream():
    state, draws = sample_state(np.uint64(7), 3), []
    for _ in range(20000):
        state, v = next_uniform(np.uint64(state))  # (numba hands a uint64 back as a Python int)
        draws.append(v)
    draws = np.array(draws)
    assert draws.min() >= 0 and draws.max() < 1 and abs(draws.mean() - 0.5) < 0.01
    starts = {int(sample_state(np.uint64(s), i)) for s in range(4) for i in range(100)}
    assert len(starts) == 400, "every (epoch seed, sample) pair gets its own stream"


# ----------------------------------------------------------------------------------------------
# Decode once, two views
# ----------------------------------------------------------------------------------------------

def test_both_views_come_from_the_same_image(flat_beton, flat_loader, record_property):
    ld, n = flat_loader, flat_beton["written"]
    assert n == FLAT_CLASSES * FLAT_PER_CLASS and len(ld) == steps_per_epoch(n, 1, 4, drop_last=True)
    batches = run_epoch(ld, 0)
    assert len(batches) == len(ld)
    seen = np.concatenate([idx for idx, _, _ in batches])
    assert sorted(seen.tolist()) == list(range(n))  # 20 = 5 x 4: the whole set, once
    for idx, labels, views in batches:
        assert labels.tolist() == flat_beton["label"][idx].tolist()
        for v in views:
            assert v.shape == (4, 3, 16, 16) and v.is_contiguous(memory_format=torch.channels_last)
            # every pixel of both views is the colour of image idx[j] (JPEG: within a few levels)
            want = torch.from_numpy(flat_beton["colour"][idx]).view(4, 3, 1, 1)
            assert (v * 255 - want).abs().max() <= 4
    record_property("ffcv_jit_seconds", ld.jit_seconds)
    assert ld.jit_seconds is not None and ld.jit_seconds > 0


def test_epochs_are_reproducible_and_differ(ffcv_mixed_beton, textured_loader):
    ld = textured_loader
    first = run_epoch(ld, 0)
    other = run_epoch(ld, 1)
    again = run_epoch(ld, 0)  # set_epoch(0) after epoch 1: nothing carries over
    assert len(first) == len(other) == len(ld) == ffcv_mixed_beton["written"] // 8
    for (i0, l0, v0), (i2, l2, v2) in zip(first, again):
        assert np.array_equal(i0, i2) and torch.equal(l0, l2)
        assert all(torch.equal(a, b) for a, b in zip(v0, v2)), "crops/flips must be reproducible per epoch"
    order = [np.concatenate([i for i, _, _ in epoch]) for epoch in (first, other)]
    assert not np.array_equal(*order), "set_epoch must reshuffle"
    # Same images, other epoch -> other crops.
    pos = {int(k): (b, j) for b, (idx, _, _) in enumerate(other) for j, k in enumerate(idx)}
    idx0, _, views0 = first[0]
    k = next(int(k) for k in idx0 if int(k) in pos)
    b, j = pos[k]
    assert not torch.equal(views0[0][list(idx0).index(k)], other[b][2][0][j])
    # Two views of one image differ (independent crops).
    assert not torch.equal(views0[0], views0[1])


def test_eval_centre_crop_matches_a_reference(ffcv_mixed_beton):
    """One decode + FFCV's resize of the TF centre crop == OpenCV on the read-back image."""
    path = ffcv_mixed_beton["out"]
    n = ffcv_mixed_beton["written"]
    ld = loader(path, specs.eval_(size=24), batch_size=n, num_workers=1, train=False)
    (idx, labels, views), = run_epoch(ld, 0)
    assert idx.tolist() == list(range(n)) and len(views) == 1
    got = (views[0].permute(0, 2, 3, 1) * 255).round().numpy()
    for i, img, label in write_ffcv.read_beton(path):
        y, x, h, w = center_box(img.shape[0], img.shape[1], 0.875)
        ref = cv2.resize(np.ascontiguousarray(img[y:y + h, x:x + w]), (24, 24), interpolation=cv2.INTER_AREA)
        assert np.abs(got[i] - ref).mean() < 3, f"sample {i}"  # FFCV decodes with libjpeg-turbo FASTDCT
        assert labels[i] == label


# ----------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------

def test_two_ranks_cover_the_data_once_per_epoch(flat_beton):
    n, B = flat_beton["written"], 5
    ranks = [loader(flat_beton["out"], pairwise_spec(8), rank=r, world_size=2, batch_size=B, num_workers=1)
             for r in range(2)]
    assert [len(ld) for ld in ranks] == [n // 2 // B] * 2
    orders = []
    for epoch in (0, 1):
        per_rank = [run_epoch(ld, epoch) for ld in ranks]
        seen = [np.concatenate([idx for idx, _, _ in batches]) for batches in per_rank]
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
        assert sorted(np.concatenate(seen).tolist()) == list(range(n))
        for batches in per_rank:  # and each rank decodes the images it claims
            for idx, _, views in batches:
                want = torch.from_numpy(flat_beton["colour"][idx]).view(B, 3, 1, 1)
                assert (views[0] * 255 - want).abs().max() <= 4
        orders.append(seen[0])
    assert not np.array_equal(orders[0], orders[1]), "set_epoch must reshuffle"


def test_file_list_selects_samples_through_the_manifest(flat_beton, tmp_path):
    """data.file_list (loaders.subsets format, or bare file names) restricts the .beton."""
    files = write_ffcv.read_manifest(flat_beton["out"])["files"]
    chosen = [3, 7, 8, 12, 19]
    (tmp_path / "sub.txt").write_text("".join(f"{os.path.basename(files[i])}\n" for i in chosen))
    ld = loader(flat_beton["out"], specs.eval_(size=8), batch_size=2, num_workers=1, train=False,
                file_list=str(tmp_path / "sub.txt"))
    assert ld.indices.tolist() == chosen and len(ld) == 3  # eval keeps the last partial batch
    batches = run_epoch(ld, 0)
    assert np.concatenate([idx for idx, _, _ in batches]).tolist() == [0, 1, 2, 3, 4]
    for idx, labels, views in batches:
        beton = ld.indices[idx]
        assert labels.tolist() == flat_beton["label"][beton].tolist()
        want = torch.from_numpy(flat_beton["colour"][beton]).view(-1, 3, 1, 1)
        assert (views[0] * 255 - want).abs().max() <= 4


def test_quasi_random_order_is_a_fixed_shard_reshuffled(flat_beton):
    """quasi_random (FFCV's page-local order): each rank keeps one shard; only its order changes.
    Checked on the order alone - no batch is decoded, so no JIT."""
    n = flat_beton["written"]
    ranks = [loader(flat_beton["out"], pairwise_spec(8), rank=r, world_size=2, batch_size=5,
                    ffcv_order="quasi_random") for r in range(2)]
    shards = [set(ld.epoch_indices(0).tolist()) for ld in ranks]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == n
    for ld, shard in zip(ranks, shards):
        e1 = ld.epoch_indices(1)
        assert set(e1.tolist()) == shard and len(e1) == len(shard)


def test_rejects_a_folder_path(image_folder):
    with pytest.raises(ValueError, match=r"\.beton"):
        loader(image_folder, pairwise_spec(8))


# ----------------------------------------------------------------------------------------------
# GPU: FFCV's ToDevice path (run by benchmarks/gpu_suite.sh: pytest -m gpu)
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("photometry_device", ["auto", "cpu"])
def test_cuda_views(ffcv_mixed_beton, photometry_device):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    n, B, S = ffcv_mixed_beton["written"], 8, 32
    cfg = LoaderConfig(backend="ffcv", path=ffcv_mixed_beton["out"], image_size=S, batch_size=B,
                       num_workers=2, dtype="bfloat16", photometry_device=photometry_device)
    ld = build_ffcv_loader(cfg, specs.simclr(size=S), device="cuda")
    for epoch in (0, 1):
        ld.set_epoch(epoch)
        count = 0
        for batch in ld:
            count += 1
            assert len(batch.views) == 2
            for v in batch.views:
                assert v.device.type == "cuda" and v.dtype == torch.bfloat16 and v.shape == (B, 3, S, S)
                assert v.is_contiguous(memory_format=torch.channels_last)
                assert float(v.min()) >= 0 and float(v.max()) <= 1
            assert batch.labels.device.type == "cuda" and batch.labels.dtype == torch.int64
            assert batch.labels.shape == (B,) and int(batch.labels.max()) < 4
            assert not torch.equal(batch.views[0], batch.views[1])
        assert count == len(ld) == steps_per_epoch(n, 1, B, drop_last=True)
