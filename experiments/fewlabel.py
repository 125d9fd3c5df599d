"""Few-label fine-tuning against the linear probe, on more than one data set (docs/semisup.md,
"Few-label fine-tuning on two data sets").

    python -m experiments.fewlabel split SRC DST [--fraction 0.2]
        DST/pool and DST/heldout: a seeded class-balanced split of the ImageFolder SRC, as symlinks
        (the validation split recipes are chosen on; the real val set stays untouched)
    python -m experiments.fewlabel grid --data DIR --val DIR --pretrain RUN --out OUT --variants A,B
        for every label fraction (1 %, 10 %) and subset seed: the linear probe and each fine-tuning
        variant (VARIANTS below), one run directory each under OUT (a finished run is skipped, so the
        grid can be extended); prints the table and writes OUT/table.json

Every run is the real entry point (finetune.py / linear_eval.py) in its own process with the demo
presets, plus the variant's options; the number kept is each run's final top-1 (no best-epoch picking).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from loaders.subsets import folder_entries

ROOT = Path(__file__).resolve().parent.parent


def recipe(probe_steps: int, min_steps: int, frozen_bn: bool, base_lr: float, crop: str, flip: bool = True) -> dict:
    """Every option a variant's recipe sets, so a variant means the same whatever the presets become."""
    return {"probe_steps": probe_steps, "min_steps": min_steps, "frozen_bn": str(frozen_bn).lower(),
            "optim.base_lr": base_lr, "data.crop_scale": crop, "data.flip": str(flip).lower()}


# Fine-tuning variants: options added to `finetune.py demo_{1pct,10pct}` ("preset": the presets as they
# are). Batch sizes larger than a tiny labelled subset are lowered to it (per run, printed). The names:
# lpft = probe_steps 500, fbn = frozen BN, lrX = base lr 0.X, crop60 = crop area 0.6-1, _60 = no
# min_steps (60 steps at 1 % of digits), nf = no flip.
VARIANTS: dict[str, dict] = {
    "preset": {},
    "nf_preset": {"data.flip": "false"},
    "old_recipe": recipe(0, 0, False, 0.05, "0.35,1.0"),                 # demo_1pct/10pct before LP-FT
    "nf_old_recipe": recipe(0, 0, False, 0.05, "0.35,1.0", flip=False),
    "lpft_fbn": recipe(500, 400, True, 0.05, "0.35,1.0"),
    "lpft_fbn_crop60": recipe(500, 0, True, 0.05, "0.6,1.0"),
    "lpft_fbn_lr005_crop60": recipe(500, 400, True, 0.005, "0.6,1.0"),
    "lpft_fbn_lr005_crop60_60": recipe(500, 0, True, 0.005, "0.6,1.0"),
    "lpft_lr005_crop60": recipe(500, 400, False, 0.005, "0.6,1.0"),
    "lpft_fbn_lr015_crop60": recipe(500, 400, True, 0.015, "0.6,1.0"),    # the presets now
    "nf_lpft_fbn_lr005_crop60": recipe(500, 400, True, 0.005, "0.6,1.0", flip=False),
    "nf_lpft_lr005_crop60": recipe(500, 400, False, 0.005, "0.6,1.0", flip=False),
    "nf_lpft_fbn_lr015_crop60": recipe(500, 400, True, 0.015, "0.6,1.0", flip=False),
}
FRACTIONS = {"1pct": 0.01, "10pct": 0.1}


def split(src: str, dst: str, fraction: float) -> None:
    from experiments.semisup_report import link_split
    held = link_split(src, dst, fraction, parts=("pool", "heldout"))
    print(f"{dst}: {len(folder_entries(src)) - held} pool + {held} held-out images")


def n_labelled(data: str, fraction: float) -> int:
    from loaders.subsets import balanced_draw
    return len(balanced_draw([lab for _, lab in folder_entries(data)], fraction, seed=0))


def done_record(run_dir: Path) -> dict | None:
    from experiments.semisup_report import done
    rec = done(str(run_dir))
    return rec if rec.get("event") == "done" else None


def run_one(script: str, preset: str, args: list[str], out: Path, threads: int) -> dict:
    rec = done_record(out)
    if rec is None:
        cmd = [sys.executable, str(ROOT / "fastclr" / script), preset, *args, f"--run.out_dir={out}",
               "--run.progress=false", "--run.resume=auto"]
        t0 = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        rec = done_record(out)
        rec["wall_s"] = round(time.time() - t0, 1)
        (out / "wall.json").write_text(json.dumps({"wall_s": rec["wall_s"]}))
    elif (out / "wall.json").is_file():
        rec["wall_s"] = json.loads((out / "wall.json").read_text())["wall_s"]
    return rec


def variant_args(spec: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in spec.items()]


def grid(data: str, val: str, pretrain: str, out: str, variants: list[str], seeds: list[int],
         fractions: list[str], threads: int, probe: bool) -> dict:
    outp = Path(out)
    table: dict = {"data": data, "val": val, "pretrain": pretrain, "seeds": seeds, "rows": {}}
    common = [f"--data.path={data}", f"--run.val_path={val}"]
    for frac in fractions:
        n = n_labelled(data, FRACTIONS[frac])
        batch_ft = {"1pct": 64, "10pct": 128}[frac]
        batch_le = {"1pct": 64, "10pct": 256}[frac]
        rows = [("linear", "linear_eval.py", [f"--ckpt={pretrain}"], batch_le)] if probe else []
        rows += [(v, "finetune.py", [f"--ckpt={pretrain}", *variant_args(VARIANTS[v])], batch_ft)
                 for v in variants]
        for name, script, extra, batch in rows:
            accs, walls = [], []
            for s in seeds:
                b = min(batch, n)
                bx = [f"--optim.global_batch_size={b}"] if b != batch else []
                rec = run_one(script, f"demo_{frac}", [*common, *extra, *bx, f"--subset.seed={s}",
                                                       f"--run.seed={s}"],
                              outp / f"{name}_{frac}_s{s}", threads)
                accs.append(rec["final_top1"])
                walls.append(rec.get("wall_s"))
                print(f"{name:>24} {frac:>5} seed {s}: {rec['final_top1']:.2f}  ({rec.get('wall_s')} s)", flush=True)
            mean = sum(accs) / len(accs)
            table["rows"].setdefault(name, {})[frac] = {"top1": accs, "mean": round(mean, 2), "labelled": n,
                                                        "wall_s": walls}
            (outp / "table.json").write_text(json.dumps(table, indent=1))
    print("\n| variant | " + " | ".join(fractions) + " |")
    for name, r in table["rows"].items():
        print(f"| {name} | " + " | ".join(
            f"{r[f]['mean']:.2f} ({', '.join(f'{a:.1f}' for a in r[f]['top1'])})" if f in r else "" for f in fractions)
            + " |")
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.fewlabel", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="a class-balanced pool / held-out split of SRC as symlinks in DST")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--fraction", type=float, default=0.2, help="held-out share per class (default 0.2)")
    g = sub.add_parser("grid", help="linear probe and fine-tuning variants at 1 %% and 10 %% of the labels")
    g.add_argument("--data", required=True, help="train ImageFolder (the labelled subsets are drawn from it)")
    g.add_argument("--val", required=True, help="ImageFolder scored at the end")
    g.add_argument("--pretrain", required=True, help="pretrain.py run directory or checkpoint")
    g.add_argument("--out", required=True)
    g.add_argument("--variants", default="preset", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    g.add_argument("--seeds", default="0,1,2")
    g.add_argument("--fractions", default="1pct,10pct")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--no-probe", action="store_true", help="skip the linear probe rows")
    a = ap.parse_args(argv)
    if a.cmd == "split":
        split(a.src, a.dst, a.fraction)
        return 0
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    grid(a.data, a.val, a.pretrain, a.out, variants, [int(x) for x in a.seeds.split(",")],
         a.fractions.split(","), a.threads, not a.no_probe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
