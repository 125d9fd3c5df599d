"""The semi-supervised chain end to end on the fixture folder, each step as its own process like a user
runs it: pretrain -> finetune (label subset) -> self-distill (student from the pretrain checkpoint) ->
linear_eval (fast path). distill.py from scratch and with cached teacher logits: tests/test_distill.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastclr import checkpoint as ck

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--data.image_size=32", "--data.num_workers=0", "--run.progress=false"]


def run(script, args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    r = subprocess.run([sys.executable, str(ROOT / "fastclr" / script), *args], check=False,
                       capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0:
        raise AssertionError(f"{script} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\n"
                             f"stderr:\n{r.stderr[-3000:]}")
    return r


def done(out):
    recs = [json.loads(ln) for ln in Path(out, "log.jsonl").read_text().splitlines()]
    assert recs[-1]["event"] == "done", recs[-1]
    return recs[-1]


def test_pretrain_finetune_distill_linear_eval(tmp_path, image_folder):
    data = [f"--data.path={image_folder}", f"--run.val_path={image_folder}"]
    pre, fto, slf, lin = (tmp_path / n for n in ("pre", "ft", "self", "linear"))
    run("pretrain.py", ["demo_cpu", f"--data.path={image_folder}", "--data.image_size=32",
                        "--data.num_workers=0", "--optim.global_batch_size=8", "--optim.warmup_epochs=0",
                        "--run.knn_eval=false",
                        "--run.progress=false", "--run.max_steps=2", f"--run.out_dir={pre}"])
    assert ck.list_checkpoints(pre)

    r = run("finetune.py", ["demo_1pct", f"--ckpt={pre}", *data, *COMMON, "--subset.fraction=0.5",
                            "--optim.global_batch_size=4", "--optim.epochs=1", "--run.max_steps=2",
                            f"--run.out_dir={fto}"])
    d = done(fto)
    assert d["step"] == 2 and d["labeled_images"] == 12 and d["final_top1"] is not None
    assert "head cut at layer 1" in r.stdout
    assert ck.load(fto / "best.pt")["arch"]["ft_proj_selector"] == 1

    run("distill.py", ["demo_self_distill", f"--teacher={fto}", f"--student_ckpt={pre}", *data, *COMMON,
                       "--optim.global_batch_size=8", "--run.max_steps=2", f"--run.out_dir={slf}"])
    d = done(slf)
    assert d["temperature"] == 0.1 and d["init"].startswith(str(pre)) and d["teacher"] == str(fto / "best.pt")

    r = run("linear_eval.py", ["demo_1pct", f"--ckpt={pre}", *data, *COMMON, "--subset.fraction=0.5",
                               "--optim.global_batch_size=4", "--optim.epochs=2", f"--run.out_dir={lin}"])
    d = done(lin)
    assert d["path"] == "fast" and d["step"] == 6 and d["final_top1"] is not None
    assert "extracted once" in r.stdout
