"""Your own images: folders in any layout without labels (flat, nested, class folders) for pretraining and
distillation in every backend, one-line errors where labels are needed, the online k-NN while
pretraining runs, and the README's walkthrough run as written."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loaders
from loaders.base import resolve_samples
from loaders.config import DataConfig, loader_config
from loaders.sources.folders import list_image_folder, read_file_list, scan_images

ROOT = Path(__file__).resolve().parents[1]


def digest(path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def listing(path, labels=False, **kw):
    cfg = loader_config(DataConfig(path=str(path), **kw), batch_size=8, labels=labels)
    return resolve_samples(cfg)


def test_every_layout_lists_the_same_images_once_without_labels(image_folder, flat_folder, nested_folder):
    """Flat, nested (with a symlink loop and a second link to one folder) and class folders list the
    same 24 images (by content), each once, all labelled -1, in a deterministic order; the class-folder
    tree lists in the labelled order; the line for the user names what was left out and why."""
    want = {digest(p) for p, _ in list_image_folder(image_folder)[0]}
    assert len(want) == 24
    for root in (image_folder, flat_folder, nested_folder):
        got = listing(root)
        assert [lab for _, lab in got.samples] == [-1] * 24 and got.classes == [], root
        assert {digest(p) for p, _ in got.samples} == want, root
        assert got.samples == listing(root).samples
    assert [p for p, _ in listing(image_folder).samples] == [p for p, _ in list_image_folder(image_folder)[0]]
    note = listing(nested_folder).note
    assert note.startswith(f"24 images in {nested_folder}") and "1 not an image (notes.txt)" in note, note
    assert "2 symlink not followed (cam1_again, 2021/up)" in note, note
    assert "notes.txt" in listing(flat_folder).note
    # Unlabelled list files: any paths under the root, labels ignored.
    lst = Path(flat_folder).parent / "flat_list.txt"
    lst.write_text("img003.jpg\nimg001.jpg 2\n")
    samples, classes = read_file_list(lst, flat_folder, labels=False)
    assert samples == [(os.path.join(flat_folder, "img003.jpg"), -1), (os.path.join(flat_folder, "img001.jpg"), -1)]
    assert classes == [] and listing(flat_folder, file_list=str(lst)).note.startswith("2 images listed")


def test_data_without_labels_is_refused_where_labels_are_needed(flat_folder, tmp_path):
    """Labelled loaders on a flat folder name the layout they need; an empty folder says so."""
    with pytest.raises(FileNotFoundError, match=r"no class folders in .*root/<class>/<image>"):
        listing(flat_folder, labels=True)
    empty = tmp_path / "empty"
    (empty / "a" / "b").mkdir(parents=True)
    (empty / "a" / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no images .* left out: 1 not an image \(a/readme.md\)"):
        listing(empty)
    assert scan_images(empty).paths == []


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


@pytest.mark.e2e
def test_bad_layouts_are_one_line(flat_folder, image_folder, tmp_path, call):
    """Every command a user can point at an unlabelled folder where labels are needed answers in one line
    that says which layout it needs; so does a class-based selection of unlabelled data."""
    from fastclr import finetune, linear_eval, pretrain
    from loaders import write_ffcv
    fake = ROOT / "tests" / "no_such.pt"
    cases = [
        (finetune.main, ["demo_10pct", f"--ckpt={fake}", f"--data.path={flat_folder}"], "class folders"),
        (linear_eval.main, ["demo_10pct", f"--ckpt={fake}", f"--data.path={flat_folder}"], "class folders"),
        (pretrain.main, ["demo_cpu", f"--data.path={flat_folder}", f"--run.val_path={image_folder}",
                         f"--run.out_dir={tmp_path / 'p'}", "--optim.global_batch_size=8"], "--run.knn_bank=val"),
        (pretrain.main, ["demo_cpu", f"--data.path={image_folder}", f"--run.val_path={flat_folder}",
                         f"--run.out_dir={tmp_path / 'q'}", "--optim.global_batch_size=8"],
         "run.val_path's class folders"),
        (write_ffcv.main, [flat_folder, tmp_path / "x.beton", "--unlabeled", "--fraction=0.5"],
         "--unlabeled data has none"),
        (write_ffcv.main, [flat_folder, tmp_path / "x.beton"], "class folders"),
    ]
    for main, args, what in cases:
        code, out, err = call(main, args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1, (args, code, out[-1500:], err[-1500:])
        line = lines[0]
        assert what in line, (args, line)
        assert "root/<class>/<image>" in line or "unlabeled" in line or "knn_bank" in line, line
    assert not (tmp_path / "x.beton").exists()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finetune.py-style teacher of the 4 fixture classes (random weights: distillation only needs outputs)."""
    from test_distill import teacher_run
    return teacher_run(tmp_path_factory.mktemp("teacher"), None)


TOY = ["--data.image_size=32", "--optim.global_batch_size=8", "--run.progress=false", "--run.log_every=1",
       "--data.num_workers=1"]


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
def test_pretrain_and_distill_on_a_flat_folder(backend, flat_folder, image_folder, teacher, tmp_path, call):
    """Pretraining on the flat folder (no labels) in each backend: FFCV after the converter's --unlabeled
    (its manifest says labeled: false, and a labelled loader refuses it). Distillation reads the same
    listing in every backend: it runs once, with the default backend."""
    from fastclr import distill, pretrain
    from loaders import write_ffcv
    ok, why = loaders.available(backend)
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {why}")
    data = flat_folder
    if backend == "ffcv":
        data = tmp_path / "flat.beton"
        code, out, err = call(write_ffcv.main, [flat_folder, data, "--unlabeled", "--quiet", "--workers=1"])
        assert code == 0 and "wrote 24 images" in out and "no labels" in out, err
        m = json.loads((tmp_path / "flat.manifest.json").read_text())
        assert m["labeled"] is False and m["classes"] == [] and len(m["files"]) == 24
        with pytest.raises(ValueError, match="converted with --unlabeled, and this needs labels"):
            loaders.build(loader_config(DataConfig(backend="ffcv", path=str(data)), batch_size=8), device="cpu")
    common = TOY + [f"--data.backend={backend}", f"--data.path={data}"]
    code, out, err = call(pretrain.main, ["demo_cpu", *common, "--run.max_steps=2",
                                           f"--run.out_dir={tmp_path / 'pre'}", "--run.knn_eval=false"])
    assert code == 0, err[-3000:]
    if backend != "ffcv":
        assert "24 images in" in out and "1 not an image (notes.txt)" in out, out
    recs = [json.loads(ln) for ln in (tmp_path / "pre" / "log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in recs if "loss" in x]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    if backend != "torch":
        return
    code, out, err = call(distill.main, ["demo_distill", f"--teacher={teacher}", *common, "--run.max_steps=2",
                                          f"--run.val_path={image_folder}", "--run.eval_batch_size=24",
                                          f"--run.out_dir={tmp_path / 'st'}"])
    assert code == 0, err[-3000:]
    recs = [json.loads(ln) for ln in (tmp_path / "st" / "log.jsonl").read_text().splitlines()]
    assert recs[-1]["event"] == "done" and any(x.get("event") == "eval" for x in recs)


@pytest.mark.e2e
def test_online_knn_records_at_the_asked_cadence_and_match_the_final_knn(flat_folder, image_folder, tmp_path, call):
    """run.knn_every=0.5 with 3 steps per epoch: an eval record every 2 steps (2, 4, 6), in log.jsonl,
    TensorBoard and fastclr.plot's val panel; with the online sizes equal to the final ones, the last
    online top-1 is the final k-NN's on the same weights."""
    from fastclr import plot, pretrain
    out = tmp_path / "run"
    sizes = ["--run.knn_online_train_size=12", "--run.knn_online_val_size=12", "--run.knn_train_size=12",
             "--run.knn_val_size=12", "--run.probe_labels_per_class=0"]
    code, stdout, err = call(pretrain.main, ["demo_cpu", *TOY, f"--data.path={flat_folder}",
                                              f"--run.val_path={image_folder}", "--run.knn_bank=val",
                                              "--run.knn_every=0.5", "--optim.epochs=2", *sizes,
                                              "--run.tensorboard=true", f"--run.out_dir={out}"])
    assert code == 0, err[-3000:]
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    evals = [x for x in recs if x.get("event") == "eval"]
    assert [x["step"] for x in evals] == [2, 4, 6] and all(x["metric"] == "k-NN" for x in evals)
    assert all(x["knn_bank"] == 12 and x["val_images"] == 12 and 0 <= x["top1"] <= 100 for x in evals)
    done = recs[-1]
    assert done["event"] == "done" and round(100 * done["knn_top1"], 3) == evals[-1]["top1"]
    assert 0 < done["knn_online_seconds"] < done["train_seconds"]
    assert re.search(r"step 4 \(epoch 1.333\): k-NN top-1 \d+\.\d\d%", stdout), stdout
    assert "online k-NN:" in stdout
    panel = plot.series(plot.read_log(out / "log.jsonl")[0], [("eval", "top1")])
    assert panel is not None and panel[1] == [2, 4, 6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(out)).Reload()
    assert [e.step for e in tb.Scalars("eval/top1")] == [2, 4, 6]


def split_labelled(image_folder, root: Path) -> None:
    """labelled/train and labelled/val: 3 images of each fixture class in each."""
    for c in sorted(os.listdir(image_folder)):
        for i, name in enumerate(sorted(os.listdir(os.path.join(image_folder, c)))):
            dest = root / ("train" if i < 3 else "val") / c
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(image_folder, c, name), dest / name)


def readme_walkthrough() -> list[str]:
    """The commands of the README's "Your own images" block, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own images", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


# Toy size for the walkthrough's commands: small batches and few steps on the 24-image fixture.
WALK_TOY = {
    "pretrain.py": ["--optim.global_batch_size=8", "--optim.epochs=2", "--run.knn_every=1",
                    "--run.probe_labels_per_class=1"],
    "finetune.py": ["--optim.global_batch_size=4", "--optim.epochs=2", "--run.eval_batch_size=12"],
    "distill.py": ["--optim.global_batch_size=8", "--optim.epochs=1", "--run.eval_batch_size=12"],
}


@pytest.mark.e2e
def test_readme_walkthrough_runs_as_written(image_folder, flat_folder, nested_folder, tmp_path):
    """The README's commands, in a folder holding photos/ (flat images beside a nested tree with a
    symlink loop) and labelled/{train,val}: each exits 0, at toy size (WALK_TOY appended)."""
    cmds = readme_walkthrough()
    assert [c.split()[1] for c in cmds] == ["fastclr/pretrain.py", "fastclr/finetune.py", "fastclr/distill.py",
                                            "-m"], cmds
    shutil.copytree(flat_folder, tmp_path / "photos")
    shutil.copytree(nested_folder, tmp_path / "photos" / "more", symlinks=True)
    split_labelled(image_folder, tmp_path / "labelled")
    os.symlink(ROOT / "fastclr", tmp_path / "fastclr")
    for cmd in cmds:
        args = cmd.split()[1:]
        r = cli(*args, *WALK_TOY.get(Path(args[0]).name, []), cwd=tmp_path)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
        if "pretrain.py" in cmd:
            assert "48 images in photos" in r.stdout and "k-NN top-1" in r.stdout, r.stdout
    assert (tmp_path / "photos_backbone.pt").is_file()
    sd = torch.load(tmp_path / "photos_backbone.pt", weights_only=True)
    assert "conv1.weight" in sd and not any(k.startswith("fc.") for k in sd)
