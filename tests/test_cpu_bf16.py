"""bf16 on the CPU: run.precision=auto picks it only where the CPU multiplies bf16 natively and the maps
after the stem are big enough; whatever it picks, the TF-parity paths (colour ops, NT-Xent, LARS) compute
in fp32."""
import pytest
import torch

from fastclr import runtime
from fastclr.lars import LARS
from fastclr.losses import nt_xent
from loaders import augment as A
from loaders.augment.spec import simclr


@pytest.mark.parametrize("caps, size, cifar, want", [
    ({"avx512_bf16": True}, 224, False, "bf16"),
    ({"amx_bf16": True}, 64, False, "bf16"),       # 16x16 after the ImageNet stem: the threshold
    ({"amx_bf16": True}, 32, False, "fp32"),       # 8x8 after the ImageNet stem
    ({"avx512_bf16": True}, 32, True, "bf16"),     # the CIFAR stem keeps 32x32
    ({"avx512_bf16": True}, None, False, "bf16"),  # no image size given: not limiting
    ({"avx512_bf16": False, "amx_bf16": False}, 224, False, "fp32"),
    ({}, 224, False, "fp32"),
])
def test_auto_precision_on_the_cpu(monkeypatch, caps, size, cifar, want):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    cpu = torch.device("cpu")
    name, why = runtime.auto_precision(cpu, size, cifar)
    assert name == want and why, why
    assert runtime.resolve_precision("auto", cpu, size, cifar) == runtime.parse_dtype(want)
    assert runtime.resolve_precision("fp32", cpu, size, cifar) == torch.float32  # asked for: kept
    assert runtime.auto_precision(torch.device("cuda"), size, cifar)[0] == "bf16"


def test_auto_precision_counts_the_stride_of_the_cifar_stem(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    cpu = torch.device("cpu")
    assert runtime.auto_precision(cpu, 32, True, stem_stride=2)[0] == "bf16"   # 16x16 after the stem
    name, why = runtime.auto_precision(cpu, 16, True, stem_stride=2)          # 8x8
    assert name == "fp32" and "8x8" in why


def test_a_query_that_fails_means_no_native_bf16(monkeypatch):
    def broken():
        raise RuntimeError("no cpuinfo")
    monkeypatch.setattr(torch.cpu, "get_capabilities", broken)
    assert runtime.auto_precision(torch.device("cpu"), 224)[0] == "fp32"


def test_colour_ops_compute_in_fp32_and_round_once(monkeypatch):
    """bf16 views are the fp32 views rounded once at the end (the ops themselves run in fp32). The fused
    graphs run eagerly here (compiling them is tests/test_fused_photometry.py's job)."""
    monkeypatch.setenv("FASTCLR_FUSED_EAGER", "1")
    spec = simclr(32)
    crops = torch.randint(0, 256, (6, 2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for mode in ("subset", "fused"):
        f32 = [v.clone() for v in A.finish_views(crops, spec, torch.Generator().manual_seed(1), torch.float32,
                                                 mode=mode)]
        b16 = A.finish_views(crops, spec, torch.Generator().manual_seed(1), torch.bfloat16, mode=mode)
        for a, b in zip(f32, b16):
            assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), mode


def test_loss_and_lars_stay_fp32_under_cpu_autocast():
    """Under CPU bf16 autocast the projections arrive in bf16; NT-Xent still computes in fp32 (the same
    value as on the fp32 copies of those projections), and LARS updates fp32 weights with fp32 state."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(12, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)
        assert z.dtype == torch.bfloat16
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, temperature=0.2)
    assert loss.dtype == torch.float32
    want = nt_xent(z1.float(), z2.float(), temperature=0.2)
    assert torch.allclose(loss, want, rtol=1e-6, atol=1e-6)
    opt = LARS(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    loss.backward()
    opt.step()
    for p in lin.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert all(t.dtype == torch.float32 for t in opt.state[p].values() if torch.is_tensor(t))
