"""Where does the time go, is training data-bound, and how much faster is fastclr than the usual peers?

    python benchmarks/throughput.py                        # CPU, <= ~3 min on 2 cores
    python benchmarks/throughput.py --quick                # smoke configuration, well under a minute
    python benchmarks/throughput.py --device cuda          # GPU: R50, 224 px, bf16, channels_last, 256/GPU
    python benchmarks/throughput.py --stages augment,loss --backends torch,dali --no-peers
    python benchmarks/throughput.py --sweep num_threads=2,4,8 --sweep batch_size=16,32
    python benchmarks/throughput.py --data /imagenet/train --beton /data/train_256.beton

Stages (images/s; views/s where a stage makes two views per image):
  read      bytes from disk (ImageFolder files) and from the .beton, page cache warm
  decode    JPEG -> RGB uint8 (PIL, OpenCV, torchvision; + nvJPEG on GPU), one thread
  geometry  decode + 2 random crops resized (fastclr augment.geometry vs torchvision/PIL), one thread
  augment   the full two-view SimCLR recipe through each data backend and the peers' DataLoaders,
            same worker count, views on the target device
  h2d       host -> device copy of a batch of crops (GPU only)
  model     backbone + head fwd+bwd on synthetic channels-last inputs, per architecture / dtype,
            eager and torch.compile
  teacher   the distillation teacher's eval-mode forward (a released model's layout), eager and compiled
  loss      NT-Xent fwd+bwd, dense and chunked, with peak memory, vs lightly's NTXentLoss
  optim     fused LARS step vs lightly's LARS and a per-parameter loop with .item() (R50 params)
  step      full training step on synthetic data: fwd + loss + bwd + LARS
  e2e       full training step on real data through each backend, with the data-wait fraction

Headline ratios are measured side by side in the same run (never against numbers from elsewhere).
Results: an aligned table on stdout, a JSON file (benchmarks/results/<date>-<device>-<sha>.json or
--out; a --quick run writes to a new temporary folder instead) with every number, the machine and the
versions, and a PNG bar chart per stage next to it.
See benchmarks/README.md for how to read them.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/throughput.py` puts benchmarks/ first, not the repo root
    sys.path.insert(0, ROOT)

import argparse
import time

import torch

from benchmarks.data import Data
from benchmarks.plan import SWEEPABLE, apply_overrides, cpu_count, make_plan, parse_args, sweep_plan
from benchmarks.ratios import compute_ratios
from benchmarks.report import (
    charts,
    default_out,
    device_name,
    git_info,
    log,
    ratio_table,
    run_meta,
    write_json,
)
from benchmarks.stages import Bench, run_stages


def main(argv=None) -> int:
    args = parse_args(argv, description=__doc__.split("\n\n")[0])
    t_start = time.perf_counter()
    try:
        import cv2
        # Before any cv2 call: OpenCV's thread pool does not survive fork, and DataLoader workers forked
        # from a process that ran multi-threaded cv2 ops hang in their first cv2 call. The decode and
        # geometry stages measure one thread anyway.
        cv2.setNumThreads(1)
    except ImportError:
        pass
    plan = apply_overrides(make_plan(args.device, args.quick), args)
    torch.manual_seed(args.seed)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sha, dirty = git_info()
    out_path = os.path.abspath(args.out or default_out(args.device, sha, temporary=args.quick))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    log(f"results -> {out_path}" + ("  (--quick: a temporary folder; --out PATH to keep them)"
                                    if args.quick and not args.out else ""))
    log(f"device {args.device} ({device_name(args.device)}), {cpu_count()} CPUs, stages {','.join(args.stages)}, "
        f"backends {','.join(args.backends)}, peers {'on' if args.peers else 'off'}")
    data = Data(args, plan)
    bench = Bench(args, plan, data)
    stages: dict = {}
    sweeps: list = []
    ratios: dict = {}

    def save(complete: bool) -> dict:
        """Write the JSON. Also called after every stage and sweep point with complete=false, so a run
        killed by a time limit (the GPU suite's) still leaves what it measured."""
        meta = run_meta(args, plan, data, sha, dirty, complete)
        result = {"meta": meta, "stages": stages, "ratios": ratios or compute_ratios(stages, plan, args.device),
                  "sweeps": sweeps}
        if complete and not args.no_chart:
            meta["charts"] = charts(stages, out_path)
            if "_skipped" in meta["charts"]:
                log(meta["charts"]["_skipped"])
        meta["seconds"] = round(time.perf_counter() - t_start, 1)
        write_json(out_path, result)
        return meta

    stages.update(run_stages(bench, args.stages, on_stage=lambda done: (stages.update(done), save(False))))
    ratios.update(compute_ratios(stages, plan, args.device))
    print(ratio_table(ratios), flush=True)

    for param, values in args.sweep:
        names = [s for s in args.stages if s in SWEEPABLE[param]]
        if not names:
            sweeps.append({"param": param, "status": "skipped",
                           "reason": f"none of its stages ({', '.join(SWEEPABLE[param])}) was requested"})
            continue
        sub_args = args
        note = None
        if param == "hw_decoder_load":
            sub_args = argparse.Namespace(**{**vars(args), "backends": [b for b in args.backends if b == "dali"],
                                             "peers": False, "variants": False})
            if not sub_args.backends:
                sweeps.append({"param": param, "status": "skipped", "reason": "needs the dali backend"})
                continue
            if args.device != "cuda":
                note = "the DALI CPU pipeline has no hardware decoder: the value has no effect on CPU"
        for v in values:
            log(f"sweep {param}={v}")
            sp = sweep_plan(plan, param, v)
            pt = run_stages(Bench(sub_args, sp, data), names)
            point = {"param": param, "value": v, "stages": pt}
            if note:
                point["note"] = note
            sweeps.append(point)
            save(False)

    meta = save(True)
    print(f"wrote {out_path} ({meta['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
