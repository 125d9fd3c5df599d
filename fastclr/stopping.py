"""Stopping on a signal: what a scheduler sends before it preempts a job (SIGTERM; SLURM's
``--signal=USR1@90``), or Ctrl-C.

Every entry point installs ``StopSignals`` for ``run.stop_signals`` (default TERM, INT, USR1). While
the training loop runs, a signal only raises a flag: the loop finishes the step in flight, writes a
checkpoint and stops (``Stopped``), and the entry point prints one line and exits with
``EXIT_STOPPED`` (3), which a requeue script tests before resubmitting with ``--run.resume=auto``.
Under torchrun every rank stops at the same step: the ranks agree at the next log step (one 4-byte
all-reduce there, beside the log's own sync; nothing is added to the other steps), so a multi-rank run
stops at most ``run.log_every`` steps after the signal. Outside the loop (building the data, the final
k-NN check) a signal stops the program at once, with the same one line and status. A second signal
while the checkpoint is written is acknowledged and otherwise ignored (the write is atomic anyway).
DataLoader workers ignore these signals: the main process decides (loaders/backends/torch_loader.py).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Optional

EXIT_STOPPED = 3
NAMES = ("TERM", "INT", "USR1", "USR2", "HUP")


class Stopped(Exception):
    """The run stopped on a signal. ``step``: the steps done (None: before the first step);
    ``checkpoint``: the file written at that step (None: nothing to save)."""

    def __init__(self, signame: str, step: Optional[int] = None, checkpoint: Optional[str] = None,
                 finished: bool = False):
        self.signame, self.step, self.checkpoint, self.finished = signame, step, checkpoint, finished
        super().__init__(self.line())

    def line(self) -> str:
        if self.finished:
            return (f"stopped by {self.signame} after training had finished"
                    + (f"; the final checkpoint is {self.checkpoint}" if self.checkpoint else ""))
        if self.step is None:
            return f"stopped by {self.signame} before the first step (nothing to save)"
        return (f"stopped by {self.signame} at step {self.step}; checkpoint written ({self.checkpoint}); "
                f"resume with --run.resume=auto")


def parse_names(text: str) -> list[int]:
    """``"TERM,INT,USR1"`` -> signal numbers; ValueError naming a bad one."""
    out = []
    for name in (n.strip().upper().removeprefix("SIG") for n in text.split(",") if n.strip()):
        if name not in NAMES:
            raise ValueError(f"run.stop_signals: unknown signal {name!r} (choose from {', '.join(NAMES)})")
        out.append(getattr(signal, f"SIG{name}"))
    return out


class StopSignals:
    """The handlers; ``requested`` is the first signal's name once one arrived."""

    def __init__(self, prog: str):
        self.prog = prog
        self.requested: Optional[str] = None
        self.in_loop = False
        self.step: Optional[int] = None        # steps done, set by the loop
        self.checkpoint: Optional[str] = None  # the newest checkpoint, set by the loop
        self.finished = False
        self._previous: dict = {}

    def install(self, numbers: list[int]) -> None:
        for n in numbers:
            self._previous[n] = signal.signal(n, self._handler)

    def restore(self) -> None:
        for n, h in self._previous.items():
            signal.signal(n, h)
        self._previous.clear()

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            if os.environ.get("RANK", "0") == "0":
                print(f"{self.prog}: {name} again: already stopping", file=sys.stderr, flush=True)
            return
        self.requested = name
        if not self.in_loop:
            raise Stopped(name, self.step, self.checkpoint, self.finished)
        if os.environ.get("RANK", "0") == "0":  # every rank gets it under torchrun: one line is enough
            print(f"{self.prog}: {name}: finishing this step, then writing a checkpoint", file=sys.stderr,
                  flush=True)

    @contextlib.contextmanager
    def loop(self):
        """While the training loop runs, a signal only raises the flag the loop polls."""
        self.in_loop = True
        try:
            yield self
        finally:
            self.in_loop = False


_current: Optional[StopSignals] = None


def current() -> Optional[StopSignals]:
    """The handlers of this process's entry point (None outside one)."""
    return _current


@contextlib.contextmanager
def installed(prog: str, numbers: list[int]):
    global _current
    stop = StopSignals(prog)
    stop.install(numbers)
    _current = stop
    try:
        yield stop
    finally:
        stop.restore()
        _current = None
