"""fastclr.trainer's step variants: the eager TrainStep, the CUDA-graph GraphedStep and torch.compile'd
models must compute the same training step.

On the CPU: the GraphedStep's plumbing (warmup steps, static input buffers, the lr tensor filled in
place, static outputs) against the eager step, with a stand-in for CUDA's capture that replays the
recorded step eagerly; and a compiled tiny R18 against the eager one (traced with aot_eager; with
inductor's C++ code under -m slow).
On a GPU (``-m gpu``): the real CUDA graph against the eager step, no host sync inside the step, and
pretrain.py running a few hundred steps with the graph on, killed and resumed exactly.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastclr import runtime
from fastclr.config import OptimConfig
from fastclr.losses import contrastive_loss
from fastclr.models import build_model
from fastclr.optimizers import build_optimizer
from fastclr.trainer import GraphedStep, TrainStep
from loaders.base import Batch

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(depth=18, width=1, num_proj_layers=2, proj_out_dim=16).to(memory_format=torch.channels_last)


def batches(n, device="cpu", size=16, b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [Batch([torch.rand(b, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
                   for _ in range(2)], None) for _ in range(n)]


def lr_for(step):
    return 0.2 + 0.05 * step


def run_steps(step_cls, model, data, device="cpu", dtype=torch.float32, lr_tensor=False, **kw):
    """(losses, parameters) after a step per batch, lr changing every step (as the trainer sets it)."""
    lr = torch.tensor(0.0, device=device) if lr_tensor else 0.0
    opt = build_optimizer(list(model.parameters()), OptimConfig(weight_decay=1e-4), lr, capturable=lr_tensor)
    step = step_cls(model, model, contrastive_loss(0.2), opt, torch.device(device), dtype, **kw)
    losses = []
    for i, batch in enumerate(data):
        runtime.set_lr(opt, lr_for(i))
        loss, metrics = step(lambda b=batch: b)
        assert set(metrics) == {"contrastive_acc", "contrastive_acc_all"}
        losses.append(loss.clone())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()], step


def test_graphed_step_replays_exactly_what_the_eager_step_computes():
    """2 eager warmup steps, then the step is 'captured' once and replayed on static buffers: every
    loss and the final weights equal the eager step's, to the bit (same ops, lr from a tensor)."""
    data = batches(6)
    ref_losses, ref_params, _ = run_steps(TrainStep, tiny_model(), data)
    calls = []

    def stand_in(body):  # records the step; a replay runs it on the static buffers, as the graph would
        def replay():
            calls.append(1)
            opt.zero_grad(set_to_none=True)  # a captured backward writes the grads, it does not add
            body()
        return replay

    model = tiny_model()
    opt = None

    def make_step(*args, **kw):
        nonlocal opt
        opt = args[3]
        return GraphedStep(*args, warmup=2, capture=stand_in, **kw)
    losses, params, step = run_steps(make_step, model, data, lr_tensor=True)
    assert len(calls) == 4  # batches 3..6 replayed
    assert step.static_batch.views[0].data_ptr() != data[-1].views[0].data_ptr()  # copied in, not aliased
    assert torch.equal(losses, ref_losses)
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)


def test_graphed_step_refuses_what_it_cannot_capture():
    model = tiny_model()
    opt = build_optimizer(list(model.parameters()), OptimConfig(), torch.tensor(0.1), capturable=True)
    for kw in ({"grad_accum": 2}, {"after_step": lambda m, b: None}):
        with pytest.raises(ValueError, match="CUDA-graph step"):
            GraphedStep(model, model, contrastive_loss(0.2), opt, torch.device("cpu"), torch.float32, **kw)


@pytest.mark.e2e
def test_trainer_without_gpu_runs_the_eager_step(tmp_path, image_folder):
    """run.cuda_graphs=auto and model.compile=auto on the CPU: the plain eager step, no notice."""
    r = subprocess.run([sys.executable, str(ROOT / "fastclr" / "pretrain.py"), "demo_cpu", f"--data.path={image_folder}",
                        "--data.image_size=32", "--data.num_workers=0", "--optim.global_batch_size=8",
                        "--run.knn_eval=false", "--run.progress=false", "--run.max_steps=1",
                        f"--run.out_dir={tmp_path}"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CUDA graph" not in r.stdout + r.stderr
    recs = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert not any(x.get("event") == "first_step" for x in recs)  # nothing compiled


def _compiled_matches_eager(backend: str):
    """3 steps of a tiny R18 through torch.compile(backend) against the eager run: the losses match,
    and so does the whole update (fused kernels reassociate sums, and BatchNorm over 8 images at 1x1
    amplifies that in a few near-zero BN parameters: the update is compared as one vector)."""
    data = batches(3, size=16, b=4)
    before = [p.detach().clone() for p in tiny_model().parameters()]
    eager_losses, eager_params, _ = run_steps(TrainStep, tiny_model(), data)
    model = tiny_model()
    opt = build_optimizer(list(model.parameters()), OptimConfig(weight_decay=1e-4), 0.0)
    step = TrainStep(model, torch.compile(model, backend=backend), contrastive_loss(0.2), opt,
                     torch.device("cpu"), torch.float32)
    losses = []
    for i, batch in enumerate(data):
        runtime.set_lr(opt, lr_for(i))
        losses.append(step(lambda b=batch: b)[0].detach().clone())
    torch.testing.assert_close(torch.stack(losses), eager_losses, rtol=1e-4, atol=1e-4)
    update = torch.cat([(p.detach() - b0).flatten() for p, b0 in zip(model.parameters(), before)])
    ref = torch.cat([(p - b0).flatten() for p, b0 in zip(eager_params, before)])
    assert torch.nn.functional.cosine_similarity(update, ref, dim=0) > 0.9999
    assert (update - ref).norm() / ref.norm() < 1e-2


@pytest.mark.e2e
def test_compiled_model_traces_and_matches_eager():
    """model.compile=true: the model's forward and backward trace through dynamo and AOT autograd as
    one graph each (backend aot_eager: torch.compile's front end without code generation)."""
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    """The same with inductor's C++ code (what model.compile=true runs on a CPU)."""
    _compiled_matches_eager("inductor")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_step_matches_eager(dtype):
    """The captured step replays the eager step's computation: same losses and weights after 8
    steps (3 eager warmup steps, 5 replays), TF32 off and deterministic cuDNN for fp32."""
    torch.backends.cudnn.benchmark = False
    data = batches(8, "cuda", size=64, b=16)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        ref_model = tiny_model().cuda()
        ref_losses, ref_params, _ = run_steps(TrainStep, ref_model, data, "cuda", dtype, lr_tensor=True)
        model = tiny_model().cuda()
        losses, params, _ = run_steps(GraphedStep, model, data, "cuda", dtype, lr_tensor=True)
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(losses, ref_losses, **tol)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.gpu
def test_cuda_graph_step_has_no_host_sync():
    data = batches(6, "cuda", size=64, b=16)
    model = tiny_model().cuda()
    opt = build_optimizer(list(model.parameters()), OptimConfig(), torch.tensor(0.1, device="cuda"), capturable=True)
    step = GraphedStep(model, model, contrastive_loss(0.2), opt, torch.device("cuda"), torch.bfloat16, warmup=3)
    for b in data[:4]:  # warmup and capture
        step(lambda b=b: b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, b in enumerate(data[4:]):
            runtime.set_lr(opt, lr_for(i))
            loss, _ = step(lambda b=b: b)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


@pytest.mark.gpu
def test_pretrain_with_cuda_graph_runs_and_resumes_exactly(tmp_path, image_folder):
    """pretrain.py on a GPU with the graph on (the default): 240 steps uninterrupted, and the same run
    killed after its step-120 checkpoint and resumed, end with equal weights."""
    from fastclr import checkpoint as ck
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    common = [sys.executable, str(ROOT / "fastclr" / "pretrain.py"), "demo_cpu", f"--data.path={image_folder}",
              "--run.device=cuda", "--run.precision=fp32", "--data.num_workers=2", "--optim.global_batch_size=8",
              "--optim.epochs=80", "--run.max_steps=240", "--run.ckpt_every=120", "--run.keep_last=5",
              "--run.knn_eval=false", "--run.progress=false", "--run.log_every=20", "--run.deterministic=true"]
    ref = tmp_path / "ref"
    r = subprocess.run(common + [f"--run.out_dir={ref}"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "without a CUDA graph" not in r.stdout
    first = [json.loads(x) for x in (ref / "log.jsonl").read_text().splitlines() if '"first_step"' in x]
    assert first and first[0]["cuda_graph"] is True
    out = tmp_path / "killed"
    proc = subprocess.Popen(common + [f"--run.out_dir={out}", "--run.resume=auto"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not ck.path_for(out, 120).exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run(common + [f"--run.out_dir={out}", "--run.resume=auto"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    a, b = ck.load(ck.path_for(ref, 240)), ck.load(ck.path_for(out, 240))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
