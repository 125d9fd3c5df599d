"""fastclr.zoo: released TF1 checkpoints (stand-ins written by TensorFlow with the official variable names
and shapes, tests/tf1_release.py) convert tensor for tensor, compute what TF computes, and go into
finetune / linear_eval / distill / export / eval / predict; bad inputs are one line."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastclr import checkpoint as ck
from fastclr.classifier import load_classifier, load_pretrained
from fastclr.models import build_backbone, build_model, model_kwargs
from fastclr.models.resnet import TFMaxPool3x3
from fastclr.zoo import catalog, cli
from fastclr.zoo.convert import imagenet_class_names
from fastclr.zoo.tf1 import import_tf

pytestmark = pytest.mark.e2e

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("TensorFlow not installed: pip install 'fastclr[tf]'", allow_module_level=True)
tf = import_tf()  # after torch._dynamo, as fastclr.zoo does (see import_tf)
REPO = Path(__file__).resolve().parents[1]
RELEASES = ("pretrained/r50_1x_sk0", "finetuned_1pct/r50_1x_sk0", "finetuned_1pct/r50_1x_sk1",
            "supervised/r50_1x_sk0")


@pytest.fixture(scope="session")
def releases(tmp_path_factory) -> Path:
    """tests/tf1_release.py's four release folders, written by TensorFlow in its own process."""
    root = tmp_path_factory.mktemp("releases")
    subprocess.run([sys.executable, str(REPO / "tests" / "tf1_release.py"), str(root)], check=True,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True)
    return root


@pytest.fixture(scope="session")
def converted(releases, tmp_path_factory) -> dict:
    """release -> its converted file, each written by the CLI's entry point."""
    out = tmp_path_factory.mktemp("converted")
    files = {}
    for rel in RELEASES:
        files[rel] = out / (rel.replace("/", "_") + ".pt")
        assert cli.main(["convert", str(releases / rel), str(files[rel])]) == 0
    return files


@pytest.fixture(scope="session")
def thousand_classes(tmp_path_factory) -> str:
    """An ImageFolder of 1000 class folders with one small JPEG each: the label space of ImageNet."""
    from PIL import Image
    root = tmp_path_factory.mktemp("in1k")
    rng = np.random.default_rng(0)
    for c in range(1000):
        (root / f"n{c:08d}").mkdir()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"n{c:08d}" / "a.jpg")
    return str(root)


def reference(releases, rel):
    return np.load(releases / rel / "reference.npz")


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- the table
def test_parameter_counts_match_the_release_table():
    """fastclr's backbone of every released architecture has the table's parameter count, within 1 %
    plus the table's own rounding to whole millions."""
    for r in catalog.V2 + catalog.V1:
        bb = build_backbone(r.depth, r.width, r.sk_ratio, device="meta")
        ours = sum(p.numel() for p in bb.parameters()) / 1e6
        assert abs(ours - r.params_m) <= 0.01 * r.params_m + 0.5, (r.name, ours, r.params_m)
    assert len(catalog.V2) == 13 and len(catalog.V2) * len(catalog.KINDS_V2) == 65


def test_list_prints_every_release_and_its_paths(capsys):
    assert cli.main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(catalog.RELEASES)
    r152 = next(r for r in rows if r["name"] == "r152_3x_sk1")
    assert r152["top1"]["ft_1pct"] == 74.9 and r152["params_m"] == 795 and abs(r152["fastclr_params_m"] - 795) < 1
    assert r152["paths"]["finetuned_1pct"] == "gs://simclr-checkpoints/simclrv2/finetuned_1pct/r152_3x_sk1"
    assert cli.main(["list", "r50_4x"]) == 0
    assert "gs://simclr-checkpoints/simclrv1/pretrain/4x/" in capsys.readouterr().out
    assert cli.main(["list", "r50_9x"]) == 2
    assert "no released model 'r50_9x'" in capsys.readouterr().err
    assert cli.markdown(rows) in (REPO / "docs" / "zoo.md").read_text(), "docs/zoo.md's table is stale: " \
        "python -m fastclr.zoo list --markdown"


# ----------------------------------------------------------------------------- conversion, exactly
@pytest.mark.parametrize("rel", RELEASES)
def test_every_tensor_lands_where_it_must(releases, converted, rel):
    """Each TF variable, read back by TensorFlow, equals (bit for bit, transposed as TF lays it out) the
    fastclr tensor the builder says it must become: convs, every BN's gamma/beta/moving statistics, the
    head, the classifier. Nothing is left over."""
    state = ck.load(converted[rel])
    expected = json.loads((releases / rel / "expected.json").read_text())
    reader = tf.train.load_checkpoint(str(next((releases / rel).glob("*.index"))).removesuffix(".index"))
    landed = set()
    for name, key in expected["online"].items():
        value = torch.from_numpy(reader.get_tensor(name))
        value = value.permute(3, 2, 0, 1) if value.ndim == 4 else value.t() if value.ndim == 2 else value
        got = state["classifier"][key[3:]] if key.startswith("fc.") else state["model"][key]
        assert torch.equal(got, value), (name, key)
        landed.add(key)
    assert landed >= {k for k in state["model"] if not k.endswith("num_batches_tracked")}
    assert state["arch"]["ft_proj_selector"] == expected["classifier_layer"]
    assert state["arch"]["num_classes"] == 1000 and state["arch"]["tf_maxpool"] is True
    z = state["zoo"]
    assert z["step"] == expected["step"] and z["weights"] == "online" and z["not_converted"] == []
    assert z["kind"] == rel.split("/")[0] and z["release"] == rel.split("/")[1]


@pytest.mark.parametrize("rel", RELEASES)
def test_converted_network_computes_what_tf_computed(releases, converted, rel):
    """Logits, backbone features and every projection-head layer equal TF's inference outputs on the
    same batch (computed by TensorFlow when the release was written, not by the conversion code)."""
    ref = reference(releases, rel)
    x = nchw(ref["x"])
    _, clf, _ = load_classifier(str(converted[rel]))
    _, sd, mcfg = load_pretrained(str(converted[rel]))
    net = build_model(**model_kwargs(mcfg))
    net.load_state_dict(sd)
    clf.eval(), net.eval()
    with torch.no_grad():
        logits = clf(x)
        layers = net.head(net.backbone(x), return_layers=True)
    for got, want in [(logits, ref["logits"]), *((layers[j], ref[f"layer{j}" if j else "h"]) for j in range(4))]:
        want = torch.from_numpy(want)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), float((got - want).abs().max())
    # torchvision's max-pool padding instead of TF's is not the same network
    clf.backbone.maxpool = torch.nn.MaxPool2d(3, 2, 1)
    with torch.no_grad():
        assert (clf(x) - torch.from_numpy(ref["logits"])).abs().max() > 1e-3


def test_tf_maxpool_is_tf_same_padding():
    for h, w in [(112, 112), (7, 8), (9, 9), (1, 2)]:
        x = torch.randn(2, 3, h, w)
        want = tf.nn.max_pool2d(x.permute(0, 2, 3, 1).numpy(), 3, 2, "SAME").numpy()
        assert torch.equal(TFMaxPool3x3()(x), torch.from_numpy(want).permute(0, 3, 1, 2)), (h, w)


def test_tf_eval_view_matches_tf1_preprocessing():
    """loaders.augment.geometry.tf_eval_view = TF1's convert_image_dtype, 0.875 centre crop and resize_bicubic."""
    from loaders.augment.geometry import tf_eval_view
    rng = np.random.default_rng(0)
    for H, W in [(375, 500), (500, 333), (61, 100), (224, 224)]:
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        t = tf.image.convert_image_dtype(tf.constant(img), tf.float32)
        side = min(H, W)
        c = int(np.rint(0.875 * side))
        crop = tf.image.crop_to_bounding_box(t, ((H - c) + 1) // 2, ((W - c) + 1) // 2, c, c)
        want = tf.clip_by_value(tf.compat.v1.image.resize_bicubic([crop], [224, 224])[0], 0.0, 1.0).numpy()
        assert np.abs(tf_eval_view(img, 224) - want.transpose(2, 0, 1)).max() < 1e-6, (H, W)


def test_ema_weights_and_the_default(releases, tmp_path, capsys):
    """A release with two encoders: auto takes the one its classifier reads (online here); --weights=ema
    converts the other copy, and leaves out the classifier, which was trained on the online one."""
    rel = "pretrained/r50_1x_sk0"
    out = tmp_path / "ema.pt"
    assert cli.main(["convert", str(releases / rel), str(out), "--weights=ema"]) == 0
    assert "classifier not converted: it reads the online encoder" in capsys.readouterr().out
    state = ck.load(out)
    assert "arch" not in state and "classifier" not in state and state["zoo"]["weights"] == "ema"
    expected = json.loads((releases / rel / "expected.json").read_text())["ema"]
    reader = tf.train.load_checkpoint(str(next((releases / rel).glob("*.index"))).removesuffix(".index"))
    for name, key in expected.items():
        value = torch.from_numpy(reader.get_tensor(name))
        value = value.permute(3, 2, 0, 1) if value.ndim == 4 else value.t() if value.ndim == 2 else value
        assert torch.equal(state["model"][key], value), name
    with pytest.raises(Exception, match="has no classifier"):
        load_classifier(str(out))


def test_the_graph_decides_the_classifier_layer(releases, tmp_path, capsys):
    """Without any graph the layer is asked for, never guessed; a stated layer that contradicts the
    graph is refused."""
    src = tmp_path / "finetuned_1pct" / "r50_1x_sk0"
    shutil.copytree(releases / "finetuned_1pct" / "r50_1x_sk0", src)
    assert cli.main(["convert", str(src), str(tmp_path / "a.pt"), "--classifier-input=backbone"]) == 2
    err = capsys.readouterr().err
    assert "the release's graph says the classifier reads head layer 1" in err and err.count("\n") == 1
    for f in list(src.glob("*.meta")) + [src / "graph.pbtxt"]:
        f.unlink()
    assert cli.main(["convert", str(src), str(tmp_path / "b.pt")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell which layer the classifier reads" in err and "--classifier-input" in err
    assert cli.main(["convert", str(src), str(tmp_path / "c.pt"), "--classifier-input=head1"]) == 0
    assert ck.load(tmp_path / "c.pt")["arch"]["ft_proj_selector"] == 1


def test_bad_sources_are_one_line(releases, tmp_path, converted, capsys):
    """What is not a release, or only part of one, or says another architecture than it holds."""
    good = releases / "supervised" / "r50_1x_sk0"
    partial = tmp_path / "partial" / "r50_1x_sk0"
    shutil.copytree(good, partial)
    data = next(partial.glob("*.data-*"))
    renamed = tmp_path / "supervised" / "r101_2x_sk1"
    shutil.copytree(good, renamed)
    truncated = tmp_path / "truncated" / "r50_1x_sk0"
    shutil.copytree(good, truncated)
    tdata = next(truncated.glob("*.data-*"))
    tdata.write_bytes(tdata.read_bytes()[: tdata.stat().st_size // 3])
    saved = tmp_path / "tf2" / "saved_model"
    saved.mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"x")
    empty = tmp_path / "empty"
    empty.mkdir()
    data.unlink()
    cases = [
        (tmp_path / "missing", "no such file or folder"),
        (empty, "holds no TF checkpoint"),
        (partial, "partial download"),
        (renamed, "the folder r101_2x_sk1 says r101_2x_sk1, but the checkpoint's variables are r50_1x_sk0"),
        (truncated, "truncated"),
        (saved, "is a TF2 SavedModel"),
        (converted["supervised/r50_1x_sk0"], "is not a TF checkpoint"),
    ]
    for i, (src, msg) in enumerate(cases):
        if i in (0, 3):  # the real command: before TF is imported, and after (its startup lines silenced)
            r = subprocess.run([sys.executable, "-m", "fastclr.zoo", "convert", str(src), str(tmp_path / "o.pt")],
                               capture_output=True, text=True)
            code, err = r.returncode, r.stderr
        else:
            code, err = cli.main(["convert", str(src), str(tmp_path / "o.pt")]), capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and msg in lines[0], (src, err)
    assert not (tmp_path / "o.pt").exists()
    assert cli.main(["convert", str(good), str(converted["supervised/r50_1x_sk0"])]) == 2  # OUT exists


# ----------------------------------------------------------------------------- downstream
TINY = ["--data.image_size=32", "--data.num_workers=2", "--optim.global_batch_size=8", "--run.progress=false",
        "--run.log_every=1", "--run.max_steps=2"]


def test_finetune_linear_eval_and_export_take_a_converted_release(converted, image_folder, tmp_path):
    from fastclr import export, finetune, linear_eval
    pre = str(converted["pretrained/r50_1x_sk0"])
    assert finetune.main([f"--ckpt={pre}", f"--data.path={image_folder}",
                          f"--run.out_dir={tmp_path / 'ft'}", *TINY]) == 0
    best = ck.load(tmp_path / "ft" / "best.pt")
    assert best["arch"]["ft_proj_selector"] == 1 and best["arch"]["tf_maxpool"] is True  # the paper's cut
    start = ck.load(converted["pretrained/r50_1x_sk0"])["model"]["head.layers.0.linear.weight"]
    after = best["model"]["neck.0.linear.weight"]  # two steps from the converted head layer 1
    assert torch.nn.functional.cosine_similarity(after.flatten(), start.flatten(), 0) > 0.9
    assert linear_eval.main([f"--ckpt={pre}", f"--data.path={image_folder}",
                             f"--run.out_dir={tmp_path / 'le'}", "--data.image_size=32",
                             "--optim.global_batch_size=8", "--run.progress=false", "--run.max_steps=2"]) == 0
    assert ck.load(tmp_path / "le" / "best.pt")["arch"]["tf_maxpool"] is True
    assert export.main([str(converted["finetuned_1pct/r50_1x_sk0"]), str(tmp_path / "tv.pt")]) == 0
    import torchvision
    m = torchvision.models.resnet50()
    m.fc = torch.nn.Identity()
    m.load_state_dict(torch.load(tmp_path / "tv.pt", weights_only=True))


def test_distill_from_a_converted_teacher(converted, thousand_classes, tmp_path):
    """The paper's step 3 from a released fine-tuned model: its 1000 outputs are the labels' space."""
    from fastclr import distill
    teacher = str(converted["finetuned_1pct/r50_1x_sk1"])
    assert distill.main(["demo_distill", f"--teacher={teacher}", f"--data.path={thousand_classes}",
                         f"--run.out_dir={tmp_path / 'st'}", *TINY]) == 0
    recs = [json.loads(ln) for ln in (tmp_path / "st" / "log.jsonl").read_text().splitlines()]
    assert recs[-1]["event"] == "done" and recs[-1]["step"] == 2 and recs[-1]["teacher"] == teacher


def test_eval_and_predict(converted, thousand_classes, tmp_path, capsys):
    """eval's top-1 is the classifier's argmax on TF's eval views, counted independently here; predict
    names ImageNet classes."""
    from fastclr.zoo.evaluate import labelled_samples
    from loaders.sources.decode import read_rgb
    from loaders.augment.geometry import tf_eval_view
    ckpt = str(converted["supervised/r50_1x_sk0"])
    out = tmp_path / "eval.json"
    assert cli.main(["eval", ckpt, f"--data.path={thousand_classes}", "--limit=40", "--image-size=64",
                     "--workers=2", "--quiet", f"--out={out}"]) == 0
    res = json.loads(out.read_text())
    samples, _ = labelled_samples(thousand_classes, None)
    picked = samples[:: len(samples) // 40][:40]
    _, model, _ = load_classifier(ckpt)
    x = torch.stack([torch.from_numpy(tf_eval_view(read_rgb(p), 64)) for p, _ in picked])
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    want = 100.0 * float((pred == torch.tensor([y for _, y in picked])).float().mean())
    assert res["images"] == 40 and abs(res["top1"] - want) < 1e-6
    capsys.readouterr()
    assert cli.main(["predict", ckpt, picked[0][0], "--image-size=64", "--top-k=3", "--json", "--workers=0"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got) == 1 and len(got[0]["top"]) == 3 and int(pred[0]) == got[0]["top"][0]["class"]
    names = imagenet_class_names()
    assert got[0]["top"][0]["name"] == names[int(pred[0])] and names[0] == "tench"
    assert cli.main(["eval", ckpt, f"--data.path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no class folders" in err and err.count("\n") == 1
