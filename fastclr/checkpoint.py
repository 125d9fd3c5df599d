"""Checkpoints: atomic writes, keep-last-k, and resume from the newest *valid* file.

A checkpoint is a plain dict of tensors, numbers, strings and dicts (model / optimizer / scaler state,
step, epoch, position in the epoch, RNG states, config as a dict), so every load uses
``torch.load(..., weights_only=True)``: nothing user-supplied is ever unpickled.

Files are ``<run_dir>/ckpt_<step:08d>.pt``. A write goes to ``.tmp`` then ``os.replace``: a crash or
a full disk never leaves a truncated file under a checkpoint name.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


def path_for(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:08d}.pt"


def save(path: str | os.PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` atomically: tmp file, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a fastclr checkpoint (a {type(state).__name__}, expected a dict)")
    return state


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
    """The newest checkpoint that loads; corrupt or partial newer files are skipped with a warning."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            state = load(path, map_location)
            if "model" not in state or "step" not in state:
                raise ValueError("missing 'model' or 'step'")
            return path, state
        except Exception as e:  # truncated zip, bad pickle opcode, wrong content: try the previous one
            first = (str(e).splitlines() or [""])[0][:200]
            warnings.warn(f"skipping unreadable checkpoint {path.name}: {type(e).__name__}: {first}")
    return None


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (keep_last <= 0 keeps all)."""
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
