"""Train a registered model (QA-Net, PIUnet, ...) on PROBA-V scenes.

    python train.py --preset=demo                       # synthetic scenes, CPU, minutes
    python train.py --preset=qanet --data_dir=/data/probav --plan   # what a run would do, nothing written
    python train.py --preset=qanet --data_dir=/data/probav --band=NIR
    torchrun --nproc_per_node=4 train.py --preset=piunet --data_dir=/data/probav

Writes a run folder (``out_dir``): ``config.json``, ``checkpoints/last.pt`` and ``best.pt`` (the best
score of the scenes that choose: the holdout split, else the validation split; see
``engine.keeper``), TensorBoard events and ``images/`` (comparison panels). ``--resume`` continues
the run in ``out_dir`` exactly where ``last.pt`` left it. Options: ``config.py``.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from config import CommandLine, Config, ConfigError, parse_command
from data import DataError, ProbaVDataset, build_dataset, norm_of
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.keeper import CheckpointKeeper
from engine.layout import RunFolder
from engine.plan import format_plan, make_plan
from engine.scale_fit import fit_best_scale
from engine.trainer import Trainer, TrainingDiverged, check_placement
from engine.validation import describe
from models import spec_of
from utils.files import EventWriter, FolderInUse, WriteError, atomic_write_text, folder_lock, sweep_temporaries
from utils.runtime import Dist, init_distributed, seed_everything

INTERRUPTED = 130  # the exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it


def prepare_data_dir(cfg: Config, dist: Dist) -> None:
    """Generate the synthetic scenes of ``synthetic=true`` configs on first use."""
    root = Path(cfg.data_dir)
    if cfg.synthetic and not root.exists():
        if dist.main:
            from data.synthetic import generate
            print(f"generating synthetic scenes in {root} (first run only)")
            generate(root)
        dist.barrier()


def datasets(cfg: Config, progress: bool) -> tuple[ProbaVDataset, ProbaVDataset, ProbaVDataset | None]:
    """Training patches, the full validation scenes, and the full scenes that choose ``best.pt``
    (None: the validation scenes choose)."""
    train = build_dataset(cfg, "train", training=True, progress=progress)
    holdout = build_dataset(cfg, "holdout", progress=progress) if cfg.holdout_fraction > 0 else None
    return train, build_dataset(cfg, cfg.split, progress=progress), holdout


def run_folder(cfg: Config) -> Path:
    """The run folder: ``out_dir``, or for a new run without one ``results/<preset>-<band>-<time>``."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    if cfg.resume:
        raise ConfigError("--resume needs the run folder: --out_dir=results/<run>")
    return Path("results") / f"{cfg.preset}-{cfg.band}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_config(command: CommandLine, run: Path) -> tuple[Config, dict | None]:
    """The run's config and, with ``--resume``, the checkpoint to continue from."""
    cfg = command.config if command.config.out_dir else command.config.replace(out_dir=str(run))
    last = RunFolder(run).last
    if not cfg.resume:
        if last.exists():
            raise ConfigError(f"{last} exists: continue that run with --resume, or choose another --out_dir")
        return check_scale_fit(cfg), None
    ckpt = load_checkpoint(last)
    base = Config.from_dict(ckpt["config"])
    # the run's own config, changed only where the command line says so (e.g. more epochs)
    cfg = command.onto(base, resume=True, out_dir=cfg.out_dir)
    if cfg.model != base.model or cfg.model_args != base.model_args:
        raise ConfigError("--resume cannot change the model; start a new run with --checkpoint instead")
    return check_scale_fit(cfg), ckpt


def check_scale_fit(cfg: Config) -> Config:
    """``cfg``, or a ConfigError where ``scale_fit_epochs`` asks to fit a model without uncertainty
    (checked on the run's own model: with --resume, the checkpoint's)."""
    if cfg.scale_fit_epochs and not spec_of(cfg.model).uncertainty:
        raise ConfigError(f"scale_fit_epochs={cfg.scale_fit_epochs}: {cfg.model} has no uncertainty output to fit")
    return cfg


def main(argv: list[str] | None = None) -> Path:
    """Train as the command line (``sys.argv[1:]`` when None) says; returns the run folder. A run
    stopped by Ctrl-C saves ``last.pt`` and ends the process with status 130. The run folder is
    locked for the whole run (by rank 0): a second run into it is refused (:class:`FolderInUse`).
    ``--plan`` prints what the run would do and returns, without locking or writing anything."""
    command = parse_command(argv)
    run = run_folder(command.config)
    if not spec_of(command.config.model).trainable:
        raise ConfigError(f"{command.config.model} has nothing to train; score it with python valid.py "
                          f"--model={command.config.model}")
    if command.config.plan:
        cfg, _ = resolve_config(command, run)
        print(format_plan(make_plan(cfg)))
        return run
    with folder_lock(run) if Dist.from_env().main else nullcontext():
        cfg, ckpt = resolve_config(command, run)
        dist, device = init_distributed(cfg.device)
        check_placement(cfg, dist, device)
        try:
            run, keeper = _train(cfg, ckpt, dist, device)
        finally:
            if dist.enabled:
                torch.distributed.destroy_process_group()
    if keeper.interrupted:
        raise SystemExit(INTERRUPTED)
    return run


def _train(cfg: Config, ckpt: dict | None, dist: Dist, device: torch.device) -> tuple[Path, CheckpointKeeper]:
    """The method: train epoch by epoch, validate every ``val_every`` epochs (keeping ``best.pt``),
    save ``last.pt`` after every epoch; a run stopped by its budget is scored where it stopped, one
    stopped by Ctrl-C only saved."""
    seed_everything(cfg.seed)
    prepare_data_dir(cfg, dist)
    train_ds, val_ds, holdout_ds = datasets(cfg, progress=dist.main)
    norm = norm_of(cfg.data_dir)
    trainer = Trainer(cfg, dist, device, ckpt)
    keeper = CheckpointKeeper(trainer.run, cfg.max_steps, cfg.max_minutes, main=dist.main, metric=cfg.best_metric)
    p, summary = trainer.progress, None

    def validate_and_keep(scheduled: bool = False) -> dict:
        summary, chooser = trainer.validate(val_ds, norm, writer, holdout_ds)
        keeper.consider(chooser, trainer)
        if scheduled:  # only the every-val_every validations move a plateau schedule: resuming stays exact
            trainer.schedule_on(chooser)
        return summary

    # a write that cannot complete (a full disk) ends the run saying which last.pt is intact
    with keeper.explain_write_errors(), open_run(trainer, train_ds, val_ds) as writer, keeper.catch_interrupt():
        while p.epoch < cfg.epochs and not keeper.should_stop(p.step):
            if not trainer.train_epoch(train_ds, writer, keeper):
                break  # stopped mid-epoch: Ctrl-C, max_steps or max_minutes
            if p.epoch % cfg.val_every == 0 or p.epoch == cfg.epochs:
                summary = validate_and_keep(scheduled=True)
                if dist.main:
                    tqdm.write(f"epoch {p.epoch}: {describe(summary)}")
            keeper.save_last(trainer)
        if keeper.interrupted:
            keeper.save_last(trainer)
            if dist.main:
                print(f"\ninterrupted: saved {keeper.last} (epoch {p.epoch + 1}, step {p.step}); "
                      f"continue with: python train.py --out_dir={trainer.run} --resume")
            return trainer.run, keeper
        if p.step_in_epoch or summary is None:  # stopped early: save, then score what we have
            keeper.save_last(trainer)
            summary = validate_and_keep()
            keeper.save_last(trainer)
    if cfg.scale_fit_epochs:
        fit_final_scale(cfg, keeper.best, dist, device)
    if dist.main:
        report(trainer.run, summary)
    return trainer.run, keeper


def fit_final_scale(cfg: Config, best: Path, dist: Dist, device: torch.device) -> None:
    """Fit the last layers of ``best.pt``'s uncertainty on the full training scenes
    (:mod:`engine.scale_fit`), on rank 0 while the others wait; log the loss of each pass. Ctrl-C
    leaves ``best.pt`` as trained, and ``--resume`` of the run fits it."""
    if dist.main:
        try:
            record = fit_best_scale(cfg, best, device)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {best} is kept as trained, its scale not fitted; fit it with: "
                  f"python train.py --out_dir={cfg.out_dir} --resume")
            raise SystemExit(INTERRUPTED) from None
        if record is not None:
            with EventWriter(cfg.out_dir) as writer:
                for i, loss in enumerate(record["loss"]):
                    writer.add_scalar("scale_fit/loss", loss, i + 1)
            print(f"scale fitted on {record['scenes']} full training scenes ({record['epochs']} passes, Adam "
                  f"{record['lr']:g}): Laplace loss {record['loss'][0]:.4f} -> {record['loss'][-1]:.4f}; {best}")
    dist.barrier()


def open_run(trainer: Trainer, train_ds: ProbaVDataset, val_ds: ProbaVDataset):
    """On rank 0: create the run folder, clear it of temporary files a killed run left, write
    ``config.json``, print what is trained on; returns the TensorBoard writer as a context manager
    (an :class:`utils.files.EventWriter`; on other ranks one that gives None)."""
    cfg, run = trainer.cfg, trainer.run
    if not trainer.dist.main:
        return nullcontext()
    folders = RunFolder(run)
    for folder in (run, folders.checkpoints, folders.images):
        sweep_temporaries(folder)
    atomic_write_text(folders.config, json.dumps(cfg.to_dict(), indent=2) + "\n")
    print(f"run folder: {run}\n{len(train_ds)} training samples ({len(train_ds.scenes)} scenes), "
          f"{len(val_ds.scenes)} {cfg.split} scenes, {sum(p.numel() for p in trainer.net.parameters()):,} "
          f"parameters, device {trainer.device}, {trainer.dist.world} process(es)")
    for split, ds in (("training", train_ds), (cfg.split, val_ds)):
        if ds.dropped:
            print(f"{len(ds.dropped)} {split} scene(s) left out, no frame clearer than "
                  f"min_frame_clearance={cfg.min_frame_clearance}: {', '.join(ds.dropped)}")
    return EventWriter(run)


def report(run: Path, summary: dict) -> None:
    folders = RunFolder(run)
    best_file = folders.best if folders.best.exists() else folders.last
    print(f"\nfinished: {describe(summary)}\ncheckpoint: {best_file}\nnext:\n"
          f"  python valid.py --checkpoint={best_file}\n"
          f"  python predict.py --checkpoint={best_file}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, CheckpointError, TrainingDiverged, WriteError, FolderInUse) as e:
        sys.exit(f"error: {e}")
