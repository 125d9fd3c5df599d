"""How a number is taken: synchronized timing (median of several calls), peak memory, and the small
context managers the stages run under (quiet file descriptors, autocast, torch threads)."""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device, warmup: int, iters: int, min_time: float = 0.0) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls; each call is timed on its own with the
    device synchronized (so asynchronous GPU work is counted). Runs at least ``iters`` calls and, for
    short calls, keeps going until ``min_time`` seconds are measured (at most 20x ``iters`` calls):
    the median of several calls resists the noise of a shared machine."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < iters or (sum(times) < min_time and len(times) < 20 * max(iters, 1)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device) -> tuple[int | None, str]:
    """(peak bytes allocated while ``fn`` runs, above what was live before, method).

    CUDA: torch.cuda.max_memory_allocated. CPU: torch has no public CPU allocator statistics and
    tracemalloc does not see torch's allocations, so the peak comes from torch.profiler's memory
    events: each op's allocations minus its frees, accumulated in time order (a temporary that an op
    allocates and frees internally is not seen, so this is a slight underestimate)."""
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile
    with quiet_fds(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return int(peak), "torch.profiler profile_memory (CPU)"


@contextlib.contextmanager
def quiet_fds():
    """Silence the profiler's native log lines (written straight to fd 1/2)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved + [null]:
            os.close(f)


@contextlib.contextmanager
def quiet_stdout():
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def free(device) -> None:
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
