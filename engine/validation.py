"""Validation during training: score the scenes of a split with the weights that are kept, sharded
over the processes and gathered on all, and log the means, comparison panels and PIUnet's
uncertainty figures to TensorBoard (rank 0)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from config import Config
from data import ProbaVDataset
from models import esa_baseline, spec_of
from utils.files import atomic_path
from utils.runtime import Dist, release_freed_memory
from utils.uncertainty import UncertaintyReport, reliability_image

from .checkpoint import unwrap
from .evaluate import describe_gain, evaluate, make_panel, summarize
from .layout import RunFolder

__all__ = ["validate", "describe", "val_indices"]


def val_indices(ds: ProbaVDataset, limit: int) -> list[int]:
    """The first ``limit`` scenes of each band (all when 0)."""
    if limit <= 0:
        return list(range(len(ds.keys)))
    seen: dict[str, int] = {}
    out = []
    for i, (band, _) in enumerate(ds.keys):
        if seen.get(band, 0) < limit:
            seen[band] = seen.get(band, 0) + 1
            out.append(i)
    return out


def _panel(batch: dict, out: dict, i: int) -> np.ndarray:
    """The comparison panel of sample ``i`` of an evaluation batch, from what the batch holds: the
    clearest of its frames, the ESA baseline of its frames, the SR, HR, error and uncertainty."""
    lr, qm = batch["lr"][i].cpu().numpy(), batch["lr_mask"][i].cpu().numpy() > 0.5
    ls = out["log_scale"][i, 0].cpu().numpy() if "log_scale" in out else None
    return make_panel(lr[int(np.argmax(qm.mean((1, 2))))], esa_baseline(lr, qm), out["sr"][i, 0].cpu().numpy(),
                      batch["hr"][i, 0].cpu().numpy(), batch["hr_mask"][i, 0].cpu().numpy(), ls)


def validate(model: nn.Module, ds: ProbaVDataset, cfg: Config, dist: Dist, device: torch.device,
             norm: dict, epoch: int, writer, run: Path | None, tag: str = "val") -> dict:
    """Score the scenes of ``ds`` (sharded over the processes, gathered on all) -> summary; on
    rank 0 also log the means to ``writer`` under ``tag/`` and, for ``tag="val"``, write
    comparison panels to ``run/images``."""
    indices = val_indices(ds, cfg.val_scenes)
    shown = set(indices[:cfg.n_images]) if tag == "val" else set()
    panels: list[tuple[str, np.ndarray]] = []
    # the predicted scale against the error (rank 0's share of the scenes under torchrun)
    uncertainty = UncertaintyReport() if tag == "val" and spec_of(unwrap(model)).uncertainty else None

    def on_batch(batch: dict, out: dict) -> None:
        if uncertainty is not None:
            uncertainty.add_batch(batch["name"], batch["band"], out["sr"], out["log_scale"], batch["hr"],
                                  batch["hr_mask"])
        for i, idx in enumerate(batch["index"].tolist()):
            if idx in shown:
                panels.append((batch["name"][i], _panel(batch, out, i)))

    mine = indices[dist.rank::dist.world]
    records = evaluate(unwrap(model), ds, device, norm, cfg.amp, cfg.val_batch_size, indices=mine,
                       progress=dist.main, on_batch=on_batch if dist.main else None)
    release_freed_memory()  # full-scene blocks are not reused by the training steps
    records = sorted((r for part in dist.all_gather_objects(records) for r in part),
                     key=lambda r: (r["band"], r["scene"]))
    summary = summarize(records)
    if dist.main and writer is not None:
        _log_validation(summary, panels, epoch, writer, run, tag)
        if uncertainty is not None and uncertainty.bands():
            figures = uncertainty.to_dict()
            writer.add_image(f"{tag}/reliability", reliability_image(figures), epoch, dataformats="HWC")
            rho = figures["bands"]["all"]["spearman_mean"]
            writer.add_scalar(f"{tag}/uncertainty_spearman", float("nan") if rho is None else rho, epoch)
    return summary


def _log_validation(summary: dict, panels: list[tuple[str, np.ndarray]], epoch: int, writer, run: Path,
                    tag: str) -> None:
    from PIL import Image

    for band, s in summary.items():
        suffix = "" if band == "all" else f"_{band}"
        for key in ("cpsnr", "cssim", "score"):
            if not math.isnan(s[key]):
                writer.add_scalar(f"{tag}/{key}{suffix}", s[key], epoch)
    for name, panel in panels:
        with atomic_path(RunFolder(run).images / f"epoch{epoch:04d}_{name}.png") as tmp:  # WriteError on a full disk
            Image.fromarray(panel).save(tmp, format="PNG")
        writer.add_image(f"val/{name}", panel, epoch, dataformats="HW")


def describe(summary: dict) -> str:
    """The summary in one line a researcher reads: per band the gain over the ESA baseline in dB with
    wins and losses (where norm.csv has the scenes), then cPSNR, cSSIM and the Kelvin score."""
    parts = [f"{b}: " + (f"{describe_gain(s)}; " if describe_gain(s) else "")
             + f"cPSNR {s['cpsnr']:.3f} dB, cSSIM {s['cssim']:.4f}, score {s['score']:.4f} ({s['n']} scenes)"
             for b, s in summary.items()]
    skipped = summary["all"]["skipped"]
    return "; ".join(parts) + (f"; skipped (no clear HR pixel): {', '.join(skipped)}" if skipped else "")
