"""The Python half of experiments/semisup.sh (the shell script runs the training steps, this module the
bookkeeping around them). Run from the repo root:

    python -m experiments.semisup_report val-subset SRC DST
        a class-balanced 10 % of the ImageFolder SRC as symlinks in DST (the smoke run's val set)
    python -m experiments.semisup_report results OUT QUICK DEPTH PRETRAIN SAVE
        OUT/results.{json,md} from the step runs under OUT (and SAVE.{json,md} when SAVE is not empty)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

# (key, method, network, uses); the key names the run directories OUT/<key>_<fraction>.
ROWS = (
    ("raw_pixels", "logistic regression on raw pixels", "linear, 3072 inputs", "labels"),
    ("scratch", "supervised from scratch", "R{depth}", "labels"),
    ("linear", "SimCLR + linear eval (frozen)", "R{depth}", "unlabeled + labels"),
    ("finetune", "SimCLR + fine-tune (SimCLRv2 step 2)", "R{depth}", "unlabeled + labels"),
    ("distill", "+ distill into a fresh R18 (tau 1)", "R18", "unlabeled x2 + labels"),
    ("self_distill", "+ self-distill (tau 0.1)", "R{depth}", "unlabeled x2 + labels"),
)
FRACTIONS = ("1pct", "10pct")

# The targets the chain is held to, judged by the run that measured it: (text, [(measured keys, baseline
# key, margin, baseline field)]). A pair is met when the best of its measured keys' final top-1 is >= the
# baseline + margin; a target when all its pairs are; None where a step did not finish. A distilled
# student is held against its teacher's weights, which distill.py loads from the fine-tuning run's
# best.pt: the baseline there is that run's best top-1, not its final one.
TARGETS = (
    ("fine-tune at 1 % >= supervised from scratch + 10", [(("finetune_1pct",), "scratch_1pct", 10.0, "top1")]),
    ("fine-tune at 1 % >= raw-pixel logistic regression + 3",
     [(("finetune_1pct",), "raw_pixels_1pct", 3.0, "top1")]),
    ("fine-tune or linear at 10 % >= raw-pixel logistic regression + 3",
     [(("finetune_10pct", "linear_10pct"), "raw_pixels_10pct", 3.0, "top1")]),
    ("fine-tune >= linear probe, at 1 % and at 10 %",
     [(("finetune_1pct",), "linear_1pct", 0.0, "top1"), (("finetune_10pct",), "linear_10pct", 0.0, "top1")]),
    ("distillation >= its teacher, at 1 % and 10 %, both students",
     [((f"{k}_{f}",), f"finetune_{f}", 0.0, "best_top1") for f in FRACTIONS for k in ("distill", "self_distill")]),
)


def judge(res: dict, quick: bool = False) -> list:
    """[{target, pairs: [{measured, value, baseline, baseline_value, margin, met}], met}] for TARGETS;
    a smoke run (tiny schedules, 1000 images) is not judged (every met is None)."""
    out = []
    for text, pairs in TARGETS:
        rows = []
        for keys, base, margin, field in pairs:
            vals = [(res[k]["top1"], k) for k in keys if res.get(k, {}).get("top1") is not None]
            best, key = max(vals) if vals else (None, keys[0])
            b = res.get(base, {}).get(field)
            # rounded: the top-1s have two decimals, and 64.02 >= 61.02 + 3 must not fail on float error
            ok = None if quick or best is None or b is None else round(best - b - margin, 6) >= 0
            rows.append({"measured": key, "value": best, "baseline": f"{base}.{field}", "baseline_value": b,
                         "margin": margin, "met": ok})
        met = None if any(r["met"] is None for r in rows) else all(r["met"] for r in rows)
        out.append({"target": text, "pairs": rows, "met": met})
    return out


def link_split(src: str, dst: str, fraction: float, parts: tuple[str | None, str | None] = (None, "")) -> int:
    """A class-balanced draw of ``fraction`` of the ImageFolder SRC (seed 0) as symlinks under DST, made
    in DST.tmp then renamed: the drawn images go to DST/parts[1], the others to DST/parts[0] (None:
    left out; "": DST itself). Returns how many were drawn."""
    from loaders.subsets import balanced_draw, folder_entries
    entries = folder_entries(src)
    drawn = {int(i) for i in balanced_draw([lab for _, lab in entries], fraction, seed=0)}
    tmp = dst + ".tmp"
    for i, (rel, _) in enumerate(entries):
        part = parts[i in drawn]
        if part is None:
            continue
        os.makedirs(os.path.join(tmp, part, os.path.dirname(rel)), exist_ok=True)
        os.symlink(os.path.join(os.path.abspath(src), rel), os.path.join(tmp, part, rel))
    os.replace(tmp, dst)
    return len(drawn)


def val_subset(src: str, dst: str) -> None:
    """DST: a class-balanced 10 % draw of SRC (seed 0) as symlinks."""
    link_split(src, dst, 0.1)


def done(run_dir: str) -> dict:
    """The last record of a run's log.jsonl (the "done" record of a finished step), or {}."""
    try:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            return json.loads(f.read().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return {}


def step_seconds(out: str) -> dict[str, float]:
    """Wall seconds per step from OUT/timings.jsonl (a step run twice, e.g. resumed, counts both)."""
    times: dict[str, float] = {}
    path = os.path.join(out, "timings.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for ln in f:
                r = json.loads(ln)
                times[r["step"]] = times.get(r["step"], 0) + r["seconds"]
    return times


def git_state() -> tuple[str, bool | None]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, check=False).stdout)
    except OSError:
        sha, dirty = "unknown", None
    return sha, dirty


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def device_name(device: str) -> str:
    import torch
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def results(out: str, quick: bool, depth: int, pre: str, save: str, device: str = "cpu") -> str:
    """Write OUT/results.{json,md} (and SAVE.{json,md}); returns the markdown table."""
    import torch
    times = step_seconds(out)
    res = {}
    for key, _, _, _ in ROWS:
        for f in FRACTIONS:
            d = done(os.path.join(out, f"{key}_{f}"))
            res[f"{key}_{f}"] = {"top1": d.get("final_top1"), "top5": d.get("final_top5"),
                                 "best_top1": d.get("best_top1"), "steps": d.get("step"),
                                 "seconds": times.get(f"{key}_{f}")}
    pre_done = done(pre)
    sha, dirty = git_state()
    doc = {
        "what": "SimCLRv2 semi-supervised chain on Fashion-MNIST (demo set, 32px), top-1 on the 10k test set",
        "quick": quick, "device": device, "device_name": device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")), "torch": torch.__version__,
        "python": platform.python_version(), "git_sha": sha, "git_dirty": dirty,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "teacher_depth": depth, "pretrain_run": pre,
        "pretrain": {k: pre_done.get(k) for k in ("step", "final_loss", "knn_top1", "knn_top1_random_init")},
        "pretrain_seconds": times.get("pretrain"), "total_seconds": sum(times.values()),
        "results": res,
    }
    doc["targets"] = judge(res, quick)
    lines = ["| method | network | 1 % labels (600) | 10 % labels (6000) |", "|---|---|---|---|"]
    for key, method, net, _ in ROWS:
        lines.append(f"| {method} | {net.format(depth=depth)} | {_fmt(res[f'{key}_1pct']['top1'])} "
                     f"| {_fmt(res[f'{key}_10pct']['top1'])} |")
    mins = doc["total_seconds"] / 60
    scored = "SMOKE RUN: 1000 of the test images, tiny schedules" if quick else "the 10k Fashion-MNIST test images"
    where = (f"GPU ({doc['device_name']})" if device == "cuda" else f"CPU, {doc['threads']} threads")
    lines += ["", (f"Top-1 (%) on {scored}; "
                   f"{where}, torch {doc['torch']}, git {sha[:10]}{' (dirty)' if dirty else ''}; "
                   f"chain wall time {mins:.1f} min (pretrain {((times.get('pretrain') or 0) / 60):.1f} min).")]
    lines += ["", "| target | measured | |", "|---|---|---|"]
    for t in doc["targets"]:
        got = "; ".join(f"{_fmt(r['value'])} vs {_fmt(r['baseline_value'])}" for r in t["pairs"])
        verdict = {True: "met", False: "missed", None: "smoke run: not judged" if quick else "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {got} | {verdict} |")
    md = "\n".join(lines) + "\n"
    for base in [os.path.join(out, "results")] + ([save] if save else []):
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
        with open(base + ".json", "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.write("\n")
        with open(base + ".md", "w") as fh:
            fh.write(md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.semisup_report", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("val-subset", help="a class-balanced 10 %% of SRC as symlinks in DST")
    v.add_argument("src")
    v.add_argument("dst")
    r = sub.add_parser("results", help="OUT/results.{json,md} (and SAVE.{json,md})")
    r.add_argument("out")
    r.add_argument("quick", help="1: a smoke run")
    r.add_argument("depth", type=int, help="ResNet depth of the pretrained / fine-tuned network")
    r.add_argument("pre", help="the pretrain run directory")
    r.add_argument("save", help="also write SAVE.json / SAVE.md (empty: do not)")
    r.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the chain ran")
    args = ap.parse_args(argv)
    if args.cmd == "val-subset":
        val_subset(args.src, args.dst)
        return 0
    md = results(args.out, args.quick == "1", args.depth, args.pre, args.save, args.device)
    print(md)
    print(f"results: {args.out}/results.json" + (f", {args.save}.json" if args.save else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
