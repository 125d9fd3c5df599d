"""finetune.py: the network keeps the projection head up to layer k, a short run on the fixture folder
(subset, eval, best.pt), exact resume, and one-line errors."""
import json
import math
from pathlib import Path

import pytest
import torch

from fastclr import checkpoint as ck
from fastclr import config as C
from fastclr import classifier
from fastclr import finetune as ft
from fastclr.runtime import UserError
from fastclr.models import build_model

ARCH = dict(depth=18, width=1, sk_ratio=0.0, cifar_stem=False, num_proj_layers=3, proj_out_dim=16)


def fake_pretrain_ckpt(path, seed=0, **arch):
    """A pretrain.py-style checkpoint (model + config) of a random SimCLRModel with non-trivial BN stats."""
    torch.manual_seed(seed)
    a = {**ARCH, **arch}
    m = build_model(**a)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                if mod.affine:
                    mod.weight.uniform_(0.5, 1.5)
    cfg = C.PretrainConfig()
    for k, v in a.items():
        setattr(cfg.model, k, v)
    ck.save(path, {"model": m.state_dict(), "step": 1, "config": C.to_dict(cfg)})
    return m


@pytest.mark.parametrize("k", [0, 1, 2, 3, -1])
def test_head_is_cut_at_layer_k(tmp_path, k):
    pre = fake_pretrain_ckpt(tmp_path / "ckpt_00000001.pt")
    file, state, mcfg = classifier.load_pretrained(str(tmp_path))  # a run dir -> its newest checkpoint
    assert file.endswith("ckpt_00000001.pt")
    arch = classifier.arch_of(mcfg, k)
    clf = classifier.build_classifier(arch, num_classes=7, pretrained=state, zero_init=True)
    kk = 3 if k == -1 else k
    dims = pre.head.layer_dims  # [512, 512, 512, 16]
    assert len(clf.neck) == kk
    assert clf.fc.weight.shape == (7, dims[kk]) and clf.fc.bias.shape == (7,)
    assert torch.count_nonzero(clf.fc.weight) == 0  # TF zero_init_logits_layer
    for j, layer in enumerate(clf.neck):
        assert layer.linear.weight.shape == (dims[j + 1], dims[j])
        assert torch.equal(layer.linear.weight, pre.head.layers[j].linear.weight)
    # the classifier's input is the pretrained head's layer-k output
    pre.eval(); clf.eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = pre.head(pre.backbone(x), return_layers=True)[kk]
        got = clf.features(x)
    assert got.shape == (4, dims[kk])
    torch.testing.assert_close(got, want)
    # only the kept layers are parameters of the fine-tuned model (nothing unused goes to the optimizer)
    n_head = sum(p.numel() for j in range(kk) for p in pre.head.layers[j].parameters())
    n_bb = sum(p.numel() for p in pre.backbone.parameters())
    assert sum(p.numel() for p in clf.parameters()) == n_bb + n_head + 7 * dims[kk] + 7


def test_ft_proj_selector_out_of_range_is_a_user_error():
    with pytest.raises(UserError, match="out of range"):
        classifier.build_classifier({**ARCH, "ft_proj_selector": 4}, 3)


TINY = ["--data.image_size=32", "--data.num_workers=0", "--optim.global_batch_size=4", "--run.progress=false",
        "--run.device=cpu", "--run.precision=fp32", "--run.log_every=1", "--run.eval_batch_size=24"]


def records(out):
    return [json.loads(ln) for ln in Path(out, "log.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_short_run_subset_eval_best_and_exact_resume(tmp_path, image_folder):
    fake_pretrain_ckpt(tmp_path / "pre" / "ckpt_00000001.pt")
    # The preset as users run it (LP-FT's probe fit, the min_steps stretch), on a schedule the test can afford
    base = ["demo_1pct", f"--ckpt={tmp_path / 'pre'}", f"--data.path={image_folder}",
            f"--run.val_path={image_folder}", "--subset.fraction=0.5", "--optim.epochs=2", "--run.eval_every=1",
            "--min_steps=8", *TINY]
    # 12 labelled images / batch 4 = 3 steps per epoch: 2 epochs make 6 steps, stretched to min_steps 8
    assert ft.main(base + [f"--run.out_dir={tmp_path / 'a'}", "--run.ckpt_every=2", "--run.keep_last=0"]) == 0
    recs = records(tmp_path / "a")
    evals = [r for r in recs if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [3, 6, 8] and all(0 <= r["top1"] <= 100 for r in evals)
    done = recs[-1]
    assert done["event"] == "done" and done["step"] == 8 and done["labeled_images"] == 12
    assert done["schedule_stretched"]["epochs"] == [2.0, 8 / 3]
    # LP-FT: the classifier starts fitted to the 12 labelled features of this (random) network; a
    # zero-initialized one gives exactly the chance loss ln 4 on every batch, the first step included
    assert done["probe_images"] == 12 and done["probe_train_acc"] > 25 and done["probe_loss"] < math.log(4)
    first = next(r for r in recs if r.get("step") == 1 and "loss" in r)
    assert first["loss"] < math.log(4) - 0.1, first
    subset = (tmp_path / "a" / "labels_subset.txt").read_text().splitlines()
    assert len(subset) == 12
    best = ck.load(tmp_path / "a" / "best.pt")
    assert best["arch"]["ft_proj_selector"] == 1 and best["arch"]["num_classes"] == 4
    assert best["val"]["top1"] == max(r["top1"] for r in evals)
    # the fine-tuned model reloads (the teacher path of distill.py)
    _, model, _ = classifier.load_classifier(str(tmp_path / "a"))
    assert model.fc.out_features == 4

    # exact resume: a run dir holding only the step-4 checkpoint (mid-epoch 2) of that run, resumed with
    # resume=auto and DataLoader workers (the presets' default), ends where the uninterrupted run ended
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "a")] == [2, 3, 4, 6, 8]
    b = tmp_path / "b"
    b.mkdir()
    (b / "ckpt_00000004.pt").write_bytes((tmp_path / "a" / "ckpt_00000004.pt").read_bytes())
    assert ft.main(base + [f"--run.out_dir={b}", "--run.resume=auto", "--data.num_workers=2"]) == 0
    assert [r["step"] for r in records(b) if r.get("event") == "eval"] == [6, 8]
    wa = ck.load(ck.list_checkpoints(tmp_path / "a")[-1][1])["model"]
    wb = ck.load(ck.list_checkpoints(b)[-1][1])["model"]
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.e2e
def test_scratch_baseline_and_one_line_errors(tmp_path, image_folder, capsys):
    out = tmp_path / "scratch"
    assert ft.main(["demo_1pct", "--ckpt=none", f"--data.path={image_folder}", "--subset.fraction=0.5",
                    "--run.max_steps=1", f"--run.out_dir={out}", *TINY]) == 0
    # the demo preset's architecture; without a val set best.pt holds the last weights
    assert ck.load(out / "best.pt")["arch"]["depth"] == 18
    capsys.readouterr()

    def error(args):
        with pytest.raises(SystemExit) as e:
            ft.main(args + [f"--data.path={image_folder}", f"--run.out_dir={tmp_path / 'err'}", *TINY])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("finetune.py: error:") and "\n" not in err, err
        return err

    assert "--ckpt" in error([])
    assert "not found" in error([f"--ckpt={tmp_path / 'nope.pt'}"])
    assert "one label subset" in error(["--ckpt=none", "--subset.fraction=0.1",
                                        f"--data.file_list={tmp_path}/x"])
    assert "fine-tuned checkpoint" in error([f"--ckpt={out / 'best.pt'}"])
    assert "not found" in error(["--ckpt=none", "--subset.list=no_such_list.txt"])


def test_min_steps_stretches_the_schedule_and_its_period():
    cfg = C.FinetuneConfig()
    cfg.min_steps, cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.run.eval_every = 400, 10, 1, 2
    extra = {}
    got = ft.stretch_schedule(cfg, 1, extra)      # 10 steps -> 400: 40x
    assert got.optim.epochs == 400 and got.optim.warmup_epochs == 40 and got.run.eval_every == 80
    assert (cfg.optim.epochs, cfg.run.eval_every) == (10, 2)         # the typed config is left as it was
    assert extra["schedule_stretched"]["epochs"] == [10, 400]
    assert ft.stretch_schedule(cfg, 40, {}) is cfg                     # 400 steps already: unchanged
    cfg.min_steps = 0
    assert ft.stretch_schedule(cfg, 1, {}) is cfg


def test_probe_fit_separates_what_a_linear_layer_can():
    """LP-FT's first stage fits the classifier on frozen features: on linearly separable features it
    reaches 100 % train accuracy, leaves the features untouched and the model in the mode it was in."""
    torch.manual_seed(0)
    centres = torch.randn(3, 8) * 3
    labels = torch.arange(3).repeat(10)
    feats = centres[labels] + 0.3 * torch.randn(30, 8)

    class Loader:
        last_indices = None

        def __iter__(self):
            from loaders.base import Batch
            for i in range(0, 30, 8):
                self.last_indices = list(range(i, min(30, i + 8)))
                yield Batch([feats[i:i + 8, :, None, None]], labels[i:i + 8])

    model = classifier.Classifier(torch.nn.Flatten(), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    torch.nn.init.zeros_(model.fc.weight)
    model.neck.eval()
    model.train()
    bn = {k: v.clone() for k, v in model.neck.state_dict().items()}
    fit = classifier.fit_probe_head(model, Loader(), torch.device("cpu"), torch.float32, 200)
    assert fit["probe_train_acc"] == 100.0 and fit["probe_images"] == 30 and fit["probe_loss"] < 0.3
    assert model.training
    for k, v in model.neck.state_dict().items():     # eval mode while extracting: BN statistics unchanged
        assert torch.equal(v, bn[k]), k
    # the L2 penalty (scikit-learn's C=1) bounds the layer: at its optimum the gradient of the mean
    # cross-entropy balances w / n, which an unregularised fit of separable data never reaches
    with torch.no_grad():
        f = model.eval().features(feats[:, :, None, None])
    w = model.fc.weight.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(f @ w.T + model.fc.bias.detach(), labels), w)
    assert torch.allclose(g, -w.detach() / 30, atol=1e-4), (g + w / 30).abs().max()


def test_frozen_bn_keeps_pretrained_statistics_and_learns_scale_and_shift():
    """frozen_bn: after freeze_bn, train() leaves every BN in eval mode: a training step normalises with
    the running statistics (the output equals eval mode's), leaves them unchanged, and still moves the
    BN's scale and shift. Without it the same step updates the statistics (TF's behaviour)."""
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        m = classifier.Classifier(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                                      torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                                  torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        m.backbone[1].running_mean.fill_(0.5)
        m.neck.running_var.fill_(2.0)
        return m

    x = torch.randn(5, 3, 8, 8) + 1.0
    frozen, plain = make().freeze_bn(), make()
    for model in (frozen, plain):
        model.train()
        assert model.training and model.fc.training
        stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        with torch.no_grad():
            ref = model.eval()(x)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = model(x)
        torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 0, 1, 0])).backward()
        before = model.backbone[1].weight.detach().clone()
        opt.step()
        assert not torch.equal(model.backbone[1].weight, before)      # scale still learns
        changed = [k for k, v in model.state_dict().items() if "running" in k and not torch.equal(v, stats[k])]
        if model is frozen:
            assert not model.backbone[1].training and not model.neck.training
            assert changed == [] and torch.allclose(out.detach(), ref, atol=1e-6)
        else:
            assert set(changed) >= {"backbone.1.running_mean", "neck.running_var"}
            assert not torch.allclose(out.detach(), ref, atol=1e-3)
