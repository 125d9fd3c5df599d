"""Merge throughput.py results whose stages were measured in separate runs into one JSON.

    python benchmarks/merge_results.py OUT.json RUN1.json RUN2.json ...
    python -m benchmarks.merge_results OUT.json RUN1.json RUN2.json ...     (the same, from the repo root)

For a GPU suite split over several device leases (a run that failed in one stage, rerun for that
stage alone): a stage comes from the last input where it is not skipped, and records which run it
came from (``stage["source"]``). Ratios are recomputed, since each one compares rows of one stage,
which were measured side by side in one run. The charts are redrawn next to OUT.json. The meta block
is the last input's, with ``merged_from`` listing every input's date, git sha, host and stages.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/merge_results.py` puts benchmarks/ first, not the repo root
    sys.path.insert(0, ROOT)

from benchmarks.plan import STAGES, Plan
from benchmarks.ratios import compute_ratios
from benchmarks.report import charts, ratio_table, write_json


def _measured(stage: dict) -> bool:
    """A stage that ran and has at least one row that is not a skip (a stage can be "ok" with every
    row failed, e.g. every model build raising)."""
    return stage.get("status") != "skipped" and any(r.get("status", "ok") != "skipped"
                                                    for r in stage.get("rows", []))


def merge(docs: list[tuple[str, dict]]) -> dict:
    devices = {d["meta"]["device"] for _, d in docs}
    if len(devices) > 1:
        raise SystemExit(f"merge_results: inputs ran on different devices {sorted(devices)}: not comparable")
    stages: dict = {}
    sweeps: list = []
    merged_from = []
    for path, doc in docs:
        meta = doc["meta"]
        merged_from.append({"file": path, "date": meta.get("date"), "git_sha": meta.get("git_sha"),
                            "host": meta.get("host"), "complete": meta.get("complete"),
                            "stages": {k: v.get("status") for k, v in doc["stages"].items()}})
        for key, st in doc["stages"].items():
            if key in stages and _measured(stages[key]) and not _measured(st):
                continue  # keep the earlier measurement over a later failure
            stages[key] = {**st, "source": path}
        for sw in doc.get("sweeps", []):
            if "stages" in sw and not any(_measured(st) for st in sw["stages"].values()):
                continue  # a sweep point where nothing was measured
            sweeps.append({**sw, "source": path})
    last = docs[-1][1]["meta"]
    plan = Plan(**last["config"])
    meta = {**last, "merged_from": merged_from, "charts": None}
    order = [s for s in STAGES if s in stages]
    return {"meta": meta, "stages": {k: stages[k] for k in order},
            "ratios": compute_ratios(stages, plan, last.get("device_type", "cpu")), "sweeps": sweeps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out", help="merged JSON to write")
    ap.add_argument("inputs", nargs="+", help="throughput.py JSONs, oldest first (later ones win per stage)")
    ap.add_argument("--no-chart", action="store_true", help="skip the PNG charts")
    args = ap.parse_args(argv)
    docs = []
    for p in args.inputs:
        try:
            with open(p) as f:
                docs.append((p, json.load(f)))
        except (OSError, ValueError) as e:
            ap.error(f"cannot read {p}: {e}")
    result = merge(docs)
    if not args.no_chart:
        result["meta"]["charts"] = charts(result["stages"], args.out)
    write_json(args.out, result)
    print(ratio_table(result["ratios"]))
    print(f"wrote {args.out} from {len(docs)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
