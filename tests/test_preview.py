"""python -m loaders.preview: the grid of originals and augmented views per backend, and captions that
are the parameters the views were made with (torch: computed here and equal to the torch loader's first
batch; FFCV: recomputed from its per-sample streams; DALI: what is knowable)."""
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import loaders
import loaders.sampling
from loaders import augment, preview
from loaders.config import LoaderConfig
from loaders.sampling import colour_generator, geometry_rng

pytest.importorskip("matplotlib", reason="matplotlib not installed: pip install 'fastclr[plot]'")
ROOT = Path(__file__).resolve().parents[1]
N, SIZE, SEED = 3, 32, 5


def png_size(path) -> tuple[int, int]:
    from PIL import Image
    with Image.open(path) as im:
        return im.size


def grid_size(n: int, k: int = 2) -> tuple[int, int]:
    return (round(preview.CELL_W * (1 + k) * preview.DPI),
            round((preview.HEAD + n * (preview.NAME + preview.IMG + preview.TEXT)) * preview.DPI))


@pytest.fixture(scope="module")
def torch_preview(image_folder):
    cfg = LoaderConfig(path=image_folder, image_size=SIZE, seed=SEED)
    return cfg, preview.make_preview(cfg, N)


def test_torch_views_are_the_torch_loaders_first_batch(torch_preview):
    cfg, pv = torch_preview
    ld = loaders.build(replace(cfg, batch_size=N, num_workers=0, train=True))
    ld.set_epoch(0)
    batch = next(iter(ld))
    want = preview._uint8_views(batch.views, N)
    assert pv.views.shape == (N, 2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(pv.views, want)


def test_captions_are_the_params_the_views_were_made_with(torch_preview):
    cfg, pv = torch_preview
    spec, K = pv.spec, pv.spec.num_views
    # The colour parameters: the batch's one draw, view-major (view k of image i is row k*N + i).
    p = augment.sample_photometric_params(K * N, spec, colour_generator(SEED, 0, 0, 0, "cpu"))
    # The geometry: slot pos's own stream, boxes then flips (augment.geometry's order).
    samples, _ = loaders.list_image_folder(cfg.path)
    order = loaders.sampling.shard_indices(len(samples), 0, 1, 0, SEED, True)
    for i in range(N):
        img = augment.to_rgb_uint8(np.asarray(preview._decoded(samples[order[i]][0])))
        rng = geometry_rng(SEED, 0, 0, i)
        boxes = augment.sample_crop_boxes(img.shape[0], img.shape[1], K, spec.crop, rng)
        flips = rng.random(K) < 0.5
        for k in range(K):
            got, row = pv.params[i][k], k * N + i
            assert got.box == tuple(boxes[k]) and got.flip == bool(flips[k])
            c = got.colour
            assert c["jitter"] == bool(p["jitter"][row]) and c["gray"] == bool(p["gray"][row])
            want_ops = [preview.NAMES[o] for o in p["order"][row].tolist() if o >= 0]
            assert [name for name, _ in c["ops"]] == want_ops
            for name, v in c["ops"]:
                assert v == pytest.approx(p[name][row].item())
            assert (c["sigma"] is None) == (not p["blur"][row])
            # ... and the caption prints those numbers.
            text = preview.caption(k, got, spec)
            assert "(y0,x0,h,w)=({},{},{},{})".format(*boxes[k]) in text
            assert f"flip: {'yes' if flips[k] else 'no'}" in text
            if p["blur"][row]:
                assert f"blur: sigma {p['sigma'][row].item():.2f}" in text
            for name, v in c["ops"]:
                assert (f"hue {v:+.3f}" if name == "hue" else f"{name} x{v:.2f}") in text.replace("\n        ", " ")
            if not p["jitter"][row]:
                assert "jitter: off" in text


def test_the_views_follow_from_the_captioned_params(torch_preview):
    """Re-applying each caption's crop box, flip and colour parameters to the original gives the view."""
    _, pv = torch_preview
    spec, K = pv.spec, pv.spec.num_views
    p = augment.sample_photometric_params(K * N, spec, colour_generator(SEED, 0, 0, 0, "cpu"))
    crops = np.stack([augment.crop_resize(pv.originals[i], np.array([pv.params[i][k].box for k in range(K)]),
                                          SIZE, spec.crop.interpolation,
                                          np.array([pv.params[i][k].flip for k in range(K)])) for i in range(N)])
    x = torch.from_numpy(crops).permute(1, 0, 4, 2, 3).reshape(K * N, 3, SIZE, SIZE).float().mul_(1.0 / 255.0)
    y = augment.photometric(x, spec, params=p, mode="subset")
    again = preview._uint8_views(list(y.split(N)), N)
    np.testing.assert_array_equal(again, pv.views)


def test_grid_png(image_folder, tmp_path, capsys):
    out = tmp_path / "views.png"
    assert preview.main([f"--data.path={image_folder}", f"--data.image_size={SIZE}", "-n", "2", "--seed", "1",
                         "--out", str(out)]) == 0
    assert png_size(out) == grid_size(2)
    assert "wrote" in capsys.readouterr().out


def test_bad_input_is_one_line(image_folder, tmp_path, capsys):
    cases = [([f"--data.path={image_folder}", "--data.imag_size=32"], "did you mean --data.image_size?"),
             ([f"--data.path={image_folder}", "--data.image_size=big"], "--data.image_size: expected int"),
             ([f"--data.path={image_folder}", "--data.image_size=0"], "must be >= 1"),
             ([f"--data.path={image_folder}", "--data.backend=tf"], "is not one of torch, dali, ffcv"),
             ([f"--data.path={tmp_path / 'none'}"], "not found"),
             ([f"--data.path={image_folder}", "-n", "1000"], "more than the 24 images"),
             ([f"--data.path={image_folder}", "stray"], "unexpected argument"),
             ([f"--data.path={image_folder}", "--seed", "-1"], "--seed must be >= 0"),
             ([f"--data.path={image_folder}", "--data.seed=2"], "unknown option --data.seed")]
    for args, msg in cases:
        assert preview.main(args + ["--out", str(tmp_path / "x.png")]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err and err.startswith(preview.PROG), (args, err)


@pytest.mark.e2e
def test_help_and_no_fastclr_import():
    code = ("import sys, loaders.preview as p; p.build_parser().format_help(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'fastclr'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip() == "[]", r.stdout
    text = preview.build_parser().format_help()
    for word in ("--data.backend", "--data.image_size", "-n N", "--seed", "--out", "DALI", "FFCV", "crop"):
        assert word in text, word


def test_dali_grid(dali_contract_data, tmp_path):
    """DALI draws its crops and flips inside its pipeline: the captions say so; with the torch photometry
    the colour parameters are the shared stream's first draw."""
    d = dali_contract_data
    cfg = LoaderConfig(backend="dali", path=d["path"], file_list=d["file_list"], image_size=SIZE, seed=SEED,
                       num_workers=1, dali_photometry="torch")
    pv = preview.make_preview(cfg, 2)
    assert pv.views.shape == (2, 2, SIZE, SIZE, 3) and len(pv.originals) == 2
    assert all(v.box is None and v.flip is None for row in pv.params for v in row)
    p = augment.sample_photometric_params(4, pv.spec, colour_generator(SEED, 0, 0, 0, "cpu"))
    assert pv.params[1][1].colour == preview.colour_params(p, 3, pv.spec)
    assert "crop drawn by the backend" in preview.caption(0, pv.params[0][0], pv.spec)
    out = tmp_path / "dali.png"
    assert preview.main([f"--data.path={d['path']}", f"--data.file_list={d['file_list']}", "--data.backend=dali",
                         f"--data.image_size={SIZE}", "--data.num_workers=1", "-n", "2", "--out", str(out)]) == 0
    assert png_size(out) == grid_size(2)
    assert preview.caption(0, preview.ViewParams(None, None, None), pv.spec).endswith("colour: drawn by the backend")


def test_ffcv_boxes_are_the_crops_ffcv_cut(ffcv_contract_data, tmp_path):
    """FFCV's crops, recomputed from its per-sample streams, cut the view out of the stored image
    (fine-tuning recipe: no colour ops, so the view is the crop)."""
    cv2 = pytest.importorskip("cv2")
    d = ffcv_contract_data
    cfg = LoaderConfig(backend="ffcv", path=str(d["path"]), image_size=SIZE, seed=SEED, num_workers=1,
                       augment="finetune")
    pv = preview.make_preview(cfg, N)
    assert pv.views.shape == (N, 1, SIZE, SIZE, 3)
    for i in range(N):
        y0, x0, h, w = pv.params[i][0].box
        want = cv2.resize(pv.originals[i][y0:y0 + h, x0:x0 + w], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        if pv.params[i][0].flip:
            want = want[:, ::-1]
        diff = np.abs(want.astype(int) - pv.views[i, 0].astype(int))
        assert diff.mean() < 2, (i, diff.mean())  # the same pixels, up to the JPEG decoders' rounding
    out = tmp_path / "ffcv.png"
    assert preview.draw(pv, out) == grid_size(N, 1)
    assert png_size(out) == grid_size(N, 1)
