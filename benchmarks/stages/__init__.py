"""The per-stage measurements. Each stage is a function of a ``Bench`` (the run's arguments, plan,
data and device) that returns ``{"status", "rows", ["reason"], ["notes"]}``; a row may itself be
skipped, with its reason.

    host        read, decode, geometry
    photometry  the colour recipe alone, per implementation
    loading     augment, h2d
    compute   model, teacher, loss, optim
    training  step, e2e (the step: benchmarks.train_step)
"""
from __future__ import annotations

import time
import traceback

from benchmarks.plan import STAGES
from benchmarks.report import log, stage_table
from benchmarks.rows import err, skip_stage
from benchmarks.stages import compute, host, loading, photometry, training
from benchmarks.stages.bench import Bench

RUNNERS = {
    "read": host.stage_read, "decode": host.stage_decode, "geometry": host.stage_geometry,
    "photometry": photometry.stage_photometry,
    "augment": loading.stage_augment, "h2d": loading.stage_h2d,
    "model": compute.stage_model, "teacher": compute.stage_teacher, "loss": compute.stage_loss, "optim": compute.stage_optim,
    "step": training.stage_step, "e2e": training.stage_e2e,
}
assert tuple(RUNNERS) == STAGES

__all__ = ["RUNNERS", "Bench", "run_stages"]


def run_stages(bench: Bench, names, on_stage=None) -> dict:
    """Run the named stages in order; ``on_stage(out)`` after each (the partial results so far)."""
    out = {}
    for name in names:
        log(f"stage {name} ...")
        t0 = time.perf_counter()
        try:
            st = RUNNERS[name](bench)
        except Exception as e:  # a stage that crashes is reported, the run goes on
            traceback.print_exc()
            st = skip_stage(f"failed: {err(e)}")
        st["seconds"] = round(time.perf_counter() - t0, 2)
        out[name] = st
        print(stage_table(name, st), flush=True)
        if on_stage is not None:
            on_stage(out)
    return out
