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
        raise FileNotFoundError(f"no class folders in {root}: expected ImageFolder layout root/<class>/<image>")
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


def scan_image_folder(root: str | os.PathLike, classes: Optional[Sequence[str]] = None) -> FolderScan:
    """Every image under ``root/<class>/`` (subfolders included), labelled by the sorted class names.

    Linked folders are followed once each, by their real path: a link to a folder already listed (a
    loop such as ``class1/up -> ..``, or a second link to the same place), to a class folder, or to
    the data root or above it is not followed, and a warning names it. Without that, one loop lists
    the whole data set again under the wrong label, dozens of times. ``classes``: list only these
    class folders (each must be one of root's). Files whose names cannot be used are ``refused``.
    """
    root = Path(root)
    all_classes = find_classes(root)
    root_real = os.path.realpath(root)
    class_real = {c: os.path.realpath(root / c) for c in all_classes}
    visited = set()
    samples, refused = [], []
    for label, c in enumerate(all_classes):
        if classes is not None and c not in classes:
            continue
        top = str(root / c)
        if class_real[c] in visited:  # two class names for one folder: the same images, two labels
            _refuse_link(top, class_real[c], "another class folder is the same folder")
            continue
        visited.add(class_real[c])
        # Plain subfolders first, then links in name order, so a link to a folder of the tree never
        # wins over the folder itself.
        dirs: List[Tuple[str, List[str]]] = []
        pending = [top]
        links: List[str] = []
        while pending or links:
            if not pending:
                link = links.pop(0)
                target = os.path.realpath(link)
                if _within(root_real, target):
                    why = "it points at the data root or above it"
                elif target in class_real.values():
                    why = "it points at a class folder"
                elif target in visited:
                    why = "its target is already listed (a symlink loop, or a second link to one folder)"
                else:
                    visited.add(target)
                    pending.append(link)
                    continue
                _refuse_link(link, target, why)
                continue
            folder = pending.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as e:
                log.warning("cannot list %s: %s", folder, e.strerror or e)
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
            dirs.append((folder, files))
        for folder, files in sorted(dirs):
            samples += [(os.path.join(folder, f), label) for f in files]
    return FolderScan(samples, all_classes, refused)


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


def read_file_list(list_path: str | os.PathLike, root: str | os.PathLike) -> Tuple[List[Tuple[str, int]], List[str]]:
    """Samples from a list file, labelled with the ImageFolder mapping of ``root``.

    Each non-empty line is ``relative/path [label]`` (the format ``loaders.validate`` writes and DALI
    reads). Without a label the class is the path's first folder. Lines starting with # are comments.
    """
    from .files import read_list
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
