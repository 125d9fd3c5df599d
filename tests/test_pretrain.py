"""pretrain.py end to end on CPU: smoke, overfitting one batch, exact resume after SIGKILL,
elastic restart under torchrun, NaN stop, one-line config errors, and the demo's k-NN gain."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastclr import checkpoint as ck

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "fastclr" / "pretrain.py")
# A tiny, fast configuration on the fixture folder: R18 with the CIFAR stem at 32px, batch 8.
TINY = ["demo_cpu", "--data.image_size=32", "--data.num_workers=0", "--optim.global_batch_size=8",
        "--optim.warmup_epochs=0", "--run.knn_eval=false", "--run.progress=false", "--run.log_every=1"]


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    return e


def run(args, check=True, **kw):
    r = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env(), **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}")
    return r


@pytest.fixture
def inproc(call):
    """pretrain.py's main() in this process (tests of a run's results; process behaviour: ``run``)."""
    from fastclr import pretrain

    def go(args):
        code, out, err = call(pretrain.main, args)
        assert code == 0, f"exit {code}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
        return out
    return go


def log_records(out_dir):
    return [json.loads(ln) for ln in Path(out_dir, "log.jsonl").read_text().splitlines()]


def final_state(out_dir):
    step, path = ck.list_checkpoints(out_dir)[-1]
    return step, ck.load(path)


def test_smoke_few_steps_finite_loss_and_logs(tmp_path, mixed_folder, inproc):
    out = tmp_path / "run"
    stdout = inproc(TINY + [f"--data.path={mixed_folder}", f"--run.out_dir={out}", "--run.max_steps=3"])
    recs = log_records(out)
    steps = [x for x in recs if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    for x in steps:
        assert torch.isfinite(torch.tensor(x["loss"])) and 0 <= x["data_wait"] <= 1 and x["images_per_s"] > 0
        assert 0 <= x["contrastive_acc"] <= 1
    done = recs[-1]
    assert done["event"] == "done" and done["bad_images_skipped"] >= 1   # the fixture's bad files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["path"] == mixed_folder and cfg["optim"]["lr"] is None
    assert "done: 3 steps" in stdout


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_smoke_other_backends(tmp_path, request, backend, inproc):
    """A few steps through the DALI (CPU mode, on the validated clean list) and FFCV (on the
    converted .beton) backends: finite loss, done record."""
    import loaders
    ok, why = loaders.available(backend)
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {why}")
    data = request.getfixturevalue(f"{backend}_contract_data")
    out = tmp_path / backend
    args = TINY + [f"--data.backend={backend}", f"--data.path={data['path']}", f"--run.out_dir={out}",
                   "--run.max_steps=2", "--data.num_workers=1"]
    if data.get("file_list"):
        args.append(f"--data.file_list={data['file_list']}")
    inproc(args)
    recs = log_records(out)
    assert [x["step"] for x in recs if "loss" in x] == [1, 2]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in recs if "loss" in x)
    assert recs[-1]["event"] == "done"


def test_overfit_one_batch_drives_loss_down(tmp_path, image_folder, inproc):
    """The same 8 images in every step (a list file of 8, batch 8), crop+flip views: the loss must
    fall to a fraction of its start."""
    from loaders.sources.folders import list_image_folder
    samples, _ = list_image_folder(image_folder)
    lst = tmp_path / "eight.txt"
    lst.write_text("".join(f"{os.path.relpath(p, image_folder)} {lab}\n" for p, lab in samples[::3][:8]))
    out = tmp_path / "overfit"
    inproc(TINY + [f"--data.path={image_folder}", f"--data.file_list={lst}", f"--run.out_dir={out}",
                "--run.max_steps=30", "--optim.epochs=100", "--data.augment=finetune", "--optim.lr=1.0",
                "--run.log_every=5"])
    losses = [x["loss"] for x in log_records(out) if "loss" in x]
    assert len(losses) == 6 and losses[-1] < 0.3 * losses[0], losses


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exact_resume_after_sigkill(tmp_path, flat_folder, image_folder):
    """A run on an unlabelled flat folder killed with SIGKILL mid-run and resumed ends bitwise equal to
    an uninterrupted run, with DataLoader workers (2, the demo's default: torch's multi-worker loader
    iterates its sampler twice per pass, which once made a resumed epoch restart at batch 0) and the
    online k-NN on, which the reference runs without: the monitor leaves the training streams alone.
    24 images / batch 8 = 3 steps per epoch; 9 steps cross two epoch boundaries; the kill lands
    after the step-4 checkpoint (mid-epoch 2), so the resume starts mid-epoch. The reference runs
    without workers: batches do not depend on the worker count."""
    common = TINY + [f"--data.path={flat_folder}", "--run.max_steps=9", "--optim.epochs=3",
                     "--run.ckpt_every=2", "--run.keep_last=10", "--run.deterministic=true",
                     "--optim.warmup_epochs=1"]
    online = [f"--run.val_path={image_folder}", "--run.knn_bank=val", "--run.knn_every=0.5",
              "--run.knn_online_train_size=8", "--run.knn_online_val_size=8"]
    ref = tmp_path / "ref"
    run(common + [f"--run.out_dir={ref}"])
    step_a, a = final_state(ref)
    assert step_a == 9
    for workers, kill_after in ((2, 4),):
        out = tmp_path / f"killed_w{workers}"
        args = common + online + [f"--data.num_workers={workers}", f"--run.out_dir={out}", "--run.resume=auto"]
        proc = subprocess.Popen([sys.executable, SCRIPT, *args], env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not ck.path_for(out, kill_after).exists() and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        assert not ck.path_for(out, 9).exists()
        r = run(args)
        assert "resumed from" in r.stdout
        step_b, b = final_state(out)
        assert step_b == 9
        evals = [x["step"] for x in log_records(out) if x.get("event") == "eval"]
        assert 2 in evals and 8 in evals, evals  # checks ran before the kill and after the resume
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (workers, k)
        for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"]), workers


def test_elastic_restart_after_a_worker_is_killed(tmp_path, image_folder):
    """2 gloo workers under torchrun --max-restarts=1; one is SIGKILLed after the first checkpoint:
    torchrun restarts both, they resume from the checkpoint and complete."""
    psutil = pytest.importorskip("psutil", reason="psutil (installed with fastclr[ffcv]) finds the workers")
    out = tmp_path / "elastic"
    args = TINY + [f"--data.path={image_folder}", f"--run.out_dir={out}", "--optim.global_batch_size=8",
                   "--optim.epochs=4", "--run.max_steps=8", "--run.ckpt_every=2", "--run.resume=auto"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", SCRIPT, *args]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if ck.path_for(out, 2).exists():
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if "pretrain.py" in " ".join(p.cmdline())]
            if workers:
                workers[-1].send_signal(signal.SIGKILL)
                killed = True
                break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=300)
    assert killed, output[-3000:]
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output, output[-3000:]
    step, state = final_state(out)
    assert step == 8


@pytest.mark.parametrize("args, needle", [
    (["--data.path=/nonexistent/folder"], "data.path '/nonexistent/folder' is not a folder"),
    (["--optim.lrr=1"], "did you mean --optim.lr?"),
    (["--optim.global_batch_size=1"], "must split into equal per-rank batches"),
    ([f"--data.path={ROOT / 'fastclr'}"], "no images (.jpg"),     # a folder, but not of images
])
def test_bad_config_is_one_line_error_before_heavy_work(tmp_path, args, needle, call):
    from fastclr import pretrain
    code, _, err = call(pretrain.main, ["demo_cpu", f"--run.out_dir={tmp_path}/x", *args])
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_demo_knn_beats_random_init(tmp_path, demo_root, inproc):
    """The embedded demo on a shortened schedule (36 steps of 128 real Fashion-MNIST images): the
    k-NN top-1 of the trained backbone beats the same backbone at random init by >= 10 points, and the
    two comparisons the demo promises (k-NN and the 600-label probe against raw pixels) are printed."""
    out = tmp_path / "demo"
    stdout = inproc(["demo_cpu", f"--data.path={demo_root / 'train'}", f"--run.val_path={demo_root / 'val'}",
                     f"--run.out_dir={out}", "--run.max_steps=36", "--optim.global_batch_size=128",
                     "--run.knn_train_size=2000", "--run.knn_val_size=1000", "--run.progress=false"])
    done = log_records(out)[-1]
    assert done["event"] == "done" and done["step"] == 36
    assert done["final_loss"] < done["first_loss"]
    assert done["knn_top1"] >= done["knn_top1_random_init"] + 0.10, done
    assert "k-NN top-1 on val" in stdout and "on raw pixels" in stdout
    assert "600 labels (linear probe" in stdout and 0 < done["probe_top1_raw_pixels"] <= 1


def test_step_meter_window_means_and_non_finite_stop():
    """runtime.StepMeter (the loops' log bookkeeping): per-window means, then a non-finite loss stops
    the run naming its first bad step and that step's lr."""
    from fastclr import runtime
    m = runtime.StepMeter(torch.device("cpu"))
    for s, (loss, acc) in enumerate([(1.0, 0.5), (3.0, 0.7)]):
        m.add(s, torch.tensor(loss), torch.tensor(acc))
    w = m.read("p", None)
    assert (w.loss, w.steps) == (2.0, 2) and w.acc == pytest.approx(0.6) and 0.0 <= w.data_wait <= 1.0
    m.add(2, torch.tensor(5.0), torch.tensor(0.1))
    assert m.read("p", None).loss == 5.0  # the window restarted
    m.add(3, torch.tensor(float("nan")), torch.tensor(0.0))
    m.add(4, torch.tensor(float("inf")), torch.tensor(0.0))
    with pytest.raises(ck.NonFiniteState, match=r"non-finite loss at step 3 \(lr 0\.75\).*ckpt_3\.pt"):
        m.read("p", "ckpt_3.pt", lambda s: s / 4)
