"""The semi-supervised chain end to end on the fixture folder: pretrain -> finetune (label subset) ->
self-distill (student from the pretrain checkpoint) -> linear_eval (fast path), each entry point's
main() in this process (the README walkthrough in tests/test_own_images.py runs a chain as real CLIs).
distill.py from scratch and with cached teacher logits: tests/test_distill.py."""
import json
from pathlib import Path

import pytest

from fastclr import checkpoint as ck
from fastclr import distill, finetune, linear_eval, pretrain

pytestmark = pytest.mark.e2e

COMMON = ["--data.image_size=32", "--data.num_workers=0", "--run.progress=false"]
MAINS = {"pretrain.py": pretrain.main, "finetune.py": finetune.main, "distill.py": distill.main,
         "linear_eval.py": linear_eval.main}


@pytest.fixture
def run(call):
    def go(script, args):
        code, out, err = call(MAINS[script], args)
        assert code == 0, f"{script} exited {code}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
        return out
    return go


def done(out):
    recs = [json.loads(ln) for ln in Path(out, "log.jsonl").read_text().splitlines()]
    assert recs[-1]["event"] == "done", recs[-1]
    return recs[-1]


def test_pretrain_finetune_distill_linear_eval(tmp_path, image_folder, run):
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
    assert "head cut at layer 1" in r
    assert ck.load(fto / "best.pt")["arch"]["ft_proj_selector"] == 1

    run("distill.py", ["demo_self_distill", f"--teacher={fto}", f"--student_ckpt={pre}", *data, *COMMON,
                       "--optim.global_batch_size=8", "--run.max_steps=2", f"--run.out_dir={slf}"])
    d = done(slf)
    assert d["temperature"] == 0.1 and d["init"].startswith(str(pre)) and d["teacher"] == str(fto / "best.pt")

    r = run("linear_eval.py", ["demo_1pct", f"--ckpt={pre}", *data, *COMMON, "--subset.fraction=0.5",
                               "--optim.global_batch_size=4", "--optim.epochs=2", f"--run.out_dir={lin}"])
    d = done(lin)
    assert d["path"] == "fast" and d["step"] == 6 and d["final_top1"] is not None
    assert "extracted once" in r
