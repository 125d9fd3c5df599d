"""Training curves of one or more runs, from their log.jsonl, on one figure.

    python -m fastclr.plot runs/demo                          # -> runs/demo/curves.png
    python -m fastclr.plot runs/a runs/b --out compare.png    # one colour per run

Panels against the step: loss, accuracy (pretraining's contrastive accuracy, or train_acc of
finetune / distill / linear_eval), learning rate, images/s, data-wait share, and the val top-1 of the
``eval`` records (finetune, distill, linear_eval). A panel no run logs says so; a run that lacks a
metric is simply absent from that panel.

The log may belong to a run that is still going or was killed: an unreadable line (the last one,
cut mid-write) is skipped, and a run resumed after a kill, whose steps repeat, keeps the last
record of each step. Reads nothing but the logs; imports neither torch nor the data backends.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PROG = "python -m fastclr.plot"
EXIT_BAD_INPUT = 2  # loaders.errors': bad input, fix it and rerun
LOG_NAME = "log.jsonl"
# The figure's size in pixels is FIGSIZE * DPI: 1500 x 850.
FIGSIZE, DPI = (15.0, 8.5), 100

# (title, y label, [(record kind, key)] the first one a run logs wins, y scale, y axis from 0)
PANELS = [
    ("loss", "loss", [("train", "loss")], 1.0, False),
    ("accuracy", "% of the batch", [("train", "contrastive_acc"), ("train", "train_acc")], 100.0, False),
    ("learning rate", "lr", [("train", "lr")], 1.0, True),
    ("throughput", "images/s", [("train", "images_per_s")], 1.0, True),
    ("data wait", "% of the step time blocked on the loader", [("train", "data_wait")], 100.0, True),
    ("val top-1 (eval records)", "top-1 %", [("eval", "top1")], 1.0, False),
]


class PlotError(Exception):
    """Bad input: printed as one line, exit 2."""


def read_log(path: str | os.PathLike) -> tuple[dict[str, list[dict]], int]:
    """({"train": records, "eval": records}, unreadable lines) of a log.jsonl.

    ``train``: the records without an ``event`` (one every run.log_every steps), ``eval``: the
    ``event: "eval"`` ones; each sorted by step, one per step, the last written winning (a run resumed
    from a checkpoint logs the steps after it again). Unreadable lines (a run killed mid-write) are
    counted and skipped; a record glued to such a fragment (written by a version that did not start
    a resumed run on a fresh line) is recovered."""
    kinds: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = _parse(line)
            if rec is None:
                bad += 1
                continue
            kind = rec.get("event", "train")
            if kind in kinds and isinstance(rec.get("step"), int):
                kinds[kind][rec["step"]] = rec
    return {k: [v[s] for s in sorted(v)] for k, v in kinds.items()}, bad


def _parse(line: str) -> dict | None:
    start = 0
    while start >= 0:
        try:
            rec = json.loads(line[start:])
            return rec if isinstance(rec, dict) else None
        except ValueError:
            start = line.find("{", start + 1)
    return None


def series(records: dict[str, list[dict]], sources) -> tuple[str, list[int], list[float]] | None:
    """(key, steps, values) of the first source the run logs, or None."""
    for kind, key in sources:
        pts = [(r["step"], r[key]) for r in records[kind]
               if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if pts:
            return key, [s for s, _ in pts], [v for _, v in pts]
    return None


def find_log(run: str) -> Path:
    p = Path(run)
    log = p if p.is_file() else p / LOG_NAME
    if not log.is_file():
        why = "no such folder" if not p.exists() else f"no {LOG_NAME} in it (not a run directory?)"
        raise PlotError(f"{run}: {why}")
    return log


def labels(runs: list[str]) -> list[str]:
    """Legend names: each run folder's name, or the path as given where two names would collide."""
    names = [Path(r).resolve().name if Path(r).is_dir() else Path(r).resolve().parent.name for r in runs]
    return [n if names.count(n) == 1 else r.rstrip("/") for n, r in zip(names, runs)]


def plot(runs: list[str], out: str | os.PathLike, title: str | None = None) -> list[str]:
    """Draw ``runs`` (run folders or log.jsonl files) into ``out`` (PNG). Returns notes for the user
    (skipped lines, empty runs). Raises PlotError on bad input."""
    logs = [find_log(r) for r in runs]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install 'fastclr[plot]'") from None
    notes, data = [], []
    for run, name, log in zip(runs, labels(runs), logs):
        recs, bad = read_log(log)
        if bad:
            notes.append(f"{log}: skipped {bad} unreadable line(s) (a run killed or still writing)")
        if not recs["train"] and not recs["eval"]:
            notes.append(f"{log}: no training or eval records yet")
        data.append((name, recs))
    if not any(r["train"] or r["eval"] for _, r in data):
        raise PlotError("nothing to plot: no training or eval records in " + ", ".join(map(str, logs)))

    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, ylabel, sources, scale, from_zero) in zip(axes.flat, PANELS):
        keys = set()
        for i, (name, recs) in enumerate(data):
            s = series(recs, sources)
            if s is None:
                continue  # this run does not log it
            key, steps, values = s
            keys.add(key)
            few = len(steps) < 25
            ax.plot(steps, [v * scale for v in values], color=colours[i % len(colours)], label=name,
                    marker="o" if few else None, markersize=3, linewidth=1.3)
        # Which accuracy: contrastive (pretraining) or train_acc (the classifiers), or both when compared.
        ax.set_title(f"{panel} ({' / '.join(sorted(keys))})" if len(sources) > 1 and keys else panel, fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if from_zero and ax.lines:
            ax.set_ylim(bottom=0)
        if not ax.lines:
            wanted = " / ".join(k for _, k in sources)
            ax.text(0.5, 0.5, f"no run logs {wanted}", ha="center", va="center", transform=ax.transAxes,
                    color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [plt.Line2D([], [], color=colours[i % len(colours)], linewidth=2) for i in range(len(data))]
    names = [n if r["train"] or r["eval"] else f"{n} (nothing logged yet)" for n, r in data]
    fig.legend(handles, names, loc="upper center", ncol=min(len(data), 6), frameon=False,
               fontsize=10, bbox_to_anchor=(0.5, 0.995))
    if title:
        fig.suptitle(title, y=0.955, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if title else 0.96))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return notes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[1:4]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Live: rerun it while the run goes (it reads what is written so far). TensorBoard shows the same "
               "numbers when the run was started with --run.tensorboard=true: tensorboard --logdir runs. "
               "Exit status: 0 written, 2 bad input (no log.jsonl, nothing logged yet).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="a run folder (its run.out_dir, holding log.jsonl) or a log.jsonl file; several to compare")
    p.add_argument("--out", default=None,
                   help="PNG to write (default: RUN_DIR/curves.png for one run, curves.png here for several)")
    p.add_argument("--title", default=None, help="a title above the panels (default: none)")
    return p


def check_out(out) -> None:
    """PlotError unless matplotlib can write ``out``'s format (known from its suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    formats = FigureCanvasAgg.get_supported_filetypes()
    suffix = Path(out).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise PlotError(f"--out {out}: {'no' if not suffix else 'unknown'} image format"
                        f"{'' if not suffix else ' .' + suffix}; use .png, .svg or .pdf (or {', '.join(sorted(formats))})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out
    if out is None:
        one = Path(args.runs[0])
        out = (one if one.is_dir() else one.parent) / "curves.png" if len(args.runs) == 1 else "curves.png"
    try:
        check_out(out)
        notes = plot(args.runs, out, args.title)
    except PlotError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for n in notes:
        print(f"{PROG}: note: {n}", file=sys.stderr)
    print(f"wrote {out} ({len(args.runs)} run{'s' if len(args.runs) > 1 else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
