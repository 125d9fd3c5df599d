"""Runs on a cluster (issue: preemption, requeue, resume rules, one writer per folder, no tracebacks),
each the way users run it: the real CLI in its own process group, DataLoader workers on."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastclr import checkpoint as ck

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "fastclr" / "pretrain.py")
# 24 images / batch 8 = 3 steps per epoch, 8 epochs; workers on (the demo's 2). The R18 recipe, not the
# demo's smaller network: a second process must find the first one still running.
RUN = ["semisup_cpu", "--data.image_size=32", "--data.num_workers=2", "--optim.global_batch_size=8",
       "--optim.epochs=8", "--run.max_steps=none", "--optim.warmup_epochs=1", "--run.knn_eval=false",
       "--run.progress=false", "--run.log_every=1", "--run.deterministic=true", "--run.ckpt_every=100"]
STEPS = 24


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        e.pop(k, None)
    return e


def start(cmd, **kw):
    """A program in its own process group (as a scheduler starts a job), output captured."""
    return subprocess.Popen(cmd, env=kw.pop("env", env()), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


def wait_for_step(out: Path, step: int, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(r.get("step", 0) >= step and "loss" in r for r in records(out)):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no step {step} logged (exit {proc.poll()})")


def records(out: Path):
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]


def final_model(out: Path):
    step, path = ck.list_checkpoints(out)[-1]
    return step, ck.load(path)["model"]


def assert_same_model(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def one_line_err(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def uninterrupted(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = subprocess.run([sys.executable, PRETRAIN, *RUN, f"--data.path={image_folder}", f"--run.out_dir={out}"],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    step, model = final_model(out)
    assert step == STEPS
    return model


# ----------------------------------------------------------------------------- preemption
def test_ctrl_c_twice_stops_with_a_checkpoint_and_the_resume_is_exact(image_folder, tmp_path, uninterrupted):
    """SIGINT to the process group (Ctrl-C, workers included), twice: the step in flight finishes, one
    checkpoint, one line, exit 3; --run.resume=auto then ends bitwise where an uninterrupted run ends."""
    out = tmp_path / "run"
    cmd = [sys.executable, PRETRAIN, *RUN, f"--data.path={image_folder}", f"--run.out_dir={out}", "--run.resume=auto"]
    proc = start(cmd)
    wait_for_step(out, 4, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    last = one_line_err(err)
    assert last.startswith("pretrain.py: stopped by SIGINT at step ") and "resume with --run.resume=auto" in last
    stopped = records(out)[-1]
    assert stopped["event"] == "stopped" and ck.path_for(out, stopped["step"]).is_file()
    assert stopped["step"] < STEPS and not (out / ".lock").exists()
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    step, model = final_model(out)
    assert step == STEPS
    assert_same_model(model, uninterrupted)


def test_slurm_stand_in_signal_requeue_resume(image_folder, tmp_path, uninterrupted):
    """docs/slurm.sbatch under a stand-in scheduler: USR1 to the batch script (SLURM's --signal=B:USR1),
    the script forwards it, the run stops with a checkpoint (exit 3), the script requeues; the
    requeued job (the same script, the same job id) finishes, bitwise equal to an uninterrupted run."""
    out = tmp_path / "run"
    marker = tmp_path / "requeued"
    e = dict(env(), SLURM_JOB_ID="4242", FASTCLR_OUT=str(out), FASTCLR_REQUEUE=f"touch {marker}",
             FASTCLR_CMD=" ".join([sys.executable, PRETRAIN, *RUN, f"--data.path={image_folder}"]))
    script = ["bash", str(ROOT / "docs" / "slurm.sbatch")]
    proc = start(script, env=e)
    wait_for_step(out, 4, proc)
    os.kill(proc.pid, signal.SIGUSR1)  # to the batch shell only
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and marker.exists(), (stdout, err)
    assert "stopped by SIGTERM at step" in err and "requeueing" in stdout
    marker.unlink()
    r = subprocess.run(script, env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and not marker.exists(), r.stderr[-2000:]
    step, model = final_model(out)
    assert step == STEPS
    assert_same_model(model, uninterrupted)


def test_torchrun_two_ranks_stop_at_the_same_step(image_folder, tmp_path):
    """SIGTERM to the whole job (fastclr.launch, torchrun, two gloo ranks): the ranks agree on a step at
    a log step, one checkpoint is written, one line and exit 3 (no torchrun traceback); the resume
    continues from that step."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastclr.launch", "--standalone", "--nproc_per_node=2", PRETRAIN, *RUN,
           "--data.num_workers=1", "--run.log_every=2", f"--data.path={image_folder}", f"--run.out_dir={out}",
           "--run.resume=auto"]
    proc = start(cmd)
    wait_for_step(out, 4, proc, timeout=180)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err and "fastclr.launch: stopped by SIGTERM" in err
    stopped = [r for r in records(out) if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] % 2 == 0  # at a log step, once
    assert [s for s, _ in ck.list_checkpoints(out)] == [stopped[0]["step"]]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ck.path_for(out, stopped[0]['step'])}" in r.stdout
    assert final_model(out)[0] == STEPS


# ----------------------------------------------------------------------------- resume rules, lock, out_dir
def short(image_folder, out, *extra, check=True):
    r = subprocess.run([sys.executable, PRETRAIN, *RUN, "--data.num_workers=0", "--run.max_steps=2",
                        f"--data.path={image_folder}", f"--run.out_dir={out}", *extra],
                       env=env(), capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def in_process(args, capsys) -> tuple[int, str]:
    """pretrain.main (the command's own entry, as `python fastclr/pretrain.py` runs it): (status, stderr)."""
    from fastclr import pretrain
    try:
        code = pretrain.main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_resume_refuses_a_changed_config_unless_asked(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    base = [*RUN, "--data.num_workers=0", f"--data.path={image_folder}", f"--run.out_dir={out}"]
    assert in_process(base + ["--run.max_steps=2"], capsys)[0] == 0
    for extra, what in ((["--optim.global_batch_size=4"], "optim.global_batch_size: 8 -> 4"),
                        (["--model.depth=34"], "model.depth: 18 -> 34"),
                        (["--optim.optimizer=sgd"], "optim.optimizer: 'lars' -> 'sgd'"),
                        (["--loss.temperature=0.5"], "loss.temperature: 0.2 -> 0.5")):
        code, err = in_process(base + ["--run.resume=auto", "--run.max_steps=3", *extra], capsys)
        assert code == 2 and what in one_line_err(err) and "--run.allow_config_change=true" in err, (extra, err)
    assert json.loads((out / "config.json").read_text())["optim"]["global_batch_size"] == 8  # kept
    assert in_process(base + ["--run.resume=auto", "--run.max_steps=3", "--run.log_every=2"], capsys)[0] == 0
    seg = [x for x in records(out) if x.get("event") == "segment"]
    assert seg[-1]["step"] == 2 and seg[-1]["changed"] == ["run.log_every: 1 -> 2", "run.max_steps: 2 -> 3"]
    assert json.loads((out / "config.00000002.json").read_text())["run"]["log_every"] == 1
    r = short(image_folder, out, "--run.resume=auto", "--run.max_steps=4", "--run.log_every=2",
              "--loss.temperature=0.5", "--run.allow_config_change=true")  # the real command, once
    assert "changed option(s) that change the run" in r.stderr and final_model(out)[0] == 4
    seg = [x for x in records(out) if x.get("event") == "segment"]
    assert "loss.temperature: 0.2 -> 0.5" in seg[-1]["changed"] and seg[-1]["step"] == 3


def test_one_writer_per_folder_and_stale_locks(image_folder, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, PRETRAIN, *RUN, f"--data.path={image_folder}", f"--run.out_dir={out}"]
    first = start(cmd)
    wait_for_step(out, 1, first)
    second = subprocess.run(cmd + ["--run.resume=auto"], env=env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert f"is in use by another run (pid {first.pid} on" in one_line_err(second.stderr)
    os.killpg(first.pid, signal.SIGKILL)  # dead without releasing its lock
    first.wait()
    assert (out / ".lock").exists()
    third = short(image_folder, out, "--run.resume=auto", "--run.max_steps=3")
    assert "taking over the lock" in third.stderr and f"process {first.pid} on this host is gone" in third.stderr
    assert not (out / ".lock").exists()


def test_unusable_out_dir_and_resume_target_are_one_line_and_leave_nothing(image_folder, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [([f"--run.out_dir={a_file}"], "is a file, not a folder"),
             ([f"--run.out_dir={a_file}/sub"], "cannot be created"),
             ([f"--run.out_dir={tmp_path / 'new'}", "--run.resume=yes"], "--run.resume=yes: no such checkpoint file"),
             ([f"--run.out_dir={tmp_path / 'new'}", "--run.resume=/missing.pt"], "no such checkpoint file")]
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs another user
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cases.append(([f"--run.out_dir={ro / 'run'}"], "read-only"))
    for i, (extra, msg) in enumerate(cases):
        if i == 0:  # the real command once
            r = subprocess.run([sys.executable, PRETRAIN, *RUN, f"--data.path={image_folder}", *extra], env=env(),
                               capture_output=True, text=True, timeout=120)
            code, err = r.returncode, r.stderr
        else:
            code, err = in_process([*RUN, f"--data.path={image_folder}", *extra], capsys)
        assert code == 2 and msg in one_line_err(err), (extra, err)
    assert not (tmp_path / "new").exists() and not (a_file.parent / "sub").exists()


# ----------------------------------------------------------------------------- workers
def test_a_dead_or_stalled_worker_is_one_line(image_folder, tmp_path):
    psutil = pytest.importorskip("psutil", reason="psutil (installed with fastclr[ffcv]) finds the workers")
    for sig, extra, msg in ((signal.SIGKILL, [], "DataLoader worker"),
                            (signal.SIGSTOP, ["--data.timeout=3"], "no batch from the DataLoader workers in 3 s")):
        out = tmp_path / sig.name
        proc = start([sys.executable, PRETRAIN, *RUN, "--optim.epochs=400", f"--data.path={image_folder}",
                      f"--run.out_dir={out}", *extra])
        wait_for_step(out, 2, proc)
        workers = psutil.Process(proc.pid).children()
        assert workers
        os.kill(workers[0].pid, sig)
        _, err = proc.communicate(timeout=120)
        for w in workers:  # the stopped one
            with __import__("contextlib").suppress(psutil.Error):
                w.kill()
        assert proc.returncode == 1, err[-2000:]
        last = one_line_err(err)
        assert msg in last and "--run.resume=auto" in last, last
