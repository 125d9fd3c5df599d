"""--run.tensorboard=true: the run log (runtime.RunLog) writes the records of log.jsonl as TensorBoard
scalars beside it, for the trainer's entry points and linear_eval's fast path; without the package the
option is a one-line error before any work."""
import json
import sys
from pathlib import Path

import pytest

from fastclr import linear_eval, pretrain, runtime

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard not installed: pip install 'fastclr[tensorboard]'")

# A tiny, fast pretraining on the fixture folder: R18 with the CIFAR stem at 32px, batch 8.
TINY = ["demo_cpu", "--data.image_size=32", "--data.num_workers=0", "--optim.global_batch_size=8",
        "--optim.warmup_epochs=0", "--run.knn_eval=false", "--run.progress=false", "--run.log_every=1"]


def scalars(run_dir) -> dict:
    """tag -> [(step, value)] of every event file in run_dir."""
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def records(run_dir) -> list:
    return [json.loads(line) for line in Path(run_dir, "log.jsonl").read_text().splitlines()]


def test_pretrain_writes_the_logged_scalars(tmp_path, image_folder):
    out = tmp_path / "run"
    assert pretrain.main(TINY + [f"--data.path={image_folder}", f"--run.out_dir={out}", "--run.max_steps=3", "--optim.epochs=1",
                                 "--run.tensorboard=true"]) == 0
    assert list(out.glob("events.out.tfevents.*")), "no event file beside log.jsonl"
    got = scalars(out)
    for key in ("loss", "contrastive_acc", "lr", "images_per_s", "data_wait", "gpu_mem_gb", "epoch"):
        assert [s for s, _ in got[f"train/{key}"]] == [1, 2, 3], key
    logged = [r for r in records(out) if "event" not in r]
    assert [v for _, v in got["train/loss"]] == pytest.approx([r["loss"] for r in logged])
    assert got["done/final_loss"] == [(3, pytest.approx(logged[-1]["loss"]))]
    # Strings, bools and None stay in log.jsonl only.
    assert not any(t.endswith(("/checkpoint", "/time", "/step", "/event")) for t in got)


def test_linear_eval_fast_path_writes_eval_scalars(tmp_path, image_folder):
    out = tmp_path / "lin"
    rc = linear_eval.main(["--raw_pixels=true", f"--data.path={image_folder}", f"--run.val_path={image_folder}",
                           "--data.image_size=16", "--data.num_workers=0", "--optim.global_batch_size=8",
                           "--optim.epochs=2", "--run.log_every=1", "--run.progress=false",
                           f"--run.out_dir={out}", "--run.tensorboard=true"])
    assert rc == 0
    got = scalars(out)
    evals = [r for r in records(out) if r.get("event") == "eval"]
    assert [s for s, _ in got["eval/top1"]] == [r["step"] for r in evals] and evals
    assert [v for _, v in got["eval/top5"]] == pytest.approx([r["top5"] for r in evals])
    assert [s for s, _ in got["train/train_acc"]] == [1, 2, 3, 4, 5, 6]  # 24 images / 8, 2 epochs


def test_missing_package_is_one_line_naming_the_extra(tmp_path, image_folder, monkeypatch, capsys):
    # What an environment without tensorboard sees: the import fails.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        pretrain.main(TINY + [f"--data.path={image_folder}", f"--run.out_dir={out}", "--run.max_steps=1",
                              "--run.tensorboard=true"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fastclr[tensorboard]" in err and "Traceback" not in err, err
    assert not out.exists(), "the run started before the check"


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-write
    log = runtime.RunLog(tmp_path)
    log.write(step=2, loss=1.5)
    log.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 2, "lo' and json.loads(lines[2])["loss"] == 1.5


def test_overwrite_removes_the_old_event_files(tmp_path, image_folder):
    """A fresh run with --run.overwrite=true starts a clean TensorBoard history, as it does log.jsonl."""
    from fastclr import config as C
    from fastclr import presets
    out = tmp_path / "run"
    out.mkdir()
    old = [out / "events.out.tfevents.1.host.1.0", out / "log.jsonl"]
    for f in old:
        f.write_text("an old run's\n")
    cfg = C.parse_into(C.PretrainConfig(), TINY + [f"--data.path={image_folder}", f"--run.out_dir={out}",
                                                   "--run.overwrite=true", "--run.tensorboard=true"],
                       presets.PRETRAIN)
    runtime.start_run(cfg)
    assert not any(f.exists() for f in old)
