"""fastclr.dist helpers, and the distributed NT-Xent proven with two real processes (gloo, CPU).

The two ranks are started like torchrun starts them (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT, a port the OS picked) running tests/_dist_worker.py; they save what they saw, and the
tests compare it with one process on the concatenated global batch.

Gradient convention checked (see fastclr/losses.py): rank r's loss is the mean over its own 2B
anchors; the mean of the ranks' losses is the single-process loss L on the global batch; the
gradient rank r gets w.r.t. its local embeddings is W * dL/dz_r, so DDP's average over ranks gives
the single-process parameter gradient.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_losses import naive_nt_xent_per_anchor

from fastclr import dist as fdist
from fastclr.losses import nt_xent

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as worker

WORLD = 2
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the two ranks once for the whole module; returns the list of their saved results."""
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = []
    for r in range(WORLD):
        with open(out / f"rank{r}.log", "wb") as log:  # the child keeps its own copy of the handle
            procs.append(subprocess.Popen([sys.executable, str(Path(worker.__file__)), str(out)],
                                          env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=REPO,
                                          stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # wait for all; if one fails the other would block in a collective, so stop it then
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n" + (out / f"rank{r}.log").read_text()
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_helpers_under_two_ranks(ranks):
    for r, res in enumerate(ranks):
        assert res["info"] == (r, WORLD)
        assert (res["rank"], res["world_size"], res["local_rank"], res["is_main"]) == (r, WORLD, r, r == 0)
        assert res["gathered"].tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 2  # rank-major
        assert res["mean"].item() == pytest.approx(1.5)


def test_queue_fed_with_gathered_keys_is_identical_on_all_ranks(ranks):
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])
    assert ranks[0]["ptr"].item() == (3 * WORLD * worker.B) % 10


@pytest.mark.parametrize("case", list(worker.CASES))
def test_nt_xent_two_processes_match_one_process(ranks, case):
    dtype, t, _, _ = worker.CASES[case]
    tol = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    b = worker.B
    z1g, z2g, extra = worker.global_inputs(case, WORLD)
    z1g.requires_grad_()
    z2g.requires_grad_()
    # one process, the whole global batch, dense path: L = mean over all 2BW anchors
    loss = nt_xent(z1g, z2g, t, chunk_size=0, extra_negatives=extra)
    g1, g2 = torch.autograd.grad(loss, [z1g, z2g])
    per_anchor, correct = naive_nt_xent_per_anchor(z1g.detach(), z2g.detach(), t, extra)

    for r, res in enumerate(ranks):
        got = res[case]
        mine = torch.cat([torch.arange(r * b, (r + 1) * b), WORLD * b + torch.arange(r * b, (r + 1) * b)])
        sl = slice(r * b, (r + 1) * b)
        # loss on rank r: the mean over its own 2B anchors (rows), each against all 2BW columns
        torch.testing.assert_close(got["loss"].double(), per_anchor[mine].mean().detach(), **tol)
        # mean over ranks == single-process loss on the global batch
        torch.testing.assert_close(got["mean_loss"], loss.detach(), **tol)
        assert got["acc"].item() == pytest.approx(correct[mine].double().mean().item())
        # TF's metric: rank r's view-1 rows against every rank's view-2 rows, argmax = own positive
        ab = F.normalize(z1g.detach().double(), dim=1)[sl] @ F.normalize(z2g.detach().double(), dim=1).T
        hit = ab.argmax(1) == torch.arange(r * b, (r + 1) * b)
        assert got["tf_acc"].item() == pytest.approx(hit.double().mean().item())
        # gradient on rank r == W x gradient of the global mean loss w.r.t. rank r's slice
        torch.testing.assert_close(got["grad_z1"], WORLD * g1[sl], **tol)
        torch.testing.assert_close(got["grad_z2"], WORLD * g2[sl], **tol)
    # DDP averages over ranks: the average of the rank gradients is the global-batch gradient
    avg = torch.cat([res[case]["grad_z1"] for res in ranks]) / WORLD
    torch.testing.assert_close(avg, g1, **tol)


# ----------------------------------------------------------------------------- single process


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def test_single_process_helpers_are_no_ops(no_torchrun_env, capsys):
    assert not fdist.launched_by_torchrun()
    assert fdist.init() == (0, 1)
    assert not fdist.is_distributed()
    assert (fdist.rank(), fdist.world_size(), fdist.local_rank(), fdist.is_main()) == (0, 1, 0, True)
    fdist.barrier()
    fdist.cleanup()
    t = torch.arange(3.0, requires_grad=True)
    m = fdist.all_reduce_mean(t)
    assert torch.equal(m, t.detach()) and m.data_ptr() != t.data_ptr() and not m.requires_grad
    assert fdist.gather_nograd(t).data_ptr() == t.data_ptr()
    assert fdist.device() == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    fdist.print0("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"


def test_print0_is_silent_off_rank_zero(monkeypatch, capsys):
    monkeypatch.setattr(fdist, "rank", lambda: 1)
    fdist.print0("nope")
    assert capsys.readouterr().out == ""
