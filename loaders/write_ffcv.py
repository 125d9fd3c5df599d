"""ImageFolder (ImageNet train/ or val/) -> FFCV .beton, robust and atomic.

    python -m loaders.write_ffcv ~/imagenet/train train_256.beton                 # everything
    python -m loaders.write_ffcv ~/imagenet/train train_1pct.beton --subset 1percent.txt
    python -m loaders.write_ffcv ~/imagenet/train tiny.beton --fraction 0.01 --seed 0
    python -m loaders.write_ffcv ~/imagenet/val val_256.beton --dry-run           # check only
    python -m loaders.write_ffcv ~/photos photos.beton --unlabeled                # any layout, no labels

Two phases, one progress bar each:
  1. validate: every selected image is opened and fully decoded (in parallel). Unreadable files
     (truncated, empty, not an image) are skipped and listed with the reason; CMYK, grayscale,
     palette and PNG-named-.JPEG files are fine (converted to RGB when written).
  2. write: FFCV's DatasetWriter stores fields ``image`` (RGBImageField) and ``label`` (IntField).

Outputs, for OUT = ``name.beton``:
  name.beton               the data set (written as name.beton.tmp, renamed when complete, so a
                           crash or a full disk never leaves a truncated file under this name)
  name.manifest.json       classes, per-class counts, source root, options, versions, and the
                           relative path of every sample in .beton order (sample index -> file)
  name.skipped.txt         ``relative/path<TAB>reason`` for every skipped file (always written)

Labels use the one mapping of every fastclr backend: sorted class folder names
(``loaders.sources.folders.list_image_folder``). ``--unlabeled`` lists every image of SRC in any layout
(``scan_images``: flat, nested, or class folders whose names are not used) and writes label -1 for each;
the manifest says ``"labeled": false`` and has no classes, and only pretraining and distillation
accept it. ImageNet's val/ must first be sorted into class folders
(see the README). Exit status: 0 written, 2 bad input (no valid image, a bad selection), 1 writing failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .sources import manifest
from .errors import EXIT_BAD_INPUT, EXIT_FAILED
from .sources.folders import scan_image_folder, scan_images, shown_name
from .sources.decode import read_rgb
from .sources.files import atomic_write_text
from .validate import check_file

Sample = Tuple[str, int]
WRITE_MODES = ("smart", "jpg", "raw", "proportion")
MANIFEST_FORMAT = manifest.FORMAT


# ----------------------------------------------------------------------------------------------
# Output names
# ----------------------------------------------------------------------------------------------

def _stem(out: str | os.PathLike) -> str:
    out = str(out)
    return out[: -len(".beton")] if out.endswith(".beton") else out


def manifest_path(out: str | os.PathLike) -> str:
    """``name.beton`` -> ``name.manifest.json``."""
    return str(manifest.manifest_path(out))


def skipped_path(out: str | os.PathLike) -> str:
    """``name.beton`` -> ``name.skipped.txt``."""
    return _stem(out) + ".skipped.txt"


def read_manifest(beton: str | os.PathLike) -> dict:
    """The manifest beside ``beton``, checked against it (``loaders.sources.manifest.read``)."""
    return manifest.read(beton)


def _dist_version(name: str) -> str:
    # `loaders` never imports `fastclr`: ask the installed distribution instead.
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return "unknown"


# ----------------------------------------------------------------------------------------------
# Selection: everything, an official file list or a seeded class-balanced fraction, a limit
# ----------------------------------------------------------------------------------------------

def select(src: str, samples: List[Sample], subset: Optional[str] = None, fraction: Optional[float] = None,
           seed: int = 0, limit: Optional[int] = None) -> List[Sample]:
    """Apply --subset / --fraction (with ``loaders.subsets``: the same images the other backends get
    from ``python -m loaders.subsets``) and then --limit, keeping the folder order."""
    if subset or fraction is not None:
        from .subsets import make_subset
        entries, _ = make_subset(src, subset, fraction, seed)  # SubsetError (a ValueError): one line
        keep = {os.path.normpath(os.path.join(src, rel)) for rel, _ in entries}
        samples = [s for s in samples if os.path.normpath(s[0]) in keep]
    return select_limit(samples, limit) if limit else samples


def select_limit(samples: List[Sample], limit: int) -> List[Sample]:
    """The first ``limit`` images taken round-robin over classes (so a small limit still spans them)."""
    by_class: Dict[int, List[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    order = [i for group in _round_robin(list(by_class.values())) for i in group]
    return [samples[i] for i in sorted(order[:limit])]


def _round_robin(lists: List[List[int]]):
    for k in range(max(map(len, lists), default=0)):
        yield [lst[k] for lst in lists if k < len(lst)]


# ----------------------------------------------------------------------------------------------
# Phase 1: validation
# ----------------------------------------------------------------------------------------------

def _open_rgb(path: str, max_resolution: Optional[int]) -> np.ndarray:
    """``path`` as HxWx3 uint8 RGB for writing, decoded by the loaders' decoder (CMYK, gray, palette,
    16-bit, PNG... -> RGB the same way everywhere). A JPEG is decoded at 1/2, 1/4 or 1/8 scale when both
    sides stay >= max_resolution (RGBImageField then shrinks the longer side to max_resolution with
    INTER_AREA), so a 6000x4000 photo costs little to convert."""
    return read_rgb(path, min_side=max_resolution)


def validate_one(args: Tuple[str, Optional[int]]) -> Tuple[Optional[Tuple[int, int]], str, str]:
    """((h, w) as it will be stored at most, "", warning) for a usable image, (None, reason, "")
    otherwise. The full decode and the reasons are ``loaders.validate.check_file``'s, so the DALI
    clean list and this converter skip the same files. Never raises."""
    path, max_resolution = args
    try:
        error, warning = check_file(path)
        if error:
            return None, error, ""
        from PIL import Image
        with Image.open(path) as im:
            w, h = im.size
        if max_resolution and max(w, h) > max_resolution:  # what RGBImageField's resizer stores
            r = max_resolution / max(w, h)
            w, h = int(r * w), int(r * h)
        if w < 1 or h < 1:
            return None, f"too small once resized to --max-resolution {max_resolution}", ""
        return (h, w), "", warning or ""
    except Exception as e:  # any other surprise is a reason to skip, not to abort
        return None, f"{type(e).__name__}: {' '.join(str(e).split())}", ""


def _pool_map(fn, items: Sequence, workers: int, desc: str, progress: bool, chunksize: int = 16):
    from tqdm import tqdm
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    out = []
    if workers <= 1:
        for it in items:
            out.append(fn(it))
            bar.update()
    else:
        with get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers) as pool:
            for r in pool.imap(fn, items, chunksize=chunksize):
                out.append(r)
                bar.update()
    bar.close()
    return out


def validate(samples: List[Sample], max_resolution: Optional[int], workers: int, progress: bool = True):
    """Split ``samples`` into (good, shapes [(h, w)], skipped [(path, reason)], notes {path: warning})."""
    results = _pool_map(validate_one, [(p, max_resolution) for p, _ in samples], workers,
                        "[1/2] validate", progress)
    good, shapes, skipped, notes = [], [], [], {}
    for s, (shape, reason, warning) in zip(samples, results):
        if shape is None:
            skipped.append((s[0], reason))
        else:
            good.append(s)
            shapes.append(shape)
            if warning:
                notes[s[0]] = warning
    return good, shapes, skipped, notes


# ----------------------------------------------------------------------------------------------
# Phase 2: writing
# ----------------------------------------------------------------------------------------------

class ValidatedImages:
    """The indexed dataset handed to FFCV's DatasetWriter: ``ds[i] -> (HxWx3 uint8 RGB, label)``.

    FFCV's writer waits forever if a worker raises, so this never raises: a file that fails now
    but passed validation (changed on disk meanwhile) is written as a black 8x8 image and logged
    to ``error_log``; ``convert`` then fails the whole conversion instead of keeping a wrong sample.
    """

    def __init__(self, samples: List[Sample], max_resolution: Optional[int], error_log: str):
        self.samples, self.max_resolution, self.error_log = samples, max_resolution, error_log

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            return _open_rgb(path, self.max_resolution), label
        except Exception as e:
            with open(self.error_log, "a") as f:  # O_APPEND: one short line per write is atomic
                f.write(f"{path}\t{type(e).__name__}: {e}\n")
            return np.zeros((8, 8, 3), np.uint8), label


def _page_size(shapes: List[Tuple[int, int]]) -> int:
    """FFCV stores every sample inside one page (default 8 MiB): grow it for huge raw images."""
    biggest = max(3 * h * w for h, w in shapes)
    size = 1 << 23
    while size < 2 * biggest + (1 << 16):
        size <<= 1
    return size


def _write_beton(tmp: str, good: List[Sample], shapes, opts: dict, error_log: str,
                 progress: bool = True) -> None:
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    image = RGBImageField(write_mode=opts["write_mode"], max_resolution=opts["max_resolution"],
                          smart_threshold=opts["smart_threshold"], jpeg_quality=opts["jpeg_quality"],
                          compress_probability=opts["compress_probability"])
    writer = DatasetWriter(tmp, {"image": image, "label": IntField()}, page_size=_page_size(shapes),
                           num_workers=opts["workers"])
    if progress:
        print("[2/2] write (FFCV DatasetWriter)", file=sys.stderr, flush=True)
    # FFCV's writer draws its own bar (module-level tqdm) with no way to turn it off: --quiet replaces it
    bar = ffcv.writer.tqdm
    ffcv.writer.tqdm = bar if progress else (lambda *a, **k: bar(*a, **{**k, "disable": True}))
    try:
        writer.from_indexed_dataset(ValidatedImages(good, opts["max_resolution"], error_log),
                                    chunksize=opts["chunk_size"])
    except BaseException:  # the writer leaks its shared-memory segment when it fails midway
        sm = getattr(writer, "metadata_sm", None)
        if sm is not None and not isinstance(sm, int):
            for fn in (sm.close, sm.unlink):
                try:
                    fn()
                except OSError:
                    pass
        raise
    finally:
        ffcv.writer.tqdm = bar


def convert(src: str | os.PathLike, out: str | os.PathLike, *, max_resolution: Optional[int] = 256,
            jpeg_quality: int = 90, write_mode: str = "smart", smart_threshold: int = 120_000,
            compress_probability: float = 0.5, workers: Optional[int] = None, chunk_size: int = 100,
            subset: Optional[str] = None, fraction: Optional[float] = None, seed: int = 0,
            limit: Optional[int] = None, dry_run: bool = False, progress: bool = True,
            labeled: bool = True) -> dict:
    """Convert the ImageFolder ``src`` to ``out`` (.beton). Returns a summary dict:
    ``written, skipped, selected, classes, out, manifest, skipped_report, seconds, dry_run``.
    Raises ValueError for bad selections and RuntimeError when no valid image remains or the
    writing fails (the partial ``out.tmp`` is removed; ``out`` is never left truncated)."""
    t0 = time.time()
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
    if subset and fraction is not None:
        raise ValueError("use either --subset or --fraction, not both")
    src, out = os.path.abspath(src), os.path.abspath(out)
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    max_resolution = max_resolution or None  # 0 -> keep the original size

    if labeled:
        samples, classes, refused = scan_image_folder(src)
    else:
        if subset or fraction is not None:
            raise ValueError("--subset and --fraction pick images by class: --unlabeled data has none (use --limit)")
        scan = scan_images(src)
        samples, classes = [(path, -1) for path in scan.paths], []
        refused = [(path, why) for path, why in scan.left_out if not why.startswith("symlink")]
    if not samples and not refused:
        raise FileNotFoundError(f"no images under {src}")
    samples = select(src, samples, subset, fraction, seed, limit)

    good, shapes, skipped, notes = validate(samples, max_resolution, workers, progress)
    skipped = list(refused) + skipped  # unusable names: listed with the unreadable files
    rel = lambda p: os.path.relpath(p, src)  # noqa: E731
    summary = dict(src=src, out=out, selected=len(samples), written=len(good), skipped=len(skipped),
                   classes=len(classes), manifest=manifest_path(out), skipped_report=skipped_path(out),
                   converted=len(notes), dry_run=dry_run, skipped_files=[(rel(p), why) for p, why in skipped])
    if not good:
        raise ValueError(f"no valid image among {len(samples)} selected under {src} "
                           f"({len(skipped)} unreadable); nothing written")
    if dry_run:
        summary.update(written=0, would_write=len(good), seconds=time.time() - t0)
        return summary

    opts = dict(max_resolution=max_resolution, jpeg_quality=int(jpeg_quality), write_mode=write_mode,
                smart_threshold=int(smart_threshold), compress_probability=float(compress_probability),
                workers=int(workers), chunk_size=int(chunk_size), subset=subset, fraction=fraction,
                seed=seed, limit=limit)
    counts = Counter(label for _, label in good)
    try:
        import ffcv  # noqa: F401  (ffcv.__version__ is stale in 1.0.2: ask the distribution)
    except ImportError as e:
        raise RuntimeError(f"FFCV is not importable ({e}); install: pip install 'fastclr[ffcv]'") from e
    info = dict(format=MANIFEST_FORMAT, fastclr_version=_dist_version("fastclr"),
                    ffcv_version=_dist_version("ffcv"), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    source_root=src, labeled=labeled,
                    fields={"image": "RGBImageField", "label": "IntField"}, options=opts,
                    num_images=len(good), num_skipped=len(skipped), classes=classes,
                    class_counts={c: counts.get(i, 0) for i, c in enumerate(classes)},
                    notes={rel(p): w for p, w in notes.items()},  # readable oddities: CMYK, PNG as .JPEG...
                    files=[rel(p) for p, _ in good])

    tmp, error_log = out + ".tmp", out + ".tmp.errors"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for stale in (tmp, error_log):
        if os.path.exists(stale):
            os.remove(stale)
    try:
        _write_beton(tmp, good, shapes, opts, error_log, progress)
        if os.path.exists(error_log) and os.path.getsize(error_log):
            late = Path(error_log).read_text().splitlines()
            raise RuntimeError(f"{len(late)} image(s) passed validation but failed while writing "
                               f"(changed on disk?), e.g. {late[0]}; nothing written, rerun")
        atomic_write_text(skipped_path(out), "".join(
            f"{shown_name(rel(p))}\t{why}\n" for p, why in skipped))
        # The .beton appears complete or not at all, and never beside another conversion's manifest.
        manifest.write(out, info, tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        if os.path.exists(error_log):
            os.remove(error_log)
    summary.update(bytes=os.path.getsize(out), seconds=time.time() - t0)
    return summary


def read_beton(path: str | os.PathLike, indices: Optional[Sequence[int]] = None):
    """Yield ``(index, HxWx3 uint8 RGB, label)`` from a .beton written by ``convert``, decoded in
    plain Python with OpenCV (no compiled FFCV pipeline, no JIT): for checks and tests."""
    import cv2
    from ffcv.reader import Reader

    reader = Reader(str(path))
    fields = {name: f"f{i}" for i, name in enumerate(reader.field_names)}
    images, labels = reader.metadata[fields["image"]], reader.metadata[fields["label"]]
    size_at = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = np.memmap(str(path), np.uint8, mode="r")
    for i in range(reader.num_samples) if indices is None else indices:
        m = images[i]
        ptr = int(m["data_ptr"])
        blob = np.asarray(data[ptr:ptr + size_at[ptr]])
        if m["mode"] == 0:  # jpg (RGBImageField's IMAGE_MODES)
            img = cv2.cvtColor(cv2.imdecode(blob, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        else:
            img = blob.reshape(int(m["height"]), int(m["width"]), 3)
        yield i, img, int(labels[i])


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loaders.write_ffcv",
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[1:4]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Size: raw stores H*W*3 bytes per image (172 KB at 256x224); JPEG at quality 90 is "
               "typically 5-10x smaller but costs a decode per image at load time. Estimate for ImageNet "
               "train at 256 px: ~220 GB raw, ~20-30 GB jpg.")
    p.add_argument("src", help="ImageFolder root: SRC/<class>/<image>, e.g. imagenet/train (any layout with "
                   "--unlabeled)")
    p.add_argument("out", help="output file, e.g. train_256.beton (manifest and skipped list go beside it)")
    sel = p.add_argument_group("selection (default: every image)")
    sel.add_argument("--unlabeled", action="store_true",
                     help="data without labels: every image of SRC at any depth (flat, nested, or class folders "
                          "whose names are not used), label -1; for pretraining and distillation")
    sel.add_argument("--subset", metavar="FILE", help="keep the files named in FILE, one file name per line "
                     "(the official SimCLR 1%%/10%% lists: n04235860_14959.JPEG); unknown names are an error")
    sel.add_argument("--fraction", type=float, metavar="F",
                     help="seeded class-balanced draw: round(F * n) images per class, at least 1")
    sel.add_argument("--seed", type=int, default=0, help="seed of --fraction (default 0)")
    sel.add_argument("--limit", type=int, metavar="N",
                     help="at most N images, spread round-robin over classes")
    enc = p.add_argument_group("encoding")
    enc.add_argument("--max-resolution", type=int, default=256, metavar="PX",
                     help="shrink the longer side to PX (never enlarge); 0 keeps originals (default 256)")
    enc.add_argument("--write-mode", choices=WRITE_MODES, default="smart",
                     help="jpg: JPEG-compress all (smallest file, decode cost at load); raw: pixels "
                          "(no decode, ~8x larger); smart: raw if the raw pixels take <= --smart-threshold "
                          "bytes, else JPEG; proportion: JPEG with probability --compress-probability "
                          "(default smart)")
    enc.add_argument("--smart-threshold", type=int, default=120_000, metavar="BYTES",
                     help="smart mode: images whose H*W*3 exceeds this are JPEG-compressed (default 120000, "
                          "~200x200 px). FFCV's own default (None) would store everything raw")
    enc.add_argument("--jpeg-quality", type=int, default=90, metavar="Q", help="JPEG quality (default 90)")
    enc.add_argument("--compress-probability", type=float, default=0.5, metavar="P",
                     help="proportion mode: share of images JPEG-compressed (default 0.5, FFCV's default)")
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, default=None,
                     help="processes for validation and writing (default: all cores)")
    run.add_argument("--chunk-size", type=int, default=100, help="images per writer work item (default 100)")
    run.add_argument("--dry-run", action="store_true", help="validate and report; write nothing")
    run.add_argument("--quiet", action="store_true", help="no progress bars (validation and FFCV's writer)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = convert(args.src, args.out, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                    write_mode=args.write_mode, smart_threshold=args.smart_threshold,
                    compress_probability=args.compress_probability, workers=args.workers,
                    chunk_size=args.chunk_size, subset=args.subset, fraction=args.fraction, seed=args.seed,
                    limit=args.limit, dry_run=args.dry_run, progress=not args.quiet, labeled=not args.unlabeled)
    except (ValueError, FileNotFoundError) as e:  # bad selection, no valid image, unusable list
        print(f"write_ffcv: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as e:  # the writing failed
        print(f"write_ffcv: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    for path, why in s["skipped_files"][:10]:
        print(f"skipped {shown_name(path)}: {why}", file=sys.stderr)
    if s["skipped"] > 10:
        print(f"... and {s['skipped'] - 10} more", file=sys.stderr)
    if s["converted"]:
        print(f"{s['converted']} readable odd files (CMYK, gray, PNG named .JPEG...) are converted to RGB; "
              f"see 'notes' in the manifest", file=sys.stderr)
    classes = "no labels" if args.unlabeled else f"{s['classes']} classes"
    if args.dry_run:
        print(f"dry run: {s['would_write']} of {s['selected']} images valid, {s['skipped']} to skip, "
              f"{classes}; nothing written ({s['seconds']:.1f} s)")
    else:
        print(f"wrote {s['written']} images ({s['bytes'] / 2**20:.1f} MiB, {classes}) "
              f"to {s['out']}; "
              f"skipped {s['skipped']} (listed in {s['skipped_report']}); manifest {s['manifest']}; "
              f"{s['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
