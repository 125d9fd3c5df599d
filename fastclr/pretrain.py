"""SimCLRv2 contrastive pretraining. Read top to bottom: setup, data, model and loss, then the one
training loop (fastclr.trainer) with its online k-NN check, then the final k-NN check and probe.

    torchrun --nproc_per_node=8 fastclr/pretrain.py imagenet_r50_1x --data.path=/data/imagenet/train
    torchrun --standalone --nproc_per_node=1 fastclr/pretrain.py       # the embedded demo (CPU, make demo)
    python fastclr/pretrain.py demo_cpu --optim.epochs=2                # one process, no torchrun
    python fastclr/pretrain.py demo_cpu --data.path=~/photos --run.val_path=~/labelled --run.knn_bank=val

The images need no labels: data.path may be a folder in any layout (flat, nested, class folders whose
names are not used). The k-NN checks (online every run.knn_every epochs, and at the end) need labelled
images: run.val_path, with the bank from data.path's class folders (run.knn_bank=train) or from a part
of run.val_path (run.knn_bank=val).

Everything is configured by ``[PRESET] --section.key=value`` (see --help). The run directory
(run.out_dir) gets config.json, log.jsonl (every log_every steps) and ckpt_XXXXXXXX.pt files;
``--run.resume=auto`` continues from the newest valid checkpoint there (exactly: same data order,
same augmentations, same RNG).
"""
from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # `python fastclr/pretrain.py` / torchrun put fastclr/ first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

import loaders
from loaders.config import loader_config
from fastclr import config as C
from fastclr import dist, presets, runtime
from fastclr.knn import KnnProbe, knn_report, online_knn
from fastclr.losses import MomentumQueue, contrastive_loss
from fastclr.models import build_model, model_kwargs
from fastclr.optimizers import pretrain_optimizer
from fastclr.runtime import UserError
from fastclr.trainer import Task, Trainer
from loaders.sources.folders import find_classes

PROG = "pretrain.py"


def main(argv=None) -> int:
    return runtime.run_entry(PROG, C.PretrainConfig, presets.PRETRAIN, __doc__, train, argv, demo_preset="demo_cpu")


def queue_update(queue: MomentumQueue, device, dtype):
    """after_step for the trainer: the EMA encoder follows the model, and its keys of the last batch
    (all ranks') enter the queue. After the optimizer step: the queue was a tensor of that step's graph."""
    def after_step(model, batch):
        queue.update(model)
        with torch.no_grad(), runtime.autocast(device, dtype):
            keys = F.normalize(queue(batch.views)[1].float(), dim=1)
        queue.enqueue(dist.gather_nograd(keys))
    return after_step


def knn_unavailable(cfg: C.PretrainConfig, run: runtime.Run) -> str | None:
    """Why the k-NN checks cannot run here (None: they can, or there is no val set to run them on). A
    folder without class folders under run.knn_bank=train is an error: its labels would be nonsense."""
    if not run.val_path or not (cfg.run.knn_eval or cfg.run.knn_every > 0):
        return None
    if cfg.run.knn_bank == "train" and cfg.data.backend == "ffcv":
        return ("with run.knn_bank=train its bank is read from image folders, and data.backend=ffcv trains on "
                "a .beton: pass --run.knn_bank=val (bank and queries from run.val_path)")
    labelled = [("run.val_path", run.val_path)]
    if cfg.run.knn_bank == "train":
        labelled.insert(0, ("data.path", run.train_path))
    for name, path in labelled:
        try:
            find_classes(path)
        except FileNotFoundError:
            hint = "pass --run.knn_bank=val to take the bank from run.val_path, or " if name == "data.path" else ""
            raise UserError(f"the k-NN checks label images by {name}'s class folders and {path} has none "
                            f"(expected root/<class>/<image>): {hint}pass --run.knn_eval=false --run.knn_every=0"
                            ) from None
    return None


def train(cfg: C.PretrainConfig) -> int:
    # ------------------------------------------------------------------ setup
    run = runtime.start_run(cfg, min_batch=2)  # contrastive pairs need >= 2 images per rank
    if run.is_demo:
        dist.print0(f"{PROG}: no data.path given: the Fashion-MNIST demo set at {os.path.dirname(run.train_path)}")

    knn_why_not = knn_unavailable(cfg, run)  # a k-NN that cannot label its bank fails now, not after training

    # ------------------------------------------------------------------ data
    # Derived, not written back into cfg: the per-rank batch and the views' dtype.
    # Contrastive learning uses no labels: any folder layout (labels=False lists every image, label -1).
    data_cfg = loader_config(cfg.data, path=run.train_path, batch_size=run.per_rank, train=True,
                             seed=cfg.run.seed, dtype=runtime.dtype_name(run.dtype), labels=False)
    try:
        # Contrastive learning needs two views of every image, whatever recipe data.augment names.
        spec = loaders.spec_from_config(data_cfg).replace(num_views=2)
        loader = loaders.build(data_cfg, rank=run.rank, world_size=run.world, device=run.device, spec=spec)
    except (FileNotFoundError, ValueError) as e:  # no images, bad list file, batch larger than the data
        raise UserError(str(e).splitlines()[0]) from None
    if loader.listing_note:
        dist.print0(f"{PROG}: {loader.listing_note}")
    if knn_why_not is not None:
        dist.print0(f"{PROG}: no k-NN checks: {knn_why_not}")

    # ------------------------------------------------------------------ model and loss
    model = build_model(**model_kwargs(cfg.model))
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if cfg.run.knn_eval else None
    queue, after_step, state = None, None, {}
    if cfg.loss.queue_size > 0:
        fmt = torch.channels_last if cfg.model.channels_last else torch.preserve_format
        model = model.to(run.device, memory_format=fmt)  # the EMA copy starts as the model will run
        queue = MomentumQueue(model, cfg.model.proj_out_dim, cfg.loss.queue_size, cfg.loss.queue_momentum)
        after_step, state = queue_update(queue, run.device, run.dtype), {"queue": queue}
    loss_fn = contrastive_loss(cfg.loss.temperature, cfg.loss.chunk_size, queue)  # NT-Xent x 2 (TF's scale)
    task = Task(model=model, loss_fn=loss_fn, make_optimizer=pretrain_optimizer(cfg.optim),
                after_step=after_step, state=state)

    # ------------------------------------------------------------------ the loop
    trainer = Trainer(PROG, cfg, run, task, loader)
    if cfg.run.knn_every > 0 and run.val_path and knn_why_not is None:
        # The online k-NN: a smaller bank than the final one, on rank 0 (the others wait).
        if dist.is_main():
            probe = KnnProbe(cfg, run.train_path, run.val_path, cfg.run.knn_online_train_size,
                             cfg.run.knn_online_val_size, "online", run.device, run.dtype)
            task.monitor = online_knn(probe, trainer.model.backbone)
        task.monitor_every = max(1, round(cfg.run.knn_every * trainer.steps_per_epoch))
    t0 = time.perf_counter()
    summary = trainer.fit()
    seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ k-NN report
    def fmt(x):
        return "-" if x is None else f"{x:.3f}"
    message = f"{summary['step']} steps, loss {fmt(summary.get('first_loss'))} -> {fmt(summary.get('final_loss'))}"
    if task.monitor is not None and trainer.monitor_seconds:
        summary.update(knn_online_seconds=round(trainer.monitor_seconds, 2), train_seconds=round(seconds, 2))
        message += (f"\n  online k-NN: {trainer.monitor_seconds:.1f} s of the {seconds:.0f} s of training "
                    f"({trainer.monitor_seconds / seconds:.1%})")
    if cfg.run.knn_eval and run.val_path and knn_why_not is None:
        summary.update(knn_report(trainer.model.backbone, init_state, run.train_path, run.val_path, cfg,
                                  run.device, run.dtype))
        if "knn_top1" in summary:
            message += (f"\n  k-NN top-1 on val: {summary['knn_top1']:.1%} trained vs "
                        f"{summary['knn_top1_raw_pixels']:.1%} on raw pixels (same k-NN), "
                        f"{summary['knn_top1_random_init']:.1%} at random init")
        if "probe_top1" in summary:
            message += (f"\n  {summary['probe_labels']} labels (linear probe on frozen features): "
                        f"{summary['probe_top1']:.1%} trained vs {summary['probe_top1_raw_pixels']:.1%} for "
                        f"logistic regression on raw pixels")
    return trainer.finish(summary, message)


if __name__ == "__main__":
    raise SystemExit(main())
