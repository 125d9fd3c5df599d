"""The run folder as a cluster uses it: checked before any work, held by one writer, and resumed only
with the config that made its checkpoints.

* ``check_out_dir``: a folder we can create and write (not a file, not under a file, not read-only),
  checked before anything is created; ``check_resume``: ``--run.resume`` is '', 'auto' or a checkpoint
  file that exists. Both are one-line UserErrors (exit 2) that leave nothing behind.
* ``RunLock``: ``<out_dir>/.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local file systems and
  on the shared ones clusters use: NFSv3+, Lustre, GPFS, BeeGFS), holding the holder's host, pid, start
  time, command and job (SLURM job id, torchrun run id). A second run refuses in one line naming the
  holder. The lock is taken over, with a warning, when its holder is gone: a dead pid on this host, or
  the same scheduler job or torchrun run (a requeued job, an elastic restart on another node). A lock
  of a live process or of another host's unknown process stays: delete the file if you know it is stale.
* ``config_changes``: which options differ between the config a checkpoint was made with and this
  command's. Bookkeeping (logging, checkpoint cadence, progress bar, TensorBoard, a longer run,
  evaluation, loader workers, compile and CUDA graphs) may change on resume; anything else alters the
  run's trajectory and is refused unless ``--run.allow_config_change=true``.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from fastclr.errors import UserError

LOCK_NAME = ".lock"

# Options that do not change what a run computes: they may differ between the parts of a resumed run.
BOOKKEEPING = {
    "run.max_steps", "run.log_every",
    "run.tensorboard", "run.ckpt_every", "run.keep_last", "run.progress", "run.eval_every", "run.eval_batch_size",
    "run.val_path", "run.knn_eval", "run.knn_train_size", "run.knn_val_size", "run.probe_labels_per_class",
    "run.stop_signals", "run.deterministic", "data.num_workers", "data.timeout", "model.compile",
    "run.cuda_graphs", "model.channels_last",
}


# How a part of the run was started, not what it computes: never reported as a change.
INVOCATION = {"run.out_dir", "run.resume", "run.overwrite", "run.allow_config_change"}


# ----------------------------------------------------------------------------- before any work
def check_out_dir(out_dir: str) -> None:
    """UserError unless ``out_dir`` is (or can be created as) a writable folder. Creates nothing."""
    p = Path(out_dir).absolute()
    if p.exists() and not p.is_dir():
        raise UserError(f"run.out_dir {out_dir} is a file, not a folder: choose another --run.out_dir")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"run.out_dir {out_dir} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is read-only" if existing == p else f"cannot be created: {existing} is read-only"
        raise UserError(f"run.out_dir {out_dir} {what} for this user: choose another --run.out_dir")


def check_resume(resume: str) -> None:
    """UserError unless ``--run.resume`` is '', 'auto' or an existing checkpoint file."""
    if resume in ("", "auto"):
        return
    p = Path(resume)
    if p.is_dir():
        raise UserError(f"--run.resume={resume} is a folder: give a checkpoint file, or --run.resume=auto "
                        f"with --run.out_dir={resume}")
    if not p.is_file():
        hint = " (auto, a checkpoint file, or nothing)" if "/" not in resume and not resume.endswith(".pt") else ""
        raise UserError(f"--run.resume={resume}: no such checkpoint file{hint}")


# ----------------------------------------------------------------------------- one writer per folder
def _job() -> Dict[str, str]:
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID", "PBS_JOBID", "LSB_JOBID")
    return {k: os.environ[k] for k in keys if os.environ.get(k)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """``<out_dir>/.lock`` while this run writes there (rank 0 holds it). See the module docstring."""

    def __init__(self, out_dir: str):
        self.path = Path(out_dir) / LOCK_NAME
        self.held = False

    def _record(self) -> Dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(shlex.quote(a) for a in sys.argv), "job": _job()}

    def _holder(self) -> Optional[Dict[str, Any]]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, holder: Optional[Dict[str, Any]]) -> Optional[str]:
        """Why the lock's holder is gone (None: it may be alive)."""
        if holder is None:
            return "its file is unreadable (a holder killed while writing it)"
        job = holder.get("job") or {}
        same_job = [k for k, v in _job().items() if job.get(k) == v]
        if same_job:
            return f"it was this job's ({same_job[0]}={job[same_job[0]]}: a requeued or restarted run)"
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} on this host is gone"
        return None

    def acquire(self) -> None:
        """Take the lock or raise UserError naming its holder (stale locks are taken over with a warning)."""
        record = json.dumps(self._record())
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                why = self._stale(holder)
                if why is None:
                    h = holder or {}
                    raise UserError(f"{self.path.parent} is in use by another run (pid {h.get('pid')} on "
                                    f"{h.get('host')}, since {h.get('started')}: {h.get('command', '?')[:120]}); "
                                    f"choose another --run.out_dir, or delete {self.path} if that run is dead")
                warnings.warn(f"taking over the lock of {self.path.parent}: {why}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(record + "\n")
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}: another run took it at the same moment")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is None or holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


# ----------------------------------------------------------------------------- resume with the same config
def _flat(d: Dict[str, Any]) -> Dict[str, Any]:
    """By dotted key, tuples as lists (a saved config.json holds lists where the live config has tuples)."""
    from loaders.options import flatten
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(d).items()}


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """(trajectory changes, bookkeeping changes) between two config dicts, each as 'key: old -> new';
    a key only one of them knows (another fastclr version) is compared where both have it."""
    a, b = _flat(old), _flat(new)
    trajectory, bookkeeping = [], []
    for k in sorted(set(a) & set(b) - INVOCATION):
        if a[k] != b[k]:
            (bookkeeping if k in BOOKKEEPING else trajectory).append(f"{k}: {a[k]!r} -> {b[k]!r}")
    return trajectory, bookkeeping
