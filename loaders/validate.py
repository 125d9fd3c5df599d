"""Find the images a data loader cannot decode and write a clean file list without them.

DALI cannot skip a corrupt image in the middle of a pipeline: one bad file stops the run. So, once per
data set, decode every file and keep the good ones:

    python -m loaders.validate /data/imagenet/train --out clean_train.txt --workers 16

writes ``clean_train.txt`` ("relative/path label" lines, label = index of the sorted class folder, the
format DALI's ``file_list`` and ``loaders.common.read_file_list`` read; use it as ``data.file_list``)
and ``clean_train.txt.bad.txt``, the report: each excluded file with the reason, then the readable
files with a warning (CMYK, PNG data named .JPEG, grayscale, tiny, huge).

"Good" means: PIL decodes the whole file (this gives the reason when it does not), and, when DALI is
installed, DALI's CPU decoder decodes it too (``--no-dali`` skips that second pass). The GPU decoder
(nvJPEG through nvImageCodec) falls back to the CPU codec for what it cannot handle, so the CPU check
is the conservative one.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .common import EXIT_BAD_INPUT, bad_name_reason, scan_image_folder
from .decode import decode_rgb
from .files import atomic_write, write_list

TINY_SIDE = 8                  # a side under this many pixels: warn (random crops of it are blurry mush)
HUGE_PIXELS = 20_000_000       # more pixels than this: warn (slow to decode, large decoder buffers)
JPEG_EXT = (".jpg", ".jpeg")


def check_file(path: str) -> Tuple[Optional[str], Optional[str]]:
    """(error, warning) for one file; error None means the whole image decoded with the loaders'
    decoder (``loaders.decode.decode_rgb``: OpenCV, then PIL, whose error is the reason given)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"cannot read: {e.strerror or e}", None
    if not data:
        return "empty file (0 bytes)", None
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header: format, mode and size for the warnings
            fmt, mode, (w, h) = im.format, im.mode, im.size
        decode_rgb(data)  # the full decode: truncated data fails here, not in open()
    except UnidentifiedImageError:
        return "not an image (PIL cannot identify the format)", None
    except Image.DecompressionBombError as e:
        return f"too large for PIL ({e})", None
    except (OSError, SyntaxError, ValueError) as e:
        return f"decode failed: {' '.join(str(e).split())}", None
    warnings = []
    ext = os.path.splitext(path)[1]
    if ext.lower() in JPEG_EXT and fmt != "JPEG":
        warnings.append(f"{fmt} data named {ext}")
    if mode == "CMYK":
        warnings.append("CMYK colour (converted to RGB)")
    elif mode.startswith("I;16") or mode in ("I", "F"):
        warnings.append(f"mode {mode}, more than 8 bits (scaled to 8-bit RGB)")
    elif mode not in ("RGB", "YCbCr"):
        warnings.append(f"mode {mode} (converted to RGB)")
    if min(w, h) < TINY_SIDE:
        warnings.append(f"tiny {w}x{h}")
    if w * h > HUGE_PIXELS:
        warnings.append(f"huge {w}x{h} ({w * h / 1e6:.0f} MP, slow to decode)")
    return None, "; ".join(warnings) or None


def dali_reason(err: Exception) -> str:
    """One line from a DALI pipeline error (its text is a multi-line traceback): the operator and
    the first line of what it encountered."""
    text = str(err)
    op = re.search(r"Error in \w+ operator `([^`]+)`", text)
    skip = ("C++ context", "Current pipeline", "Critical error")
    lines = [ln.strip() for ln in text.split("encountered:", 1)[-1].splitlines()
             if ln.strip() and not ln.strip().startswith(skip)]
    msg = lines[0] if lines else (text.strip().splitlines() or [type(err).__name__])[0]
    return ((f"{op.group(1)}: " if op else "") + msg)[:240].rstrip(" :")


class DaliChecker:
    """Decodes batches of files with DALI's CPU decoder. A batch that fails is bisected (DALI reports
    the failure for the whole batch and the pipeline must be rebuilt), so the cost stays close to one
    decode per file when bad files are rare."""

    def __init__(self, threads: int = 1, batch: int = 32):
        self.threads, self.batch = max(1, threads), batch
        self.pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.batch, num_threads=self.threads, device_id=None,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def decode_only():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            # Returning only the shape keeps the decode in the graph while the output stays tiny.
            return fn.decoders.image(enc, device="cpu", output_type=types.RGB).shape()

        self.pipe = decode_only()
        self.pipe.build()

    def _decodes(self, paths: Sequence[str]) -> Optional[str]:
        """None when DALI decodes every file of ``paths``, else the DALI reason."""
        import numpy as np

        if self.pipe is None:
            self._build()
        try:
            self.pipe.feed_input("enc", [np.fromfile(p, dtype=np.uint8) for p in paths])
            self.pipe.run()
            return None
        except Exception as e:  # DALI raises RuntimeError; the pipeline is unusable afterwards
            self.pipe = None
            return dali_reason(e)

    def failures(self, paths: Sequence[str]) -> Dict[str, str]:
        """path -> reason for every file of ``paths`` DALI cannot decode."""
        bad: Dict[str, str] = {}
        stack = [list(paths)]
        while stack:
            chunk = stack.pop()
            reason = self._decodes(chunk)
            if reason is None:
                continue
            if len(chunk) == 1:
                bad[chunk[0]] = f"DALI decoder: {reason}"
            else:
                half = len(chunk) // 2
                stack += [chunk[half:], chunk[:half]]
        return bad


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


def _pool(workers: int):
    """A process pool for ``workers`` > 1, else a no-op context giving None. forkserver, not fork: the
    caller may run DALI or torch threads, and forking a threaded process can deadlock."""
    if workers <= 1:
        return contextlib.nullcontext(None)
    import multiprocessing
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"))


def validate(root: str, workers: int = 1, use_dali: Optional[bool] = None, progress: bool = True,
             dali_batch: int = 64) -> Tuple[List[Tuple[str, int]], Dict[str, str], Dict[str, str], List[str]]:
    """(good samples [(path, label)], bad {path: reason}, warnings {path: text}, classes)."""
    from tqdm import tqdm

    samples, classes, refused = scan_image_folder(root)
    if not samples and not refused:
        raise FileNotFoundError(f"no images under {root}")
    paths = [p for p, _ in samples]
    bar = dict(unit="img", disable=not progress, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    bad, warn = dict(refused), {}
    with _pool(workers) as pool, tqdm(total=len(paths), desc="decoding (PIL)", **bar) as pbar:
        if pool is None:
            results = map(check_file, paths)
        else:  # named by its module path, so it pickles also when this file runs as __main__
            from loaders.validate import check_file as worker_fn
            results = pool.map(worker_fn, paths, chunksize=max(1, min(64, len(paths) // (workers * 8))))
        for path, (err, w) in zip(paths, results):
            if err:
                bad[path] = err
            if w:
                warn[path] = w
            pbar.update(1)
    if use_dali is None:
        use_dali = _dali_available()
    if use_dali:
        todo = [p for p in paths if p not in bad]
        checker = DaliChecker(threads=workers, batch=dali_batch)
        with tqdm(total=len(todo), desc="decoding (DALI)", **bar) as pbar:
            for i in range(0, len(todo), dali_batch):
                bad.update(checker.failures(todo[i:i + dali_batch]))
                pbar.update(len(todo[i:i + dali_batch]))
    for p in bad:
        warn.pop(p, None)
    good = [(p, label) for p, label in samples if p not in bad]
    return good, bad, warn, classes


def write_outputs(root: str, out: str, report: str, good, bad, warn) -> None:
    rel = lambda p: Path(os.path.relpath(p, root)).as_posix()  # noqa: E731
    shown = lambda p: rel(p) if bad_name_reason(p) is None else repr(rel(p))  # noqa: E731  one line each
    # no comment lines in the list: DALI's own file_list reader would take them as files
    write_list([(rel(p), label) for p, label in good], out)
    with atomic_write(report) as f:
        f.write(f"# loaders.validate report for {os.path.abspath(root)}\n")
        f.write(f"# bad: {len(bad)} file(s), excluded from {out}\n")
        f.writelines(f"{shown(p)}\t{reason}\n" for p, reason in sorted(bad.items()))
        f.write(f"# warnings: {len(warn)} file(s), readable and kept\n")
        f.writelines(f"{shown(p)}\t{w}\n" for p, w in sorted(warn.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loaders.validate",
        description="Decode every image of an ImageFolder (with PIL, then with DALI's CPU decoder when DALI "
                    "is installed) and write a list of the good ones ('relative/path label' lines, labels "
                    "from the sorted class folders) for data.file_list, plus a report of the bad ones with "
                    "reasons. Needed by the DALI backend, which stops on the first undecodable file.",
        epilog="Exit status: 0 list written (bad files excluded), 1 bad files found with --strict, "
               "2 no usable images or bad arguments.")
    ap.add_argument("root", metavar="DIR", help="ImageFolder root: DIR/<class>/<image>")
    ap.add_argument("--out", required=True, help="clean list to write, e.g. clean_list.txt")
    ap.add_argument("--report", default=None, help="report of bad files and warnings (default: OUT.bad.txt)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="decoding processes (and DALI threads); default min(8, cores)")
    ap.add_argument("--no-dali", action="store_true",
                    help="only decode with PIL, skip the DALI decoder check")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when any file is bad")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    report = args.report or f"{args.out}.bad.txt"
    try:
        good, bad, warn, _ = validate(args.root, workers=args.workers,
                                      use_dali=False if args.no_dali else None, progress=not args.quiet)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    write_outputs(args.root, args.out, report, good, bad, warn)
    print(f"validate: {len(good)} good, {len(bad)} bad, {len(warn)} with warnings, of {len(good) + len(bad)} "
          f"files in {args.root} -> {args.out} (report: {report})")
    if not good:
        print("error: no decodable images", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 1 if (bad and args.strict) else 0


if __name__ == "__main__":
    raise SystemExit(main())
