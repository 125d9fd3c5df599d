"""Regenerate docs/images/preview_fixture.png, the README's example of ``python -m loaders.preview``:
4 textured RGB JPEGs from ``loaders.sources.synthetic`` (ImageNet-like sizes), the torch backend's SimCLR views at
224 px, seed 0. Run from the repository root: ``python docs/images/preview_fixture.py``.

The grid is stored as a 256-colour, dithered PNG at 75 dpi (a 224 px view is 225 px on screen): the
synthetic textures are noise-rich, and the full-colour file would weigh ~1 MB in the repository."""
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from PIL import Image

from loaders.sources import synthetic
from loaders import preview

OUT = ROOT / "docs" / "images" / "preview_fixture.png"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.make_image_folder(Path(tmp) / "images", num_classes=2, per_class=2, seed=0)
        full = Path(tmp) / "full.png"
        rc = preview.main([f"--data.path={Path(tmp) / 'images'}", "--data.image_size=224", "-n", "4",
                           "--seed", "0", "--dpi", "75", "--out", str(full)])
        if rc:
            return rc
        im = Image.open(full).convert("RGB")
        palette = im.quantize(256, method=Image.Quantize.MEDIANCUT)
        im.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
