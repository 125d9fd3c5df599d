"""SimCLRv2 contrastive pretraining. Read top to bottom: setup, data, model, optimizer, loop, checkpoint.

    torchrun --nproc_per_node=8 fastclr/pretrain.py imagenet_r50_1x --data.path=/data/imagenet/train
    torchrun --standalone --nproc_per_node=1 fastclr/pretrain.py       # the embedded demo (CPU, ~5 min)
    python fastclr/pretrain.py demo_cpu --optim.epochs=2                # one process, no torchrun

Everything is configured by ``[PRESET] --section.key=value`` (see --help). The run directory
(run.out_dir) gets config.json, log.jsonl (every log_every steps) and ckpt_XXXXXXXX.pt files;
``--run.resume=auto`` continues from the newest valid checkpoint there (exactly: same data order,
same augmentations, same RNG).
"""
from __future__ import annotations

import dataclasses
import os
import sys

if __package__ in (None, ""):  # `python fastclr/pretrain.py` / torchrun put fastclr/ first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from tqdm import tqdm

import loaders
from fastclr import checkpoint as ckpt
from fastclr import config as C
from fastclr import dist, runtime
from fastclr.knn import knn_report
from fastclr.lars import LARS
from fastclr.losses import MomentumQueue, contrastive_accuracy, nt_xent
from fastclr.models import build_model, convert_sync_bn, parse_model_name
from fastclr.runtime import UserError
from fastclr.schedule import lr_at, scaled_lr

PROG = "pretrain.py"


def model_kwargs(m: C.ModelConfig) -> dict:
    kw = dict(depth=m.depth, width=m.width, sk_ratio=m.sk_ratio)
    if m.name:
        kw.update(parse_model_name(m.name))  # a named preset (r50_1x_sk0 ...) sets depth/width/sk
    return dict(**kw, cifar_stem=m.cifar_stem, num_proj_layers=m.num_proj_layers, proj_out_dim=m.proj_out_dim)


def build_optimizer(params, o: C.OptimConfig, lr: float):
    if o.optimizer == "lars":
        return LARS(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, eta=o.eta, mode=o.lars_mode)
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("--") and not any(a.startswith("--data.path") for a in argv)
                    and "-h" not in argv and "--help" not in argv):
        argv = ["demo_cpu"] + argv  # no preset and no data: the embedded default
    return runtime.run_entry(PROG, C.PretrainConfig, C.PRETRAIN_PRESETS, __doc__, train, argv)


def train(cfg: C.PretrainConfig) -> int:
    # ------------------------------------------------------------------ setup
    o = cfg.optim
    # Contrastive pairs need >= 2 images per rank.
    rank, world, device, dtype, per_rank, train_path, val_path, is_demo, out_dir, ckpts = runtime.start_run(
        cfg, min_batch=2)
    if is_demo:
        dist.print0(f"{PROG}: no data.path given: the Fashion-MNIST demo set at {os.path.dirname(train_path)}")

    # ------------------------------------------------------------------ data
    # Derived, not written back into cfg: the per-rank batch and the views' dtype.
    data_cfg = dataclasses.replace(cfg.data, path=train_path, batch_size=per_rank, train=True,
                                   seed=cfg.run.seed, dtype=runtime.DTYPE_NAME[dtype])
    # Contrastive learning needs two views of every image, whatever recipe data.augment names.
    try:
        spec = loaders.spec_from_config(data_cfg).replace(num_views=2)
        loader = loaders.build(data_cfg, rank=rank, world_size=world, device=device, spec=spec)
    except (FileNotFoundError, ValueError) as e:  # no images, bad list file, batch larger than the data
        raise UserError(str(e).splitlines()[0]) from None
    steps_per_epoch = len(loader) // o.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"fewer images than one global batch of {o.global_batch_size}: lower optim.global_batch_size")
    total_steps = o.epochs * steps_per_epoch
    if cfg.run.max_steps is not None:
        total_steps = min(total_steps, cfg.run.max_steps)
    warmup_steps = int(round(o.warmup_epochs * steps_per_epoch))
    peak_lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, o.global_batch_size, o.lr_scaling)

    # ------------------------------------------------------------------ model
    model = build_model(**model_kwargs(cfg.model)).to(device)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if cfg.run.knn_eval else None
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and cfg.model.sync_bn:
        model = convert_sync_bn(model)  # global BN: statistics over all ranks' images, as in the paper
    queue = None
    if cfg.loss.queue_size > 0:
        queue = MomentumQueue(model, cfg.model.proj_out_dim, cfg.loss.queue_size, cfg.loss.queue_momentum)
    raw_model = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    fwd = torch.compile(model) if cfg.model.compile else model

    # ------------------------------------------------------------------ optimizer
    optimizer = build_optimizer(raw_model.parameters(), o, peak_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))

    # ------------------------------------------------------------------ resume
    step = 0
    found = ckpts.load_resume()
    if found is None and cfg.run.resume == "auto":
        dist.print0(f"{PROG}: run.resume=auto: no checkpoint in {out_dir}, starting fresh")
    elif found is not None:
        path, state = found
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if queue is not None and "queue" in state:
            queue.load_state_dict(state["queue"])
        ckpt.set_rng_state(state["rng"])
        step = int(state["step"])
        dist.print0(f"{PROG}: resumed from {path} at step {step}")

    def save_checkpoint():
        tensors = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict()}
        if queue is not None:
            tensors["queue"] = queue.state_dict()

        def state():
            return {**tensors, "scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                    "step_in_epoch": step % steps_per_epoch, "rng": ckpt.rng_state(), "config": C.to_dict(cfg)}
        ckpts.save(step, state, tensors)
        dist.barrier()

    # ------------------------------------------------------------------ loop
    log = runtime.JsonlLog(os.path.join(out_dir, "log.jsonl"))
    dist.print0(f"{PROG}: {world} rank(s) on {device}, {runtime.DTYPE_NAME[dtype]}, global batch "
                f"{o.global_batch_size} ({per_rank}/rank x {o.grad_accum} accum), {steps_per_epoch} steps/epoch, "
                f"{total_steps} steps, peak lr {peak_lr:.4g}, data: {cfg.data.backend} {train_path}")
    bar = tqdm(total=total_steps, initial=step, desc="pretrain", unit="step",
               disable=not (dist.is_main() and cfg.run.progress), dynamic_ncols=True, mininterval=1.0)
    meter = runtime.StepMeter(device)  # sums on the device: read (a host sync) every log_every steps
    first_loss = final_loss = None
    model.train()
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch, start_step=skip * o.grad_accum)  # exact position after a resume
        it = iter(loader)
        for _ in range(skip, steps_per_epoch):
            if step >= total_steps:
                break
            lr = lr_at(step, peak_lr, warmup_steps, total_steps)
            runtime.set_lr(optimizer, lr)
            for micro in range(o.grad_accum):
                batch = meter.next_batch(it)
                with runtime.autocast(device, dtype):
                    _, z = fwd(batch.views)
                z1, z2 = z.float().chunk(2)
                negs = queue.negatives() if queue is not None else None
                loss, acc_all = nt_xent(z1, z2, cfg.loss.temperature, chunk_size=cfg.loss.chunk_size,
                                        extra_negatives=negs, return_accuracy=True)
                # TF's objective is loss_a + loss_b averaged over images = 2x our mean over the 2B
                # anchors. The factor matters with LARS: it sets the size of weight decay relative
                # to the gradient and the update of the non-adapted BN/bias parameters.
                loss = 2.0 * loss
                scaler.scale(loss / o.grad_accum).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if queue is not None:
                queue.update(raw_model)
                with torch.no_grad(), runtime.autocast(device, dtype):
                    keys = F.normalize(queue(batch.views)[1].float(), dim=1)
                queue.enqueue(dist.gather_nograd(keys))
            step += 1
            meter.add(step, loss, contrastive_accuracy(z1, z2), all=acc_all)
            bar.update(1)

            if step % cfg.run.log_every == 0 or step == total_steps:
                w = meter.read(PROG, ckpts.last, lambda s: lr_at(s - 1, peak_lr, warmup_steps, total_steps))
                mean_loss, mean_acc, wait = w.loss, w.acc, w.data_wait
                ips = w.steps * o.global_batch_size / w.seconds
                first_loss = mean_loss if first_loss is None else first_loss
                final_loss = mean_loss
                log.write(step=step, epoch=epoch, loss=round(mean_loss, 5), contrastive_acc=round(mean_acc, 4),
                          contrastive_acc_all=round(w.extra["all"], 4), lr=lr, images_per_s=round(ips, 1),
                          data_wait=round(wait, 4),
                          gpu_mem_gb=runtime.gpu_memory_gb(device))
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{mean_acc:.2f}", lr=f"{lr:.3g}",
                                img_s=f"{ips:.0f}", wait=f"{wait:.0%}")
            if step % cfg.run.ckpt_every == 0 or step == total_steps:
                save_checkpoint()
    bar.close()
    skipped = getattr(loader, "num_skipped", 0)
    summary = dict(event="done", step=step, first_loss=first_loss, final_loss=final_loss,
                   bad_images_skipped=skipped, checkpoint=str(ckpts.last) if ckpts.last else None)

    # ------------------------------------------------------------------ k-NN report
    if cfg.run.knn_eval and val_path and cfg.data.backend != "ffcv":
        report = knn_report(raw_model.backbone, init_state, train_path, val_path, cfg, device, dtype)
        summary.update(report)
    log.write(**summary)
    log.close()
    if dist.is_main():
        msg = f"{PROG}: done: {step} steps, loss {first_loss} -> {final_loss}"
        if "knn_top1" in summary:
            msg += (f"; k-NN top-1 on val: {summary['knn_top1']:.1%} trained vs "
                    f"{summary['knn_top1_random_init']:.1%} at random init "
                    f"({summary['knn_top1_raw_pixels']:.1%} on raw pixels)")
        print(msg + f"; logs and checkpoints in {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
