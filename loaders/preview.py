"""See what a backend feeds the model: for N images, the decoded original and its augmented views, each
view captioned with the parameters it was made with.

    python -m loaders.preview --data.path=/data/train -n 6 --out views.png
    python -m loaders.preview --data.path=/data/train --data.backend=dali --out dali.png
    python -m loaders.preview --data.path=/data/train.beton --data.backend=ffcv --out ffcv.png

The images are the first batch of epoch 0 for a batch of N (``--seed``, as a run's ``run.seed``): the
same N images for every backend on the same data, since all three draw the epoch's order from one
permutation (``sampling.shard_indices``). Two backends side by side show how their views
differ, e.g. DALI's native colour ops against the torch ones.

What the captions know:
* torch: everything, exactly. The views are computed here with the torch loader's own streams:
  crop boxes with ``augment.sample_crop_boxes`` and flips from the sample's geometry rng, crops with
  ``augment.crop_resize``, colour parameters drawn once with ``augment.sample_photometric_params``
  from the batch's photometry generator and applied with ``augment.photometric(..., params=...)``.
  The views are the torch loader's first batch (a test checks), and every number in a caption is
  the one applied.
* ffcv: the views are the FFCV loader's first batch. Its crop boxes and flips are recomputed from
  its per-sample streams (``ffcv_loader.sample_geometry``) and the colour parameters from its
  photometry generator: exact too. The original is the image as stored in the .beton.
* dali: the views are the DALI loader's first batch. Crops and flips (and, with the default
  ``data.dali_photometry=dali``, the colour ops) are drawn inside the DALI pipeline and cannot be
  read back: the captions say so. With ``data.dali_photometry=torch`` the colour parameters are
  the shared photometry's first draw, exact.

Caption format: ``crop (y0, x0, h, w)`` in the original's pixels, then resized to data.image_size;
the colour-jitter ops in the order applied (brightness, contrast and saturation as factors, hue as a
shift in turns); grayscale; blur sigma. ``loaders`` only: this never imports fastclr.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import options
from .errors import EXIT_BAD_INPUT, DataError
from .config import DataConfig, LoaderConfig, loader_config

PROG = "python -m loaders.preview"
NAMES = {0: "brightness", 1: "contrast", 2: "saturation", 3: "hue"}  # augment's op codes
CELL_W, DPI = 3.4, 100   # inches per grid column, pixels per inch


class PreviewError(Exception):
    """Bad input: printed as one line, exit 2."""


# ----------------------------------------------------------------------------------------------
# --data.key=value -> DataConfig: fastclr's parser (loaders.options), the same rules and errors
# ----------------------------------------------------------------------------------------------

@dataclass
class _DataOptions:
    data: DataConfig = field(default_factory=DataConfig)


def data_options(pairs: list[str], cfg: DataConfig | None = None) -> DataConfig:
    """``["--data.path=/x", "--data.image_size", "64", ...]`` -> a DataConfig (PreviewError on bad input:
    an unknown key suggests the closest one, a wrong type names the field and the type, choices and
    ranges are checked)."""
    try:
        return options.parse_into(_DataOptions(cfg or DataConfig()), list(pairs), {}, prog=PROG).data
    except options.ConfigError as e:
        raise PreviewError(str(e)) from None


def data_help() -> str:
    """The --data.* options with their defaults and help, for --help."""
    text = options.help_text(_DataOptions, {}, PROG)
    return "data options" + text[text.index("options (default in brackets):") + len("options"):].split("\n\nValues:")[0]


# ----------------------------------------------------------------------------------------------
# The views and their parameters
# ----------------------------------------------------------------------------------------------

@dataclass
class ViewParams:
    """What one view was made with. ``None`` = drawn inside the backend, not knowable here."""
    box: tuple[int, int, int, int] | None   # (y0, x0, h, w) in the original's pixels, then resized
    flip: bool | None
    colour: dict | None  # jitter (bool), ops [(name, value)] in the order applied, gray (bool), sigma (float|None)


@dataclass
class Preview:
    backend: str
    spec: object                     # the AugmentSpec
    seed: int
    originals: list                  # HxWx3 uint8 per image
    names: list                      # a short name per image
    views: np.ndarray                # uint8 [N, K, S, S, 3]
    params: list                     # [N][K] ViewParams
    note: str                        # what the captions know, for the title


def colour_params(params: dict, n: int, spec) -> dict:
    """Sample ``n``'s colour parameters from ``augment.sample_photometric_params``'s dict: jitter on/off,
    the ops in the order applied with their factors (hue: shift in turns), grayscale, blur sigma (None
    when not blurred)."""
    def at(key):
        return params[key][n].item()
    ops = []
    if spec.jitter is not None and at("jitter"):
        for code in params["order"][n].tolist():
            if code >= 0:  # augment.NO_OP: an op of strength 0
                ops.append((NAMES[code], at(NAMES[code])))
    blurred = spec.blur is not None and bool(at("blur"))
    return {"jitter": bool(spec.jitter is not None and at("jitter")), "ops": ops,
            "gray": bool(spec.grayscale_p > 0 and at("gray")), "sigma": at("sigma") if blurred else None}


def _uint8_views(views: list, n: int) -> np.ndarray:
    """K tensors [N, 3, S, S] in [0, 1] -> uint8 [N, K, S, S, 3] (for display)."""
    import torch
    v = torch.stack([x.detach().float().cpu() for x in views], dim=1)[:n]
    return (v.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()


def _first_images(cfg: LoaderConfig, n: int):
    """(samples, shard): the folder's (path, label) samples and epoch 0's order of their indices, whose
    first N are the first batch (the torch loader's shard for one rank)."""
    from .base import resolve_samples
    from .sampling import shard_indices
    samples = resolve_samples(cfg).samples
    if n > len(samples):
        raise PreviewError(f"-n {n} is more than the {len(samples)} images of {cfg.path or 'the demo set'}")
    return samples, shard_indices(len(samples), 0, 1, 0, cfg.seed, cfg.train)


def preview_torch(cfg: LoaderConfig, spec, n: int, device="cpu") -> Preview:
    """The torch loader's first batch of N, computed here step by step so every parameter is kept."""
    import torch

    from . import augment
    from .sampling import colour_generator, geometry_rng
    samples, shard = _first_images(cfg, n)
    K, S = spec.num_views, spec.size
    originals, names, boxes, flips = [], [], [], []
    crops = np.empty((n, K, S, S, 3), np.uint8)
    for pos in range(n):
        img = None
        for attempt in range(len(shard)):  # an unreadable file: the next readable one, as the loader does
            path = samples[int(shard[(pos + attempt) % len(shard)])][0]
            img = _decoded(path)
            if img is not None:
                break
        if img is None:
            raise PreviewError(f"no readable image in {cfg.path}")
        rng = geometry_rng(cfg.seed, 0, 0, pos)  # the loader's stream of slot pos
        b = augment.sample_crop_boxes(img.shape[0], img.shape[1], K, spec.crop, rng)
        f = rng.random(K) < 0.5 if spec.flip else np.zeros(K, bool)
        crops[pos] = augment.crop_resize(img, b, S, spec.crop.interpolation, f if spec.flip else None)
        originals.append(img)
        names.append(_short(path))
        boxes.append(b)
        flips.append(f)
    # As augment.finish_views: the views of the batch view-major (view k of image i is row k*N + i),
    # scaled by 1/255, then the colour ops with parameters drawn once from the batch's generator.
    device = torch.device(device)
    x = torch.empty((K * n, 3, S, S), dtype=torch.float32, device=device)
    x.view(K, n, 3, S, S).copy_(torch.from_numpy(crops).to(device).permute(1, 0, 4, 2, 3))
    x.mul_(1.0 / 255.0)
    params = None
    if spec.has_photometry:
        gen = colour_generator(cfg.seed, 0, 0, 0, device)
        params = augment.sample_photometric_params(K * n, spec, gen, device=device)
        x = augment.photometric(x, spec, params=params, inplace=True, mode=cfg.photometry_mode)
    vp = [[ViewParams(tuple(int(c) for c in boxes[i][k]), bool(flips[i][k]),
                      colour_params(params, k * n + i, spec) if params is not None else _NO_COLOUR)
           for k in range(K)] for i in range(n)]
    views = _uint8_views(list(x.split(n)), n)
    return Preview("torch", spec, cfg.seed, originals, names, views, vp,
                   "every parameter exact: the torch loader's first batch")


def _decoded(path: str) -> np.ndarray | None:
    """The RGB image the torch loader decodes from ``path``; None where it would skip the file."""
    from .augment import to_rgb_uint8
    from .sources.decode import decode_rgb
    try:
        return to_rgb_uint8(decode_rgb(Path(path).read_bytes()))
    except Exception:  # noqa: BLE001  (the loader skips whatever fails to read or decode)
        return None


_NO_COLOUR = {"jitter": False, "ops": [], "gray": False, "sigma": None}


def preview_ffcv(cfg: LoaderConfig, spec, n: int, device="cpu") -> Preview:
    """The FFCV loader's first batch of N; boxes and flips recomputed from its per-sample streams."""
    from . import augment
    from .sampling import colour_generator, epoch_seed
    from .backends.ffcv_loader import build_ffcv_loader, sample_geometry
    from .write_ffcv import read_beton
    loader = build_ffcv_loader(replace(cfg, batch_size=n, train=True), spec, device=device)
    loader.set_epoch(0)
    it = iter(loader)
    batch = next(it)
    it.close()  # stops FFCV's pipeline thread
    index = loader.indices[loader.last_indices]  # .beton indices of the batch's samples
    originals = {i: img for i, img, _ in read_beton(cfg.path, [int(j) for j in index])}
    params = None
    if spec.has_photometry:
        gen = colour_generator(cfg.seed, 0, 0, 0, loader.photometry_device)  # batch 0's colour stream
        params = augment.sample_photometric_params(spec.num_views * n, spec, gen)
    K, vp, names = spec.num_views, [], []
    files = _beton_files(cfg.path)
    for i, j in enumerate(index):
        img = originals[int(j)]
        boxes, flips = sample_geometry(spec, epoch_seed(cfg.seed, 0), int(j), img.shape[0], img.shape[1])
        vp.append([ViewParams(tuple(int(c) for c in boxes[k]), bool(flips[k]),
                              colour_params(params, k * n + i, spec) if params is not None else _NO_COLOUR)
                   for k in range(K)])
        names.append(_short(files[int(j)]) if files else f"sample {int(j)}")
    return Preview("ffcv", spec, cfg.seed, [originals[int(j)] for j in index], names,
                   _uint8_views(batch.views, n), vp,
                   "exact: boxes from FFCV's per-sample streams (resized with INTER_AREA), colours from its generator")


def _beton_files(path: str) -> list | None:
    try:
        from .write_ffcv import read_manifest
        return read_manifest(path)["files"]
    except Exception:  # noqa: BLE001  (no manifest: name the samples by index)
        return None


def preview_dali(cfg: LoaderConfig, spec, n: int, device="cpu") -> Preview:
    """The DALI loader's first batch of N; what DALI draws inside its pipeline is not knowable."""
    from . import augment
    from .backends.dali_loader import build_dali_loader
    from .sampling import colour_generator
    from .sources.decode import decode_rgb
    loader = build_dali_loader(replace(cfg, batch_size=n, train=True), spec, device=device)
    try:
        loader.set_epoch(0)
        batch = next(iter(loader))
        index = loader.last_indices
        paths = [loader.paths[int(j)] for j in index]
        params = None
        if spec.has_photometry and cfg.dali_photometry == "torch":
            gen = colour_generator(cfg.seed, 0, 0, 0, loader.photometry_device)
            params = augment.sample_photometric_params(spec.num_views * n, spec, gen)
        views = _uint8_views(batch.views, n)
    finally:
        loader.close()
    originals = [augment.to_rgb_uint8(decode_rgb(Path(p).read_bytes())) for p in paths]
    native = spec.has_photometry and cfg.dali_photometry == "dali"
    vp = [[ViewParams(None, None, None if native else
                      colour_params(params, k * n + i, spec) if params is not None else _NO_COLOUR)
           for k in range(spec.num_views)] for i in range(n)]
    note = ("crops, flips and colour ops drawn inside DALI (native ops, fixed order b>c>s>h): not knowable"
            if native else "crops and flips drawn inside DALI; colours exact (data.dali_photometry=torch)")
    return Preview("dali", spec, cfg.seed, originals, [_short(p) for p in paths], views, vp, note)


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def make_preview(cfg: DataConfig, n: int = 4, device="cpu", seed: int = 0) -> Preview:
    """The first batch of N of ``cfg.backend`` with ``seed`` (a LoaderConfig brings its own), its
    originals and every view's parameters (``Preview.params[i][k]``: image i, view k)."""
    if not isinstance(cfg, LoaderConfig):
        cfg = loader_config(cfg, batch_size=n, train=True, seed=seed)
    from . import available, spec_from_config
    from .demo_data import DemoDataError
    ok, why = available(cfg.backend)
    if not ok:
        raise PreviewError(f"data.backend={cfg.backend} unavailable: {why}")
    try:
        spec = spec_from_config(cfg)
        build = {"torch": preview_torch, "dali": preview_dali, "ffcv": preview_ffcv}[cfg.backend]
        return build(replace(cfg, train=True), spec, n, device)
    except (ValueError, FileNotFoundError, DataError, DemoDataError) as e:
        raise PreviewError(str(e).strip().splitlines()[0]) from None


def caption(k: int, p: ViewParams, spec) -> str:
    """The caption of view ``k`` (0-based) from its parameters: the crop box, flip, grayscale, blur
    sigma, then the colour-jitter ops in the order applied."""
    crop = "drawn by the backend" if p.box is None else "(y0,x0,h,w)=({},{},{},{})".format(*p.box)
    flip = "not in the recipe" if not spec.flip else "drawn by the backend" if p.flip is None else \
        "yes" if p.flip else "no"
    lines = [f"view {k + 1}: crop {crop}"]
    c = p.colour
    if c is None:
        return "\n".join(lines + [f"flip: {flip}", "colour: drawn by the backend"])
    gray = "-" if spec.grayscale_p == 0 else "yes" if c["gray"] else "no"
    blur = "-" if spec.blur is None else f"sigma {c['sigma']:.2f}" if c["sigma"] is not None else "no"
    lines.append(f"flip: {flip}  gray: {gray}  blur: {blur}")
    if spec.jitter is None:
        lines.append("jitter: -  (not in the recipe)")
    elif not c["jitter"]:
        lines.append("jitter: off")
    else:
        ops = [f"hue {v:+.3f}" if name == "hue" else f"{name} x{v:.2f}" for name, v in c["ops"]]
        # two ops a line: four do not fit a cell's width
        lines.append("jitter: " + " > ".join(ops[:2]) + (" >" if len(ops) > 2 else ""))
        if len(ops) > 2:
            lines.append("        " + " > ".join(ops[2:]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------

HEAD, NAME, IMG, TEXT = 0.65, 0.25, 3.0, 0.65   # inches: header, image name, image side, caption


def draw(pv: Preview, out: str | os.PathLike, title: str | None = None, dpi: int = DPI) -> tuple[int, int]:
    """Write the grid (rows: images; columns: the original with the crop boxes, view 1..K, each
    captioned) to ``out``; returns (width, height) in pixels."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        raise PreviewError("matplotlib is not installed: pip install 'fastclr[plot]'") from None
    N, K = len(pv.originals), pv.spec.num_views
    row = NAME + IMG + TEXT
    fw, fh = CELL_W * (1 + K), HEAD + N * row
    fig = plt.figure(figsize=(fw, fh), dpi=dpi)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def cell(i: int, c: int):
        left = c * CELL_W + (CELL_W - IMG) / 2
        bottom = fh - HEAD - i * row - NAME - IMG
        ax = fig.add_axes((left / fw, bottom / fh, IMG / fw, IMG / fh))
        ax.set_xticks([])
        ax.set_yticks([])
        return ax

    def below(ax, text: str):
        ax.text(0, -0.025, text, transform=ax.transAxes, va="top", ha="left", fontsize=7.5, family="monospace")

    for i in range(N):
        img = pv.originals[i]
        H, W = img.shape[:2]
        ax = cell(i, 0)
        step = max(1, max(H, W) // 1024)  # a huge original is shown subsampled, in its own coordinates
        ax.imshow(img[::step, ::step], extent=(0, W, H, 0))
        known = [p.box is not None for p in pv.params[i]]
        for k, p in enumerate(pv.params[i]):
            if p.box is not None:
                y0, x0, h, w = p.box
                ax.add_patch(Rectangle((x0, y0), w, h, fill=False, linewidth=1.6, color=colours[k % len(colours)],
                                       linestyle="-" if k == 0 else "--"))
        ax.set_title(pv.names[i], fontsize=8)
        boxes = "boxes: view 1 solid, view 2 dashed" if K > 1 else "box: the view's crop"
        stored = " as stored in the .beton" if pv.backend == "ffcv" else ""
        below(ax, f"original{stored}, {H}x{W} (h x w)" + (f"\n{boxes}" if all(known) else ""))
        for k in range(K):
            ax = cell(i, 1 + k)
            ax.imshow(pv.views[i, k], interpolation="nearest")
            for side in ax.spines.values():
                side.set_edgecolor(colours[k % len(colours)])
                side.set_linewidth(2)
            below(ax, caption(k, pv.params[i][k], pv.spec))
    head = title or (f"loaders.preview: backend {pv.backend}, recipe {pv.spec.name}, {pv.spec.size} px, "
                     f"seed {pv.seed}")
    fig.text(0.5, 1 - 0.12 / fh, f"{head}\n{pv.note}", ha="center", va="top", fontsize=10)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    size = fig.canvas.get_width_height()
    plt.close(fig)
    return size


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} --data.path=PATH [--data.backend=torch|dali|ffcv] [--data.key=value ...] "
              f"[--out views.png] [-n N] [--seed S]",
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[1:5]),
        epilog=data_help() + "\n\nExit status: 0 written, 2 bad input (options, data, a missing backend).")
    p.add_argument("--out", default="views.png", help="PNG to write (default: views.png)")
    p.add_argument("-n", type=int, default=4, metavar="N", help="images, one row each (default: 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the order, crops and colours, as a run's --run.seed (default: 0)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the backend runs (cuda: DALI's GPU pipeline, colour ops on the GPU; the GPU's "
                        "random streams differ from the CPU's). Default: cpu")
    p.add_argument("--title", default=None, help="a title instead of the default one")
    p.add_argument("--dpi", type=int, default=DPI, help=f"pixels per inch of the PNG (default: {DPI}: a "
                   f"{CELL_W * 3:.1f} in wide grid of two views is {int(CELL_W * 3 * DPI)} px)")
    return p


def main(argv=None) -> int:
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    try:
        if args.n < 1:
            raise PreviewError(f"-n must be >= 1, got {args.n}")
        if args.seed < 0:
            raise PreviewError(f"--seed must be >= 0, got {args.seed}")
        cfg = data_options(rest)
        if args.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise PreviewError("--device cuda but no CUDA device is visible (use --device cpu)")
        pv = make_preview(cfg, args.n, args.device, seed=args.seed)
        if args.dpi < 20:
            raise PreviewError(f"--dpi must be >= 20, got {args.dpi}")
        w, h = draw(pv, args.out, args.title, args.dpi)
    except PreviewError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {args.out} ({w}x{h} px): {args.n} image(s) x (original + {pv.spec.num_views} view(s)), "
          f"backend {cfg.backend}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
