"""torchrun, for preemptible clusters: ``python -m fastclr.launch`` takes torchrun's arguments and runs it,
but a stop on a signal ends in one line and exit status 3 instead of torchrun's traceback.

    python -m fastclr.launch --nproc_per_node=8 fastclr/pretrain.py imagenet_r50_1x --run.resume=auto ...

A scheduler's SIGTERM (or SIGINT, SIGHUP) reaches torchrun and the ranks: the ranks finish the step in
flight, agree on a step, write one checkpoint and exit with status 3 (fastclr.stopping); torchrun
itself gives the ranks its 30 s grace before it kills them, then raises. This wrapper turns that into
one line and status 3, so a requeue script tests one number whether the signal went to the whole job
or only to the ranks. Any other failure keeps torchrun's status (1) and its report of the failed rank.
"""
from __future__ import annotations

import os
import signal
import sys

from fastclr.stopping import EXIT_STOPPED

PROG = "fastclr.launch"


def main(argv: list[str] | None = None) -> int:
    # torchrun's own INFO/WARNING lines (rendezvous, "sending SIGTERM to process ...") are noise on a
    # preemption; its errors still show. LOGLEVEL=INFO brings them back.
    os.environ.setdefault("LOGLEVEL", "ERROR")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except SignalException as e:
        name = signal.Signals(e.sigval).name if e.sigval else "a signal"
        print(f"{PROG}: stopped by {name}; the ranks stopped together and wrote a checkpoint (their last "
              f"line names it); resume with --run.resume=auto", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        if codes == [EXIT_STOPPED]:  # the ranks alone were signalled: they stopped with a checkpoint
            return EXIT_STOPPED
        print(f"{PROG}: {len(e.failures)} rank(s) failed (exit status {', '.join(map(str, codes))}); their "
              f"errors are above", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
