"""python -m fastclr.zoo: the released SimCLR models (google-research/simclr) in fastclr.

    python -m fastclr.zoo list                                   # every release, its figures and paths
    python -m fastclr.zoo convert r152_3x_sk1/ r152_3x_sk1_ft1.pt  # a downloaded TF1 release folder
    python -m fastclr.zoo eval r152_3x_sk1_ft1.pt --data.path=/data/imagenet/val
    python -m fastclr.zoo predict r152_3x_sk1_ft1.pt dog.jpg cat.jpg

A converted file goes straight into finetune.py (--ckpt), linear_eval.py (--ckpt), distill.py
(--teacher for a release with a classifier, --student_ckpt) and fastclr.export. docs/zoo.md has the
downloads and the paper's steps 2 and 3 from a released model.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch

from fastclr.runtime import EXIT_BAD_INPUT, UserError, one_line
from fastclr.zoo import catalog

PROG = "python -m fastclr.zoo"


# ----------------------------------------------------------------------------- list
def _our_params(r: catalog.Release) -> float:
    from fastclr.models import build_backbone
    bb = build_backbone(r.depth, r.width, r.sk_ratio, device="meta")
    return sum(p.numel() for p in bb.parameters()) / 1e6


def rows(names: Optional[List[str]] = None) -> List[dict]:
    """One dict per release: the table's facts, fastclr's parameter count, the paths of every kind."""
    rels = [catalog.find(n) for n in names] if names else list(catalog.RELEASES.values())
    return [{"name": r.name, "family": r.family, "depth": r.depth, "width": r.width, "sk": r.sk,
             "params_m": r.params_m, "fastclr_params_m": round(_our_params(r), 2), "top1": dict(r.top1),
             "paths": {k: f"{catalog.GCS}/{r.path(k)}" for k in r.kinds}} for r in rels]


COLUMNS = ("ft_1pct", "ft_10pct", "ft_100pct", "linear_eval", "supervised")


def markdown(table: List[dict]) -> str:
    """The release table as docs/zoo.md shows it."""
    head = ("| name | family | depth | width | SK | params (M), release table | params (M), fastclr | "
            "fine-tuned 1 % | 10 % | 100 % | linear eval | supervised |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for t in table:
        top = " | ".join(str(t["top1"].get(c, "-")) for c in COLUMNS)
        lines.append(f"| {t['name']} | {t['family']} | {t['depth']} | {t['width']}x | {'yes' if t['sk'] else 'no'} | "
                     f"{t['params_m']} | {t['fastclr_params_m']:.1f} | {top} |")
    return "\n".join(lines)


def cmd_list(args) -> int:
    try:
        table = rows(args.names)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    if args.markdown:
        print(markdown(table))
        return 0
    cols = COLUMNS
    print(f"{'name':<13} {'fam':<3} {'depth':>5} {'width':>5} {'SK':>3} {'params M':>9} {'fastclr M':>9}  "
          + " ".join(f"{c:>11}" for c in cols))
    for t in table:
        top = " ".join(f"{t['top1'].get(c, '-'):>11}" for c in cols)
        print(f"{t['name']:<13} {t['family']:<3} {t['depth']:>5} {t['width']:>4}x {'yes' if t['sk'] else 'no':>3} "
              f"{t['params_m']:>9} {t['fastclr_params_m']:>9.1f}  {top}")
    print("\nImageNet top-1 (%) from the official README; params M: the release table's backbone count, "
          "fastclr M: fastclr's backbone of that architecture.")
    if args.names:
        for t in table:
            print(f"\n{t['name']}:")
            for kind, path in t["paths"].items():
                print(f"  {kind:<17} {path}/   ({catalog.KIND_TEXT[kind]})")
    else:
        print(f"Paths: {catalog.GCS}/simclrv2/<kind>/<name>/ for kind in {', '.join(catalog.KINDS_V2)} "
              f"(and {', '.join(catalog.KINDS_DISTILL)}); SimCLRv1: {catalog.GCS}/simclrv1/<kind>/<1x|2x|4x>/ for "
              f"kind in {', '.join(catalog.KINDS_V1)}. `list NAME` prints one model's paths; docs/zoo.md has "
              f"the download commands.")
    return 0


# ----------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    from fastclr import checkpoint as ckpt
    from fastclr.zoo.convert import check_out, convert_release, imagenet_class_names
    check_out(args.out, args.force)
    state, lines = convert_release(args.src, args.weights, args.classifier_input, imagenet_class_names())
    for line in lines:
        print(f"{PROG} convert: {line}")
    try:
        ckpt.save(args.out, state)
    except ckpt.CheckpointWriteError as e:
        raise UserError(str(e)) from None
    use = (f"finetune.py --ckpt={args.out}, linear_eval.py --ckpt={args.out}"
           + (f", distill.py --teacher={args.out}, {PROG} eval {args.out} --data.path=VAL_DIR" if "arch" in state
              else ""))
    print(f"{PROG} convert: wrote {args.out}; use it with {use}")
    return 0


# ----------------------------------------------------------------------------- eval / predict
def _classifier(path: str, device_name: str, precision: str):
    from fastclr import runtime
    from fastclr.classifier import load_classifier
    device = runtime.resolve_device(device_name)
    dtype = runtime.resolve_precision(precision, device)
    file, model, state = load_classifier(path)
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    return file, model, state, device, dtype


def cmd_eval(args) -> int:
    from fastclr.zoo.evaluate import evaluate, labelled_samples
    if not args.data_path:
        raise UserError("give --data.path=VAL_DIR: an ImageFolder of labelled images (ImageNet val in "
                        "synset folders)")
    file, model, state, device, dtype = _classifier(args.ckpt, args.device, args.precision)
    samples, classes = labelled_samples(args.data_path, args.data_file_list)
    n_cls = int(state["arch"]["num_classes"])
    if len(classes) != n_cls:
        raise UserError(f"{args.data_path} has {len(classes)} class folders but the model has {n_cls} outputs")
    if args.limit:
        samples = samples[:: max(1, len(samples) // args.limit)][: args.limit]
    res = evaluate(model, samples, args.image_size, args.batch_size, args.workers, device, dtype,
                   progress=not args.quiet)
    official = _official(state)
    print(f"{PROG} eval: {file}: top-1 {res['top1']:.2f} %, top-5 {res['top5']:.2f} % on {res['images']} images "
          f"of {args.data_path}" + (f" (official: {official} %)" if official is not None else "")
          + f"; TF1 eval preprocessing at {args.image_size} px, {str(dtype).removeprefix('torch.')} on {device}")
    if res["unreadable"]:
        print(f"{PROG} eval: warning: {len(res['unreadable'])} unreadable images left out, e.g. "
              f"{res['unreadable'][0]!r}")
    if args.out:
        from loaders.sources.files import atomic_write_text
        atomic_write_text(args.out, json.dumps({"checkpoint": file, "data": args.data_path, **res,
                                                "official_top1": official, "zoo": state.get("zoo")},
                                               indent=1) + "\n")
    return 0


def _official(state: dict) -> Optional[float]:
    z = state.get("zoo") or {}
    column = catalog.TOP1_COLUMNS.get(z.get("kind") or "")
    rel = catalog.RELEASES.get(z.get("release") or "")
    return rel.top1.get(column) if rel and column else None


def cmd_predict(args) -> int:
    from fastclr.zoo.evaluate import as_names, image_files, predict
    inputs = list(args.images) + ([args.data_path] if args.data_path else [])
    if not inputs:
        raise UserError("give image files or folders, or --data.path=DIR")
    files = image_files(inputs)
    file, model, state, device, dtype = _classifier(args.ckpt, args.device, args.precision)
    names = as_names(state, int(state["arch"]["num_classes"]))
    preds, bad = predict(model, files, args.image_size, args.batch_size, args.workers, device, dtype, args.top_k)
    if args.json:
        print(json.dumps([{"file": f, "top": [{"class": c, "name": names[c], "p": round(p, 5)} for c, p in top]}
                          for f, top in preds], indent=1))
    else:
        for f, top in preds:
            print(f"{f}: " + ", ".join(f"{names[c]} {100 * p:.1f} %" for c, p in top))
    for f in bad:
        print(f"{PROG} predict: warning: cannot read {f!r}: not an image, or a broken file", file=sys.stderr)
    return 0 if preds else EXIT_BAD_INPUT


# ----------------------------------------------------------------------------- the parser
def _common(p: argparse.ArgumentParser) -> None:
    from fastclr.zoo.evaluate import default_workers
    p.add_argument("--image-size", type=int, default=224, help="side of the centre-crop view (default 224)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="DataLoader workers decoding and cropping (default: min(8, CPUs - 1))")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda if available")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 (default: what the official numbers were measured in) or bf16 (faster on a GPU)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n", 1)[1].strip())
    sub = p.add_subparsers(dest="command", metavar="{list,convert,eval,predict}")
    s = sub.add_parser("list", help="every released model: architecture, parameters, official top-1, paths")
    s.add_argument("names", nargs="*", help="only these (r50_1x_sk0, r152_3x_sk1, r50_4x, ...), with their paths")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--markdown", action="store_true", help="the table as docs/zoo.md shows it")
    s = sub.add_parser("convert", help="a downloaded TF1 release folder -> a fastclr checkpoint",
                       description="Convert a released TF1 checkpoint (needs TensorFlow: pip install "
                       "'fastclr[tf]'). The architecture comes from the variables (and must agree with the "
                       "folder's name), the classifier's input layer from the graph shipped beside them.")
    s.add_argument("src", help="the release folder (with model.ckpt-N.index/.data/.meta, graph.pbtxt) or a "
                   "checkpoint prefix (.../model.ckpt-N)")
    s.add_argument("out", help="the fastclr file to write (.pt)")
    s.add_argument("--weights", choices=("auto", "online", "ema"), default="auto",
                   help="which encoder when the file holds two (ema_model/...): auto = the one the release's "
                   "classifier reads (the one the official evaluation used), else online")
    s.add_argument("--classifier-input", choices=("backbone", "head1", "head2", "head3"), default=None,
                   help="only for a folder without any graph: the layer the classifier reads. With a graph, "
                   "the graph decides")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    for name, text in (("eval", "top-1/top-5 on a labelled folder with the official TF eval preprocessing"),
                       ("predict", "top-k classes of images")):
        s = sub.add_parser(name, help=text)
        s.add_argument("ckpt", help="a converted release with a classifier, or a finetune.py / distill.py "
                       "checkpoint or run folder")
        if name == "predict":
            s.add_argument("images", nargs="*", help="image files or folders")
            s.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
            s.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            s.add_argument("--data.file_list", dest="data_file_list", default=None,
                           help="'relpath [label]' lines under --data.path instead of every image")
            s.add_argument("--limit", type=int, default=0, help="evaluate an evenly spaced subset of N images")
            s.add_argument("--out", default=None, help="also write the result as JSON here")
            s.add_argument("--quiet", action="store_true", help="no progress bar")
        s.add_argument("--data.path", dest="data_path", default="", help="an ImageFolder (eval) or a folder of "
                       "images (predict)")
        _common(s)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    for key in ("batch_size", "workers", "image_size", "top_k", "limit"):
        if getattr(args, key, 1) is not None and getattr(args, key, 1) < (0 if key in ("workers", "limit") else 1):
            print(f"{PROG} {args.command}: error: --{key.replace('_', '-')} must be "
                  f"{'>= 0' if key in ('workers', 'limit') else '>= 1'}", file=sys.stderr)
            return EXIT_BAD_INPUT
    fn = {"list": cmd_list, "convert": cmd_convert, "eval": cmd_eval, "predict": cmd_predict}[args.command]
    from fastclr import checkpoint as ckpt
    try:
        return fn(args)
    except (UserError, ckpt.UnusableCheckpoint) as e:
        print(f"{PROG} {args.command}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
