"""Checkpoints: atomic writes, exact resume from the newest *usable* file, and pruning that only ever
deletes this run's own older files.

A checkpoint is a plain dict of tensors, numbers, strings and dicts (model / optimizer / scaler state,
step, epoch, position in the epoch, RNG states, config as a dict), so every load uses
``torch.load(..., weights_only=True)``: nothing user-supplied is ever unpickled. A file that needs
more (a pickled object, a malicious payload) is refused and the refusal says why; fastclr never
suggests loading it another way.

Files are ``<run_dir>/ckpt_<step:08d>.pt``, step = the number of optimizer steps done (as in
log.jsonl). A write goes to ``.tmp`` then ``os.replace``: a crash or a full disk never leaves a
truncated file under a checkpoint name, and a failed write removes its ``.tmp``. A checkpoint with a
NaN or inf anywhere in its weights, buffers (BatchNorm statistics) or optimizer state is never
written, and ``resume=auto`` passes over such a file with a warning.

``RunCheckpoints`` is what a training loop uses: it refuses a fresh run in a folder that holds
another run's checkpoints, resumes, saves and prunes.
"""
from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from loaders.sources.files import atomic_write

_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


class UnusableCheckpoint(ValueError):
    """A checkpoint file that cannot be used (unreadable, refused, not fastclr's, non-finite). The
    message is one line and names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, permissions). One line: the file, the
    reason and the free space; the partial file is gone and the previous checkpoints are intact."""


def path_for(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:08d}.pt"


def _os_reason(e: BaseException) -> str:
    """The OS-level reason of a failed write: torch.save reports a failed write of the file object as
    a RuntimeError ("unexpected pos ...") whose context holds the OSError that says why."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        e = e.__cause__ or e.__context__
    return "write failed"


def save(path: str | os.PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` atomically: tmp file, fsync, os.replace. On failure the tmp file is removed and
    a CheckpointWriteError names the file, the reason and the free space of its folder."""
    path = Path(path)
    try:
        with atomic_write(path, "wb") as fh:  # removes its .tmp when the write fails
            torch.save(state, fh)
    except (OSError, RuntimeError) as e:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**30:.2f} GiB free there"
        except OSError:
            free = "free space unknown"
        raise CheckpointWriteError(f"cannot write {path.name} to {path.parent}: {_os_reason(e)} ({free}); "
                                   f"the previous checkpoints are intact") from None
    return path


def _refusal(e: Exception) -> str:
    """One line from torch's weights-only refusal: what was refused (e.g. "unsupported GLOBAL
    posix.system"), without torch's advice on how to load the file anyway."""
    lines = [ln.strip() for ln in str(e).splitlines()
             if ln.strip() and "weights_only" not in ln and "Weights only load failed" not in ln]
    what = lines[0] if lines else "content other than tensors and plain values"
    what = re.sub(r"^WeightsUnpickler error:\s*", "", what)
    what = re.split(r"\.?\s+(?:Please|If you|Check the|To )", what)[0].rstrip(".")
    return what[:200]


def read(path: str | os.PathLike, map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file that is not plain weights raises
    UnusableCheckpoint naming the file and why (never torch's advice to load it unsafely)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # a plain pickle: torch's "please file an issue" aside, then our line
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, EOFError... per defect)
        text = str(e)
        if "weights_only" in text and re.search(r"global", text, re.IGNORECASE):  # a pickled object or call
            raise UnusableCheckpoint(f"{path}: refused: it holds Python objects that a weights-only load does "
                                     f"not allow ({_refusal(e)}); a fastclr checkpoint holds only tensors, "
                                     f"numbers, strings and dicts, so this file was written by other code "
                                     f"or altered") from None
        why = _refusal(e) if "weights_only" in text else (text.strip().splitlines() or [type(e).__name__])[0]
        raise UnusableCheckpoint(f"{path}: not a torch checkpoint ({why[:200]}); truncated, or another kind "
                                 f"of file?") from None


def load(path: str | os.PathLike, map_location="cpu") -> Dict[str, Any]:
    """``read`` a checkpoint dict (UnusableCheckpoint for anything else)."""
    state = read(path, map_location)
    if not isinstance(state, dict):
        raise UnusableCheckpoint(f"{path} is not a fastclr checkpoint (a {type(state).__name__}, expected a dict)")
    return state


def _float_tensors(tree: Any, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _float_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _float_tensors(v, f"{prefix}.{i}")


# What a training checkpoint's numbers are: weights and buffers, optimizer and queue state.
CHECKED_KEYS = ("model", "optimizer", "queue")


def first_non_finite(tree: Any) -> Optional[str]:
    """Dotted name of the first floating tensor of ``tree`` holding a NaN or inf, else None. One
    reduction per device and one host sync in the common (all finite) case."""
    named = list(_float_tensors(tree))
    if not named:
        return None
    by_device: Dict[torch.device, List[torch.Tensor]] = {}
    for _, t in named:
        by_device.setdefault(t.device, []).append(t)
    flags = [torch.stack([torch.isfinite(t).all() for t in ts]).all() for ts in by_device.values()]
    if all(bool(f) for f in flags):
        return None
    return next(name for name, t in named if not bool(torch.isfinite(t).all()))


def check_usable(path: Path, state: Dict[str, Any]) -> None:
    """UnusableCheckpoint unless ``state`` is a training checkpoint with finite numbers."""
    if "model" not in state or "step" not in state:
        raise UnusableCheckpoint(f"{path}: not a training checkpoint (no 'model' or 'step')")
    bad = first_non_finite({k: state[k] for k in CHECKED_KEYS if k in state})
    if bad:
        raise UnusableCheckpoint(f"{path}: non-finite values in {bad}")


def list_checkpoints(run_dir: str | os.PathLike) -> List[Tuple[int, Path]]:
    """(step, path) of every checkpoint in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_latest_valid(run_dir: str | os.PathLike, map_location="cpu") -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest checkpoint that loads and holds only finite numbers; newer unusable files are skipped
    with a warning. None when the folder holds no checkpoint; UnusableCheckpoint when it holds some but
    none is usable (the message gives the newest one's reason)."""
    found = list_checkpoints(run_dir)
    reasons = []
    for _, path in reversed(found):
        try:
            state = load(path, map_location)
            check_usable(path, state)
        except (UnusableCheckpoint, OSError) as e:  # truncated, refused, NaN, vanished: try the previous one
            reasons.append((path, str(e)))
            continue
        for bad, why in reasons:
            warnings.warn(f"skipping unreadable checkpoint {bad.name}: {why.replace(str(bad) + ': ', '')}")
        return path, state
    if found:
        raise UnusableCheckpoint(f"none of the {len(found)} checkpoint(s) in {run_dir} is usable; the newest: "
                                 f"{reasons[0][1]}")
    return None


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints of a folder (keep_last <= 0 keeps all). A
    training run prunes through RunCheckpoints instead, which only deletes its own files."""
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        path.unlink(missing_ok=True)


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers (their state_dict keys carry prefixes)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class NonFiniteState(Exception):
    """The weights, buffers or optimizer state hold a NaN or inf: the run must stop (message: one line)."""


class RunCheckpoints:
    """The checkpoints of one training run in ``run_dir``: a guard against mixing two runs, resume,
    save (only finite states) and pruning of this run's own older files.

    * A fresh run (``resume=""``) in a folder that already holds checkpoints (or ``extra_files`` such as
      best.pt) of another run is refused with a one-line ValueError, unless ``overwrite``: then those
      files are deleted first. Without the guard, an old run's newer files made ``keep_last`` delete the
      fresh run's checkpoints as soon as they were written, and a later ``resume=auto`` continued the
      other run.
    * ``resume="auto"``: the newest usable checkpoint (unusable newer ones skipped with a warning);
      ``resume=PATH``: that file. The files of this folder up to the resumed step are this run's.
    * ``save(step, state)`` refuses a state with a non-finite number (NonFiniteState naming the tensor
      and the last good checkpoint), writes atomically and then deletes this run's checkpoints beyond
      the newest ``keep_last``: never a file it did not write or resume from, so a newer garbage file
      cannot push a good one out.
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, resume: str = "", overwrite: bool = False,
                 extra_files: Tuple[str, ...] = (), main: bool = True):
        self.run_dir, self.keep_last, self.resume, self.main = Path(run_dir), int(keep_last), resume, main
        self.last: Optional[Path] = None      # the newest good checkpoint of this run
        self._own: List[Path] = []            # this run's checkpoints, oldest first
        existing = list_checkpoints(self.run_dir)
        extras = [self.run_dir / f for f in extra_files if (self.run_dir / f).exists()]
        foreign = existing + [(-1, p) for p in extras]
        resume_here = resume == "auto" or (resume and Path(resume).resolve().parent == self.run_dir.resolve())
        if foreign and not resume_here:
            if not overwrite:
                names = [p.name for _, p in existing] + [p.name for p in extras]
                shown = ", ".join(names[:3]) + (f" ... ({len(names)} files)" if len(names) > 3 else "")
                raise ValueError(f"{self.run_dir} already holds files of another run ({shown}): continue it "
                                 f"with --run.resume=auto, choose another --run.out_dir, or pass "
                                 f"--run.overwrite=true to delete them")
            if main:
                for _, p in foreign:
                    p.unlink(missing_ok=True)

    def load_resume(self, map_location="cpu") -> Optional[Tuple[Path, Dict[str, Any]]]:
        """(path, state) to resume from, or None for a fresh start (resume="" or an empty folder)."""
        if not self.resume:
            return None
        if self.resume == "auto":
            found = load_latest_valid(self.run_dir, map_location)
            if found is None:
                return None
        else:
            state = load(self.resume, map_location)
            check_usable(Path(self.resume), state)
            found = (Path(self.resume), state)
        path, state = found
        self.last = path
        step = int(state["step"])
        self._own = [p for s, p in list_checkpoints(self.run_dir) if s <= step and p != path] + [path]
        return found

    def save(self, step: int, state_fn: Callable[[], Dict[str, Any]], tensors: Dict[str, Any]) -> Optional[Path]:
        """Check ``tensors`` ({"model": state_dict, "optimizer": ..., ...}; on every rank, they are the
        same), then (main rank) write ``state_fn()`` as ckpt_<step> and prune. Returns the path."""
        bad = first_non_finite(tensors)
        if bad:
            where = f"last good checkpoint: {self.last}" if self.last else "no good checkpoint written yet"
            raise NonFiniteState(f"non-finite values in {bad} after step {step}; stopping without writing a "
                                 f"checkpoint ({where}). Lower optim.lr or check the data, then --run.resume=auto")
        path = path_for(self.run_dir, step)
        if self.main:
            save(path, state_fn())
            self._own = [p for p in self._own if p != path] + [path]
            if self.keep_last > 0:
                for old in self._own[:-self.keep_last]:
                    old.unlink(missing_ok=True)
                self._own = self._own[-self.keep_last:]
        self.last = path
        return path
