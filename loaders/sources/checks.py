"""Is an image file usable: one check for the loaders' CPU decoder (``check_file``: read, decode, warn
about odd files) and one for DALI's (``DaliChecker``). ``python -m loaders.validate`` runs them over a
folder; the DALI backend names a file it cannot decode with them; the FFCV converter skips what
``check_file`` refuses."""
from __future__ import annotations

import io
import os
import re
from typing import Dict, Optional, Sequence, Tuple

from .decode import decode_rgb

TINY_SIDE = 8                  # a side under this many pixels: warn (random crops of it are blurry mush)
HUGE_PIXELS = 20_000_000       # more pixels than this: warn (slow to decode, large decoder buffers)
JPEG_EXT = (".jpg", ".jpeg")


def check_file(path: str) -> Tuple[Optional[str], Optional[str]]:
    """(error, warning) for one file; error None means the whole image decoded with the loaders'
    decoder (``loaders.sources.decode.decode_rgb``: OpenCV, then PIL, whose error is the reason given)."""
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
