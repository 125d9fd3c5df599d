"""Find the images a data loader cannot decode and write a clean file list without them.

DALI cannot skip a corrupt image in the middle of a pipeline: one bad file stops the run. So, once per
data set, decode every file and keep the good ones:

    python -m loaders.validate /data/imagenet/train --out clean_train.txt --workers 16

writes ``clean_train.txt`` ("relative/path label" lines, label = index of the sorted class folder, the
format DALI's ``file_list`` and ``loaders.sources.folders.read_file_list`` read; use it as ``data.file_list``)
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
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import EXIT_BAD_INPUT
from .sources.checks import DaliChecker, _dali_available, check_file, dali_reason  # noqa: F401
from .sources.files import atomic_write, write_list
from .sources.folders import scan_image_folder, shown_name

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
    # no comment lines in the list: DALI's own file_list reader would take them as files
    write_list([(rel(p), label) for p, label in good], out)
    with atomic_write(report) as f:
        f.write(f"# loaders.validate report for {os.path.abspath(root)}\n")
        f.write(f"# bad: {len(bad)} file(s), excluded from {out}\n")
        f.writelines(f"{shown_name(rel(p))}\t{reason}\n" for p, reason in sorted(bad.items()))
        f.write(f"# warnings: {len(warn)} file(s), readable and kept\n")
        f.writelines(f"{shown_name(rel(p))}\t{w}\n" for p, w in sorted(warn.items()))


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
