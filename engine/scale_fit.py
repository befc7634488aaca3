"""A final fit of the uncertainty's last layers on full training scenes, the SR untouched.

Training sees patches (``patch_size`` LR pixels); valid.py and predict.py see full scenes. The SR
does not mind, but the scale's cues do: PIUnet's frame disagreement removes each frame's mean
difference over what it is given, a patch at training and the whole scene after. The weights the
scale learns on patches therefore rank full scenes' errors less well than weights fitted on full
scenes. This fit closes that: after training, the last layers of the scale (the model's
``scale_fit_layers``) are fitted to the registered Laplace loss of ``best.pt``'s own SR on the full
training scenes, everything else frozen (BatchNorm statistics too: the model is in eval mode).
Measured on ``cpu_real`` (3 passes, Adam 1e-2, the 10 held-out scenes, seeds 0-2): Spearman NIR
+0.338/+0.320/+0.352 -> +0.362/+0.343/+0.379, RED unchanged (+0.316/+0.329/+0.319 ->
+0.316/+0.331/+0.319), deciles within 25% of calibration NIR 2/2/3 -> 6/5/9, RED 6/7/7 -> 7/8/8
(BENCHMARKS.md).

``best.pt`` is rewritten (atomically) with the fitted weights and a ``scale_fit`` record; a
``best.pt`` that has one is left alone, so a resumed run that ends without a new best does not fit
twice. ``last.pt``, the training state ``--resume`` continues, is not touched.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from utils.losses import registered_l1_uncertainty
from utils.runtime import atomic_torch_save

from .checkpoint import model_from_checkpoint

__all__ = ["scale_parameters", "fit_scale", "fit_best_scale"]


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's ``scale_fit_layers`` (module names); ValueError for a model
    without them."""
    names = tuple(getattr(model, "scale_fit_layers", ()))
    if not names:
        raise ValueError(f"{type(model).__name__} has no scale_fit_layers: nothing of its uncertainty to fit")
    return [p for name in names for p in model.get_submodule(name).parameters()]


def fit_scale(model: nn.Module, dataset, epochs: int, lr: float, batch_size: int, device: torch.device,
              seed: int = 0, progress: bool = True) -> list[float]:
    """Fit ``scale_parameters(model)`` with Adam (``lr``) to the registered Laplace loss of the
    model's own SR (``utils.losses.registered_l1_uncertainty``, the SR detached) on the full scenes
    of ``dataset`` (items with ``lr``, ``lr_mask``, ``hr``, ``hr_mask``), ``epochs`` passes in an
    order drawn from ``seed``. Every other parameter and buffer is left as it was; the model is
    returned to eval mode. Returns the mean loss of each pass."""
    params = scale_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # as they were: restored at the end
    for p in trainable:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.eval()  # BatchNorm reads its running statistics and leaves them as they are
    optimizer = torch.optim.Adam(params, lr)
    order = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for epoch in range(epochs):
            perm = torch.randperm(len(dataset), generator=order).tolist()
            batches = [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
            total = 0.0
            for idx in tqdm(batches, desc=f"fitting the scale ({epoch + 1}/{epochs})", disable=not progress,
                            leave=False, unit="batch"):
                items = [dataset[i] for i in idx]
                b = {k: torch.stack([s[k] for s in items]).to(device) for k in ("lr", "lr_mask", "hr", "hr_mask")}
                out = model.super_resolve(b["lr"], b["lr_mask"])
                loss = registered_l1_uncertainty(out["sr"].detach(), out["log_scale"], b["hr"], b["hr_mask"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            losses.append(total / len(dataset))
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return losses


def fit_best_scale(cfg, best: Path, device: torch.device, progress: bool = True) -> dict | None:
    """Fit the scale of checkpoint ``best`` on the full training scenes of ``cfg`` and rewrite it;
    returns the record written (``epochs``, ``lr``, ``scenes``, ``loss`` per pass), or None where
    there was nothing to do (no such file, or a checkpoint already fitted)."""
    from data import build_dataset

    if not best.is_file():
        return None
    model, ckpt = model_from_checkpoint(best)
    if ckpt.get("scale_fit"):
        return None
    model.to(device)
    scenes = build_dataset(cfg, "train", progress=progress)
    losses = fit_scale(model, scenes, cfg.scale_fit_epochs, cfg.scale_fit_lr, cfg.val_batch_size, device,
                       cfg.seed, progress)
    record = {"epochs": cfg.scale_fit_epochs, "lr": cfg.scale_fit_lr, "scenes": len(scenes), "loss": losses}
    ckpt["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt["scale_fit"] = record
    ckpt["uncertainty_trained"] = True  # its scale now follows the error, whatever the training loss was
    atomic_torch_save(ckpt, best)
    return record
