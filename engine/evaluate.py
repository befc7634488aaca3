"""Batched inference and scoring on full scenes, shared by train.py, valid.py and predict.py."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models import spec_of
from utils.metrics import cpsnr, cssim, has_clear, kelvin_score
from utils.runtime import autocast

__all__ = ["super_resolve", "iterate", "evaluate", "summarize", "make_panel", "to_uint16"]


def _dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = x.flip(-1) if flip else x
    return torch.rot90(x, k, (-2, -1))


def _undo_dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, -k, (-2, -1))
    return x.flip(-1) if flip else x


@torch.no_grad()
def super_resolve(model: nn.Module, lr: torch.Tensor, lr_mask: torch.Tensor, amp: str = "off",
                  ensemble: bool = False, alphas: torch.Tensor | None = None, roll_frames: bool = False) -> dict:
    """SR of ``lr (B,T,h,w)`` in [0,1] with masks ``lr_mask`` and padding flags ``alphas (B,T)`` (None:
    all frames real) -> ``{"sr": (B,1,3h,3w) float32 in [0,1]}`` (+ ``"log_scale"`` for models with
    uncertainty). The SR is clipped to [0,1], or goes through the authors' own output step where
    the model's spec has one (``spec.postprocess``, e.g. TR-MISR's).

    ``ensemble`` averages the 8 flips/rotations of the input, each mapped back. With
    ``roll_frames`` (a model trained on shuffled frames: ``frame_order="shuffled"``) a model that
    depends on the frame order (QA-Net) also sees the frames in another cyclic order per
    transform; one trained on a fixed order keeps it, as does a model whose order is part of its
    input (``spec.frame_order_contract`` "sequence": clearest first, padding last). A x3 upscaling commutes exactly with
    these transforms of the pixel grid.
    """
    device = lr.device
    spec = spec_of(model)
    transforms = [(k, f) for f in (False, True) for k in range(4)] if ensemble else [(0, False)]
    alphas = alphas if alphas is not None else lr.new_ones(lr.shape[:2])
    acc: dict[str, torch.Tensor] = {}
    for i, (k, f) in enumerate(transforms):
        x, m, a = _dihedral(lr, k, f), _dihedral(lr_mask, k, f), alphas
        if ensemble and roll_frames and spec.frame_order_contract == "positional":
            shift = i % lr.shape[1]
            x, m, a = x.roll(shift, 1), m.roll(shift, 1), a.roll(shift, 1)
        with autocast(device, amp):
            out = model.super_resolve(x, m, a)
        for key, val in out.items():
            val = _undo_dihedral(val.float(), k, f)
            acc[key] = acc[key] + val if key in acc else val
    out = {key: val / len(transforms) for key, val in acc.items()}
    out["sr"] = spec.postprocess(out["sr"]) if spec.postprocess is not None else out["sr"].clamp(0.0, 1.0)
    return out


def iterate(model: nn.Module, dataset, device: torch.device, amp: str = "off", batch_size: int = 4,
            ensemble: bool = False, indices: Iterable[int] | None = None, progress: bool = True,
            desc: str = "super-resolving") -> Iterable[tuple[dict, dict]]:
    """Yield ``(batch, output)`` over full scenes, the batch on ``device``. The self-ensemble
    (``ensemble``) also rolls the frames where the dataset feeds them shuffled (``frame_order``),
    the order the model was trained on (see :func:`super_resolve`)."""
    roll_frames = getattr(dataset, "frame_order", None) == "shuffled"
    ds = Subset(dataset, list(indices)) if indices is not None else dataset
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0,
                        pin_memory=device.type == "cuda")
    model.eval()
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        yield batch, super_resolve(model, batch["lr"], batch["lr_mask"], amp, ensemble, batch.get("alphas"),
                                   roll_frames)


def evaluate(model: nn.Module, dataset, device: torch.device, norm: dict[str, float] | None = None,
             amp: str = "off", batch_size: int = 4, ensemble: bool = False,
             indices: Iterable[int] | None = None, progress: bool = True,
             on_batch: Callable[[dict, dict], None] | None = None) -> list[dict]:
    """Score every scene of ``dataset`` (which must have HR).

    Returns one record per scene: ``scene, band, cpsnr, cssim, norm, score, skipped`` (``skipped``
    True, with NaN metrics, where the status map has no clear pixel in any window). ``score`` is
    ``norm / cpsnr`` (NaN when the scene is not in ``norm``).
    """
    records = []
    for batch, out in iterate(model, dataset, device, amp, batch_size, ensemble, indices, progress,
                              desc="validating"):
        if on_batch is not None:
            on_batch(batch, out)
        sr, hr, mask = out["sr"], batch["hr"], batch["hr_mask"]
        ok = has_clear(mask)
        psnr = cpsnr(sr, hr, mask).double().cpu()
        ss = cssim(sr, hr, mask).double().cpu()
        for i, name in enumerate(batch["name"]):
            n = (norm or {}).get(name, float("nan"))
            p = float(psnr[i]) if bool(ok[i]) else float("nan")
            records.append({"scene": name, "band": batch["band"][i], "cpsnr": p,
                            "cssim": float(ss[i]) if bool(ok[i]) else float("nan"), "norm": n,
                            "score": n / p, "skipped": not bool(ok[i])})  # NaN where either is
    return records


def _mean(xs: list[float]) -> float:
    """The mean of the values that are not NaN (NaN for none)."""
    return float(np.nanmean(xs)) if xs else float("nan")


def summarize(records: list[dict]) -> dict:
    """Per band and overall: mean cPSNR, cSSIM, Kelvin score (mean of norm/cPSNR), the gain over the
    ESA baseline and counts.

    ``{"NIR": {...}, "RED": {...}, "all": {"cpsnr", "cssim", "score", "gain", "wins", "losses", "n",
    "skipped": [names]}}``: ``gain`` is the mean of cPSNR minus the ESA baseline's cPSNR (``norm.csv``)
    in dB over the scenes norm.csv has, ``wins``/``losses`` the scenes above/below it (NaN and 0
    without norm.csv); skipped scenes are listed, never averaged.
    """
    out = {}
    groups = sorted({r["band"] for r in records})
    for key in groups + ["all"]:
        rs = [r for r in records if key == "all" or r["band"] == key]
        kept = [r for r in rs if not r["skipped"]]
        psnr = torch.tensor([r["cpsnr"] for r in kept], dtype=torch.float64)
        norm = torch.tensor([r["norm"] for r in kept], dtype=torch.float64)
        gains = [r["cpsnr"] - r["norm"] for r in kept if not math.isnan(r["norm"])]
        out[key] = {"cpsnr": _mean([r["cpsnr"] for r in kept]), "cssim": _mean([r["cssim"] for r in kept]),
                    "score": float(kelvin_score(psnr, norm)) if kept else float("nan"),
                    "gain": _mean(gains), "wins": sum(g > 0 for g in gains), "losses": sum(g < 0 for g in gains),
                    "n": len(kept), "skipped": [r["scene"] for r in rs if r["skipped"]]}
    return out


def describe_gain(s: dict) -> str:
    """One band's gain over the ESA baseline as researchers read it: ``+0.83 dB over the ESA baseline
    (9 wins, 1 loss)``; "" without norm.csv."""
    if math.isnan(s["gain"]):
        return ""
    w, l_ = s["wins"], s["losses"]
    return (f"{s['gain']:+.3f} dB over the ESA baseline ({w} win{'s' * (w != 1)}, "
            f"{l_} loss{'es' * (l_ != 1)})")


def to_uint16(sr: torch.Tensor) -> np.ndarray:
    """An SR image in [0,1] (``(H,W)`` or ``(1,H,W)``) as the competition's uint16 array."""
    x = sr.detach().float().cpu().reshape(sr.shape[-2:]).clamp(0, 1).numpy()
    return np.round(x * 65535.0).astype(np.uint16)


def _stretch(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)


def make_panel(lr: np.ndarray, baseline: np.ndarray, sr: np.ndarray, hr: np.ndarray, hr_mask: np.ndarray,
               log_scale: np.ndarray | None = None, gap: int = 4) -> np.ndarray:
    """A uint8 ``(H, n*W + gaps)`` strip: clearest LR frame (nearest x3), ESA baseline, SR, HR,
    absolute brightness-corrected error (black 0, white 0.05), and the uncertainty ``exp(log_scale)``.

    Images are ``(H,W)`` floats in [0,1] (``lr`` ``(h,w)``); all but the error and uncertainty share
    the contrast stretch of the HR's clear pixels (1st-99th percentile), clouds shown white.
    """
    H, W = hr.shape
    scale = H // lr.shape[0]
    clear = hr_mask > 0.5
    ref = hr[clear] if clear.any() else hr.ravel()
    lo, hi = np.percentile(ref, 1), np.percentile(ref, 99)
    bias = float((hr - sr)[clear].mean()) if clear.any() else 0.0
    err = np.abs(hr - sr - bias)
    err[~clear] = 0.0
    tiles = [_stretch(np.kron(lr, np.ones((scale, scale))), lo, hi), _stretch(baseline, lo, hi),
             _stretch(sr, lo, hi), _stretch(np.where(clear, hr, hi), lo, hi), _stretch(err, 0.0, 0.05)]
    if log_scale is not None:
        sig = np.exp(log_scale)
        tiles.append(_stretch(sig, 0.0, float(np.percentile(sig, 99))))
    out = np.full((H, len(tiles) * (W + gap) - gap), 255, np.uint8)
    for i, t in enumerate(tiles):
        out[:, i * (W + gap):i * (W + gap) + W] = t
    return out

