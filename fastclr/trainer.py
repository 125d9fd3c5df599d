"""fastclr's one training loop, shared by pretraining, fine-tuning, distillation and linear evaluation
(and the benchmark's step): setup around the model, exact resume, the learning-rate schedule, gradient
accumulation, mixed precision, the finite-check and atomic checkpoints, logging and the summary.

A script describes what differs in a ``Task``: its model, ``loss_fn(forward, batch) -> (loss,
metrics)``, its optimizer, and optional hooks (after each step, at epoch ends, extra checkpoint
state). The loop, in order, every optimizer step:

    lr = schedule(step)                           # warmup + cosine (fastclr.schedule), set in place
    for each of grad_accum micro-batches:
        batch = next(loader)                      # timed: the data-wait share in the log
        loss, metrics = loss_fn(forward, batch)   # under autocast (bf16/fp16) when asked
        backward(loss / grad_accum)               # scaled for fp16
    optimizer.step(); zero_grad(); after_step(batch)
    every log_every steps: one host sync, a log.jsonl line (and TensorBoard scalars with
                           run.tensorboard); a NaN/inf loss stops the run
    every ckpt_every steps and at the end: check the state is finite, write ckpt_<step>.pt

Steps count from 1 in the log and in checkpoint names (the step just done). A resumed run restores
model, optimizer, scaler, RNG and the task's state, then positions the loader at the exact batch
(``set_epoch(epoch, start_step)``), so its batches and augmentations are those of the uninterrupted
run. Nothing in the hot loop syncs with the host except the log read and the checkpoint check.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fastclr import checkpoint as ckpt
from fastclr import config as C
from fastclr import dist, runtime, stopping
from fastclr.models import convert_sync_bn
from fastclr.runtime import UserError
from fastclr.schedule import lr_at, scaled_lr
from fastclr.stopping import Stopped
from loaders.base import Batch

LossFn = Callable[[nn.Module, Batch], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass
class Task:
    """What a training script plugs into the loop (see the module docstring)."""
    model: nn.Module                     # unwrapped; the trainer moves it to the device and wraps it
    loss_fn: LossFn                      # (forward, batch) -> (loss, {name: metric}); first metric in the bar
    make_optimizer: Callable             # make(model, lr) -> optimizer (fastclr.optimizers)
    after_step: Callable[[nn.Module, Batch], None] | None = None  # (model, batch): e.g. the memory queue
    state: dict[str, nn.Module] = field(default_factory=dict)  # extra modules in checkpoints (the queue)
    checkpoint_fields: Callable[[], dict] | None = None      # extra keys of every checkpoint (arch, best...)
    load_fields: Callable[[str, dict], None] | None = None  # (path, resumed state): restore / check them
    on_epoch_end: Callable[[int, int], None] | None = None  # (epochs done, step): e.g. val evaluation
    eval_every: int = 0                  # epochs between on_epoch_end calls; 0 = only at the end
    # (step) -> {name: value} on rank 0 every monitor_every steps, logged as an ``eval`` record while
    # training runs (pretraining's online k-NN); the other ranks wait for it
    monitor: Callable[[int], dict] | None = None
    monitor_every: int = 0
    # model state_dict -> what best.pt-style files hold as "model" (checkpoints keep the trained state):
    # e.g. the linear layer trained on cached features, saved as the whole classifier it belongs to
    export_weights: Callable[[dict], dict] | None = None


class TrainStep:
    """One optimizer step over ``grad_accum`` micro-batches (forward under autocast, loss, backward,
    optimizer, zero_grad, the task's after_step). Used by the Trainer and by the benchmark's step
    stage, so both time the same code. ``GraphedStep`` is the same step replayed from a CUDA graph."""

    def __init__(self, model: nn.Module, forward: nn.Module, loss_fn: LossFn,
                 optimizer: torch.optim.Optimizer, device: torch.device, dtype: torch.dtype, grad_accum: int = 1,
                 after_step: Callable[[nn.Module, Batch], None] | None = None):
        """``model``: the plain module (what after_step gets); ``forward``: what to call (the model, or its
        DDP / compiled wrapper)."""
        self.model, self.forward, self.loss_fn, self.optimizer = model, forward, loss_fn, optimizer
        self.device, self.dtype, self.grad_accum, self.after_step = device, dtype, grad_accum, after_step
        self.scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))

    def __call__(self, next_batch: Callable[[], Batch]):
        """Take ``grad_accum`` batches from ``next_batch()``; returns (loss, metrics) of the last one."""
        for _ in range(self.grad_accum):
            batch = next_batch()
            with runtime.autocast(self.device, self.dtype):
                loss, metrics = self.loss_fn(self.forward, batch)
            self.scaler.scale(loss / self.grad_accum).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step(self.model, batch)
        return loss, metrics


class GraphedStep(TrainStep):
    """The step captured once as one CUDA graph (forward, loss, backward, optimizer) and replayed.

    With the whole step in one graph the GPU runs it back to back: no Python, no kernel launches, no
    host sync. The first ``warmup`` steps run eagerly on a side stream (cuDNN picks its algorithms,
    torch.compile compiles, the optimizer creates its buffers), then the next batch is copied into
    static input buffers, the step is captured and replayed; every later batch is copied into the same
    buffers (a device-to-device copy: the loader already brought it to the GPU on a side stream) and
    the graph replayed. The optimizer must be capturable (LARS(capturable=True) with a tensor lr, which
    ``runtime.set_lr`` fills in place before each replay). The returned loss and metrics are the
    graph's static outputs: read or accumulate them before the next step (the StepMeter does, on the
    stream). Replays compute exactly what the eager step computes.

    ``capture(body) -> replay``: ``cuda_capture`` records ``body`` into a CUDA graph; the CPU tests pass
    a stand-in that replays ``body`` eagerly, which checks the static-buffer plumbing (not CUDA)."""

    def __init__(self, *args, warmup: int = 3, capture=None, **kw):
        super().__init__(*args, **kw)
        if self.grad_accum != 1 or self.after_step is not None or self.scaler.is_enabled():
            raise ValueError("a CUDA-graph step needs grad_accum=1, no after_step and no fp16 loss scaling")
        self.warmup, self.capture = warmup, capture or cuda_capture
        self.done, self.replay = 0, None
        self.static_batch = self.static_out = None

    def _copy_in(self, batch: Batch) -> None:
        for s, v in zip(self.static_batch.views, batch.views):
            s.copy_(v, non_blocking=True)
        if batch.labels is not None:
            self.static_batch.labels.copy_(batch.labels, non_blocking=True)

    def _body(self) -> None:
        """What the graph holds. Its outputs are static tensors, rewritten by every replay."""
        with runtime.autocast(self.device, self.dtype, cache=False):
            loss, metrics = self.loss_fn(self.forward, self.static_batch)
        loss.backward()
        self.optimizer.step()
        self.static_out = (loss.detach(), {k: v.detach() for k, v in metrics.items()})

    def __call__(self, next_batch: Callable[[], Batch]):
        batch = next_batch()
        if self.done < self.warmup:
            self.done += 1
            side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                out = super().__call__(lambda: batch)
            if side is not None:
                torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        if self.replay is None:
            self.static_batch = Batch([v.clone() for v in batch.views],
                                      None if batch.labels is None else batch.labels.clone())
            self.optimizer.zero_grad(set_to_none=True)  # so the captured backward writes the grads, not adds
            self.replay = self.capture(self._body)
        else:
            self._copy_in(batch)
        self.replay()
        return self.static_out


def cuda_capture(body: Callable[[], None]) -> Callable[[], None]:
    """Record ``body`` (run once, on the GPU, as a capture: nothing executes) into a CUDA graph; return
    its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def resolve_compile(cfg, run: runtime.Run) -> bool:
    """model.compile: none = on a GPU yes, on the CPU no."""
    on = cfg.model.compile
    return run.device.type == "cuda" if on is None else bool(on)


def graphs_unsupported(cfg, run: runtime.Run, task: Task) -> str | None:
    """Why the step cannot be one CUDA graph here (None: it can)."""
    if run.device.type != "cuda":
        return "CUDA graphs need a GPU"
    if run.world > 1:
        return "under torchrun (DDP's collectives are not captured here)"
    if cfg.optim.grad_accum != 1:
        return "with gradient accumulation"
    if cfg.optim.optimizer != "lars":
        return f"with optim.optimizer={cfg.optim.optimizer} (only LARS is capturable here)"
    if task.after_step is not None:
        return "with the memory queue (its EMA update runs between steps)"
    if run.dtype == torch.float16:
        return "with fp16 (loss scaling syncs with the host); use bf16"
    return None


def wrap_model(model: nn.Module, cfg, run: runtime.Run, compiled: bool) -> tuple[nn.Module, nn.Module]:
    """(model on the device: channels_last, global BN; the forward to call: DDP and/or torch.compile)."""
    model = model.to(run.device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.sync_bn and run.world > 1:
        model = convert_sync_bn(model)  # global BN: statistics over all ranks' images, as in the paper
    forward = model
    if run.world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            broadcast_buffers=False)
    if compiled:
        forward = torch.compile(forward)
    return model, forward


class Trainer:
    """``Trainer(prog, cfg, run, task, loader).fit()`` trains; ``finish(summary, message)`` writes the
    ``done`` record and prints the message."""

    def __init__(self, prog: str, cfg, run: runtime.Run, task: Task, loader, typed_cfg=None):
        self.prog, self.cfg, self.run, self.task, self.loader = prog, cfg, run, task, loader
        # What checkpoints record as the run's options: the config as typed, when ``cfg`` was derived from
        # it (finetune's min_steps stretch), so that a resume with the same command compares equal.
        self.typed_config = C.to_dict(typed_cfg if typed_cfg is not None else cfg)
        o = cfg.optim
        self.steps_per_epoch = len(loader) // o.grad_accum
        if self.steps_per_epoch == 0:
            raise UserError(f"fewer images than one global batch of {o.global_batch_size}: "
                            f"lower optim.global_batch_size")
        # The schedule spans optim.epochs; run.max_steps only cuts the run short (a run resumed with a
        # larger max_steps continues the same trajectory: max_steps is bookkeeping, fastclr.rundir).
        self.schedule_steps = max(1, round(o.epochs * self.steps_per_epoch))
        self.total_steps = self.schedule_steps
        if cfg.run.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.run.max_steps)
        self.warmup_steps = round(o.warmup_epochs * self.steps_per_epoch)
        self.peak_lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, o.global_batch_size, o.lr_scaling)
        self.compiled = resolve_compile(cfg, run)
        self.model, forward = wrap_model(task.model, cfg, run, self.compiled)
        for m in task.state.values():
            m.to(run.device)
        why_not = graphs_unsupported(cfg, run, task)
        self.graphs = cfg.run.cuda_graphs is not False and why_not is None
        asked = cfg.run.cuda_graphs or (cfg.run.cuda_graphs is None and run.device.type == "cuda")
        if why_not is not None and asked:
            dist.print0(f"{prog}: the step runs without a CUDA graph {why_not}")
        # A captured step reads its learning rate from a device tensor, filled in place each step.
        lr = torch.tensor(self.peak_lr, device=run.device) if self.graphs else self.peak_lr
        kw = {"capturable": True} if self.graphs else {}
        if self.compiled and cfg.optim.optimizer == "lars":
            kw["compiled"] = True
        self.optimizer = task.make_optimizer(self.model, lr, **kw)
        self.lr_tensor = lr if self.graphs else None
        step_cls = GraphedStep if self.graphs else TrainStep
        self.step_fn = step_cls(self.model, forward, task.loss_fn, self.optimizer, run.device, run.dtype,
                                o.grad_accum, task.after_step)
        self.ckpts = run.ckpts
        self.step = 0
        self.log = runtime.RunLog(run.out_dir, tensorboard=cfg.run.tensorboard)
        self.bar = None  # the progress bar, while fit() runs
        self.monitor_seconds = 0.0  # spent in the task's monitor (rank 0)

    def lr(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based: the step about to be taken)."""
        return lr_at(step, self.peak_lr, self.warmup_steps, self.schedule_steps)

    # -- checkpoints -----------------------------------------------------------------------------
    def _resume(self) -> None:
        found = self.run.resumed if self.run.resumed is not None else self.ckpts.load_resume()
        if found is None:
            if self.cfg.run.resume == "auto":
                dist.print0(f"{self.prog}: run.resume=auto: no checkpoint in {self.run.out_dir}, "
                            f"starting fresh")
            return
        path, state = found
        if self.task.load_fields is not None:
            self.task.load_fields(str(path), state)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:  # another architecture or optimizer
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} holds another network or optimizer than this run builds ({first}); "
                            f"resume with the options it was made with") from None
        if self.lr_tensor is not None:  # the saved lr (a float, or another tensor) replaces ours: undo
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr_tensor
        self.step_fn.scaler.load_state_dict(state["scaler"])
        for name, m in self.task.state.items():
            if name in state:
                m.load_state_dict(state[name])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        saved = state.get("loader")
        if saved and hasattr(self.loader, "restore"):
            if saved["world"] == self.run.world and saved["states"][self.run.rank] is not None:
                self.loader.restore(saved["states"][self.run.rank])
            else:
                dist.print0(f"{self.prog}: {path} was written by {saved['world']} rank(s), this run has "
                            f"{self.run.world}: the loader's own random state starts afresh (the sample order "
                            f"stays exact)")
        dist.print0(f"{self.prog}: resumed from {path} at step {self.step}")

    def check_finite(self) -> None:
        """Stop (NonFiniteState) when the weights or BN buffers hold a NaN/inf. One host sync; on every
        rank (identical weights), so no rank waits on one that left."""
        bad = ckpt.first_non_finite(self.model.state_dict())
        if bad:
            last = self.ckpts.last
            where = f"last good checkpoint: {last}" if last else "no good checkpoint written yet"
            raise ckpt.NonFiniteState(f"non-finite values in model.{bad} after step {self.step}; stopping "
                                      f"({where}). Lower optim.lr or check the data, then --run.resume=auto")

    def weights_state(self) -> dict[str, Any]:
        """The model and the task's fields: what best.pt-style files hold."""
        fields = self.task.checkpoint_fields() if self.task.checkpoint_fields else {}
        weights = self.model.state_dict()
        if self.task.export_weights is not None:
            weights = self.task.export_weights(weights)
        return {"model": weights, **fields, "step": self.step,
                "epoch": self.step // self.steps_per_epoch, "config": self.typed_config}

    def _loader_states(self) -> dict | None:
        """A loader that keeps random state of its own (DALI's pipeline): every rank's, for exact
        resume (one gather at checkpoint time). None for the others (their streams are seeded)."""
        if not hasattr(self.loader, "state"):
            return None
        mine = self.loader.state()
        states = [mine] if self.run.world == 1 else dist.all_gather_objects(mine)
        return {"world": self.run.world, "states": states}

    def save_checkpoint(self) -> None:
        tensors = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   **{name: m.state_dict() for name, m in self.task.state.items()}}
        loader_states = self._loader_states()
        self.ckpts.save(self.step, lambda: {**self.weights_state(), **tensors, "loader": loader_states,
                                            "scaler": self.step_fn.scaler.state_dict(),
                                            "step_in_epoch": self.step % self.steps_per_epoch,
                                            "rng": ckpt.rng_state()}, tensors)
        dist.barrier()

    def say(self, message: str) -> None:
        """A line for the user (rank 0), above the progress bar while one is shown."""
        if not dist.is_main():
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    # -- the loop --------------------------------------------------------------------------------
    def _log(self, meter, epoch: int, lr: float) -> float:
        """Every log_every steps (and the last): one host sync, a log.jsonl record, the bar's numbers.
        Returns the mean loss since the last record."""
        o = self.cfg.optim
        w = meter.read(self.prog, self.ckpts.last, lambda s: self.lr(s - 1))
        ips = w.steps * o.global_batch_size / w.seconds
        self.log.write(step=self.step, epoch=epoch, loss=round(w.loss, 5),
                       **{k: round(v, 4) for k, v in w.metrics.items()}, lr=lr,
                       images_per_s=round(ips, 1), data_wait=round(w.data_wait, 4),
                       gpu_mem_gb=runtime.gpu_memory_gb(self.run.device))
        shown = {k: f"{v:.2f}" for k, v in list(w.metrics.items())[:1]}
        self.bar.set_postfix(loss=f"{w.loss:.3f}", **shown, lr=f"{lr:.3g}", img_s=f"{ips:.0f}",
                             wait=f"{w.data_wait:.0%}")
        return w.loss

    def _after_step(self) -> bool:
        """The evaluation and checkpoint policy after a step: at the ends of every eval_every-th epoch
        the task's on_epoch_end (after a finite check) and a checkpoint; else a checkpoint every
        ckpt_every steps and at the end. Returns whether the task evaluated."""
        epochs_done, at_epoch_end = divmod(self.step, self.steps_per_epoch)
        t = self.task
        if t.monitor is not None and t.monitor_every > 0 and self.step % t.monitor_every == 0:
            self._monitor()
        periodic = self.step % self.cfg.run.ckpt_every == 0 or self.step == self.total_steps
        if t.on_epoch_end is not None and at_epoch_end == 0 and t.eval_every > 0 and epochs_done % t.eval_every == 0:
            self.check_finite()
            t.on_epoch_end(epochs_done, self.step)
            self.save_checkpoint()  # after every evaluation (best.pt's step is always a checkpoint's)
            return True
        if periodic:
            self.save_checkpoint()
        return False

    def _monitor(self) -> None:
        """The task's monitor on rank 0, its numbers as an ``eval`` record and one line; the others wait."""
        if dist.is_main():
            record = self.task.monitor(self.step)
            self.monitor_seconds += record.get("seconds", 0.0)
            epoch = round(self.step / self.steps_per_epoch, 3)
            self.log.write(event="eval", step=self.step, epoch=epoch, **record)
            self.say(f"{self.prog}: step {self.step} (epoch {epoch:g}): {record.get('metric', 'val')} top-1 "
                     f"{record['top1']:.2f}% ({record.get('seconds', 0.0):.1f} s)")
        dist.barrier()

    def _first_step_done(self, t_step: float) -> None:
        """The first step pays for torch.compile (inductor's disk cache makes later runs cheaper): one
        sync, once, so the log says what compiling cost."""
        if self.run.device.type == "cuda":
            torch.cuda.synchronize(self.run.device)
        self.log.write(event="first_step", step=self.step, compiled=self.compiled, cuda_graph=self.graphs,
                       seconds=round(time.perf_counter() - t_step, 2))

    def fit(self) -> dict[str, Any]:
        cfg, o, run = self.cfg, self.cfg.optim, self.cfg.run
        self._resume()
        dist.print0(f"{self.prog}: {self.run.world} rank(s) on {self.run.device}, "
                    f"{runtime.dtype_name(self.run.dtype)}, "
                    f"global batch {o.global_batch_size} ({self.run.per_rank}/rank x {o.grad_accum} accum), "
                    f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, {o.optimizer} peak lr "
                    f"{self.peak_lr:.4g}, wd {o.weight_decay}, "
                    f"data: {cfg.data.backend} {self.run.train_path}")
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc=self.prog.replace(".py", ""), unit="step",
                        disable=not (dist.is_main() and run.progress), dynamic_ncols=True, mininterval=1.0)
        meter = runtime.StepMeter(self.run.device)  # sums on the device: read (a host sync) every log_every
        self.first_loss = self.final_loss = None
        self.evaluated_at = -1
        timed_first = self.compiled or self.graphs
        self.model.train()
        stop = stopping.current()
        with stop.loop() if stop is not None else contextlib.nullcontext():
            self._loop(stop, meter, timed_first)
            self.bar.close()
            self.bar = None
            if self.task.on_epoch_end is not None and self.evaluated_at != self.step:
                self.check_finite()
                self.task.on_epoch_end(math.ceil(self.step / self.steps_per_epoch), self.step)
                self.save_checkpoint()
        if stop is not None:  # from now on a signal stops the program at once: training is over
            stop.finished, stop.step = True, self.step
            stop.checkpoint = str(self.ckpts.last) if self.ckpts.last else None
            if stop.requested is not None:  # it came while the last checkpoint was written
                raise Stopped(stop.requested, self.step, stop.checkpoint, finished=True)
        return {"step": self.step, "first_loss": self.first_loss, "final_loss": self.final_loss,
                "bad_images_skipped": getattr(self.loader, "num_skipped", 0),
                "checkpoint": str(self.ckpts.last) if self.ckpts.last else None}

    def _stop_now(self, stop, logged: bool) -> bool:
        """Whether to stop after this step: one rank, as soon as a signal came; several, when any rank
        got one, decided together at a log step (the one collective beside the log's own sync)."""
        stop.step = self.step
        stop.checkpoint = str(self.ckpts.last) if self.ckpts.last else None
        if self.run.world == 1:
            return stop.requested is not None
        return logged and dist.any_rank(stop.requested is not None)

    def _loop(self, stop, meter, timed_first: bool) -> None:
        o, run = self.cfg.optim, self.cfg.run
        while self.step < self.total_steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            self.loader.set_epoch(epoch, start_step=skip * o.grad_accum)  # exact position after a resume
            it = iter(self.loader)
            for _ in range(skip, self.steps_per_epoch):
                if self.step >= self.total_steps:
                    break
                lr = self.lr(self.step)
                runtime.set_lr(self.optimizer, lr)
                t_step = time.perf_counter() if timed_first else 0.0
                loss, metrics = self.step_fn(lambda it=it: meter.next_batch(it))
                self.step += 1
                if timed_first:
                    self._first_step_done(t_step)
                    timed_first = False
                meter.add(self.step, loss, **metrics)
                self.bar.update(1)
                if self.step % run.log_every == 0 or self.step == self.total_steps:
                    self.final_loss = self._log(meter, epoch, lr)
                    self.first_loss = self.final_loss if self.first_loss is None else self.first_loss
                if self._after_step():
                    self.evaluated_at = self.step
                if stop is not None and self._stop_now(stop, logged=self.step % run.log_every == 0):
                    if self.ckpts.last is None or ckpt.path_for(self.run.out_dir, self.step) != self.ckpts.last:
                        self.save_checkpoint()
                    self.bar.close()
                    why = stop.requested or "a signal on another rank"
                    self.log.write(event="stopped", signal=why, step=self.step, checkpoint=str(self.ckpts.last))
                    self.log.close()
                    raise Stopped(why, self.step, str(self.ckpts.last))

    def finish(self, summary: dict[str, Any], message: str) -> int:
        """Write the ``done`` record, close the log, print ``message`` with where things are (rank 0)."""
        self.log.write(event="done", **summary)
        self.log.close()
        if dist.is_main():
            head, _, rest = message.partition("\n")  # further lines (the probes) follow the summary line
            tail = f"\n{rest}" if rest else ""
            print(f"{self.prog}: done: {head}; logs and checkpoints in {self.run.out_dir}{tail}", flush=True)
        return 0
