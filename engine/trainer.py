"""One training run: the network and its optimiser state, one optimisation step, one epoch, and
validation. ``train.py`` drives a :class:`Trainer` epoch by epoch, with a
:class:`engine.keeper.CheckpointKeeper` that writes the checkpoints and says when to stop::

    trainer = Trainer(cfg, dist, device, ckpt)                 # build, restore, wrap
    keeper = CheckpointKeeper(run, cfg.max_steps, cfg.max_minutes)
    while trainer.progress.epoch < cfg.epochs and not keeper.should_stop(trainer.progress.step):
        if not trainer.train_epoch(train_ds, writer, keeper):  # steps, logging; False: stopped midway
            break
        summary, chooser = trainer.validate(val_ds, norm, writer, holdout_ds)  # every val_every epochs
        keeper.consider(chooser, trainer)                      # best.pt
        keeper.save_last(trainer)                              # last.pt

Each method says in its docstring which part of the run's state it changes.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import Config, ConfigError
from data import ProbaVDataset
from data.sampler import StepBatchSampler
from models import build_model, model_kwargs, request_channels_last, spec_of
from utils.losses import LOSSES, compute_loss, run_losses
from utils.runtime import (
    Dist,
    autocast,
    check_amp,
    cuda_graphed,
    load_scaler_state,
    make_optimizer,
    make_scaler,
    rng_state,
    set_rng_state,
)

from .checkpoint import load_initial_weights
from .keeper import CheckpointKeeper, rank_value
from .validation import validate

__all__ = ["Trainer", "Progress", "SuperResolveForward", "TrainingDiverged", "build_network", "check_placement",
           "wrap", "parameter_groups", "make_scheduler"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class SuperResolveForward(nn.Module):
    """``forward(lr, lr_mask, alphas=None) -> dict``: the common interface as a forward, for DDP and compile."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, lr: torch.Tensor, lr_mask: torch.Tensor, alphas: torch.Tensor | None = None) -> dict:
        return self.module.super_resolve(lr, lr_mask, alphas)


@dataclass
class Progress:
    """Where a run stands; a checkpoint stores it and ``--resume`` restores it."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps
    step_in_epoch: int = 0  # steps done in the current epoch (non-zero only when stopped mid-epoch)
    best: float = math.inf  # best rank_value of a validation so far (lower is better)


def build_network(cfg: Config, dist: Dist, device: torch.device) -> nn.Module:
    """The model of ``cfg`` on ``device``: initial weights from ``cfg.checkpoint`` when given,
    SyncBatchNorm across CUDA processes, channels-last features when ``cfg.channels_last``."""
    kwargs = model_kwargs(cfg.model, cfg.model_args, cfg.n_frames)
    net = build_model(cfg.model, **kwargs)
    if cfg.checkpoint:
        load_initial_weights(net, cfg.checkpoint, cfg.model, kwargs)
    if dist.enabled and device.type == "cuda":
        # BatchNorm statistics over the global batch; gloo (CPU) has no SyncBatchNorm, where each
        # process normalises its own micro-batch (as gradient accumulation does on one process)
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device)
    if cfg.channels_last:
        request_channels_last(net)
    return net


def check_placement(cfg: Config, dist: Dist, device: torch.device) -> None:
    """The rules of the config that depend on where the run lands (the device ``auto`` resolved to,
    torchrun's processes), checked once when the device is open, before any data loads.

    Raises:
        ConfigError: CUDA graphs outside one CUDA process, fp16 without CUDA.
    """
    if cfg.cuda_graphs and (device.type != "cuda" or dist.enabled):
        raise ConfigError("cuda_graphs=true needs a single CUDA process (not CPU, not torchrun); "
                          "drop --cuda_graphs or use --amp/--compile instead")
    try:
        check_amp(cfg.amp, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def wrap(net: nn.Module, cfg: Config, dist: Dist, device: torch.device) -> nn.Module:
    """``net`` behind the common ``forward(lr, lr_mask, alphas)``, in DDP across processes and compiled
    when ``cfg.compile``. CUDA graphs are captured later, at the first batch (:meth:`Trainer.train_step`)."""
    model: nn.Module = SuperResolveForward(net)
    if dist.enabled:
        # an uncertainty head gets no gradient from the losses that ignore it (registered L1)
        losses = run_losses(cfg.loss, cfg.warmup_loss, cfg.warmup_epochs)
        unused = spec_of(net).uncertainty and not all(LOSSES[name].uses_uncertainty for name in losses)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=unused)
    if cfg.compile:
        model = torch.compile(model)
    return model


def parameter_groups(net: nn.Module, lr_scale: dict[str, float], lr: float):
    """``net``'s parameters for the optimizer: all of them at the learning rate, or, where the model's
    spec scales the rate of some submodules (``lr_scale``: name -> factor, e.g. TR-MISR's transformer
    at half its encoder's rate), one group of the rest at ``lr`` then one group per named submodule."""
    if not lr_scale:
        return net.parameters()
    named = {name: [p for key, p in net.named_parameters() if key.split(".")[0] == name] for name in lr_scale}
    rest = [p for key, p in net.named_parameters() if key.split(".")[0] not in lr_scale]
    return [{"params": rest, "lr": lr}] + [{"params": ps, "lr": lr * lr_scale[name]} for name, ps in named.items()]


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    """``MultiStepLR`` at ``lr_milestones`` (epochs or steps, ``lr_unit``), or with ``lr_unit=plateau``
    ``ReduceLROnPlateau``: the rates times ``lr_gamma`` after ``lr_patience`` validations in a row
    that did not improve the score (the HighRes-net and MISR-GRU authors' schedule)."""
    if cfg.lr_unit == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_gamma,
                                                          patience=cfg.lr_patience)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.lr_milestones), cfg.lr_gamma)


class Trainer:
    """The state of one training run and the operations that change it.

    Holds the network (``net``, plain) and its training form (``model``: DDP/compile wrappers), the
    optimizer, scheduler and gradient scaler, the moving average of the weights (``ema``, when
    ``cfg.ema > 0``) and the run's :class:`Progress`. A checkpoint in ``ckpt`` (``--resume``)
    restores all of them and the RNG states; :meth:`checkpoint` gives what to save.
    """

    def __init__(self, cfg: Config, dist: Dist, device: torch.device, ckpt: dict | None = None):
        self.cfg, self.dist, self.device = cfg, dist, device
        self.run = Path(cfg.out_dir)
        self.net = build_network(cfg.replace(checkpoint="") if ckpt is not None else cfg, dist, device)
        self.optimizer = make_optimizer(parameter_groups(self.net, spec_of(self.net).lr_scale, cfg.lr), cfg.lr,
                                        cfg.weight_decay, device)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.scaler = make_scaler(device, cfg.amp)
        # an exponential moving average of the weights (and BatchNorm statistics), updated after
        # every optimizer step; validation and checkpoints use it when on
        self.ema = (AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
                    if cfg.ema > 0 else None)
        self.progress = Progress()
        if ckpt is not None:
            self.restore(ckpt)
        self.model = wrap(self.net, cfg, dist, device)
        # CUDA graphs: how the training forward+backward is captured (a stand-in in the CPU tests),
        # captured at the first training batch; None: eager
        self.capture = cuda_graphed if cfg.cuda_graphs else None
        self.graphed: nn.Module | None = None
        self._unreached: dict[str, list[nn.Parameter]] = {}  # loss -> parameters it never reaches

    # --- checkpoints ----------------------------------------------------------------------------------

    def eval_net(self) -> nn.Module:
        """The weights to validate and keep: the moving average when ``ema`` is on."""
        return self.ema.module if self.ema is not None else self.net

    def restore(self, ckpt: dict) -> None:
        """Load weights (and their moving average), optimizer, scheduler, scaler, progress and RNG
        states from a checkpoint."""
        self.net.load_state_dict(ckpt["raw_model"] if self.ema is not None else ckpt["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["model"])
            self.ema.n_averaged.fill_(ckpt["ema_updates"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        load_scaler_state(self.scaler, ckpt["scaler"])  # a run may resume with another --amp
        best = ckpt["best_score"]
        self.progress = Progress(ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"],
                                 math.inf if best is None else best)
        set_rng_state(ckpt["rng"])
        if self.dist.main:
            print(f"resuming {self.run} at epoch {self.progress.epoch}, step {self.progress.step}")

    def checkpoint(self) -> dict:
        """The arguments of :func:`engine.checkpoint.save_checkpoint`: everything :meth:`restore` reads."""
        p = self.progress
        extra = {} if self.ema is None else {"raw_model": self.net.state_dict(),
                                              "ema_updates": int(self.ema.n_averaged)}
        return dict(model=self.eval_net(), optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                    epoch=p.epoch, step=p.step, step_in_epoch=p.step_in_epoch,
                    best_score=None if p.best == math.inf else p.best, config=self.cfg.to_dict(), rng=rng_state(),
                    extra=extra)

    # --- one optimisation step --------------------------------------------------------------------------

    def loss_name(self) -> str:
        """The loss of the current epoch (the warm-up loss for the first ``warmup_epochs``)."""
        cfg = self.cfg
        return cfg.warmup_loss if self.progress.epoch < cfg.warmup_epochs and cfg.warmup_loss else cfg.loss

    def _forward(self, mb: dict) -> dict:
        inputs = (mb["lr"], mb["lr_mask"], mb["alphas"])
        if self.capture is not None and self.graphed is None:
            self.graphed = self.capture(SuperResolveForward(self.net), inputs, self.cfg.amp)
        with autocast(self.device, self.cfg.amp):
            return (self.model if self.graphed is None else self.graphed)(*inputs)

    def unreached(self, loss_name: str, mb: dict) -> list[nn.Parameter]:
        """The parameters that loss ``loss_name`` never reaches (PIUnet's uncertainty head under an L1
        loss), found once per loss by an eager forward and backward on ``mb`` that changes nothing
        (BatchNorm statistics updated on copies). Eager autograd leaves their gradient None, and
        Adam then skips them; a replayed CUDA graph gives them zeros, which Adam would count as
        steps (moving them by weight decay and running their step count on with empty moments)."""
        if loss_name not in self._unreached:
            core = SuperResolveForward(self.net)
            params = dict(core.named_parameters())
            buffers = {k: v.clone() for k, v in core.named_buffers()}
            with autocast(self.device, self.cfg.amp):
                out = torch.func.functional_call(core, (params, buffers), (mb["lr"], mb["lr_mask"], mb["alphas"]))
                loss = compute_loss(loss_name, out, mb["hr"], mb["hr_mask"])
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            self._unreached[loss_name] = [p for p, g in zip(params.values(), grads, strict=True) if g is None]
        return self._unreached[loss_name]

    def _backward(self, mb: dict, a: int) -> torch.Tensor:
        """Forward and backward of micro-batch ``a`` of the step, gradients summed into ``.grad``;
        returns the loss (detached)."""
        cfg = self.cfg
        last = not self.dist.enabled or a == cfg.accum_steps - 1
        with nullcontext() if last else self.model.no_sync():
            loss = compute_loss(self.loss_name(), self._forward(mb), mb["hr"], mb["hr_mask"])
            self.scaler.scale(loss / cfg.accum_steps).backward()
        if self.graphed is not None and a == 0 and cfg.accum_steps > 1:
            # the graphed backward hands autograd its static gradient buffers, which become .grad
            # when .grad is None; the next replay would overwrite them (the sum would read twice
            # the last micro-batch). Own copies make autograd add the next micro-batches in place.
            for p in self.net.parameters():
                if p.grad is not None:
                    p.grad = p.grad.clone()
        return loss.detach()

    def train_step(self, batches: Iterator[dict], keeper: CheckpointKeeper) -> tuple[float, int]:
        """One optimizer step over ``accum_steps`` micro-batches drawn from ``batches``.

        Changes the weights, the optimizer and scaler state, the per-step scheduler and
        ``progress.step``; tells ``keeper`` whether any process was asked to stop (Ctrl-C) or ran
        out of time (all processes agree, in the same collective as the loss).
        Returns the loss averaged over micro-batches and processes, and the samples all processes
        used. Raises :class:`TrainingDiverged` on a non-finite loss, before the weights change.
        """
        cfg, dist = self.cfg, self.dist
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # [loss, stop requested, time up], summed over processes: on the training device, the only
        # one an NCCL process group serves
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        samples = 0
        for a in range(cfg.accum_steps):
            mb = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                  for k, v in next(batches).items()}
            if self.capture is not None:
                unreached = self.unreached(self.loss_name(), mb)
            total[0] += self._backward(mb, a).double() / cfg.accum_steps
            samples += len(mb["name"]) * dist.world
        if self.capture is not None:
            for p in unreached:  # as eager autograd leaves them: Adam skips them
                p.grad = None
        total[1], total[2] = keeper.local_flags()
        total = dist.all_reduce_sum(total)
        mean_loss = float(total[0]) / dist.world
        keeper.agree(bool(total[1] > 0), bool(total[2] > 0))
        if not math.isfinite(mean_loss):
            kept = (f"The last good checkpoint is {keeper.last}." if keeper.last.exists()
                    else "No checkpoint was written yet.")
            raise TrainingDiverged(f"the {self.loss_name()} loss is {mean_loss} at epoch {self.progress.epoch + 1}, "
                                   f"step {self.progress.step + 1}: training stopped. {kept} Try a lower --lr, "
                                   f"--grad_clip, or --amp=off.")
        self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        if cfg.lr_unit == "step":
            self.scheduler.step()
        self.progress.step += 1
        return mean_loss, samples

    # --- one epoch ------------------------------------------------------------------------------------

    def train_epoch(self, train_ds: ProbaVDataset, writer, keeper: CheckpointKeeper) -> bool:
        """Train the current epoch from ``progress.step_in_epoch`` on, logging to ``writer`` (None:
        no logging).

        Returns True when the epoch completed (then ``progress.epoch`` is advanced, the per-epoch
        scheduler stepped and ``step_in_epoch`` reset), False when ``keeper`` said stop midway
        (Ctrl-C, ``max_steps``, ``max_minutes``; ``step_in_epoch`` says where).
        """
        cfg, dist, p = self.cfg, self.dist, self.progress
        train_ds.set_epoch(p.epoch)
        sampler = StepBatchSampler(len(train_ds), cfg.batch_size, dist.world, dist.rank, cfg.accum_steps, cfg.seed,
                                   p.epoch, p.step_in_epoch)
        loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        batches = iter(loader)
        bar = tqdm(range(p.step_in_epoch, sampler.steps), desc=f"epoch {p.epoch + 1}/{cfg.epochs}",
                   disable=not dist.main, leave=False, unit="step")
        logged, t0, seen = [], time.perf_counter(), 0
        for i in bar:
            loss, samples = self.train_step(batches, keeper)
            seen += samples
            logged.append(loss)
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.1f}")
            if writer is not None and p.step % cfg.log_every == 0:
                writer.add_scalar("train/loss", float(np.mean(logged)), p.step)
                writer.add_scalar("train/samples_per_s", rate, p.step)
                writer.add_scalar("lr", self.optimizer.param_groups[0]["lr"], p.step)
                logged = []
            if keeper.should_stop(p.step):
                bar.close()
                p.step_in_epoch = i + 1
                return False
        bar.close()
        p.step_in_epoch = 0
        p.epoch += 1
        if cfg.lr_unit == "epoch":
            self.scheduler.step()
        return True

    # --- validation ---------------------------------------------------------------------------------

    def validate(self, val_ds: ProbaVDataset, norm: dict, writer=None,
                 holdout_ds: ProbaVDataset | None = None) -> tuple[dict, dict]:
        """Score the validation scenes, and the selection scenes when given, with the weights that
        are kept (:meth:`eval_net`). Returns ``(validation summary, summary of the scenes that choose
        best.pt)`` (the same summary when there is no holdout split; see
        :func:`engine.evaluate.summarize`). Changes nothing but the logs."""
        args = (self.cfg, self.dist, self.device, norm, self.progress.epoch, writer, self.run)
        summary = validate(self.eval_net(), val_ds, *args)
        chooser = summary if holdout_ds is None else validate(self.eval_net(), holdout_ds, *args, tag="holdout")
        return summary, chooser

    def schedule_on(self, chooser: dict) -> None:
        """Tell a plateau scheduler (``lr_unit=plateau``) the score of a scheduled validation (see
        :func:`engine.keeper.rank_value`; the scenes that choose best.pt); other schedulers ignore it."""
        if self.cfg.lr_unit == "plateau":
            self.scheduler.step(rank_value(chooser))
