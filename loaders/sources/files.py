"""Files every part of fastclr writes or reads: atomic writes, and list files of ``relpath [label]`` lines.

* **Atomic writes.** A file is written as ``NAME.tmp``, flushed and fsynced, then renamed over NAME
  (``os.replace``), so a crash or a full disk never leaves a half-written file under the real name;
  a failed write removes its ``.tmp``.
* **List files** (``data.file_list``, ``loaders.validate``'s clean list, ``loaders.subsets``' output,
  the official SimCLR 1 %/10 % lists): one image per line, ``relative/path [label]``; blank lines and
  ``#`` comments are skipped. The label is the last space-separated field when it is an integer, so
  paths may contain spaces; they may not contain line breaks (see ``common.bad_name_reason``).

``loaders`` never imports ``fastclr``: these helpers live here so that both can use them.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator, List, Optional, Sequence, Tuple

Entry = Tuple[str, Optional[int]]  # (path as written in the list, label or None)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: the file appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def parse_list_line(line: str) -> Optional[Entry]:
    """``relpath [label]`` -> (relpath, label or None); None for a blank or comment line."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = line.rsplit(maxsplit=1)
    if len(parts) == 2 and parts[1].lstrip("-").isdigit():
        return parts[0], int(parts[1])
    return line, None


def read_list(path: str | os.PathLike) -> List[Entry]:
    """Every entry of a list file, in order."""
    return [e for e in map(parse_list_line, Path(path).read_text().splitlines()) if e is not None]


def count_list(path: str | os.PathLike) -> int:
    """Entries in a list file."""
    return len(read_list(path))


def write_list(entries: Sequence[Tuple[str, int]], path: str | os.PathLike) -> str:
    """Write ``relpath label`` lines atomically; returns the path. A path that would not read back as
    one entry (a line break, leading/trailing blanks) is a ValueError naming it."""
    bad = next((rel for rel, _ in entries if rel != rel.strip() or "\n" in rel or "\r" in rel), None)
    if bad is not None:
        raise ValueError(f"path {bad!r} cannot be written to a list file (one path per line)")
    atomic_write_text(path, "".join(f"{rel} {label}\n" for rel, label in entries))
    return str(path)
