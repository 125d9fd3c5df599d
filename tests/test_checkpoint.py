"""Checkpoints: atomic save, weights_only loads, newest-valid resume, pruning."""
import os

import pytest
import torch

from fastclr import checkpoint as ck


def _state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "config": {"run": {"seed": 1}}}


def test_save_is_atomic_and_loads_weights_only(tmp_path, monkeypatch):
    p = ck.save(ck.path_for(tmp_path, 5), _state(5))
    assert p.name == "ckpt_00000005.pt" and not list(tmp_path.glob("*.tmp"))
    assert ck.load(p)["model"]["w"].tolist() == [5.0] * 3

    # a crash during torch.save leaves the old file intact and no new final-named file
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ck.save(ck.path_for(tmp_path, 6), _state(6))
    assert not ck.path_for(tmp_path, 6).exists()


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    p = tmp_path / "ckpt_00000001.pt"
    torch.save({"model": {}, "step": 1, "x": Evil()}, p)
    with pytest.raises(Exception) as e:
        ck.load(p)
    assert "weights_only" in str(e.value) or "Unsupported" in str(e.value) or "global" in str(e.value).lower()


def test_latest_valid_skips_corrupt_newest(tmp_path):
    for s in (10, 20, 30):
        ck.save(ck.path_for(tmp_path, s), _state(s))
    data = ck.path_for(tmp_path, 30).read_bytes()
    ck.path_for(tmp_path, 30).write_bytes(data[: len(data) // 3])     # truncated newest
    ck.path_for(tmp_path, 40).write_bytes(b"")                         # empty newer
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        path, state = ck.load_latest_valid(tmp_path)
    assert state["step"] == 20 and path == ck.path_for(tmp_path, 20)
    assert ck.load_latest_valid(tmp_path / "none") is None


def test_prune_keeps_the_newest(tmp_path):
    for s in (1, 2, 3, 4):
        ck.save(ck.path_for(tmp_path, s), _state(s))
    ck.prune(tmp_path, 2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
