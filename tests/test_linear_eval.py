"""linear_eval.py: the fast path (cached features) equals the slow path (network every step) without
augmentation; the backbone stays frozen with BN in eval mode; the TF recipe; raw-pixel mode."""
import json
from pathlib import Path

import pytest
import torch
from test_finetune import fake_pretrain_ckpt

from fastclr import checkpoint as ck
from fastclr import config as C
from fastclr import linear_eval as le
from fastclr.optimizers import linear_sgd

TINY = ["--data.image_size=32", "--data.num_workers=0", "--optim.global_batch_size=8", "--run.progress=false",
        "--run.device=cpu", "--run.precision=fp32", "--run.eval_batch_size=24", "--run.log_every=1"]


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    fake_pretrain_ckpt(d / "ckpt_00000001.pt")
    return d


def records(out):
    return [json.loads(ln) for ln in Path(out, "log.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_fast_path_equals_slow_path_without_augmentation(tmp_path, image_folder, pre):
    # 24 images / batch 8 = 3 steps per epoch, 3 epochs; a large lr so the layer moves well away from 0
    common = [f"--ckpt={pre}", f"--data.path={image_folder}", f"--run.val_path={image_folder}",
              "--data.augment=eval", "--optim.epochs=3", "--optim.base_lr=20", "--run.eval_every=1", *TINY]
    assert le.main(common + ["--fast=true", f"--run.out_dir={tmp_path / 'fast'}"]) == 0
    assert le.main(common + ["--fast=false", f"--run.out_dir={tmp_path / 'slow'}"]) == 0
    fast = ck.load(ck.list_checkpoints(tmp_path / "fast")[-1][1])["model"]
    slow = ck.load(ck.list_checkpoints(tmp_path / "slow")[-1][1])["model"]
    assert fast["fc.weight"].abs().max() > 1e-2
    for k in ("fc.weight", "fc.bias"):
        torch.testing.assert_close(fast[k], slow[k], rtol=0, atol=1e-5)
    # the frozen part is the pretrained backbone, untouched by the slow path (BN statistics included)
    pre_state = ck.load(pre / "ckpt_00000001.pt")["model"]
    for k, v in slow.items():
        if k.startswith("backbone."):
            assert torch.equal(v, pre_state[k]), k
    # both best.pt files are the whole probe, loadable as a classifier, with the same layer
    from fastclr.classifier import load_classifier
    bests = [load_classifier(str(tmp_path / p / "best.pt"))[1].state_dict() for p in ("fast", "slow")]
    assert bests[0].keys() == bests[1].keys()
    for k in bests[0]:
        torch.testing.assert_close(bests[0][k], bests[1][k], rtol=0, atol=1e-5, msg=k)
    # the same evals, and the fast path says that it used cached features
    f_recs, s_recs = records(tmp_path / "fast"), records(tmp_path / "slow")
    assert f_recs[0]["event"] == "features" and "cached" in f_recs[0]["note"]
    ev = lambda rs: [(r["step"], r["top1"]) for r in rs if r.get("event") == "eval"]
    assert ev(f_recs) == ev(s_recs) and len(ev(f_recs)) == 3
    losses = lambda rs: [r["loss"] for r in rs if "loss" in r]
    assert losses(f_recs) == pytest.approx(losses(s_recs), abs=1e-4)


def test_recipe_is_tf_linear_eval():
    cfg = C.LinearEvalConfig()
    o = cfg.optim
    got = (o.optimizer, o.base_lr, o.lr_scaling, o.weight_decay, o.epochs, o.global_batch_size,
           o.warmup_epochs)
    assert got == ("sgd", 0.1, "linear", 1e-6, 90, 4096, 0.0)
    assert cfg.model.ft_proj_selector == 0 and cfg.fast
    opt = linear_sgd(o)(torch.nn.Linear(3, 2), 1.6)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert opt.defaults["weight_decay"] == 1e-6


@pytest.mark.e2e
def test_raw_pixels_logistic_regression_and_standardize_fold(tmp_path, image_folder):
    out = tmp_path / "raw"
    assert le.main(["--raw_pixels=true", "--standardize=true", f"--data.path={image_folder}",
                    f"--run.val_path={image_folder}", "--data.augment=eval", "--optim.epochs=5",
                    f"--run.out_dir={out}", *TINY]) == 0
    done = records(out)[-1]
    assert done["event"] == "done" and done["final_top1"] is not None
    best = ck.load(out / "best.pt")
    assert best["arch"]["raw_pixels"] and best["model"]["fc.weight"].shape == (4, 3 * 32 * 32)
    # the saved layer has the standardization folded in: it scores raw pixels directly
    import loaders
    c = loaders.LoaderConfig(path=image_folder, augment="eval", image_size=32, batch_size=24, num_workers=0,
                             train=False)
    x = next(iter(loaders.build(c))).views[0].flatten(1)
    fc = torch.nn.Linear(3 * 32 * 32, 4)
    fc.load_state_dict({k[3:]: v for k, v in best["model"].items() if k.startswith("fc.")})
    acc = (fc(x).argmax(1) == next(iter(loaders.build(c))).labels).float().mean().item() * 100
    assert acc == pytest.approx(best["val"]["top1"], abs=1e-3)


def test_one_line_errors(tmp_path, image_folder, capsys):
    def error(args):
        with pytest.raises(SystemExit) as e:
            le.main(args + [f"--data.path={image_folder}", f"--run.out_dir={tmp_path / 'e'}", *TINY])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("linear_eval.py: error:") and "\n" not in err, err
        return err

    assert "--ckpt" in error([])
    assert "fast path" in error(["--raw_pixels=true", "--fast=false"])
