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
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from config import Config, ConfigError, parse_args
from data import DataError, ProbaVDataset, read_norm
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.evaluate import eval_scenes
from utils.runtime import Dist, init_distributed, seed_everything
from utils.trainer import Trainer, TrainingDiverged, describe


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
    train = ProbaVDataset(cfg.data_dir, "train", bands=cfg.band, n_frames=cfg.n_frames, selection=cfg.train_selection,
                          patch_size=cfg.patch_size, min_clear=cfg.min_clear, beta=cfg.beta, seed=cfg.seed,
                          cache_dir=cfg.cache_dir or None, val_fraction=cfg.val_fraction, progress=progress,
                          repeats=cfg.repeats, fill_clouds=cfg.fill_clouds, register=cfg.register,
                          min_frame_clearance=cfg.min_frame_clearance, patches=cfg.patches, augment=cfg.augment,
                          select_fraction=cfg.select_fraction)
    select = eval_scenes(cfg, "select", cfg.band, progress) if cfg.select_fraction > 0 else None
    return train, eval_scenes(cfg, cfg.split, cfg.band, progress), select


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
    """The method: train epoch by epoch, validate every ``val_every`` epochs (keeping ``best.pt``),
    save ``last.pt`` after every epoch; a run stopped by ``max_steps`` is scored where it stopped."""
    seed_everything(cfg.seed)
    prepare_data_dir(cfg, dist)
    train_ds, val_ds, select_ds = datasets(cfg, progress=dist.main)
    norm_file = Path(cfg.data_dir) / "norm.csv"
    norm = read_norm(norm_file) if norm_file.exists() else {}
    trainer = Trainer(cfg, dist, device, ckpt)
    writer = open_run(trainer, train_ds, val_ds)
    p, summary = trainer.progress, None
    try:
        with trainer.catch_interrupt():
            while p.epoch < cfg.epochs and not trainer.out_of_budget():
                if not trainer.train_epoch(train_ds, writer):
                    break  # max_steps or max_minutes reached mid-epoch
                if p.epoch % cfg.val_every == 0 or p.epoch == cfg.epochs:
                    summary = trainer.validate_and_keep(val_ds, norm, writer, select_ds)
                    if dist.main:
                        tqdm.write(f"epoch {p.epoch}: {describe(summary)}")
                trainer.save("last.pt")
            if p.step_in_epoch or summary is None:  # stopped early: score what we have
                summary = trainer.validate_and_keep(val_ds, norm, writer, select_ds)
                trainer.save("last.pt")
    finally:
        if writer is not None:
            writer.close()
    if dist.main:
        report(trainer.run, summary)
    return trainer.run


def open_run(trainer: Trainer, train_ds: ProbaVDataset, val_ds: ProbaVDataset):
    """On rank 0: create the run folder, write ``config.json``, print what is trained on; returns
    the TensorBoard writer (None on other ranks)."""
    cfg, run = trainer.cfg, trainer.run
    if not trainer.dist.main:
        return None
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    from torch.utils.tensorboard import SummaryWriter
    print(f"run folder: {run}\n{len(train_ds)} training samples ({len(train_ds.scenes)} scenes), "
          f"{len(val_ds.scenes)} {cfg.split} scenes, {sum(p.numel() for p in trainer.net.parameters()):,} "
          f"parameters, device {trainer.device}, {trainer.dist.world} process(es)")
    if train_ds.dropped:
        print(f"{len(train_ds.dropped)} training scene(s) left out, no frame clearer than "
              f"min_frame_clearance={cfg.min_frame_clearance}: {', '.join(train_ds.dropped)}")
    return SummaryWriter(str(run))


def report(run: Path, summary: dict) -> None:
    best_file = run / "checkpoints" / ("best.pt" if (run / "checkpoints" / "best.pt").exists() else "last.pt")
    print(f"\nfinished: {describe(summary)}\ncheckpoint: {best_file}\nnext:\n"
          f"  python valid.py --checkpoint={best_file}\n"
          f"  python predict.py --checkpoint={best_file}")

if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
        sys.exit(f"error: {e}")
