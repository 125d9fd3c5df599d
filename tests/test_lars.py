"""Fused LARS against per-parameter float64 references (a readable loop for both modes, and a
line-by-line transcription of the official TF optimizer), parameter exclusion, group overrides,
lr as a tensor, AMP grad scaling, state_dict; and, on a GPU, that a step never syncs."""
import io

import pytest
import torch

from fastclr.lars import LARS

STEPS = 10


# ----------------------------------------------------------------------------- references


def tf_transcription_step(param, grad, v, learning_rate, momentum, weight_decay, eeta, use_nesterov,
                          use_weight_decay, do_layer_adaptation):
    """google-research/simclr tf2/lars_optimizer.py, _resource_apply_dense with classic_momentum=True,
    line by line (tf.* -> torch.*). ``use_weight_decay`` / ``do_layer_adaptation`` stand for TF's
    name-based _use_weight_decay(param_name) / _do_layer_adaptation(param_name). Returns
    (next_param, next_v)."""
    if use_weight_decay:
        grad = grad + weight_decay * param

    trust_ratio = 1.0
    if do_layer_adaptation:
        w_norm = torch.norm(param, p=2)
        g_norm = torch.norm(grad, p=2)
        trust_ratio = torch.where(
            torch.greater(w_norm, 0),
            torch.where(torch.greater(g_norm, 0), (eeta * w_norm / g_norm), 1.0),
            1.0)
    scaled_lr = learning_rate * trust_ratio

    next_v = torch.multiply(momentum, v) + scaled_lr * grad
    if use_nesterov:
        update = torch.multiply(momentum, next_v) + scaled_lr * grad
    else:
        update = next_v
    next_param = param - update
    return next_param, next_v


def readable_step(w, g, buf, lr, momentum, wd, eta, nesterov, mode, decay, adapt):
    """One parameter, plain arithmetic with Python-float norms. Returns (new w, new buf)."""
    wd = wd if decay else 0.0
    w_norm, g_norm = w.norm().item(), g.norm().item()
    if mode == "tf":
        d = g + wd * w
        d_norm = d.norm().item()
        trust = eta * w_norm / d_norm if (adapt and w_norm > 0 and d_norm > 0) else 1.0
        buf = momentum * buf + lr * trust * d
        update = momentum * buf + lr * trust * d if nesterov else buf
        return w - update, buf
    trust = eta * w_norm / (g_norm + wd * w_norm) if (adapt and w_norm > 0 and g_norm > 0) else 1.0
    d = (g + wd * w) * trust
    buf = momentum * buf + d
    update = d + momentum * buf if nesterov else buf
    return w - lr * update, buf


# ----------------------------------------------------------------------------- fixtures


def make_params(dtype=torch.float64):
    """conv-like weight, linear weight, bias, BN weight, an all-zero weight, a weight whose gradient
    is always zero, and a parameter that never gets a gradient."""
    g = torch.Generator().manual_seed(0)
    shapes = {"conv": (4, 3, 3, 3), "fc": (5, 4), "bias": (5,), "bn": (4,), "zero_w": (3, 3), "zero_g": (4, 2),
              "no_grad": (2, 2)}
    params = {k: torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for k, s in shapes.items()}
    with torch.no_grad():
        params["zero_w"].zero_()
    return params


def grads_for(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    out = {}
    for k, p in params.items():
        if k == "no_grad":
            out[k] = None
        elif k == "zero_g":
            out[k] = torch.zeros_like(p)
        else:
            out[k] = torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.1 + step)
    return out


def lr_for(step):
    return 0.5 + 0.1 * step  # changes every step: classic momentum must use each step's lr


CONFIGS = [
    {"mode": m, "nesterov": n, "weight_decay": wd, "exclude": ex}
    for m in ("tf", "torch") for n in (False, True) for wd in (0.0, 0.05) for ex in ("ndim1", "none")
]


def _exclude(name):
    return (lambda p: p.ndim == 1) if name == "ndim1" else (lambda p: False)


def run_lars(cfg, lr_as_tensor=False):
    params = make_params()
    lr0 = torch.tensor(lr_for(0), dtype=torch.float64) if lr_as_tensor else lr_for(0)
    opt = LARS(params.values(), lr=lr0, momentum=0.9, weight_decay=cfg["weight_decay"], eta=0.02,
               mode=cfg["mode"], nesterov=cfg["nesterov"], exclude=_exclude(cfg["exclude"]))
    for step in range(STEPS):
        for k, g in grads_for(params, step).items():
            params[k].grad = g
        if lr_as_tensor:
            opt.param_groups[0]["lr"].fill_(lr_for(step))
        else:
            opt.param_groups[0]["lr"] = lr_for(step)
        opt.step()
    return {k: p.detach() for k, p in params.items()}, opt


def run_reference(cfg, step_fn):
    params = {k: p.detach().clone() for k, p in make_params().items()}
    bufs = {k: torch.zeros_like(p) for k, p in params.items()}
    excluded = {k: _exclude(cfg["exclude"])(p) for k, p in params.items()}
    for step in range(STEPS):
        for k, g in grads_for(params, step).items():
            if g is None:
                continue
            params[k], bufs[k] = step_fn(params[k], g, bufs[k], lr_for(step), excluded[k])
    return params


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_lars_matches_readable_reference(cfg):
    got, _ = run_lars(cfg)
    ref = run_reference(cfg, lambda w, g, b, lr, excl: readable_step(
        w, g, b, lr, 0.9, cfg["weight_decay"], 0.02, cfg["nesterov"], cfg["mode"], decay=not excl, adapt=not excl))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-13, msg=f"param {k}")
    assert torch.equal(got["no_grad"], make_params()["no_grad"])  # grad None: untouched


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["mode"] == "tf"],
                         ids=lambda c: "-".join(str(v) for v in c.values()))
def test_lars_tf_mode_matches_tf_transcription(cfg):
    got, _ = run_lars(cfg)
    # TF: _use_weight_decay is False when weight_decay == 0 or the name is excluded;
    # exclude_from_layer_adaptation defaults to exclude_from_weight_decay.
    ref = run_reference(cfg, lambda w, g, v, lr, excl: tf_transcription_step(
        w, g, v, lr, 0.9, cfg["weight_decay"], 0.02, cfg["nesterov"],
        use_weight_decay=bool(cfg["weight_decay"]) and not excl, do_layer_adaptation=not excl))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-13, msg=f"param {k}")


def test_trust_ratio_and_exclusion_matter():
    """Guards the references: the configurations really produce different updates."""
    base = run_lars(CONFIGS[0])[0]  # tf, no nesterov, wd 0, ndim1
    for other in (dict(CONFIGS[0], exclude="none"), dict(CONFIGS[0], weight_decay=0.05),
                  dict(CONFIGS[0], mode="torch"), dict(CONFIGS[0], nesterov=True)):
        got = run_lars(other)[0]
        assert any(not torch.allclose(got[k], base[k]) for k in base), other


@pytest.mark.parametrize("mode", ["tf", "torch"])
def test_lr_tensor_equals_float(mode):
    cfg = {"mode": mode, "nesterov": True, "weight_decay": 0.05, "exclude": "ndim1"}
    a, _ = run_lars(cfg)
    b, opt = run_lars(cfg, lr_as_tensor=True)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("mode", ["tf", "torch"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_tensor_lr_and_capturable_steps_are_bit_identical(mode, nesterov):
    """The CUDA-graph form of the step (lr a device tensor filled in place, scratch buffers instead
    of a fresh temporary) is the same arithmetic as the plain one: equal to the last bit, in fp32."""
    def run(lr_tensor, capturable):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
        lr = torch.tensor(0.0) if lr_tensor else 0.0
        opt = LARS(model.parameters(), lr=lr, weight_decay=1e-3, eta=0.02, mode=mode, nesterov=nesterov,
                   capturable=capturable)
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
        for step in range(4):
            if lr_tensor:
                opt.param_groups[0]["lr"].fill_(lr_for(step))
            else:
                opt.param_groups[0]["lr"] = lr_for(step)
            opt.zero_grad(set_to_none=not capturable)
            model(x).square().mean().backward()
            opt.step()
        return [p.detach() for p in model.parameters()]
    ref = run(False, False)
    for variant in ((True, False), (True, True), (False, True)):
        for a, b in zip(ref, run(*variant)):
            assert torch.equal(a, b), variant


def test_compiled_step_matches_eager():
    """compiled=True: the same step through torch.compile (inductor's C++ backend here, Triton on a
    GPU). Fused kernels may reassociate, so close rather than bit-equal."""
    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                    torch.nn.Linear(4 * 4 * 4, 5))
        opt = LARS(model.parameters(), lr=torch.tensor(0.3), weight_decay=1e-4, compiled=compiled,
                   capturable=compiled)
        x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(2))
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return [p.detach() for p in model.parameters()]
    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_grad_param_gets_no_state():
    _, opt = run_lars(CONFIGS[0])
    names = list(make_params())
    group = opt.param_groups[0]["params"]
    assert group[names.index("no_grad")] not in opt.state
    assert group[names.index("fc")] in opt.state


def test_group_overrides_predicate():
    """A group's own weight_decay applies to all its params; trust=True/False forces adaptation."""
    torch.manual_seed(0)
    vec, mat = torch.nn.Parameter(torch.randn(6, dtype=torch.float64)), torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    opt = LARS([{"params": [vec], "weight_decay": 0.1, "trust": True}, {"params": [mat], "trust": False}],
               lr=0.5, momentum=0.0, weight_decay=0.2, eta=0.01)
    gv, gm = torch.randn(6, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    vec.grad, mat.grad = gv, gm
    v0, m0 = vec.detach().clone(), mat.detach().clone()
    opt.step()
    d = gv + 0.1 * v0  # decayed although 1-D, and adapted although 1-D
    torch.testing.assert_close(vec.detach(), v0 - 0.5 * (0.01 * v0.norm() / d.norm()) * d)
    d = gm + 0.2 * m0  # constructor's decay (2-D, not excluded), but no adaptation
    torch.testing.assert_close(mat.detach(), m0 - 0.5 * d)


def test_state_dict_round_trip_continues_identically():
    cfg = {"mode": "tf", "nesterov": False, "weight_decay": 0.05, "exclude": "ndim1"}
    params, opt = run_lars(cfg)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # picklable: no lambda in param_groups
    buf.seek(0)
    clone = {k: torch.nn.Parameter(p.clone()) for k, p in params.items()}
    opt2 = LARS(clone.values(), lr=0.1, weight_decay=0.05, eta=0.02)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    live = dict(zip(params, opt.param_groups[0]["params"]))
    for k, g in grads_for(params, 99).items():
        live[k].grad = g
        clone[k].grad = None if g is None else g.clone()
    opt.step()
    opt2.step()
    for k in params:
        torch.testing.assert_close(clone[k].detach(), live[k].detach(), rtol=0, atol=0)


def test_bad_mode_raises():
    with pytest.raises(ValueError):
        LARS([torch.nn.Parameter(torch.zeros(2))], lr=0.1, mode="adam")


def test_works_with_grad_scaler():
    """scaler.step(opt) unscales then calls LARS.step; the result equals an unscaled step."""
    def train(use_scaler):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
        opt = LARS(model.parameters(), lr=0.3, weight_decay=1e-4)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if use_scaler else None
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            opt.zero_grad()
            loss = model(x).square().mean()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(train(True), train(False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- GPU: no host sync


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["tf", "torch"])
@pytest.mark.parametrize("lr_tensor", [False, True])
def test_lars_step_no_host_sync(mode, lr_tensor):
    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10)).to(dev)
    lr = torch.tensor(0.3, device=dev) if lr_tensor else 0.3
    opt = LARS(model.parameters(), lr=lr, weight_decay=1e-6, mode=mode, nesterov=True)
    x = torch.randn(4, 3, 8, 8, device=dev)
    model(x).sum().backward()
    opt.step()  # first step creates the momentum buffers
    model(x).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
