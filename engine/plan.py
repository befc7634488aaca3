"""What a training run will do, computed from its config and data without training or writing:
``python train.py --plan``. A recipe is checked against a paper before days are spent on it."""
from __future__ import annotations

import json
import os
from collections import Counter

from data import BANDS, build_dataset

__all__ = ["make_plan", "format_plan"]


def _per_band(ds) -> dict[str, int]:
    counts = Counter(band for band, _ in ds.keys)
    return {band: counts.get(band, 0) for band in BANDS if band in ds.bands}


def _schedule(cfg, steps_per_epoch: int) -> dict:
    """Learning-rate drops, total steps and validations in steps and epochs."""
    per_epoch = max(steps_per_epoch, 1)
    if cfg.lr_unit == "epoch":
        drops = [(m * steps_per_epoch, float(m)) for m in cfg.lr_milestones]
    else:
        drops = [(m, m / per_epoch) for m in cfg.lr_milestones]
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    return {"total_steps": total, "lr_milestones_steps": [int(s) for s, _ in drops],
            "lr_milestones_epochs": [round(e, 2) for _, e in drops],
            "lr_after_each_drop": [float(f"{cfg.lr * cfg.lr_gamma ** (i + 1):.6g}") for i in range(len(drops))],
            "lr_drops_at_fraction": [round(s / total, 3) if total else None for s, _ in drops],
            "validations": len([e for e in range(1, cfg.epochs + 1) if e % cfg.val_every == 0 or e == cfg.epochs])}


def make_plan(cfg, world: int | None = None) -> dict:
    """The run's figures as a JSON-able dict: scenes per split and band (and those left out, with
    why), samples and steps per epoch, total steps, the learning-rate schedule in steps and epochs,
    the validation cadence and what ``best.pt`` is chosen on. Reads the data (and the decode cache,
    which it never writes). ``world``: processes (default: ``WORLD_SIZE``, else 1)."""
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    train = build_dataset(cfg, "train", training=True, progress=False, cache_write=False)
    val = build_dataset(cfg, cfg.split, progress=False, cache_write=False)
    holdout = build_dataset(cfg, "holdout", progress=False, cache_write=False) if cfg.holdout_fraction > 0 else None
    per_step = cfg.batch_size * world * cfg.accum_steps
    steps = len(train) // per_step
    why = f"no frame clearer than min_frame_clearance={cfg.min_frame_clearance}"
    chooser = holdout if holdout is not None else val
    metric = "Kelvin score (mean of norm.csv / cPSNR)" if cfg.best_metric == "score" else "mean cPSNR"
    return {
        "preset": cfg.preset, "model": cfg.model, "band": cfg.band,
        "scenes": {"train": _per_band(train), cfg.split: _per_band(val),
                   **({"holdout": _per_band(holdout)} if holdout is not None else {})},
        "dropped": {name: {"scenes": ds.dropped, "why": why} for name, ds in
                    (("train", train), (cfg.split, val), ("holdout", holdout)) if ds is not None and ds.dropped},
        "patches": cfg.patches, "samples_per_epoch": len(train), "batch_per_step": per_step,
        "steps_per_epoch": steps, "epochs": cfg.epochs, **_schedule(cfg, steps),
        "val_every_epochs": cfg.val_every, "val_split": cfg.split,
        "best_pt_chosen_on": f"{metric} of the {'holdout' if holdout is not None else cfg.split} split "
                             f"({len(chooser.keys)} scenes, bands {'+'.join(chooser.bands)})",
        "scale_fit": (f"then {cfg.scale_fit_epochs} pass(es) over the {len(train.scenes)} full training scenes "
                      f"fitting best.pt's uncertainty (Adam {cfg.scale_fit_lr:g}, the SR frozen)"
                      if cfg.scale_fit_epochs else "none"),
    }


def format_plan(plan: dict) -> str:
    """The plan as lines for a person, the last line the same plan as one JSON object."""
    scenes = "; ".join(f"{split}: " + ", ".join(f"{b} {n}" for b, n in bands.items())
                       for split, bands in plan["scenes"].items())
    lines = [f"plan for preset {plan['preset']} ({plan['model']}, band {plan['band']})",
             f"scenes: {scenes}"]
    for split, d in plan["dropped"].items():
        lines.append(f"left out of {split}: {len(d['scenes'])} scene(s), {d['why']}: {', '.join(d['scenes'])}")
    lines += [f"samples per epoch: {plan['samples_per_epoch']} ({plan['patches']} patches), "
              f"{plan['batch_per_step']} per step: {plan['steps_per_epoch']} steps per epoch",
              f"epochs: {plan['epochs']}, total steps: {plan['total_steps']}",
              "learning-rate drops: " + (", ".join(
                  f"step {s} (epoch {e}, " + (f"{f:.0%} of training) to {lr:.3g}" if f is not None and f <= 1
                                              else "after the last step: never reached)")
                  for s, e, f, lr in zip(plan["lr_milestones_steps"], plan["lr_milestones_epochs"],
                                         plan["lr_drops_at_fraction"], plan["lr_after_each_drop"], strict=True))
                                       or "none"),
              f"validation: every {plan['val_every_epochs']} epoch(s) on the {plan['val_split']} split "
              f"({plan['validations']} in all)",
              f"best.pt: {plan['best_pt_chosen_on']}",
              f"scale fit: {plan['scale_fit']}",
              json.dumps(plan, separators=(",", ":"))]
    return "\n".join(lines)
