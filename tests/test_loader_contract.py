"""The loader contract (loaders/base.py, docs/design.md), one parametrized test for every backend.

How a backend joins (DALI and FFCV engineers: this is all you need):

* provide a fixture ``<backend>_contract_data`` (conftest.py or your test module) returning
  ``dict(path=..., expected_images=N_good, bad=N_bad, file_list=None | path, num_classes=4)``:
  the loader is built with ``LoaderConfig(backend=..., path=path, file_list=file_list)`` and
  enumerates ``expected_images + bad`` samples per epoch; ``bad`` of them are unreadable and must be
  skipped and counted (``loader.num_skipped``). Until the fixture exists the backend is skipped.
* optional debug hook ``loader.last_indices``: int array of the dataset indices (positions in the
  backend's sample list, before any bad-file replacement) of the batch last yielded. With it the
  sharding test checks disjoint ranks and full coverage; without it that part is skipped.

Checked: ``len()`` exact for world_size 1 and 2 (train: drop_last); every batch has K views of
[B, 3, S, S], channels_last, in the training dtype (float32 and bfloat16), values in [0, 1], labels
int64 in range; the two views differ; ``set_epoch`` changes the order; two ranks are disjoint and
together cover the epoch; bad files skipped and counted with the batch kept full.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, PER_CLASS

import loaders
from loaders.sources import synthetic
from loaders.config import LoaderConfig
from loaders.sampling import steps_per_epoch

BACKENDS = ["torch", "dali", "ffcv"]
SIZE = 32   # small views: the contract is about shapes, sharding and bookkeeping, not pixels


@pytest.fixture(scope="session")
def torch_contract_data(mixed_folder):
    """The mixed folder as is: 24 good JPEGs + 5 readable odd files (used) + 3 unreadable (skipped)."""
    return dict(path=mixed_folder, expected_images=NUM_CLASSES * PER_CLASS + len(synthetic.READABLE),
                bad=len(synthetic.UNREADABLE), file_list=None, num_classes=NUM_CLASSES)


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    ok, why = loaders.available(name)
    if not ok:
        pytest.skip(f"backend {name} unavailable: {why}")
    try:
        data = request.getfixturevalue(f"{name}_contract_data")
    except pytest.FixtureLookupError:
        pytest.skip(f"backend {name}: fixture {name}_contract_data not provided yet")
    return name, data


def make(name, data, rank=0, world_size=1, batch_size=4, dtype="float32", train=True, seed=0, workers=0):
    cfg = LoaderConfig(backend=name, path=data["path"], file_list=data.get("file_list"), image_size=SIZE,
                       batch_size=batch_size, num_workers=workers, train=train, seed=seed, dtype=dtype)
    return loaders.build(cfg, rank=rank, world_size=world_size, device="cpu")


def total(data) -> int:
    return data["expected_images"] + data["bad"]


def run_epoch(loader, epoch):
    """(batches, per-batch indices or None)."""
    loader.set_epoch(epoch)
    batches, idx = [], []
    for b in loader:
        batches.append(b)
        idx.append(np.asarray(loader.last_indices).copy() if hasattr(loader, "last_indices") else None)
    return batches, idx


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batches(backend, dtype):
    name, data = backend
    B = 4
    loader = make(name, data, batch_size=B, dtype=dtype)
    assert len(loader) == steps_per_epoch(total(data), 1, B, drop_last=True)
    batches, _ = run_epoch(loader, 0)
    assert len(batches) == len(loader)
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    for batch in batches:
        views, labels = batch.views, batch.labels
        assert isinstance(views, list) and len(views) == 2
        for v in views:
            assert v.shape == (B, 3, SIZE, SIZE) and v.dtype == want and v.device.type == "cpu"
            assert v.is_contiguous(memory_format=torch.channels_last)
            assert float(v.min()) >= 0 and float(v.max()) <= 1
        assert labels.dtype == torch.int64 and labels.shape == (B,)
        assert int(labels.min()) >= 0 and int(labels.max()) < data.get("num_classes", NUM_CLASSES)
        assert not torch.equal(views[0], views[1]), "the two views of an image must differ"


def test_sharding_and_epochs(backend):
    name, data = backend
    B, n = 4, total(data)
    ranks = [make(name, data, rank=r, world_size=2, batch_size=B) for r in range(2)]
    steps = steps_per_epoch(n, 2, B, drop_last=True)
    assert [len(ld) for ld in ranks] == [steps, steps]
    per_rank = [run_epoch(ld, 0) for ld in ranks]
    for batches, _ in per_rank:
        assert len(batches) == steps
    if per_rank[0][1][0] is None:
        pytest.skip(f"backend {name} has no last_indices hook: sharding not checked")
    seen = [np.concatenate(idx) for _, idx in per_rank]
    for s in seen:
        assert len(s) == steps * B and len(set(s.tolist())) == len(s), "a rank repeats a sample within an epoch"
        assert s.min() >= 0 and s.max() < n
    assert not set(seen[0].tolist()) & set(seen[1].tolist()), "ranks overlap"
    if n % (2 * B) == 0:
        assert set(seen[0].tolist()) | set(seen[1].tolist()) == set(range(n)), "ranks do not cover the epoch"
    _, idx1 = run_epoch(ranks[0], 1)
    assert not np.array_equal(np.concatenate(idx1), seen[0]), "set_epoch did not change the order"
    _, again = run_epoch(ranks[0], 0)
    assert np.array_equal(np.concatenate(again), seen[0]), "an epoch's order must be reproducible"


def test_epoch_advance_and_tail_rule(backend):
    """A pass started without set_epoch runs the next epoch from batch 0 (after a resumed pass too);
    an epoch visits epoch_indices(e): its shard without the last partial batch, in order."""
    name, data = backend
    B = 4
    loader = make(name, data, batch_size=B)
    n_shard = total(data)  # world size 1: the shard is the data set
    for e in (0, 1):
        idx = loader.epoch_indices(e)
        assert len(idx) == len(loader) * B == (n_shard // B) * B, "the tail rule: drop the last partial batch"
    loader.set_epoch(3, start_step=1)
    first = [np.asarray(loader.last_indices).copy() for _ in loader]
    np.testing.assert_array_equal(np.concatenate(first), loader.epoch_indices(3)[B:])
    second = [np.asarray(loader.last_indices).copy() for _ in loader]  # no set_epoch: epoch 4, from 0
    np.testing.assert_array_equal(np.concatenate(second), loader.epoch_indices(4))


def test_bad_files_skipped_and_counted(backend):
    name, data = backend
    n = total(data)
    loader = make(name, data, batch_size=n)  # one batch holds the whole epoch
    assert len(loader) == 1
    batches, _ = run_epoch(loader, 0)
    assert len(batches) == 1 and batches[0].views[0].shape[0] == n, "the batch must stay full"
    assert getattr(loader, "num_skipped", 0) == data["bad"]
    if data["bad"]:
        assert len(loader.bad_files) == data["bad"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_position(backend, workers):
    """set_epoch(e, start_step=k) yields exactly batches k.. of epoch e (a resumed run's position):
    the same samples in the same order, and the remaining count is len() - k. With workers too (the
    default of every preset): torch's multi-worker DataLoader iterates its sampler twice per pass."""
    name, data = backend
    full, full_idx = run_epoch(make(name, data, batch_size=4, workers=workers), 1)
    k = 2
    loader = make(name, data, batch_size=4, workers=workers)  # fresh, as in a resumed process
    loader.set_epoch(1, start_step=k)
    tail_idx = []
    for _ in loader:
        tail_idx.append(np.asarray(loader.last_indices).copy())
    assert len(tail_idx) == len(loader) - k
    for a, b in zip(full_idx[k:], tail_idx):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        loader.set_epoch(0, start_step=len(loader) + 1)
