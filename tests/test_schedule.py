"""Warmup + cosine schedule and learning-rate scaling, as google-research/simclr tf2 defines them."""
import itertools
import math

import pytest

from fastclr.schedule import DEFAULT_BASE_LR, lr_at, scaled_lr


def test_scaling_rules():
    assert scaled_lr(None, 4096, "sqrt") == pytest.approx(0.075 * 64) == pytest.approx(4.8)
    assert scaled_lr(None, 4096, "linear") == pytest.approx(0.3 * 16)  # 4.8 as well
    assert scaled_lr(None, 256, "linear") == pytest.approx(0.3)
    assert scaled_lr(0.1, 512, "linear") == pytest.approx(0.2)
    assert scaled_lr(0.05, 100, "sqrt") == pytest.approx(0.5)
    assert DEFAULT_BASE_LR == {"linear": 0.3, "sqrt": 0.075}
    assert scaled_lr(None, 512) == pytest.approx(0.6)  # linear is the default rule, as in TF
    with pytest.raises(ValueError):
        scaled_lr(None, 256, "cubic")


def test_warmup_is_linear_from_zero():
    base, warm, total = 4.8, 10, 100
    assert lr_at(0, base, warm, total) == 0.0
    assert lr_at(1, base, warm, total) == pytest.approx(0.48)
    assert lr_at(5, base, warm, total) == pytest.approx(2.4)
    assert lr_at(9, base, warm, total) == pytest.approx(4.32)


def test_cosine_after_warmup():
    base, warm, total = 4.8, 10, 100
    assert lr_at(10, base, warm, total) == pytest.approx(base)  # peak right after warmup
    assert lr_at(55, base, warm, total) == pytest.approx(base / 2)  # halfway through the 90 decay steps
    t = 30 - warm
    assert lr_at(30, base, warm, total) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * t / 90)))
    assert lr_at(100, base, warm, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(150, base, warm, total) == pytest.approx(0.0, abs=1e-12)  # clipped, as Keras CosineDecay


def test_schedule_is_continuous_and_monotone_after_peak():
    base, warm, total = 1.0, 7, 50
    lrs = [lr_at(s, base, warm, total) for s in range(total + 1)]
    assert all(a <= b for a, b in itertools.pairwise(lrs[:warm + 1]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[warm:]))
    assert max(lrs) == pytest.approx(base)


def test_no_warmup_and_degenerate_lengths():
    assert lr_at(0, 2.0, 0, 10) == pytest.approx(2.0)
    assert lr_at(10, 2.0, 0, 10) == pytest.approx(0.0, abs=1e-12)
    # total <= warmup: no decay phase; no division by zero
    assert lr_at(5, 2.0, 5, 5) == pytest.approx(2.0)
    assert lr_at(6, 2.0, 5, 5) == pytest.approx(0.0, abs=1e-12)
