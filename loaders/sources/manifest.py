"""The manifest ``loaders.write_ffcv`` writes beside a ``.beton``: ``name.beton`` -> ``name.manifest.json``
with the classes, the relative path of every sample in .beton order, options and versions.

The manifest carries a content id of its .beton (``beton_id``: a hash of the file's size, first and
last MiB). Reading a manifest checks it against the .beton beside it, so a manifest can never be used
with another conversion's .beton: a conversion killed between its two renames, or a .beton copied
over without its manifest, is an error naming both files instead of labels and subsets silently
mapped through the wrong file list. (Manifests without the id, from older conversions, are read
unchecked.) Nothing here imports FFCV.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .files import atomic_write_text

FORMAT = "fastclr-ffcv-manifest/1"
_EDGE = 1 << 20  # bytes hashed at each end of the .beton


class ManifestError(ValueError):
    """A missing, unreadable or mismatched manifest; the message is one line."""


def manifest_path(beton: str | os.PathLike) -> Path:
    """``name.beton`` -> ``name.manifest.json``."""
    s = str(beton)
    return Path(s.removesuffix(".beton") + ".manifest.json")


def beton_id(path: str | os.PathLike) -> str:
    """A content id of a .beton: sha256 of its size and its first and last MiB. The header, the field
    and sample metadata (sizes, labels, data pointers) sit at the start and the allocation table at the
    end, so two conversions differ there; reading 2 MiB keeps the check instant on a 100 GB file."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            h.update(f.read(_EDGE))
    return h.hexdigest()[:32]


def read(beton: str | os.PathLike) -> dict:
    """The manifest of ``beton`` as a dict, checked against the .beton when it carries an id."""
    mf = manifest_path(beton)
    if not mf.is_file():
        raise ManifestError(f"no manifest {mf} beside {beton}: write both with python -m loaders.write_ffcv")
    try:
        m = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{mf} is not readable JSON ({e}): rewrite it with python -m loaders.write_ffcv") from None
    if "files" not in m or "classes" not in m:
        raise ManifestError(f"{mf} lacks 'files' or 'classes': rewrite it with python -m loaders.write_ffcv")
    want = m.get("beton_id")
    if want is not None:
        if not os.path.isfile(beton):
            raise ManifestError(f"{beton} is missing beside its manifest {mf}")
        if beton_id(beton) != want:
            raise ManifestError(f"{mf} does not describe {beton} (another conversion, or one interrupted "
                                f"between writing the two): convert again with python -m loaders.write_ffcv")
    return m


def files_and_classes(beton: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(relative paths in .beton order, class names) of a checked manifest."""
    m = read(beton)
    return list(m["files"]), list(m["classes"])


def write(beton: str | os.PathLike, manifest: dict, tmp_beton: str | os.PathLike) -> Path:
    """Write ``manifest`` for the .beton now at ``tmp_beton`` (id computed from it) and move both into
    place: the manifest first, the .beton last. A kill between the two renames leaves a manifest that
    does not match the old .beton, which ``read`` detects."""
    mf = manifest_path(beton)
    atomic_write_text(mf, json.dumps({**manifest, "beton_id": beton_id(tmp_beton)}, indent=1) + "\n")
    os.replace(tmp_beton, beton)
    return mf
