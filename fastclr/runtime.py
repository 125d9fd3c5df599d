"""What every entry point (pretrain, finetune, distill, linear_eval) needs around its loop:
device and precision choice, one-line user errors, the demo-data default, the run log (log.jsonl and,
when asked, TensorBoard)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import torch

from fastclr import checkpoint as ckpt
from fastclr import dist
from fastclr.errors import UserError
from loaders.errors import EXIT_BAD_INPUT, EXIT_FAILED  # noqa: F401
from loaders.config import dtype_name, parse_dtype  # noqa: F401
from loaders.sources.files import atomic_write_text


def fail(prog: str, msg: str, code: int = 2):
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def run_entry(prog: str, cls, presets, description: str, fn, argv=None, demo_preset: str | None = None) -> int:
    """An entry point's main(): parse ``[PRESET] --section.key=value`` into ``cls``, run ``fn(cfg)``.
    ``demo_preset``: the preset a command line with neither a preset nor ``--data.path`` runs (said in
    one line: the embedded demo). What a user can cause or fix becomes one line on stderr (no
    traceback): bad options, data or checkpoints (exit 2), a full disk or non-finite weights (exit 1).
    The process group is always torn down."""
    from fastclr import config as C
    from loaders.errors import DataError
    argv = sys.argv[1:] if argv is None else list(argv)
    no_preset = not argv or argv[0].startswith("-")
    asks_help = any(a in ("-h", "--help") for a in argv)
    if demo_preset and no_preset and not asks_help and not any(a.startswith("--data.path") for a in argv):
        dist.print0(f"{prog}: no preset and no --data.path: the embedded demo (preset {demo_preset})")
        argv = [demo_preset, *argv]
    cfg = C.parse(cls, argv, presets, prog=prog, description=description)
    # fastclr's own warnings (a skipped checkpoint, ...) read as one line, not as source locations
    plain = warnings.formatwarning
    warnings.formatwarning = lambda m, c, *a, **k: (f"{prog}: warning: {m}\n" if c is UserWarning
                                                    else plain(m, c, *a, **k))
    from fastclr import stopping
    try:
        try:
            signals = stopping.parse_names(cfg.run.stop_signals)
        except ValueError as e:
            raise UserError(str(e)) from None
        with stopping.installed(prog, signals):
            return fn(cfg)
    except stopping.Stopped as e:
        if dist.is_main():
            print(f"{prog}: {e.line()}", file=sys.stderr, flush=True)
        raise SystemExit(stopping.EXIT_STOPPED)
    except KeyboardInterrupt:  # run.stop_signals without INT: Ctrl-C, still one line
        fail(prog, "interrupted (Ctrl-C); the newest checkpoint in run.out_dir is where --run.resume=auto "
                   "continues", 130)
    except (UserError, DataError, ckpt.UnusableCheckpoint) as e:
        fail(prog, one_line(e), EXIT_BAD_INPUT)
    except (ckpt.CheckpointWriteError, ckpt.NonFiniteState) as e:
        fail(prog, one_line(e), EXIT_FAILED)
    except RuntimeError as e:
        why = loader_failure(e)
        if why is None:
            raise
        # The DataLoader is broken: its shutdown would wait on a stalled worker (which ignores the signals
        # it sends, fastclr.stopping) or report the dead one again from its SIGCHLD handler. Say the one
        # line, give the folder back, end the workers and leave without running that shutdown.
        print(f"{prog}: error: {why}", file=sys.stderr, flush=True)
        release_lock()
        import multiprocessing
        for child in multiprocessing.active_children():
            child.kill()
        sys.stdout.flush()
        os._exit(EXIT_FAILED)
    except OSError as e:
        if e.errno not in _FULL_DISK:
            raise
        out_dir = getattr(getattr(cfg, "run", None), "out_dir", ".")
        try:
            free = f"{shutil.disk_usage(out_dir).free / 2**30:.2f} GiB free in {out_dir}"
        except OSError:
            free = "free space unknown"
        fail(prog, f"cannot write {e.filename or 'to ' + out_dir}: {e.strerror} ({free})", EXIT_FAILED)
    finally:
        warnings.formatwarning = plain
        release_lock()
        end_loader_workers()
        dist.cleanup()


def end_loader_workers() -> None:
    """End the DataLoader workers still alive when a run is over (a loader whose last pass was not read
    to its end). They ignore SIGTERM (fastclr.stopping: the main process decides what a signal means),
    which is what the interpreter's exit sends them: without this the exit would wait on them forever.
    Each loader shuts its workers down as the DataLoader does; those still alive after that are killed,
    with torch's SIGCHLD check turned off first, so their end is not reported as a failure."""
    import multiprocessing
    import signal
    if "loaders.backends.torch_loader" in sys.modules:  # the clean way first: each worker told to stop
        sys.modules["loaders.backends.torch_loader"].close_all()
    children = multiprocessing.active_children()
    if not children:
        return
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


def loader_failure(e: BaseException) -> str | None:
    """One line for a DataLoader that failed under the run (None: another error): a worker that died
    (torch raises it from its SIGCHLD handler, anywhere in the loop) or no batch within data.timeout."""
    import re
    text = str(e)
    m = re.search(r"DataLoader worker \(pid\(?s?\)? ([\d, ]+)\) (exited unexpectedly|is killed by signal)", text)
    if m:
        sig = re.search(r"killed by signal: ([^.\n]+)", text)
        how = f" (signal: {sig.group(1).strip()})" if sig else ""
        return (f"DataLoader worker {m.group(1)} died{how}: out of memory (the kernel's OOM killer, see dmesg), "
                f"or killed; fewer --data.num_workers or more memory, then --run.resume=auto")
    m = re.search(r"DataLoader timed out after ([\d.]+) seconds", text)
    if m:
        return (f"no batch from the DataLoader workers in {float(m.group(1)):g} s (data.timeout): a stalled worker or a hung "
                f"file system; check the data's storage, then --run.resume=auto (or raise --data.timeout)")
    return None


def one_line(e: BaseException) -> str:
    """An error's message as one line. An exception raised in a DataLoader worker arrives re-raised
    with the worker's traceback in its message: its last line is the original message."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(e).__name__
    last = lines[-1]
    prefix = f"{type(e).__module__}.{type(e).__name__}: "
    for p in (prefix, f"{type(e).__name__}: "):
        if last.startswith(p):
            return last[len(p):]
    return last


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is visible (use --run.device=cpu)")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


# bf16 autocast on a CPU pays off only when the convolutions are big enough: with the network's stem
# output smaller than this (a side, in pixels), oneDNN's casts and weight reorders cost what the bf16
# arithmetic saves (the CPU rows of benchmarks/throughput.py measure both precisions).
CPU_BF16_MIN_STEM_SIDE = 16


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: the CPU multiplies bf16 natively (elsewhere oneDNN emulates it, slower
    than fp32)."""
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # a build without the query: assume the common case, no native bf16
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def auto_precision(device: torch.device, image_size: Optional[int] = None, cifar_stem: bool = False,
                   stem_stride: int = 1) -> Tuple[str, str]:
    """(precision, why) for run.precision=auto: bf16 on GPU; on a CPU, bf16 where the CPU has native
    bf16 and the stem's output is at least CPU_BF16_MIN_STEM_SIDE a side (``image_size`` None: not
    limiting), else fp32."""
    if device.type == "cuda":
        return "bf16", "GPU"
    if not cpu_has_native_bf16():
        return "fp32", "this CPU has no native bf16 (AVX512-BF16 or AMX)"
    side = None if image_size is None else (image_size // stem_stride if cifar_stem else image_size // 4)
    if side is not None and side < CPU_BF16_MIN_STEM_SIDE:
        return "fp32", (f"native bf16 on this CPU, but {image_size} px images leave {side}x{side} maps after the "
                        f"stem, too small for bf16 to be faster")
    return "bf16", "native bf16 on this CPU"


def resolve_precision(name: str, device: torch.device, image_size: Optional[int] = None,
                      cifar_stem: bool = False) -> torch.dtype:
    """The autocast dtype of run.precision (``auto``: see auto_precision). BatchNorm statistics, the loss,
    LARS and the colour ops stay fp32 whatever this says."""
    if name == "auto":
        name = auto_precision(device, image_size, cifar_stem)[0]
    if name == "fp16" and device.type != "cuda":
        raise UserError("run.precision=fp16 needs a GPU (use fp32 or bf16 on CPU)")
    return parse_dtype(name)


def autocast(device: torch.device, dtype: torch.dtype, cache: bool = True):
    """Mixed precision in ``dtype`` (nothing for float32). ``cache=False`` inside a CUDA-graph capture:
    autocast's cache of cast weights would otherwise outlive the graph's memory."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache)


def seed_everything(seed: int) -> None:
    """torch's global generators: the same seed on every rank, so model init is identical (DDP also
    broadcasts it). The data streams derive from (seed, epoch, rank, ...) in loaders.sampling."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def set_deterministic(on: bool) -> None:
    if on:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def resolve_data_path(path: str, backend: str, val_path: str = "") -> Tuple[str, str, bool]:
    """(train_path, val_path, is_demo). An empty path means the embedded Fashion-MNIST demo set,
    prepared by rank 0 on first use while the other ranks wait."""
    if path:
        p = Path(path)
        if backend == "ffcv":
            if not p.is_file():
                raise UserError(f"data.path {path!r} is not a .beton file (write one with python -m loaders.write_ffcv)")
        elif not p.is_dir():
            raise UserError(f"data.path {path!r} is not a folder of images")
        if val_path and not Path(val_path).exists():
            raise UserError(f"run.val_path {val_path!r} does not exist")
        return path, val_path, False
    if backend == "ffcv":
        raise UserError("the demo data set is an ImageFolder: use data.backend=torch or dali, or give data.path=<.beton>")
    from loaders import demo_data
    if dist.is_main():  # rank 0 prepares it on first use while the others wait
        try:
            demo_data.prepare()
        except demo_data.DemoDataError as e:
            raise UserError(str(e)) from None
    dist.barrier()
    return demo_data.resolve("", "train"), val_path or demo_data.resolve("", "val"), True


LOG_NAME = "log.jsonl"
TENSORBOARD_HINT = "pip install 'fastclr[tensorboard]'"


def summary_writer_class():
    """torch's TensorBoard SummaryWriter; a one-line UserError naming the extra when the tensorboard
    package is missing."""
    # TensorBoard imports TensorFlow when it is installed (fastclr[tf]); Triton (loaded by torch._dynamo)
    # must be loaded first, or the two LLVM copies collide and the process dies with a segmentation fault.
    import torch._dynamo  # noqa: F401
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # and TensorFlow's C++ start-up lines are not ours to show
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(f"run.tensorboard=true needs the tensorboard package: {TENSORBOARD_HINT}") from None
    return SummaryWriter


class RunLog:
    """The run's log, rank 0 only, the one place every entry point's records go (the trainer's and
    linear_eval's fast path): one JSON object per line in ``run_dir/log.jsonl``, flushed per write so a
    killed run keeps it, and with ``tensorboard=True`` the same records as TensorBoard scalars in
    event files beside it. ``run_dir=None`` writes nothing.

    TensorBoard: every numeric field of a record (bools, strings and None are left out) becomes the
    scalar ``<event>/<key>`` at the record's ``step`` (0 without one) and wall time ``time``: a
    training record (no ``event``) gives ``train/loss``, ``train/lr``, ``train/images_per_s``...,
    an ``eval`` record ``eval/top1``, the ``done`` record ``done/final_loss``. Writes happen only when
    a record is written (every run.log_every steps), never in between."""

    def __init__(self, run_dir: str | os.PathLike | None, tensorboard: bool = False):
        self.fh = self.tb = None
        if run_dir is None or not dist.is_main():
            return
        path = Path(run_dir, LOG_NAME)
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
        self.fh = open(path, "a", buffering=1)  # noqa: SIM115  (open for the run's whole life)
        if torn:  # a run killed mid-line: its fragment stays alone on its line, the next record parses
            self.fh.write("\n")
        if tensorboard:
            self.tb = summary_writer_class()(log_dir=str(run_dir))

    def write(self, **record) -> None:
        if self.fh is None:
            return
        record.setdefault("time", round(time.time(), 3))
        self.fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix, step = record.get("event", "train"), int(record.get("step") or 0)
            for key, value in record.items():
                if key not in ("event", "step", "time") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self.tb.add_scalar(f"{prefix}/{key}", value, step, walltime=record["time"])
            self.tb.flush()  # like the JSON line: a killed run keeps what it logged

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def gpu_memory_gb(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate; a tensor lr (a captured step's) is filled in place."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


class LogWindow(NamedTuple):
    """What StepMeter.read() measured since the previous read."""
    loss: float       # mean loss per step
    steps: int
    seconds: float
    data_wait: float  # share of the time blocked on the loader
    metrics: dict     # mean per step of every metric given to add(), by name

    @property
    def acc(self) -> float:
        """The metric given to add() as ``acc`` (the first one)."""
        return next(iter(self.metrics.values()))


class StepMeter:
    """The training loop's bookkeeping between two logs: loss and metric sums kept on the device, the
    first step with a non-finite loss (a device-side ``torch.where``), and the time spent blocked on
    the loader. ``read()`` is the one host sync, every log_every steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.sums: dict = {}
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._restart()

    def _restart(self) -> None:
        self.n, self.wait_s, self.t0 = 0, 0.0, time.perf_counter()

    def next_batch(self, it):
        """next(it), its blocking time counted as data wait."""
        t = time.perf_counter()
        batch = next(it)
        self.wait_s += time.perf_counter() - t
        return batch

    def add(self, step: int, loss: torch.Tensor, acc: Optional[torch.Tensor] = None, **metrics: torch.Tensor) -> None:
        """Step ``step`` (counted as in log.jsonl: the first step is 1) ended with these values."""
        loss = loss.detach()
        self.loss_sum += loss
        if acc is not None:
            metrics = {"acc": acc, **metrics}
        for k, v in metrics.items():
            if k not in self.sums:
                self.sums[k] = torch.zeros((), device=self.device)
            self.sums[k] += v.detach()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss),
                                     torch.full_like(self.first_bad, step), self.first_bad)
        self.n += 1

    def read(self, prog: str, last_ckpt, lr_at_step=None) -> LogWindow:
        """The window since the last read, then restart.
        A non-finite loss since the start stops the run (SystemExit) naming the step and the last
        good checkpoint; ``lr_at_step(step)`` adds that step's learning rate to the message."""
        bad = int(self.first_bad.item())
        if bad >= 0:
            where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint written yet"
            lr = f" (lr {lr_at_step(bad):.4g})" if lr_at_step is not None else ""
            raise ckpt.NonFiniteState(f"non-finite loss at step {bad}{lr}; stopping. {where}. "
                                      "Lower optim.lr or check the data, then --run.resume=auto.")
        dt = time.perf_counter() - self.t0
        sums = torch.stack([self.loss_sum, *self.sums.values()]) / self.n
        loss, *means = sums.tolist()  # the one host sync of the window
        out = LogWindow(loss, self.n, dt, min(self.wait_s / dt, 1.0), dict(zip(self.sums, means)))
        for t in (self.loss_sum, *self.sums.values()):
            t.zero_()
        self._restart()
        return out


def per_rank_batch(global_batch: int, grad_accum: int, world: int, minimum: int = 1) -> int:
    """optim.global_batch_size split over ranks and accumulation steps; a UserError if uneven."""
    per_rank, rem = divmod(global_batch, world * grad_accum)
    if rem or per_rank < minimum:
        raise UserError(f"optim.global_batch_size={global_batch} must split into equal per-rank batches "
                        f"of >= {minimum} over {world} rank(s) x {grad_accum} accumulation steps")
    return per_rank


@dataclass
class Run:
    """What ``start_run`` resolved for a training script."""
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype         # the training precision (autocast dtype; float32 = none)
    per_rank: int              # images per rank per micro-step
    train_path: str
    val_path: str              # '' = no validation set
    is_demo: bool              # data.path was empty: the embedded Fashion-MNIST set
    out_dir: str
    ckpts: ckpt.RunCheckpoints
    resumed: Optional[Tuple[Path, dict]] = None  # (file, state) of the checkpoint this run resumes from


# Besides ckpt_*.pt, the files that mark a folder as another run's (finetune/distill/linear_eval).
RUN_FILES = ("best.pt", "last.pt")


def start_run(cfg, min_batch: int = 1) -> Run:
    """Setup shared by every entry point, before any heavy work: process group, device, precision,
    per-rank batch, data paths (the demo set when data.path is empty), the run folder's checkpoints
    (a fresh run refuses a folder holding another run's, see checkpoint.RunCheckpoints), seeds,
    determinism, and the resolved config written to run.out_dir/config.json. Bad input (a missing
    tensorboard package for run.tensorboard=true included) raises UserError here, before anything in
    run.out_dir is touched."""
    from fastclr import config as C
    if cfg.run.tensorboard:
        summary_writer_class()  # a missing package fails here, not after the data and the model are built
    rank, world = dist.init()
    device = resolve_device(cfg.run.device)
    precision = cfg.run.precision
    if precision == "auto":
        model = getattr(cfg, "model", None)
        precision, why = auto_precision(device, cfg.data.image_size, bool(getattr(model, "cifar_stem", False)),
                                        int(getattr(model, "stem_stride", 1)))
        if device.type == "cpu":  # the rule depends on the CPU and the input: say what it chose
            dist.print0(f"run.precision=auto: {precision} ({why})")
    dtype = resolve_precision(precision, device)
    per_rank = per_rank_batch(cfg.optim.global_batch_size, cfg.optim.grad_accum, world, min_batch)
    train_path, val_path, is_demo = resolve_data_path(cfg.data.path, cfg.data.backend, cfg.run.val_path)
    r = cfg.run
    # torch.compile's generated code (inductor, FX graph cache) outlives the run: the next run of the same
    # model loads it instead of compiling again.
    from loaders.demo_data import cache_dir
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    # The folder and the resume target, before anything is created; then the folder's lock (rank 0).
    from fastclr import rundir
    rundir.check_resume(r.resume)
    dist.on_main(lambda: rundir.check_out_dir(r.out_dir))

    def lock():
        Path(r.out_dir).mkdir(parents=True, exist_ok=True)
        _LOCK.append(rundir.RunLock(r.out_dir))
        _LOCK[-1].acquire()
    dist.on_main(lock)
    try:
        ckpts = ckpt.RunCheckpoints(r.out_dir, r.keep_last, r.resume, r.overwrite, RUN_FILES, main=dist.is_main())
    except ValueError as e:
        raise UserError(str(e)) from None
    resumed = ckpts.load_resume()  # on every rank: the same file, the same verdict below
    if resumed is not None:
        check_config_on_resume(cfg, *resumed)
    if r.overwrite and not r.resume and dist.is_main():
        # The old run's records would mix with ours: its log and its TensorBoard event files go.
        for old in (Path(r.out_dir, LOG_NAME), *Path(r.out_dir).glob("events.out.tfevents.*")):
            old.unlink(missing_ok=True)
    seed_everything(cfg.run.seed)
    set_deterministic(cfg.run.deterministic)
    if dist.is_main():
        C.save_json(cfg, os.path.join(cfg.run.out_dir, "config.json"))
    dist.barrier()
    run = Run(rank, world, device, dtype, per_rank, train_path, val_path, is_demo, cfg.run.out_dir, ckpts)
    run.resumed = resumed
    return run


_LOCK: list = []  # the run folder's lock while this process holds it (rank 0)


def release_lock() -> None:
    """Give the run folder's lock back (run_entry does, however the run ends)."""
    while _LOCK:
        _LOCK.pop().release()


def check_config_on_resume(cfg, path, state) -> None:
    """Refuse (one line) a resume whose options change the run's trajectory, unless
    run.allow_config_change; with any change, keep the previous config as config.<step>.json and log a
    ``segment`` record naming the changes."""
    from fastclr import config as C
    from fastclr import rundir
    old = state.get("config")
    if not isinstance(old, dict):
        return  # a checkpoint of another fastclr version: nothing to compare
    trajectory, bookkeeping = rundir.config_changes(old, C.to_dict(cfg))
    if trajectory and not cfg.run.allow_config_change:
        shown = "; ".join(trajectory[:6]) + (f"; ... ({len(trajectory)} in all)" if len(trajectory) > 6 else "")
        raise UserError(f"{path} was made with other options that change the run ({shown}): resume with the "
                        f"same options, or pass --run.allow_config_change=true to continue with these")
    if (trajectory or bookkeeping) and dist.is_main():
        step = int(state.get("step", 0))
        previous = Path(cfg.run.out_dir, f"config.{step:08d}.json")
        atomic_write_text(previous, json.dumps(old, indent=2, sort_keys=True) + "\n")
        log = RunLog(cfg.run.out_dir)
        log.write(event="segment", step=step, changed=trajectory + bookkeeping,
                  previous_config=f"config.{step:08d}.json")
        log.close()
        if trajectory:
            print(f"warning: resuming {path} with {len(trajectory)} changed option(s) that change the run "
                  f"(--run.allow_config_change=true): {'; '.join(trajectory[:4])}", file=sys.stderr, flush=True)
