"""What a run shows and keeps: the log line, the per-stage and ratio tables on stdout, the PNG charts,
the machine / versions / git metadata, and the JSON file."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

from benchmarks import ROOT
from benchmarks.plan import cpu_count
from benchmarks.rows import err


def log(msg: str) -> None:
    print(f"[throughput] {msg}", file=sys.stderr, flush=True)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v)


def stage_table(name: str, st: dict) -> str:
    head = f"== {name} ({st.get('seconds', 0):.1f} s)"
    if st["status"] != "ok":
        return f"{head}: skipped: {st.get('reason', '')}"
    lines = [head + (f"  [{st['notes']}]" if st.get("notes") else "")]
    extras = ("data_wait", "peak_mem_mib", "ms_per_step", "mb_per_s", "gb_per_s", "compile_seconds", "jit_seconds")
    table = [("name", "images/s", "views/s", "other")]
    for r in st["rows"]:
        if r.get("status") == "skipped":
            table.append((r["name"], "skipped", "", r.get("reason", "")))
            continue
        other = "  ".join(f"{k}={_fmt(r[k])}" for k in extras if r.get(k) is not None)
        table.append((r["name"], _fmt(r.get("images_per_s")), _fmt(r.get("views_per_s")), other))
    w = [max(len(t[i]) for t in table) for i in range(3)]
    for t in table:
        lines.append(f"  {t[0]:<{w[0]}}  {t[1]:>{w[1]}}  {t[2]:>{w[2]}}  {t[3]}".rstrip())
    return "\n".join(lines)


def ratio_table(ratios: dict) -> str:
    lines = ["== headline ratios (measured side by side in this run)"]
    w = max((len(k) for k in ratios), default=10)
    for k, r in ratios.items():
        if r["value"] is None:
            lines.append(f"  {k:<{w}}  -        target {r['direction']} {r['target']}  ({r.get('reason')})")
        elif r["target"] is None:  # measured and reported, no goal
            lines.append(f"  {k:<{w}}  {r['value']:<7.3g}  (measured, no target; {r.get('unit', '')})")
        else:
            mark = "met" if r["met"] else "NOT met"
            lines.append(f"  {k:<{w}}  {r['value']:<7.3g}  target {r['direction']} {r['target']:<5}  {mark}"
                         f"  ({r.get('unit', '')})")
    return "\n".join(lines)


def charts(stages: dict, json_path: str) -> dict:
    """One horizontal bar chart per stage next to the JSON; {stage: png path} or {"_skipped": why}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return {"_skipped": f"matplotlib not available ({err(e)}): no charts"}
    out = {}
    stem = json_path.removesuffix(".json")
    for name, st in stages.items():
        rows = [r for r in st.get("rows", []) if r.get("status", "ok") == "ok"]
        key = "images_per_s" if any(r.get("images_per_s") for r in rows) else "steps_per_s"
        rows = [r for r in rows if r.get(key)]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
        labels = [r["name"] for r in rows]
        vals = [r[key] for r in rows]
        colors = ["tab:blue" if r.get("impl", "fastclr").startswith("fastclr") else "tab:gray" for r in rows]
        ax.barh(range(len(rows)), vals, color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(key.replace("_per_s", "/s"))
        ax.set_title(f"{name} ({os.path.basename(stem)})", fontsize=9)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:,.3g}", va="center", fontsize=7)
        fig.tight_layout()
        path = f"{stem}-{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out[name] = path
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    def v(*names):
        for n in names:
            try:
                return md.version(n)
            except md.PackageNotFoundError:
                continue
        return None
    dali = next((f"{d.metadata['Name']}=={d.version}" for d in md.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")), None)
    return {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
            "torchvision": v("torchvision"), "numpy": np.__version__, "dali": dali, "ffcv": v("ffcv"),
            "lightly": v("lightly"), "pillow": v("pillow", "Pillow"),
            "opencv": v("opencv-python-headless", "opencv-python"), "numba": v("numba"),
            "fastclr": v("fastclr")}


def git_info() -> tuple[str | None, bool]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10, check=False).stdout.strip())
        return sha, dirty
    except Exception:
        return None, False


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else cpu_model()


def default_out(device: str, sha: str | None, temporary: bool = False) -> str:
    """benchmarks/results/<date>-<device>-<sha>.json; with ``temporary`` (smoke runs, whose numbers are
    not meant to be committed), the same name in a new fastclr-bench-* folder of the system temp dir."""
    slug = "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")
    slug = "-".join(filter(None, slug.split("-")))[:40]
    folder = tempfile.mkdtemp(prefix="fastclr-bench-") if temporary else os.path.join(ROOT, "benchmarks", "results")
    return os.path.join(folder, f"{time.strftime('%Y%m%d-%H%M%S')}-{device}-{slug}-{(sha or 'nogit')[:8]}.json")


def run_meta(args, plan, data, sha: str | None, dirty: bool, complete: bool) -> dict:
    """The JSON's ``meta`` block (``charts`` and ``seconds`` are filled in by the caller)."""
    return {
        "device": device_name(args.device), "device_type": args.device, "cpu_model": cpu_model(),
        "cpu_count": cpu_count(), "gpu_count": torch.cuda.device_count() if args.device == "cuda" else 0,
        "versions": versions(), "git_sha": sha, "git_dirty": dirty, "tf32": args.device == "cuda",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "platform": platform.platform(),
        "args": {k: (v if not isinstance(v, tuple) else list(v)) for k, v in vars(args).items()},
        "config": asdict(plan),
        "data": {"folder": data.folder, "beton": data.beton, "generated": data.generated,
                 "images": len(data.samples), "jpeg_quality": 90 if data.generated else None,
                 "beton_max_resolution": "original" if data.generated else None},
        "complete": complete, "seconds": None,
    }


def write_json(path: str, result: dict) -> None:
    """Write ``result`` to ``path`` through a temporary file, so that a reader never sees half of it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
