"""The headline ratios: each claim computed from two rows of the same run (``ratios`` in the JSON:
value, target, direction, met, and the two rows as baseline / ours). Also used by merge_results.py,
which recomputes them from merged stages."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.plan import Plan


def _ok_rows(stages, stage, **match):
    rows = stages.get(stage, {}).get("rows", [])
    return [r for r in rows if r.get("status", "ok") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _ratio(value, target, baseline, ours, direction=">=", reason=None, **extra):
    """``target`` None: a measured ratio that is reported, not a goal (met is then None)."""
    if target is None:
        met = None
    else:
        met = value is not None and (value >= target if direction == ">=" else value <= target)
    out = {"value": None if value is None else round(value, 3), "target": target, "direction": direction,
           "met": None if met is None else bool(met), "baseline": baseline, "ours": ours}
    if value is None:
        out["reason"] = reason or "not measured"
    out.update(extra)
    return out


def compute_ratios(stages: dict, plan: Plan, device_type: str = "cpu") -> dict:
    ratios = {}
    # Augment: fastclr's torch backend reads the same JPEG files as the peers (fairest); another backend
    # stands in only when the torch one did not run.
    aug = [r for r in _ok_rows(stages, "augment", impl="fastclr")]
    ours = next((r for r in aug if r.get("backend") == "torch"), None) or max(aug, key=lambda r: r["images_per_s"],
                                                                               default=None)
    # Goals: on 2 CPU cores the colour ops are most of the work (no spare device), on a GPU they move there.
    targets = {"torchvision": 6.0, "lightly": 3.0} if device_type == "cuda" else {"torchvision": 4.5, "lightly": 2.5}
    for key, impl in (("augment_vs_torchvision", "torchvision"), ("augment_vs_lightly", "lightly")):
        target = targets[impl]
        base = next(iter(_ok_rows(stages, "augment", impl=impl)), None)
        if ours and base:
            ratios[key] = _ratio(ours["images_per_s"] / base["images_per_s"], target,
                                 {"name": base["name"], "images_per_s": base["images_per_s"]},
                                 {"name": ours["name"], "images_per_s": ours["images_per_s"]}, unit="x images/s")
        else:
            why = "augment stage not run" if "augment" not in stages else \
                f"missing row: {'fastclr' if not ours else impl}"
            ratios[key] = _ratio(None, target, impl, "fastclr", reason=why)
    # LARS: fused step vs the per-parameter loop, same parameters.
    fused = next(iter(_ok_rows(stages, "optim", impl="fastclr")), None)
    loop = next(iter(_ok_rows(stages, "optim", impl="loop")), None)
    if fused and loop:
        ratios["lars_fused_vs_loop"] = _ratio(loop["seconds_per_step"] / fused["seconds_per_step"], 5.0,
                                              {"name": loop["name"], "ms_per_step": loop["ms_per_step"]},
                                              {"name": fused["name"], "ms_per_step": fused["ms_per_step"]},
                                              unit="x steps/s", arch=fused.get("arch"))
    else:
        ratios["lars_fused_vs_loop"] = _ratio(None, 5.0, "loop", "fastclr", reason="optim stage not run or failed")
    lt = next(iter(_ok_rows(stages, "optim", impl="lightly")), None)
    if fused and lt:
        ratios["lars_fused_vs_lightly"] = _ratio(lt["seconds_per_step"] / fused["seconds_per_step"], 1.0,
                                                 {"name": lt["name"], "ms_per_step": lt["ms_per_step"]},
                                                 {"name": fused["name"], "ms_per_step": fused["ms_per_step"]},
                                                 unit="x steps/s", arch=fused.get("arch"))
    # NT-Xent fwd+bwd vs lightly at the headline batch (or the largest measured one below it).
    Bs = [b for b in plan.loss_batches if b <= plan.loss_ratio_batch] or plan.loss_batches
    B = max(Bs)
    dense = next(iter(_ok_rows(stages, "loss", impl="fastclr-dense", batch=B)), None)
    light = next(iter(_ok_rows(stages, "loss", impl="lightly", batch=B)), None)
    if dense and light:
        ratios["ntxent_vs_lightly"] = _ratio(light["seconds"] / dense["seconds"], 2.0,
                                             {"name": light["name"], "seconds": light["seconds"]},
                                             {"name": dense["name"], "seconds": dense["seconds"]},
                                             unit="x fwd+bwd speed", batch=B)
    else:
        ratios["ntxent_vs_lightly"] = _ratio(None, 2.0, "lightly", "fastclr-dense", batch=B,
                                             reason="loss stage not run, or lightly missing")
    # Chunked loss: memory per image must not grow with B (total memory linear, not quadratic).
    ch = sorted(_ok_rows(stages, "loss", impl="fastclr-chunked"), key=lambda r: r["batch"])
    # Compare only batches where chunking is active (B >= the chunk): below it one chunk holds the whole
    # similarity matrix, and the per-image cost is that of the dense loss (the GPU plan's B=256 < 1024).
    dn = sorted(_ok_rows(stages, "loss", impl="fastclr-dense"), key=lambda r: r["batch"])
    active = [r for r in ch if r["batch"] >= plan.loss_chunk]
    if len(active) >= 2:
        ch = active
        dn = [r for r in dn if r["batch"] >= plan.loss_chunk]  # the same batches for the dense reference
    if len(ch) >= 2 and ch[0]["peak_mem_bytes"]:
        growth = ch[-1]["peak_mem_per_image"] / ch[0]["peak_mem_per_image"]
        dense_growth = (dn[-1]["peak_mem_per_image"] / dn[0]["peak_mem_per_image"]
                        if len(dn) >= 2 and dn[0]["peak_mem_bytes"] else None)
        ratios["loss_chunked_memory_flat"] = _ratio(
            growth, 1.25, {"name": "dense", "per_image_growth": dense_growth and round(dense_growth, 3)},
            {"name": "chunked", "per_image_growth": round(growth, 3)}, direction="<=",
            unit=f"peak memory per image at B={ch[-1]['batch']} / at B={ch[0]['batch']}",
            batches=[r["batch"] for r in ch], peak_mib=[round(r["peak_mem_mib"], 2) for r in ch])
    else:
        ratios["loss_chunked_memory_flat"] = _ratio(None, 1.25, "dense", "chunked", direction="<=",
                                                    reason="loss stage not run, or fewer than two batch sizes")
    # The data path behind the model: end-to-end rates over the synthetic-data step rate (same network,
    # step variant, batch and dtype, this run). 1.0 = loading and augmenting cost the step nothing. The
    # best backend, and the worst of every backend's default row (each must keep up).
    main_dtype = plan.dtypes[0] if plan is not None and plan.dtypes else None
    e2e = [r for r in _ok_rows(stages, "e2e", impl="fastclr") if main_dtype in (None, r.get("dtype"))]
    step = None
    if e2e:
        step = next(iter(_ok_rows(stages, "step", impl="fastclr", variant=e2e[0].get("variant"),
                                  batch=e2e[0].get("batch"), dtype=e2e[0].get("dtype"))), None)
    step = step or next(iter(_ok_rows(stages, "step", impl="fastclr")), None)
    defaults = [r for r in e2e if r["name"] == f"fastclr {r.get('backend')}"]
    for key, pick in (("e2e_vs_synthetic_step", max), ("e2e_vs_synthetic_step_every_backend", min)):
        rows = e2e if pick is max else defaults
        if step and rows:
            r = pick(rows, key=lambda r: r["images_per_s"])
            ratios[key] = _ratio(r["images_per_s"] / step["images_per_s"], 0.97,
                                 {"name": step["name"], "images_per_s": step["images_per_s"]},
                                 {"name": r["name"], "images_per_s": r["images_per_s"]},
                                 unit="x images/s (real / synthetic data)",
                                 **({"per_backend": {x["backend"]: round(x["images_per_s"] / step["images_per_s"], 3)
                                                     for x in defaults}} if pick is min else {}))
        else:
            ratios[key] = _ratio(None, 0.97, "step", "e2e", reason="step or e2e stage not run")
    # bf16 over fp32 on the CPU (same variant, batch and view side; the e2e pair on the same backend):
    # what run.precision=auto's CPU rule rests on. Reported, with no target: the rule follows the numbers.
    if device_type != "cuda":
        steps = _ok_rows(stages, "step", impl="fastclr")
        for size in sorted({r.get("size") for r in steps if r.get("dtype") == "bf16"}, reverse=True):
            f, h = (next((r for r in steps if r.get("size") == size and r.get("dtype") == d), None)
                    for d in ("fp32", "bf16"))
            if f and h and f.get("variant") == h.get("variant") and f.get("batch") == h.get("batch"):
                ratios[f"cpu_bf16_vs_fp32_step_{size}px"] = _ratio(
                    h["images_per_s"] / f["images_per_s"], None, {"name": f["name"], "images_per_s": f["images_per_s"]},
                    {"name": h["name"], "images_per_s": h["images_per_s"]}, unit="x images/s", size=size)
        rows = _ok_rows(stages, "e2e", impl="fastclr")
        h = next((r for r in rows if r.get("dtype") == "bf16"), None)
        f = h and next((r for r in rows if r.get("dtype") == "fp32" and r.get("backend") == h.get("backend")), None)
        if f and h:
            ratios["cpu_bf16_vs_fp32_e2e"] = _ratio(
                h["images_per_s"] / f["images_per_s"], None, {"name": f["name"], "images_per_s": f["images_per_s"]},
                {"name": h["name"], "images_per_s": h["images_per_s"]}, unit="x images/s")
    # The step itself: the fastest variant's views/s, an absolute goal for one H200 (GPU runs only).
    steps = _ok_rows(stages, "step", impl="fastclr")
    if device_type != "cuda":
        ratios["step_views_per_s"] = _ratio(None, 5500.0, None, "fastclr", reason="a goal for one H200: GPU runs only")
    elif steps:
        best = max(steps, key=lambda r: r["views_per_s"])
        ratios["step_views_per_s"] = _ratio(best["views_per_s"], 5500.0, None,
                                            {"name": best["name"], "views_per_s": best["views_per_s"]},
                                            unit="views/s (absolute)", variant=best.get("variant"))
    else:
        ratios["step_views_per_s"] = _ratio(None, 5500.0, None, "fastclr", reason="step stage not run")
    # LARS against the SGD-foreach floor (no trust ratios): the fastest LARS form, <= 1.3x the floor.
    floor = next(iter(_ok_rows(stages, "optim", impl="sgd-foreach")), None)
    lars = [r for r in _ok_rows(stages, "optim") if str(r.get("impl", "")).startswith("fastclr")]
    if floor and lars:
        best = min(lars, key=lambda r: r["seconds_per_step"])
        ratios["lars_vs_sgd_floor"] = _ratio(best["seconds_per_step"] / floor["seconds_per_step"], 1.3,
                                             {"name": floor["name"], "ms_per_step": floor["ms_per_step"]},
                                             {"name": best["name"], "ms_per_step": best["ms_per_step"]},
                                             direction="<=", unit="x the floor's time per step")
    else:
        ratios["lars_vs_sgd_floor"] = _ratio(None, 1.3, "sgd-foreach", "fastclr", direction="<=",
                                             reason="optim stage not run or failed")
    # The colour recipe alone on a GPU: the fused graphs, ms per 512 views at 224 px.
    fused = next(iter(_ok_rows(stages, "photometry", mode="fused")), None)
    if device_type != "cuda":
        ratios["photometry_fused_ms_per_512_views"] = _ratio(None, 2.0, None, "fastclr", direction="<=",
                                                             reason="a goal for one H100/H200: GPU runs only")
    elif fused:
        ratios["photometry_fused_ms_per_512_views"] = _ratio(
            fused["ms_per_512_views"], 2.0, None, {"name": fused["name"], "ms_per_512_views": fused["ms_per_512_views"]},
            direction="<=", unit="ms per 512 views (absolute)", size=fused.get("size"))
    else:
        ratios["photometry_fused_ms_per_512_views"] = _ratio(None, 2.0, None, "fastclr", direction="<=",
                                                             reason="photometry stage not run")
    # The loader alone, two views at 224 px: an absolute goal for one H100, so GPU runs only.
    target = 10000.0
    if device_type != "cuda":
        ratios["loader_two_view_images_per_s"] = _ratio(None, target, None, "fastclr",
                                                        reason="a goal for one H100: GPU runs only")
    elif aug:
        best = max(aug, key=lambda r: r["images_per_s"])
        ratios["loader_two_view_images_per_s"] = _ratio(best["images_per_s"], target, None,
                                                        {"name": best["name"], "images_per_s": best["images_per_s"]},
                                                        unit="images/s (absolute)", size=plan.size)
    else:
        ratios["loader_two_view_images_per_s"] = _ratio(None, target, None, "fastclr", reason="augment stage not run")
    return ratios
