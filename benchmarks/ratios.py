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
    met = value is not None and (value >= target if direction == ">=" else value <= target)
    out = {"value": None if value is None else round(value, 3), "target": target, "direction": direction,
           "met": bool(met), "baseline": baseline, "ours": ours}
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
    for key, impl, target in (("augment_vs_torchvision", "torchvision", 6.0), ("augment_vs_lightly", "lightly", 3.0)):
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
    # The data path behind the model: the best end-to-end rate over the synthetic-data step rate (same
    # network, batch and dtype, this run). 1.0 = loading and augmenting cost the step nothing.
    step = next(iter(_ok_rows(stages, "step", impl="fastclr")), None)
    e2e = _ok_rows(stages, "e2e", impl="fastclr")
    if step and e2e:
        best = max(e2e, key=lambda r: r["images_per_s"])
        ratios["e2e_vs_synthetic_step"] = _ratio(
            best["images_per_s"] / step["images_per_s"], 0.95,
            {"name": step["name"], "images_per_s": step["images_per_s"]},
            {"name": best["name"], "images_per_s": best["images_per_s"]}, unit="x images/s (real / synthetic data)")
    else:
        ratios["e2e_vs_synthetic_step"] = _ratio(None, 0.95, "step", "e2e", reason="step or e2e stage not run")
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
