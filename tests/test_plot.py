"""python -m fastclr.plot: curves from log.jsonl files, including a run killed mid-line, a run resumed
after a kill (repeated steps) and runs that lack some metrics; bad input is one line, exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastclr import plot

pytest.importorskip("matplotlib", reason="matplotlib not installed: pip install 'fastclr[plot]'")
ROOT = Path(__file__).resolve().parents[1]


def write_log(run_dir: Path, records, tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run_dir / "log.jsonl").write_text(text)
    return run_dir


def train(step, loss, **kw):
    return {"step": step, "epoch": 0, "loss": loss, "lr": 0.1 * step, "images_per_s": 300.0 + step,
            "data_wait": 0.02, "gpu_mem_gb": 0.0, "time": 1.0 + step, **kw}


@pytest.fixture
def pretrain_run(tmp_path):
    """Steps 1-4, killed after step 4 mid-line; resumed from the checkpoint at step 2: steps 3-4 are
    logged again (other values), then 5; the resumed run is killed mid-line again."""
    first = [train(s, 10.0 - s, contrastive_acc=0.1 * s) for s in (1, 2, 3, 4)]
    resumed = [train(s, 5.0 - s / 10, contrastive_acc=0.2 * s) for s in (3, 4, 5)]
    return write_log(tmp_path / "pretrain", first + [{"event": "first_step", "step": 3, "seconds": 1.2}]
                     + resumed, tail='{"step": 6, "epoch": 0, "lo')


def test_read_log_keeps_the_last_record_per_step_and_skips_the_torn_line(pretrain_run):
    recs, bad = plot.read_log(pretrain_run / "log.jsonl")
    assert bad == 1
    assert [r["step"] for r in recs["train"]] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in recs["train"]][2:] == [4.7, 4.6, 4.5]  # the resumed run's
    assert recs["eval"] == []


def test_a_record_glued_to_a_fragment_is_recovered(tmp_path):
    run = write_log(tmp_path / "r", [train(1, 2.0)])
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 2, "lo' + json.dumps(train(2, 1.0)) + "\n")
    recs, bad = plot.read_log(run / "log.jsonl")
    assert bad == 0 and [r["loss"] for r in recs["train"]] == [2.0, 1.0]


def test_one_run_default_out(pretrain_run, capsys):
    from matplotlib.image import imread
    assert plot.main([str(pretrain_run)]) == 0
    img = imread(pretrain_run / "curves.png")
    assert img.shape[:2] == (int(plot.FIGSIZE[1] * plot.DPI), int(plot.FIGSIZE[0] * plot.DPI))
    err = capsys.readouterr().err
    assert "skipped 1 unreadable line" in err and "Traceback" not in err


def test_runs_compared_with_missing_metrics(pretrain_run, tmp_path):
    """A fine-tuning run (train_acc, eval records) next to a pretraining run (no eval), and a run
    that has only started (no records yet)."""
    from matplotlib.image import imread
    ft = write_log(tmp_path / "finetune", [train(s, 2.0 / s, train_acc=0.2 * s) for s in (1, 2, 3)]
                   + [{"event": "eval", "step": 3, "epochs_done": 1, "top1": 41.5, "top5": 80.0}])
    fresh = write_log(tmp_path / "fresh", [])
    out = tmp_path / "cmp.png"
    assert plot.main([str(pretrain_run), str(ft), str(fresh), "--out", str(out), "--title", "cmp"]) == 0
    assert imread(out).shape[:2] == (850, 1500)
    keys = plot.series(plot.read_log(ft / "log.jsonl")[0], plot.PANELS[1][2])
    assert keys[0] == "train_acc" and keys[1] == [1, 2, 3]


def test_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    write_log(tmp_path / "nothing", [{"event": "first_step", "step": 1, "seconds": 3.0}])
    for args in ([str(tmp_path / "empty_dir")], [str(tmp_path / "missing")], [str(tmp_path / "nothing")]):
        r = subprocess.run([sys.executable, "-m", "fastclr.plot", *args], check=False, capture_output=True, text=True,
                           cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "error:" in r.stderr, r.stderr


def test_help_teaches():
    text = plot.build_parser().format_help()
    assert "RUN_DIR" in text and "curves.png" in text and "--out" in text and "resumed" in text
