"""Label subsets for semi-supervised fine-tuning: the official SimCLR 1 % / 10 % ImageNet lists, or a
seeded class-balanced draw. The output is a list file (``relpath label`` per line, relative to the
data root) that every backend takes as ``data.file_list``.

    python -m loaders.subsets ~/imagenet/train --list 1percent.txt --out sub1.txt
    python -m loaders.subsets ~/imagenet/train --fraction 0.01 --seed 0 --out sub1.txt
    python -m loaders.subsets train_256.beton --list 10percent.txt --out sub10.txt   # + sub10.indices

Official lists (google-research/simclr ``imagenet_subsets/``) hold one file name per line, e.g.
``n04235860_14959.JPEG``. A name is looked up in the class folder named by its synset prefix (the
part before the first ``_``); names whose prefix is not a class folder (other data sets) are matched
by file name anywhere under the root, and must then be unique. A name that is not found is an error
(one line: the count and a few examples), never silently dropped: a 1 % subset with holes would
report numbers that are not comparable with the paper's.

For an FFCV ``.beton`` the root is the .beton and names are matched against its manifest (written by
``loaders.write_ffcv`` beside it, with the relative path of every sample in .beton order). Besides the
list file, ``--indices`` writes the .beton sample indices of the subset (one per line, ascending) and
:func:`beton_indices` turns any list file into those indices: what the FFCV loader needs.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .sources import files, manifest
from .errors import EXIT_BAD_INPUT
from .sources.folders import find_classes, scan_image_folder
from .sources.files import read_list

Entry = tuple[str, int]  # (path relative to the data root, label)


class SubsetError(ValueError):
    """A bad subset request; the message is one line."""


# ----------------------------------------------------------------------------------------------
# Reading lists
# ----------------------------------------------------------------------------------------------

def read_names(list_file: str | os.PathLike) -> list[str]:
    """File names of an official subset list (blank lines and ``#`` comments skipped). A line may also
    be a ``class/name`` path or a ``relpath label`` line: only the file name is kept."""
    path = Path(list_file)
    if not path.is_file():
        raise SubsetError(f"subset list {list_file} not found")
    names = [os.path.basename(rel) for rel, _ in read_list(path)]
    if not names:
        raise SubsetError(f"subset list {list_file} is empty")
    return names


def synset(name: str) -> str:
    """``n04235860_14959.JPEG`` -> ``n04235860`` (the class folder of an ImageNet train image)."""
    return name.split("_", 1)[0]


def _missing_error(missing: Sequence[str], total: int, where: str, source: str) -> SubsetError:
    examples = ", ".join(missing[:3])
    return SubsetError(f"{len(missing)} of {total} names in {source} not found in {where}, e.g. {examples}")


# ----------------------------------------------------------------------------------------------
# Mapping names onto an ImageFolder or a .beton manifest
# ----------------------------------------------------------------------------------------------

def _relpaths_by_class(root: Path, classes: Sequence[str] | None = None) -> dict[str, list[str]]:
    """class -> image paths relative to ``root``, in the order every backend lists them
    (``loaders.sources.folders.scan_image_folder``: symlink loops refused, unusable names left out)."""
    scan = scan_image_folder(root, classes)
    out: dict[str, list[str]] = {}
    for path, label in scan.samples:
        out.setdefault(scan.classes[label], []).append(os.path.relpath(path, root))
    return out


def map_names_to_folder(names: Sequence[str], root: str | os.PathLike,
                        source: str = "the list") -> list[Entry]:
    """``(relpath, label)`` for every name, sorted by (label, relpath), labels from the ImageFolder
    mapping of ``root`` (sorted class folders). Only the class folders the names point at are listed,
    so mapping the 1 % list onto ImageNet reads 1000 directories once each, not 1.28M stats."""
    root = Path(root)
    classes = find_classes(root)
    label_of = {c: i for i, c in enumerate(classes)}
    wanted = list(dict.fromkeys(names))  # de-duplicated, order kept
    by_class = {c: {os.path.basename(r): r for r in rels} for c, rels in
                _relpaths_by_class(root, {synset(n) for n in wanted} & set(label_of)).items()}
    anywhere: dict[str, list[str]] | None = None
    found: list[Entry] = []
    missing: list[str] = []
    for name in wanted:
        cls = synset(name)
        rel = by_class.get(cls, {}).get(name)
        if rel is not None:
            found.append((rel, label_of[cls]))
            continue
        if anywhere is None:  # not an ImageNet-style name (or not in its synset folder): search by name
            anywhere = {}
            for rels in _relpaths_by_class(root).values():
                for r in rels:
                    anywhere.setdefault(os.path.basename(r), []).append(r)
        hits = anywhere.get(name, [])
        if len(hits) == 1:
            found.append((hits[0], label_of[Path(hits[0]).parts[0]]))
        elif len(hits) > 1:
            raise SubsetError(f"{name!r} in {source} matches {len(hits)} files under {root} "
                              f"(e.g. {', '.join(hits[:2])}): write class/name paths in the list")
        else:
            missing.append(name)
    if missing:
        raise _missing_error(missing, len(wanted), str(root), source)
    return sorted(found, key=lambda e: (e[1], e[0]))


def read_manifest(beton: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(relative paths in .beton order, classes) from the manifest beside ``beton``, checked against it."""
    try:
        return manifest.files_and_classes(beton)
    except manifest.ManifestError as e:
        raise SubsetError(str(e)) from None


def _manifest_labels(files: Sequence[str], classes: Sequence[str]) -> list[int]:
    label_of = {c: i for i, c in enumerate(classes)}
    return [label_of.get(Path(f).parts[0], -1) for f in files]


def map_names_to_manifest(names: Sequence[str], beton: str | os.PathLike,
                          source: str = "the list") -> tuple[list[Entry], np.ndarray]:
    """(entries, indices): ``(relpath, label)`` of every name and the ascending .beton sample indices."""
    files, classes = read_manifest(beton)
    labels = _manifest_labels(files, classes)
    by_name: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        by_name.setdefault(os.path.basename(f), []).append(i)
    wanted = list(dict.fromkeys(names))
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise _missing_error(missing, len(wanted), f"the manifest of {beton}", source)
    ambiguous = [n for n in wanted if len(by_name[n]) > 1]
    if ambiguous:
        raise SubsetError(f"{len(ambiguous)} names in {source} match several samples of {beton}, "
                          f"e.g. {ambiguous[0]}: write class/name paths in the list")
    idx = np.array(sorted(by_name[n][0] for n in wanted), np.int64)
    return [(files[i], labels[i]) for i in idx], idx


def beton_indices(beton: str | os.PathLike, file_list: str | os.PathLike) -> np.ndarray:
    """The ascending .beton sample indices of the images in ``file_list`` (``relpath [label]`` lines,
    relative to the converted root, as :func:`write_list` writes them; bare file names also work).
    This is how the FFCV backend should interpret ``data.file_list``."""
    files, _ = read_manifest(beton)
    index = {f: i for i, f in enumerate(files)}
    rels, bare = [], []
    for rel, _ in read_list(file_list):
        (rels if os.sep in rel or "/" in rel else bare).append(rel)
    missing = [r for r in rels if r not in index]
    if missing:
        raise _missing_error(missing, len(rels) + len(bare), f"the manifest of {beton}", str(file_list))
    out = [index[r] for r in rels]
    if bare:
        out += map_names_to_manifest(bare, beton, str(file_list))[1].tolist()
    if not out:
        raise SubsetError(f"file list {file_list} is empty")
    return np.unique(np.asarray(out, np.int64))


# ----------------------------------------------------------------------------------------------
# Seeded class-balanced draw
# ----------------------------------------------------------------------------------------------

def folder_entries(root: str | os.PathLike) -> list[Entry]:
    """Every image of an ImageFolder (or every sample of a .beton, via its manifest) as
    ``(relpath, label)``, sorted by class then path: the order every backend indexes."""
    if str(root).endswith(".beton"):
        files, classes = read_manifest(root)
        return list(zip(files, _manifest_labels(files, classes)))
    root = Path(root)
    label_of = {c: i for i, c in enumerate(find_classes(root))}
    out = [(r, label_of[c]) for c, rels in _relpaths_by_class(root).items() for r in rels]
    if not out:
        raise SubsetError(f"no images under {root}")
    return out


def balanced_draw(labels: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Ascending indices of a seeded class-balanced draw: ``max(1, round(fraction * n_c))`` of the
    ``n_c`` samples of each class c. The same (labels, fraction, seed) always gives the same set."""
    if not 0 < fraction <= 1:
        raise SubsetError(f"subset fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):  # ascending class order: the draw does not depend on the data order
        idx = np.flatnonzero(labels == c)
        n = max(1, round(fraction * len(idx)))
        keep.append(idx[rng.permutation(len(idx))[:n]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------------------------
# One call for the entry points, and the list file
# ----------------------------------------------------------------------------------------------

def make_subset(root: str | os.PathLike, list_file: str | None = None, fraction: float | None = None,
                seed: int = 0) -> tuple[list[Entry], np.ndarray | None]:
    """(entries, indices) of a subset of ``root`` (ImageFolder or .beton) given by an official list or
    by a class-balanced fraction. ``indices`` are .beton sample indices (None for a folder)."""
    if bool(list_file) == (fraction is not None):
        raise SubsetError("give exactly one of a subset list or a fraction")
    is_beton = str(root).endswith(".beton")
    if list_file:
        names = read_names(list_file)
        if is_beton:
            return map_names_to_manifest(names, root, str(list_file))
        return map_names_to_folder(names, root, str(list_file)), None
    entries = folder_entries(root)
    idx = balanced_draw([lab for _, lab in entries], float(fraction), seed)
    return [entries[i] for i in idx], (idx.astype(np.int64) if is_beton else None)


def write_list(entries: Sequence[Entry], out: str | os.PathLike) -> str:
    """Write ``relpath label`` lines atomically (``loaders.sources.files``); returns the path."""
    try:
        return files.write_list(entries, out)
    except ValueError as e:
        raise SubsetError(str(e)) from None


def write_indices(indices: np.ndarray, out: str | os.PathLike) -> str:
    files.atomic_write_text(out, "".join(f"{int(i)}\n" for i in indices))
    return str(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loaders.subsets", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="ImageFolder root (e.g. imagenet/train) or a .beton with its manifest")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--list", help="official subset list: one file name per line (1percent.txt ...)")
    g.add_argument("--fraction", type=float, help="seeded class-balanced draw of this fraction (>= 1/class)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --fraction draw")
    p.add_argument("--out", required=True, help="output list file: 'relpath label' lines (data.file_list)")
    p.add_argument("--indices", help="also write the .beton sample indices here (default for a .beton: "
                                     "OUT with .indices)")
    a = p.parse_args(argv)
    try:
        entries, idx = make_subset(a.root, a.list, a.fraction, a.seed)
    except (SubsetError, FileNotFoundError) as e:
        print(f"subsets: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    write_list(entries, a.out)
    msg = f"subsets: {len(entries)} images of {len({lab for _, lab in entries})} classes -> {a.out}"
    if idx is not None:
        ind = a.indices or os.path.splitext(a.out)[0] + ".indices"
        write_indices(idx, ind)
        msg += f" (+ .beton indices {ind})"
    print(msg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
