"""Train QA-Net or PIUnet on PROBA-V scenes.

    python train.py --preset=demo                       # synthetic scenes, CPU, minutes
    python train.py --preset=qanet --data_dir=/data/probav --band=NIR
    torchrun --nproc_per_node=4 train.py --preset=piunet --data_dir=/data/probav

Writes a run folder (``out_dir``): ``config.json``, ``checkpoints/last.pt`` and ``best.pt`` (best
validation Kelvin score), TensorBoard events and ``images/`` (comparison panels). ``--resume``
continues the run in ``out_dir`` exactly where ``last.pt`` left it. Options: ``config.py``.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import Config, ConfigError, parse_args
from data import DataError, ProbaVDataset, read_norm
from data.sampler import StepBatchSampler
from models import build_model, esa_baseline, set_channels_last
from utils.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint, unwrap
from utils.evaluate import evaluate, make_panel, summarize
from utils.losses import compute_loss
from utils.runtime import (Dist, autocast, cuda_graphed, init_distributed, make_optimizer, make_scaler,
                           release_freed_memory, rng_state, seed_everything, set_rng_state)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class SRModule(nn.Module):
    """``forward(lr, lr_mask) -> dict``: the common interface as a forward, for DDP and compile."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, lr: torch.Tensor, lr_mask: torch.Tensor) -> dict:
        return self.module.super_resolve(lr, lr_mask)


def prepare_data_dir(cfg: Config, dist: Dist) -> None:
    """Generate the synthetic scenes of ``synthetic=true`` configs on first use."""
    root = Path(cfg.data_dir)
    if cfg.synthetic and not root.exists():
        if dist.main:
            from data.synthetic import generate
            print(f"generating synthetic scenes in {root} (first run only)")
            generate(root)
        dist.barrier()


def datasets(cfg: Config, progress: bool) -> tuple[ProbaVDataset, ProbaVDataset]:
    common = dict(bands=cfg.band, n_frames=cfg.n_frames, cache_dir=cfg.cache_dir or None,
                  val_fraction=cfg.val_fraction, progress=progress, seed=cfg.seed, beta=cfg.beta,
                  fill_clouds=cfg.fill_clouds)
    train = ProbaVDataset(cfg.data_dir, "train", selection=cfg.train_selection, patch_size=cfg.patch_size,
                          min_clear=cfg.min_clear, repeats=cfg.repeats, **common)
    val = ProbaVDataset(cfg.data_dir, cfg.split, selection=cfg.val_selection, **common)
    return train, val


def val_indices(ds: ProbaVDataset, limit: int) -> list[int]:
    """The first ``limit`` scenes of each band (all when 0)."""
    if limit <= 0:
        return list(range(len(ds.scenes)))
    seen: dict[str, int] = {}
    out = []
    for i, s in enumerate(ds.scenes):
        if seen.get(s["band"], 0) < limit:
            seen[s["band"]] = seen.get(s["band"], 0) + 1
            out.append(i)
    return out


def validate(model: nn.Module, ds: ProbaVDataset, cfg: Config, dist: Dist, device: torch.device,
             norm: dict, epoch: int, writer, run: Path | None) -> dict:
    """Score the validation scenes (sharded over the processes, gathered on all) -> summary."""
    indices = val_indices(ds, cfg.val_scenes)
    shown = set(indices[:cfg.n_images])
    panels: list[tuple[str, np.ndarray]] = []
    net = unwrap(model)

    def on_batch(batch: dict, out: dict) -> None:
        for i, idx in enumerate(batch["index"].tolist()):
            if idx in shown:
                s = ds.scenes[idx]
                ls = out["log_scale"][i, 0].cpu().numpy() if "log_scale" in out else None
                panels.append((s["name"], make_panel(
                    s["lr"][int(np.argmax(s["clearance"]))] / 65535.0, esa_baseline(s["lr"], s["qm"]),
                    out["sr"][i, 0].cpu().numpy(), batch["hr"][i, 0].cpu().numpy(),
                    batch["hr_mask"][i, 0].cpu().numpy(), ls)))

    mine = indices[dist.rank::dist.world]
    records = evaluate(net, ds, device, norm, cfg.amp, cfg.val_batch_size, indices=mine,
                       progress=dist.main, on_batch=on_batch if dist.main else None)
    release_freed_memory()  # full-scene blocks are not reused by the training steps
    records = sorted((r for part in dist.all_gather_objects(records) for r in part),
                     key=lambda r: (r["band"], r["scene"]))
    summary = summarize(records)
    if dist.main and writer is not None:
        for band, s in summary.items():
            suffix = "" if band == "all" else f"_{band}"
            for key in ("cpsnr", "cssim", "score"):
                if s[key] == s[key]:
                    writer.add_scalar(f"val/{key}{suffix}", s[key], epoch)
        images = run / "images"
        images.mkdir(exist_ok=True)
        from PIL import Image
        for name, panel in panels:
            Image.fromarray(panel).save(images / f"epoch{epoch:04d}_{name}.png")
            writer.add_image(f"val/{name}", panel, epoch, dataformats="HW")
    return summary


def criterion(summary: dict) -> float:
    """Lower is better: the Kelvin score, or minus the cPSNR where norm.csv lacks the scenes."""
    s = summary["all"]
    return s["score"] if s["score"] == s["score"] else -s["cpsnr"]


def describe(summary: dict) -> str:
    parts = [f"{b}: cPSNR {s['cpsnr']:.3f} dB, cSSIM {s['cssim']:.4f}, score {s['score']:.4f} ({s['n']} scenes)"
             for b, s in summary.items()]
    skipped = summary["all"]["skipped"]
    return "; ".join(parts) + (f"; skipped (no clear HR pixel): {', '.join(skipped)}" if skipped else "")


def explicit_keys(argv: list[str]) -> set[str]:
    return {a[2:].partition("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def resolve_config(argv: list[str]) -> tuple[Config, dict | None]:
    """The run's config and, with ``--resume``, the checkpoint to continue from."""
    cfg = parse_args(argv)
    if not cfg.resume:
        if not cfg.out_dir:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            cfg = cfg.replace(out_dir=str(Path("results") / f"{cfg.preset}-{cfg.band}-{stamp}"))
        last = Path(cfg.out_dir) / "checkpoints" / "last.pt"
        if last.exists():
            raise ConfigError(f"{last} exists: continue that run with --resume, or choose another --out_dir")
        return cfg, None
    if not cfg.out_dir:
        raise ConfigError("--resume needs the run folder: --out_dir=results/<run>")
    ckpt = load_checkpoint(Path(cfg.out_dir) / "checkpoints" / "last.pt")
    base = Config.from_dict(ckpt["config"])
    # the run's own config, changed only where the command line says so (e.g. more epochs)
    overrides = [a for a in argv if not a.startswith("--preset")]
    cfg = parse_args(overrides, base=base).replace(resume=True, out_dir=cfg.out_dir)
    if cfg.model != base.model or cfg.model_args != base.model_args:
        raise ConfigError("--resume cannot change the model; start a new run with --checkpoint instead")
    return cfg, ckpt


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, ckpt = resolve_config(argv)
    if cfg.model == "baseline":
        raise ConfigError("the ESA baseline has nothing to train; score it with python valid.py --model=baseline")
    dist, device = init_distributed(cfg.device)
    try:
        return _train(cfg, ckpt, dist, device)
    finally:
        if dist.enabled:
            torch.distributed.destroy_process_group()


def _train(cfg: Config, ckpt: dict | None, dist: Dist, device: torch.device) -> Path:
    run = Path(cfg.out_dir)
    seed_everything(cfg.seed)
    prepare_data_dir(cfg, dist)
    train_ds, val_ds = datasets(cfg, progress=dist.main)
    norm_file = Path(cfg.data_dir) / "norm.csv"
    norm = read_norm(norm_file) if norm_file.exists() else {}

    net = build_model(cfg.model, **cfg.model_args)
    if ckpt is None and cfg.checkpoint:
        init, _ = model_from_checkpoint(cfg.checkpoint, cfg.model, cfg.model_args)
        if init.registry_name != cfg.model:
            raise ConfigError(f"--checkpoint={cfg.checkpoint} holds a {init.registry_name}, not a {cfg.model}")
        net.load_state_dict(init.state_dict())
    if dist.enabled and device.type == "cuda":
        # BatchNorm statistics over the global batch; gloo (CPU) has no SyncBatchNorm, where each
        # process normalises its own micro-batch (as gradient accumulation does on one process)
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device)
    if cfg.channels_last:
        set_channels_last(net)
    optimizer = make_optimizer(net.parameters(), cfg.lr, cfg.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.lr_milestones), cfg.lr_gamma)
    scaler = make_scaler(device, cfg.amp)
    epoch, step, skip, best = 0, 0, 0, math.inf
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        epoch, step, skip = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
        best = ckpt["best_score"] if ckpt["best_score"] is not None else math.inf
        set_rng_state(ckpt["rng"])
        if dist.main:
            print(f"resuming {run} at epoch {epoch}, step {step}")
    model: nn.Module = SRModule(net)
    if dist.enabled:
        # PIUnet's uncertainty head gets no gradient from the losses that ignore it (registered L1)
        losses = {cfg.loss} | ({cfg.warmup_loss} if cfg.warmup_loss and cfg.warmup_epochs > 0 else set())
        unused = net.has_uncertainty and losses != {"l1u_reg"}
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=unused)
    if cfg.compile:
        model = torch.compile(model)
    if cfg.cuda_graphs and (device.type != "cuda" or dist.enabled):
        raise ConfigError("cuda_graphs=true needs a single CUDA process (not CPU, not torchrun); "
                          "drop --cuda_graphs or use --amp/--compile instead")
    graphed = None  # captured at the first training batch, whose shapes every later batch shares

    writer = None
    if dist.main:
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run))
        print(f"run folder: {run}\n{train_ds.__len__()} training samples ({len(train_ds.scenes)} scenes), "
              f"{len(val_ds.scenes)} {cfg.split} scenes, {sum(p.numel() for p in net.parameters()):,} parameters, "
              f"device {device}, {dist.world} process(es)")

    def save(name: str, epoch_: int, step_in_epoch: int) -> None:
        if dist.main:
            save_checkpoint(run / "checkpoints" / name, model=net, optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, epoch=epoch_, step=step, step_in_epoch=step_in_epoch,
                            best_score=None if best == math.inf else best, config=cfg.to_dict(), rng=rng_state())

    stop = {"requested": False}

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step, save, exit; second: abort
        stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    last_summary, stopped_at = None, None  # stopped_at: steps done in the epoch where max_steps hit
    try:
        while epoch < cfg.epochs and not (cfg.max_steps and step >= cfg.max_steps):
            train_ds.set_epoch(epoch)
            loss_name = cfg.warmup_loss if epoch < cfg.warmup_epochs and cfg.warmup_loss else cfg.loss
            sampler = StepBatchSampler(len(train_ds), cfg.batch_size, dist.world, dist.rank, cfg.accum_steps,
                                       cfg.seed, epoch, skip)
            loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                                pin_memory=device.type == "cuda", persistent_workers=False)
            batches = iter(loader)
            bar = tqdm(range(skip, sampler.steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not dist.main,
                       leave=False, unit="step")
            logged, t0, seen = [], time.perf_counter(), 0
            for i in bar:
                model.train()
                optimizer.zero_grad(set_to_none=True)
                total = torch.zeros(2, dtype=torch.float64)
                for a in range(cfg.accum_steps):
                    mb = next(batches)
                    mb = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in mb.items()}
                    sync = nullcontext() if not dist.enabled or a == cfg.accum_steps - 1 else model.no_sync()
                    if cfg.cuda_graphs and graphed is None:
                        graphed = cuda_graphed(SRModule(net), (mb["lr"], mb["lr_mask"]), cfg.amp)
                    with sync:
                        with autocast(device, cfg.amp):
                            out = (model if graphed is None else graphed)(mb["lr"], mb["lr_mask"])
                        loss = compute_loss(loss_name, out, mb["hr"], mb["hr_mask"])
                        scaler.scale(loss / cfg.accum_steps).backward()
                    total[0] += loss.detach().double().cpu() / cfg.accum_steps
                    seen += len(mb["name"]) * dist.world
                total[1] = float(stop["requested"])
                total = dist.all_reduce_sum(total)
                mean_loss = float(total[0]) / dist.world
                if not math.isfinite(mean_loss):
                    last = run / "checkpoints" / "last.pt"
                    kept = f"The last good checkpoint is {last}." if last.exists() else "No checkpoint was written yet."
                    raise TrainingDiverged(f"the {loss_name} loss is {mean_loss} at epoch {epoch + 1}, step {step + 1}: "
                                           f"training stopped. {kept} Try a lower --lr, --grad_clip, or --amp=off.")
                scaler.unscale_(optimizer)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if cfg.lr_unit == "step":
                    scheduler.step()
                step += 1
                logged.append(mean_loss)
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{rate:.1f}")
                if writer is not None and step % cfg.log_every == 0:
                    writer.add_scalar("train/loss", float(np.mean(logged)), step)
                    writer.add_scalar("train/samples_per_s", rate, step)
                    writer.add_scalar("lr", optimizer.param_groups[0]["lr"], step)
                    logged = []
                if total[1] > 0 or (cfg.max_steps and step >= cfg.max_steps):
                    stopped_at = i + 1
                    save("last.pt", epoch, stopped_at)
                    if total[1] > 0:
                        if dist.main:
                            print(f"\ninterrupted: saved {run / 'checkpoints' / 'last.pt'} (epoch {epoch + 1}, "
                                  f"step {step}); continue with: python train.py --out_dir={run} --resume")
                        raise SystemExit(130)
                    break
            bar.close()
            del batches, loader
            if stopped_at is not None:
                break
            skip = 0
            epoch += 1
            if cfg.lr_unit == "epoch":
                scheduler.step()
            if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
                last_summary = validate(model, val_ds, cfg, dist, device, norm, epoch, writer, run)
                if criterion(last_summary) < best:
                    best = criterion(last_summary)
                    save("best.pt", epoch, 0)
                if dist.main:
                    tqdm.write(f"epoch {epoch}: {describe(last_summary)}")
            save("last.pt", epoch, 0)
        if stopped_at is not None or last_summary is None:  # stopped early: score what we have
            at = stopped_at if stopped_at is not None else skip
            last_summary = validate(model, val_ds, cfg, dist, device, norm, epoch, writer, run)
            if criterion(last_summary) < best:
                best = criterion(last_summary)
                save("best.pt", epoch, at)
            save("last.pt", epoch, at)
    finally:
        signal.signal(signal.SIGINT, old_handler)
        if writer is not None:
            writer.close()
    if dist.main:
        best_file = run / "checkpoints" / ("best.pt" if (run / "checkpoints" / "best.pt").exists() else "last.pt")
        print(f"\nfinished: {describe(last_summary)}\ncheckpoint: {best_file}\nnext:\n"
              f"  python valid.py --checkpoint={best_file}\n"
              f"  python predict.py --checkpoint={best_file}")
    return run


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
        sys.exit(f"error: {e}")
