"""Image folders and list files: what is an image, the one label mapping (sorted class folder names),
the folder scan (symlink rules, unusable names), and 'relpath [label]' list files."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def find_classes(root: str | os.PathLike) -> List[str]:
    """Sorted class folder names: the one label mapping shared by every backend and the converter."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class folders in {root}: labels come from class folders root/<class>/<image> "
                                f"(fine-tuning and evaluation need them; pretraining and distillation take any layout)")
    return classes


def _within(path: str, parent: str) -> bool:
    """Whether real path ``path`` is ``parent`` or lies below it."""
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


_warned_links: set = set()  # a process names each refused link once, however often it lists a folder


def _refuse_link(link: str, target: str, why: str) -> None:
    if link not in _warned_links:
        _warned_links.add(link)
        log.warning("not following the symlink %s -> %s: %s", link, target, why)


def bad_name_reason(name: str) -> Optional[str]:
    """Why a file name cannot be used, or None. List files hold one path per line, so a name with a
    line break would split its line (and DALI's reader would then look for two files that do not exist)."""
    if "\n" in name or "\r" in name:
        return "its name contains a line break (list files hold one path per line): rename it"
    return None


def shown_name(name: str) -> str:
    """A file name for one line of output: as it is, or quoted with its line breaks escaped."""
    return name if bad_name_reason(name) is None else repr(name)


class FolderScan(NamedTuple):
    samples: List[Tuple[str, int]]   # (absolute path, label), sorted by class then folder then name
    classes: List[str]
    refused: List[Tuple[str, str]]   # (path, reason): files whose names cannot be used


def _walk(top: str, root_real: str, visited: set, stop_at, refused: list, others: list) -> List[Tuple[str, List[str]]]:
    """(folder, image names) of every folder under ``top``, sorted by path components then name.

    Linked folders are followed once each, by their real path: a link to a folder already listed (a
    loop such as ``a/up -> ..``, or a second link to the same place), to a folder of ``stop_at`` (the
    class folders) or to the data root or above it is not followed, and a warning names it. Plain
    subfolders come first, then links in name order, so a link to a folder of the tree never wins over
    the folder itself. Unusable names go to ``refused`` as (path, reason), files that are not images
    to ``others``."""
    dirs: List[Tuple[str, List[str]]] = []
    pending, links = [top], []
    while pending or links:
        if not pending:
            link = links.pop(0)
            target = os.path.realpath(link)
            if _within(root_real, target):
                why = "it points at the data root or above it"
            elif target in stop_at:
                why = "it points at a class folder"
            elif target in visited:
                why = "its target is already listed (a symlink loop, or a second link to one folder)"
            else:
                visited.add(target)
                pending.append(link)
                continue
            _refuse_link(link, target, why)
            refused.append((link, f"symlink not followed: {why}"))
            continue
        folder = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            log.warning("cannot list %s: %s", folder, e.strerror or e)
            refused.append((folder, f"cannot list it: {e.strerror or e}"))
            continue
        files = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_symlink() and e.is_dir():
                links.append(e.path)
            elif e.is_dir(follow_symlinks=False):
                real = os.path.realpath(e.path)
                if real not in visited:
                    visited.add(real)
                    pending.append(e.path)
            elif e.name.lower().endswith(IMG_EXTENSIONS):
                why = bad_name_reason(e.name)
                if why:
                    refused.append((e.path, why))
                else:
                    files.append(e.name)
            else:
                others.append(e.path)
        dirs.append((folder, files))
    # Component order ("a" < "a-b" < "a/b" would not hold for plain strings): a class-folder tree lists
    # in the same order labelled (class by class) and unlabelled.
    return sorted(dirs, key=lambda d: Path(d[0]).parts)


def scan_image_folder(root: str | os.PathLike, classes: Optional[Sequence[str]] = None) -> FolderScan:
    """Every image under ``root/<class>/`` (subfolders included), labelled by the sorted class names.

    Symlinks follow ``_walk``'s rules (a link to another class folder is not followed either): without
    them one loop lists the whole data set again under the wrong label, dozens of times. ``classes``:
    list only these class folders (each must be one of root's). Files whose names cannot be used are
    ``refused``; images directly in root (outside every class folder) are left out."""
    root = Path(root)
    all_classes = find_classes(root)
    root_real = os.path.realpath(root)
    class_real = {c: os.path.realpath(root / c) for c in all_classes}
    stop_at = set(class_real.values())
    visited: set = set()
    samples, refused = [], []
    for label, c in enumerate(all_classes):
        if classes is not None and c not in classes:
            continue
        top = str(root / c)
        if class_real[c] in visited:  # two class names for one folder: the same images, two labels
            _refuse_link(top, class_real[c], "another class folder is the same folder")
            continue
        visited.add(class_real[c])
        for folder, files in _walk(top, root_real, visited, stop_at, refused, []):
            samples += [(os.path.join(folder, f), label) for f in files]
    # A refused link is named by the warning: it is not a file left out.
    refused = [(p, why) for p, why in refused if not why.startswith(("symlink", "cannot list"))]
    return FolderScan(samples, all_classes, refused)


class ImageScan(NamedTuple):
    """Every image of a folder in any layout (``scan_images``)."""
    paths: List[str]                 # absolute paths, sorted by folder (path components) then name
    left_out: List[Tuple[str, str]]  # (path, reason): unusable names, links not followed, other files


def scan_images(root: str | os.PathLike) -> ImageScan:
    """Every image under ``root`` at any depth, once each, in a deterministic order, for data without
    labels (pretraining, distillation): flat, nested, or class folders whose names are not used.
    Symlinks follow ``_walk``'s rules; what is left out (files that are not images, unusable names,
    links not followed) is returned with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    root_real = os.path.realpath(root)
    refused: List[Tuple[str, str]] = []
    others: List[str] = []
    paths = [os.path.join(folder, f)
             for folder, files in _walk(str(root), root_real, {root_real}, set(), refused, others) for f in files]
    left_out = refused + [(p, "not an image (" + ", ".join(IMG_EXTENSIONS) + ")") for p in others]
    return ImageScan(paths, left_out)


def describe_left_out(left_out: Sequence[Tuple[str, str]], root: str | os.PathLike, first: int = 3) -> str:
    """'2 not an image (a.txt, b.csv), 1 symlink not followed (...) (x/up)': one clause per reason."""
    by_reason: dict = {}
    for path, why in left_out:
        short = why.split(":")[0].split(" (")[0].replace("its name contains a line break", "named with a line break")
        by_reason.setdefault(short, []).append(os.path.relpath(path, root))
    return ", ".join(f"{len(names)} {why} ({', '.join(shown_name(n) for n in names[:first])}"
                     f"{', ...' if len(names) > first else ''})" for why, names in by_reason.items())


def list_images(root: str | os.PathLike) -> Tuple[List[Tuple[str, int]], str]:
    """(samples with label -1, a one-line description) of every image under ``root`` (``scan_images``).
    No image is a FileNotFoundError."""
    scan = scan_images(root)
    if not scan.paths:
        extra = f"; left out: {describe_left_out(scan.left_out, root)}" if scan.left_out else ""
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root}{extra}")
    note = f"{len(scan.paths)} images in {root} (any layout; labels are not used)"
    if scan.left_out:
        note += f", {len(scan.left_out)} left out: {describe_left_out(scan.left_out, root)}"
    return [(p, -1) for p in scan.paths], note


def list_image_folder(root: str | os.PathLike) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(samples, classes): samples are (absolute path, label), sorted by class then file name
    (see ``scan_image_folder``). Files whose names cannot be used are left out with a warning."""
    samples, classes, refused = scan_image_folder(root)
    for path, why in refused[:5]:
        log.warning("leaving out %r: %s", path, why)
    if len(refused) > 5:
        log.warning("... and %d more files with unusable names", len(refused) - 5)
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root}")
    return samples, classes


def read_file_list(list_path: str | os.PathLike, root: str | os.PathLike,
                   labels: bool = True) -> Tuple[List[Tuple[str, int]], List[str]]:
    """Samples from a list file, labelled with the ImageFolder mapping of ``root``.

    Each non-empty line is ``relative/path [label]`` (the format ``loaders.validate`` writes and DALI
    reads). Without a label the class is the path's first folder. Lines starting with # are comments.
    ``labels=False`` (data without labels): any paths under ``root``, every label -1, no classes.
    """
    from .files import read_list
    if not labels:
        samples = [(os.path.join(root, rel), -1) for rel, _ in read_list(list_path)]
        if not samples:
            raise ValueError(f"file list {list_path} is empty")
        return samples, []
    classes = find_classes(root)
    index = {c: i for i, c in enumerate(classes)}
    samples, bad = [], []
    for n, (rel, label) in enumerate(read_list(list_path), 1):
        if label is None:
            cls = Path(rel).parts[0] if len(Path(rel).parts) > 1 else None
            if cls not in index:
                bad.append(f"entry {n}: {rel!r} has no label and no class folder of {root}")
                continue
            label = index[cls]
        samples.append((os.path.join(root, rel), label))
    if bad:
        raise ValueError(f"{len(bad)} unusable lines in {list_path}, e.g. {bad[0]}")
    if not samples:
        raise ValueError(f"file list {list_path} is empty")
    return samples, classes
