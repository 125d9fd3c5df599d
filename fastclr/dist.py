"""torch.distributed helpers: init from torchrun's environment, rank queries, print0, collectives.

Launch with ``torchrun --nproc_per_node=N fastclr/pretrain.py``: torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and ``init()`` reads them. A plain ``python script.py``
sets none of them, and then ``init()`` does nothing and every helper answers as rank 0 of 1, so
single-process code is the same code.

Backend: NCCL when CUDA is available, gloo otherwise (the CPU tests use gloo).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist


class DistInfo(NamedTuple):
    rank: int
    world_size: int


def is_distributed() -> bool:
    """True when a process group is up (whatever its size)."""
    return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(backend: str | None = None) -> DistInfo:
    """Initialize the default process group from torchrun's env vars; a no-op without them.

    Sets the CUDA device to LOCAL_RANK first, so NCCL and every later ``.cuda()`` use this rank's GPU.
    Safe to call twice. Returns ``DistInfo(rank, world_size)``; ``(0, 1)`` when not launched by torchrun.
    """
    if is_distributed():
        return DistInfo(rank(), world_size())
    if not launched_by_torchrun():
        return DistInfo(0, 1)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # torchrun keeps one key-value store across elastic restarts. With env:// the process group's
    # keys are the same in every round, so after a restart a rank can read the previous round's
    # peer addresses and fail to connect (seen with gloo: "connectFullMesh ... Connection refused").
    # A prefix per restart round keeps the rounds apart.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), w,
                          is_master=(r == 0 and not agent_store), use_libuv=True)
    round_ = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"fastclr_round{round_}", store),
                            rank=r, world_size=w)
    return DistInfo(rank(), world_size())


def device() -> torch.device:
    """This rank's training device: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed (logs from several ranks interleave otherwise)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def on_main(fn):
    """``fn()`` on rank 0, its result (or the message of the exception it raised) broadcast, so every
    rank returns the same value or raises the same exception, instead of the others waiting forever
    for a rank 0 that stopped on bad input."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
            error = e
    if world_size() == 1:
        if error is not None:
            raise error
        return result
    box = [result, None if error is None else (type(error), str(error))]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        if error is not None:
            raise error
        raise box[1][0](box[1][1])
    return box[0]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (one small all-reduce; call it where the loop syncs anyway)."""
    if world_size() == 1:
        return flag
    dev = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(flag)], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (picklable values; a sync: checkpoint time only)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks, as a new tensor (``t`` is left alone). No host sync: the result
    stays on the device; call ``.item()`` on it only where you log."""
    if world_size() == 1:
        return t.detach().clone()
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)  # gloo has no ReduceOp.AVG
    return out.div_(world_size())


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """``[n, ...]`` on each rank -> ``[world * n, ...]``, rank-major, on every rank. No autograd.

    Every rank must pass the same shape. NCCL gathers straight into one buffer; other backends
    (gloo) gather into a list.
    """
    if world_size() == 1:
        return x
    x = x.contiguous()
    if dist.get_backend() == "nccl":
        out = x.new_empty((world_size() * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x)
        return out
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


@torch.no_grad()
def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` ([n, ...] each) concatenated rank-major, without gradient: ``[world * n, ...]``.
    Used for memory-queue keys, which never carry gradient."""
    return all_gather_cat(x.detach())
