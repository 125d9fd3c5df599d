"""distill.py: the distillation step's student gradient equals the reference loss's, the teacher gets
no gradient and stays frozen, cached teacher logits are read by sample id, presets and a short run."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import loaders
from fastclr import checkpoint as ck
from fastclr import classifier
from fastclr import config as C
from fastclr import distill as ds
from fastclr import presets

ARCH = dict(depth=18, width=1, sk_ratio=0.0, cifar_stem=False, num_proj_layers=2, proj_out_dim=16,
            ft_proj_selector=1, num_classes=5)


def reference_loss(s, t, tau, labels=None, alpha=0.0):
    """SimCLRv2's distillation loss written out naively (tau^2-scaled soft cross-entropy, optional CE)."""
    p_t = torch.exp(t / tau) / torch.exp(t / tau).sum(1, keepdim=True)
    log_p_s = (s / tau) - torch.log(torch.exp(s / tau).sum(1, keepdim=True))
    soft = -(p_t * log_p_s).sum(1).mean() * tau**2
    if labels is None or alpha == 0:
        return soft
    keep = labels >= 0
    ce = -(torch.log_softmax(s[keep], 1).gather(1, labels[keep][:, None])).mean()
    return (1 - alpha) * soft + alpha * ce


def nets(seed=0):
    torch.manual_seed(seed)
    teacher = classifier.build_classifier(ARCH, 5, zero_init=False).eval().requires_grad_(False)
    student = classifier.build_classifier({**ARCH, "ft_proj_selector": 0}, 5, zero_init=False).train()
    with torch.no_grad():  # a teacher with confident, non-uniform outputs
        teacher.fc.weight.normal_(0, 1.0)
    return teacher, student


@pytest.mark.parametrize("tau,alpha", [(1.0, 0.0), (0.1, 0.0), (0.5, 0.3)])
def test_student_gradient_matches_reference_and_teacher_gets_none(tau, alpha):
    teacher, student = nets()
    x = torch.rand(6, 3, 32, 32)
    labels = torch.tensor([0, -1, 3, -1, 4, 1]) if alpha else None
    bn = dict(teacher.backbone.bn1.named_buffers())
    bn_before = {k: v.clone() for k, v in bn.items()}

    loss, agree = ds.distill_step(student, teacher, x, tau, labels, alpha)
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training and 0.0 <= float(agree) <= 1.0
    for k, v in bn.items():  # eval mode: BN statistics untouched
        assert torch.equal(v, bn_before[k]), k

    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t = teacher(x)
    s = student(x)  # same train-mode forward: the same BN batch statistics
    ref = reference_loss(s.double(), t.double(), tau, labels, alpha)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    ref.backward()
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_cached_logits_are_indexed_by_sample_id(image_folder):
    teacher, _ = nets()
    teacher.fc = torch.nn.Linear(teacher.fc.in_features, 4)
    cfg = loaders.LoaderConfig(path=image_folder, augment="eval", image_size=32, batch_size=5, num_workers=0,
                               train=False)
    cache = ds.cache_logits(teacher, loaders.build(cfg), 24, 4, torch.device("cpu"), torch.float32)
    train = loaders.build(dataclasses.replace(cfg, train=True, batch_size=8, seed=3))
    train.set_epoch(1)
    for batch in train:  # shuffled order; the cached rows follow the batch's sample ids
        want = teacher(batch.views[0])
        got = cache[torch.as_tensor(train.last_indices)]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cached_logits_follow_the_images_actually_used(mixed_folder):
    """With unreadable files the torch backend puts the next readable image in their slot; the cached
    teacher logits must be those of the image the student sees, not of the unreadable one."""
    teacher, _ = nets()
    teacher.fc = torch.nn.Linear(teacher.fc.in_features, 4)
    teacher.eval()
    cfg = loaders.LoaderConfig(path=mixed_folder, augment="eval", image_size=32, batch_size=5, num_workers=0,
                               train=False)
    cache_loader = loaders.build(cfg)
    n = len(cache_loader.samples)
    cache = ds.cache_logits(teacher, cache_loader, n, 4, torch.device("cpu"), torch.float32)
    assert cache_loader.num_skipped > 0  # the fixture's bad files were met
    train = loaders.build(dataclasses.replace(cfg, train=True, batch_size=8, seed=3))
    replaced = 0
    for e in range(2):
        train.set_epoch(e)
        for batch in train:
            replaced += int((train.last_used_indices != train.last_indices).sum())
            got = cache[torch.as_tensor(ds.batch_ids(train))]
            torch.testing.assert_close(got, teacher(batch.views[0]), rtol=1e-4, atol=1e-5)
    assert replaced > 0  # some batch held a replacement


def test_presets_follow_the_paper_temperatures():
    for name, tau in [("imagenet_distill", 1.0), ("demo_distill", 1.0),
                      ("imagenet_self_distill", 0.1), ("demo_self_distill", 0.1)]:
        cfg = C.parse_into(C.DistillConfig(), [name], presets.DISTILL)
        assert cfg.distill.temperature == tau
        assert cfg.distill.student == ("teacher" if "self" in name else "model")
        assert cfg.data.augment == "finetune"   # one crop + flip view shared by teacher and student


def teacher_run(tmp_path, image_folder):
    """A finetune.py-style run directory (best.pt with arch and classes) holding a random teacher."""
    torch.manual_seed(1)
    arch = {**ARCH, "num_classes": 4}
    model = classifier.build_classifier(arch, 4, zero_init=False)
    ck.save(tmp_path / "teacher" / "best.pt", {"model": model.state_dict(), "arch": arch, "step": 0,
                                               "classes": [f"n{c:08d}" for c in range(4)]})
    return tmp_path / "teacher"


TINY = ["--data.image_size=32", "--data.num_workers=0", "--optim.global_batch_size=8", "--run.progress=false",
        "--run.log_every=1", "--run.eval_batch_size=24"]


@pytest.mark.e2e
def test_short_runs_self_distill_with_labels_and_cached_teacher(tmp_path, image_folder, capsys):
    t = teacher_run(tmp_path, image_folder)
    out = tmp_path / "self"
    assert ds.main(["demo_self_distill", f"--teacher={t}", f"--data.path={image_folder}",
                    f"--run.val_path={image_folder}", "--distill.alpha=0.5", "--subset.fraction=0.25",
                    "--run.max_steps=2", f"--run.out_dir={out}", *TINY]) == 0
    recs = [json.loads(ln) for ln in Path(out, "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2]
    done = recs[-1]
    assert done["event"] == "done" and done["temperature"] == 0.1 and done["alpha"] == 0.5
    assert ck.load(out / "best.pt")["arch"]["depth"] == 18
    assert len((out / "labels_subset.txt").read_text().splitlines()) == 8

    out2 = tmp_path / "cached"
    assert ds.main(["demo_distill", f"--teacher={t}", f"--data.path={image_folder}", "--data.augment=eval",
                    "--distill.cache_teacher=true", "--run.max_steps=2", f"--run.out_dir={out2}", *TINY]) == 0
    assert "cached the teacher's logits of 24 images" in capsys.readouterr().out

    with pytest.raises(SystemExit) as e:
        ds.main(["demo_distill", f"--teacher={t}", f"--data.path={image_folder}",
                 "--distill.cache_teacher=true", f"--run.out_dir={tmp_path / 'err'}", *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "needs data.augment=eval" in err and "\n" not in err
